"""Load on the production stack: a burst of flow runs queued at once on the PostgreSQL-backed
Prefect server, and the UI's runs page timed in a real browser while they run.

    flock -x /tmp/medxfer-bench.lock .venv/bin/python -m benchmarks.stack_load [--runs 20]

Starts the stack (`stack.host`, without the inference service) on free loopback ports in a
temporary home, deploys the training flow to its work pool, and queues `--runs` flow runs of
a small config (BreastMNIST from sample_data, `--per-split` images per split, one epoch of a
random ResNet-18) at once; the worker runs `--worker-limit` at a time. Meanwhile chromium
(Debian's, through Playwright) logs in to the Prefect UI and loads the runs page every
`--ui-every` seconds, timed from navigation to the first row of runs on screen. Prints every
figure with the machine, and fails (exit 1) unless every run completed, no log says the
database was locked, and every page load took under 2 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from benchmarks.machine import machine
from flows.pipeline import train_pipeline
from sample_data.breastmnist import write_breastmnist_dicom
from stack.host import ORDER, Stack
from stack.processes import children_by_parent
from stack.settings import REPO, WORKER_LIMIT_ENV, StackSettings, ephemeral_environment

UI_BUDGET_S = 2.0
LOCKED = re.compile(r"database is locked|could not obtain lock|deadlock detected", re.IGNORECASE)
SERVERS = tuple(name for name in ORDER if name != "service")


def small_config(home: Path, per_split: int) -> Path:
    data = home / "data"
    write_breastmnist_dicom(data, per_split=per_split)
    raw = yaml.safe_load((REPO / "configs" / "breast_ultrasound.yaml").read_text())
    raw.update(name="stack_load", output_dir=str(home / "outputs"))
    raw["data"].update(root=str(data), manifest=str(data / "manifest.csv"), min_usable_per_class=2)
    raw["preprocess"].update(cache_dir=str(home / "cache"), workers=1)
    raw["model"].update(weights="none")  # a random backbone trains fully: one epoch
    raw["train"] = {"epochs": 1}
    raw["evaluate"] = {"bootstrap_samples": 100, "gradcam_images": 0}
    raw["export"] = {"int8": False, "fp16": False, "parity_samples": 4}
    raw["registry"]["model_name"] = "stack-load"
    path = home / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of these processes and all their descendants, in MB: shared
    libraries (torch's, in every flow run) counted once across them, not once per process."""
    children = children_by_parent()
    total, todo = 0, list(pids)
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += int(next(line for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                              if line.startswith("Pss:")).split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError, StopIteration):
            pass
    return total / 1024


