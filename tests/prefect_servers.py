"""Real Prefect processes for tests: `prefect server start` and `prefect worker start`.

Each server binds 127.0.0.1 on a free port, with its own PREFECT_HOME and database (SQLite
in that home unless a `database_url` is given, e.g. PostgreSQL), and writes its console to
a log file the test can read (`error_lines`). The scheduler loop is shortened so that a
test sees scheduled runs within seconds. Processes run in their own session and are
stopped by process group (the worker's flow-run subprocesses with it), never by name.

    with prefect_server(tmp_path / "prefect") as server:
        server.cli("work-pool", "create", "pool", "--type", "process")
        with prefect_worker(server, "pool"):
            ...
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from stack.settings import free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
# Prefect's default scheduler loop is 60 s; the recently-deployed loop runs every 5 s.
SCHEDULER_LOOP_SECONDS = 2
# A log line at ERROR or CRITICAL level (Prefect's and uvicorn's formats), or a traceback.
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|^Traceback \(most recent call last\)")


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any PREFECT_* setting, plus `settings`, and this
    checkout first on PYTHONPATH so subprocesses import its code."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **settings}
    return env


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR_LINE.search(line)]


def wait_healthy(process: "LoggedProcess", health_url: str, timeout: float) -> None:
    """Poll `health_url` until it answers 200; fail with the log's tail if the process exits
    or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running():
            raise RuntimeError(f"{process.process.args[0]} exited {process.process.returncode}:\n{process.log()[-4000:]}")
        try:
            if httpx.get(health_url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{health_url} not healthy after {timeout:.0f} s:\n{process.log()[-4000:]}")


@dataclass
class LoggedProcess:
    """A subprocess in its own session, its stdout and stderr in `log_path`."""

    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO) -> "LoggedProcess":
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        return cls(process, log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def descendants(self) -> list[tuple[int, str]]:
        """(pid, start time) of every process this one started, and theirs: a worker's flow
        runs have sessions of their own, so signalling the group does not reach them."""
        found, pending = [], [self.process.pid]
        while pending:
            for children in Path(f"/proc/{pending.pop()}/task").glob("*/children"):
                try:
                    kids = [int(kid) for kid in children.read_text().split()]
                except OSError:  # it ended meanwhile
                    continue
                found += [(kid, _start_time(kid)) for kid in kids]
                pending += kids
        return found

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM to the process group and every descendant; SIGKILL to what is left after
        `timeout` seconds. A pid is signalled only while it is still the process we started."""
        descendants = self.descendants()
        for send in (signal.SIGTERM, signal.SIGKILL):
            if self.running():
                os.killpg(self.process.pid, send)
            for pid, started in descendants:
                if _start_time(pid) == started:
                    with suppress(ProcessLookupError):  # it ended just now
                        os.kill(pid, send)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            if not self.running() and not any(_start_time(pid) == started for pid, started in descendants):
                return


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), None once it is gone: with the pid,
    it names one process, never a later one given the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class PrefectServer(LoggedProcess):
    port: int = 0
    home: Path = Path()
    client_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The UI's address."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A Prefect client of this server in this process (the process's settings restored after)."""
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    def cli(self, *args: str, cwd: Path = REPO, timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess:
        """`prefect ARGS` against this server, as an operator would type it; output captured."""
        wide = self.client_env | {"COLUMNS": "250"}  # rich tables cut names at the terminal's width
        result = subprocess.run([PREFECT, *args], env=wide, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result


@contextmanager
def prefect_server(home: Path, database_url: str | None = None, startup_timeout: float = 180,
                   **settings: str) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port; `settings` are extra PREFECT_* variables."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_environment(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS=str(SCHEDULER_LOOP_SECONDS),
        # The UI asks the API at these; `--port` alone leaves it asking 127.0.0.1:4200.
        PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
        **settings)
    process = LoggedProcess.start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                   env, home / "server.log")
    client_env = clean_environment(PREFECT_HOME=str(home / "client"),
                                   PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    server = PrefectServer(process.process, process.log_path, port=port, home=home, client_env=client_env)
    try:
        wait_healthy(server, f"{server.api_url}/health", startup_timeout)
        yield server
    finally:
        server.stop()


@contextmanager
def prefect_worker(server: PrefectServer, pool: str, cwd: Path = REPO, **settings: str
                   ) -> Iterator[LoggedProcess]:
    """`prefect worker start --pool POOL` (a process pool, created if missing) for `server`,
    polling every 2 s; its flow runs are subprocesses that inherit its environment."""
    # One heartbeat at start, then every 15 minutes (not 30 s): on SQLite, Prefect 3.8.8 records
    # a heartbeat by reading the work pool, then writing, in one deferred transaction, which
    # fails at once with "database is locked" (logged at ERROR) when another write (a flow
    # run's logs, states, events) lands in between (PrefectHQ/prefect#16299). Harmless, the
    # next one lands, but an error line all the same: a test's flow runs finish before the
    # first periodic heartbeat. The worker stays online (three missed heartbeats: 45 minutes).
    env = server.client_env | {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_HEARTBEAT_SECONDS": "900",
                               **settings}
    worker = LoggedProcess.start([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env,
                                  server.home / f"worker-{pool}.log", cwd=cwd)
    try:
        yield worker
    finally:
        worker.stop()