class UiTimer:
    """Chromium on the Prefect UI: log in once, then time the runs page until stopped."""

    def __init__(self, ui_url: str, auth_string: str, every_s: float, screenshot: Path):
        self.ui_url, self.auth_string, self.every_s, self.screenshot = ui_url, auth_string, every_s, screenshot
        self.load_seconds: list[float] = []
        self.api_seconds: list[float] = []  # per load: the slowest API answer the page waited for
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        from playwright.sync_api import sync_playwright
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                     args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{self.ui_url}/runs")
                page.locator("input[type=password]").fill(self.auth_string)  # the UI's login page
                page.keyboard.press("Enter")
                page.locator("input[type=password]").wait_for(state="detached", timeout=60_000)
                answers: list = []
                page.on("requestfinished", lambda request: answers.append(request) if "/api/" in request.url else None)
                while not self._stop.is_set():
                    answers.clear()
                    started = time.perf_counter()
                    page.goto(f"{self.ui_url}/runs")
                    page.locator(".flow-run-list-item").first.wait_for(state="visible", timeout=60_000)
                    self.load_seconds.append(time.perf_counter() - started)
                    timings = [request.timing for request in answers]
                    self.api_seconds.append(max((t["responseEnd"] - t["requestStart"]) / 1000 for t in timings)
                                            if timings else 0.0)
                    page.screenshot(path=str(self.screenshot))
                    self._stop.wait(self.every_s)
                browser.close()
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--per-split", type=int, default=10, help="BreastMNIST images per split")
    parser.add_argument("--worker-limit", type=int, default=2)
    parser.add_argument("--ui-every", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds for the whole burst")
    parser.add_argument("--keep", type=Path, help="keep the stack's home (logs) here")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    started_load = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="medxfer-load-"))
    config = small_config(home, args.per_split)
    env = ephemeral_environment(home) | {WORKER_LIMIT_ENV: str(args.worker_limit)}
    stack = Stack(StackSettings.from_environment(env))
    settings = stack.settings
    started = time.perf_counter()
    try:
        stack.up(SERVERS)
        print(f"stack up in {time.perf_counter() - started:.0f} s")
        client_env = settings.client_environment()
        os.environ.update(client_env)
        with temporary_settings({PREFECT_API_URL: client_env["PREFECT_API_URL"],
                                 PREFECT_API_AUTH_STRING: client_env["PREFECT_API_AUTH_STRING"]}):
            deployment_id = train_pipeline.from_source(str(REPO), "flows/pipeline.py:train_pipeline").deploy(
                name="load", work_pool_name=settings.work_pool, tags=["medxfer", "load"],
                parameters={"config_path": str(config)}, build=False, push=False)
            timer = UiTimer(settings.url("prefect-server"), client_env["PREFECT_API_AUTH_STRING"], args.ui_every,
                            home / "logs" / "runs_page.png")  # kept with the logs by --keep
            queued_at = time.perf_counter()
            runs = [run_deployment("train-pipeline/load", timeout=0) for _ in range(args.runs)]
            print(f"{len(runs)} flow runs queued in {time.perf_counter() - queued_at:.1f} s")
            timer.start()
            peak_pss = 0.0
            with get_client(sync_client=True) as client:
                while True:
                    states = [run.state for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))]
                    pids = [stack.processes.pid(name) for name in SERVERS]
                    peak_pss = max(peak_pss, pss_mb([pid for pid in pids if pid]))
                    if all(state.is_final() for state in states) or time.perf_counter() - queued_at > args.timeout:
                        break
                    time.sleep(5)
                burst_s = time.perf_counter() - queued_at
                final = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
            timer.stop()
        counts: dict[str, int] = {}
        for run in final:
            counts[run.state.name] = counts.get(run.state.name, 0) + 1
        durations = [run.total_run_time.total_seconds() for run in final if run.state.is_completed()]
        logs = "\n".join(path.read_text(errors="replace") for path in (home / "logs").glob("*.log"))
        locked = [line for line in logs.splitlines() if LOCKED.search(line)]
        loads = timer.load_seconds
        print(f"burst: {args.runs} runs, worker limit {args.worker_limit}, {burst_s:.0f} s until all were final; "
              f"states {counts}")
        if durations:
            print(f"run time per completed run: median {statistics.median(durations):.1f} s, "
                  f"max {max(durations):.1f} s")
        print(f"peak memory (PSS) of the stack's servers and flow runs: {peak_pss:.0f} MB")
        print(f"lock errors in the servers' and worker's logs: {len(locked)}")
        if loads:
            print(f"UI runs page: {len(loads)} loads, median {statistics.median(loads):.2f} s, "
                  f"max {max(loads):.2f} s (budget {UI_BUDGET_S} s); slowest API answer per load: median "
                  f"{statistics.median(timer.api_seconds):.2f} s, max {max(timer.api_seconds):.2f} s")
        if timer.error:
            print(f"UI timer failed: {type(timer.error).__name__}: {timer.error}")
        print(f"load average (1 min) at start {started_load[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
        ok = (counts.get("Completed", 0) == args.runs and not locked and loads and not timer.error
              and max(loads) < UI_BUDGET_S)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        stack.down(SERVERS)
        if args.keep:
            shutil.copytree(home / "logs", args.keep, dirs_exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
