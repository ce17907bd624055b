"""Inference speed: PyTorch vs ONNX Runtime per image and per batch, and the service under load.

Run (one benchmark at a time on shared machines):
    flock /tmp/medxfer-bench.lock python -m benchmarks.inference [--load-seconds 30] [--soak-seconds 120]

Part 1 times one forward pass of a ResNet-18 classifier at batch 1, 8 and 32 for
every path this machine has: PyTorch eager (the baseline, same run), ONNX Runtime
CPU fp32 and int8, and where a CUDA GPU is present PyTorch CUDA eager and
torch.compile, ONNX Runtime CUDA, TensorRT and fp16, plus the GPU's measured
matmul capacity expressed as ResNet-18 images/s. Weights are random (speed does
not depend on them); the input is a real DICOM image (pydicom-data CT_small)
through the project's preprocessing.

Part 2 starts the real service (python -m serve) on 127.0.0.1 with that model
as champion in a temporary MLflow store, drives it with a bounded asyncio load
generator at 1, 8 and 32 concurrent clients posting real images of seven sizes
(pydicom-data DICOMs from 64x64 MR to a 1955x1841 CR, and a BreastMNIST PNG), and
reports requests/s, p50/p99 latency, errors, how many images shared a network call,
and the server's RSS sampled every second, averaged over each 30 s of a level: a
single sample swings by +-150 MiB with the batches in flight, so a plateau or a
steady climb shows in the window means, not in first vs last.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from configs import ModelConfig, PipelineConfig, TaskKind
from models.resnet import build_model
from sample_data.breastmnist import BUNDLED_NPZ
from tasks.export import (CPU_PROVIDER, CUDA_PROVIDER, INPUT_NAME, TRT_PROVIDER, ServingHead, export_onnx,
                          export_self_contained, gpu_available, serving_metadata)
from tasks.decode import load_grey
from tasks.transforms import PreprocessSpec
from tasks.register import register_model, tracking_run
from tasks.variants import half_precision, quantise_network

BATCHES = (1, 8, 32)
RESNET18_GFLOP = 2 * 1.81  # per 224x224 image: torchvision's 1.81 G multiply-adds, 2 FLOPs each
REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}; "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}")


def time_calls(call: Callable[[], object], budget_s: float, min_calls: int = 5) -> np.ndarray:
    """Seconds per call: two warm-up calls, then calls until the budget (at least `min_calls`)."""
    call(), call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return np.array(times)


def row(path: str, batch: int, times: np.ndarray, baseline_ms: float | None) -> str:
    p50, p99 = np.percentile(times, 50) * 1000, np.percentile(times, 99) * 1000
    speedup = f"{baseline_ms / p50:.2f}x" if baseline_ms else "-"
    return f"| {path} | {batch} | {p50:.1f} | {p99:.1f} | {batch / times.mean():.1f} | {speedup} | {len(times)} |"


def ort_runner(path: Path, providers: list[str], inputs: np.ndarray, input_name: str = INPUT_NAME):
    session = ort.InferenceSession(str(path), providers=providers)
    if session.get_providers()[0] != providers[0]:
        return None  # the provider did not load; do not report CPU numbers under its name
    return lambda: session.run(None, {input_name: inputs})


def torch_runner(model: torch.nn.Module, inputs: np.ndarray, device: str, compile_: bool = False):
    module = torch.compile(model.to(device)) if compile_ else model.to(device)
    x = torch.from_numpy(inputs).to(device)

    @torch.inference_mode()
    def call():
        out = module(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def gpu_capacity_images_per_s() -> float:
    """The GPU's measured fp16 matmul rate, as ResNet-18 images/s (an upper bound)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    times = time_calls(lambda: (a @ a, torch.cuda.synchronize()), budget_s=2.0)
    tflops = 2 * 8192**3 / np.median(times) / 1e12
    return tflops * 1e3 / RESNET18_GFLOP


def random_champion(work: Path) -> tuple[torch.nn.Module, Path, Path]:
    """A seeded random-weights ResNet-18 classifier exported as the pipeline exports it (speed,
    memory and fault handling do not depend on the weights): the model, its normalised graph
    and its self-contained file, in `work`."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), TaskKind.CLASSIFICATION, 2)[0].eval()
    metadata = serving_metadata(task=TaskKind.CLASSIFICATION, label_names=["benign", "malignant"],
                                positive_index=1, operating_threshold=None, spec=PreprocessSpec(), metrics={},
                                training_data="none", weights_name="none", weights_sha256="none",
                                model_name="bench")
    normalised = export_onnx(model, TaskKind.CLASSIFICATION, work / "model_normalised.onnx", 224, 18, metadata)
    return model, normalised, export_self_contained(normalised, work / "model.onnx", metadata)


def model_benchmarks(work: Path, budget_s: float) -> tuple[list[str], Path, torch.nn.Module]:
    model, normalised, full = random_champion(work)
    int8 = quantise_network(normalised, work / "model_int8_normalised.onnx")
    grey = load_grey(get_testdata_file("CT_small.dcm"))[0]
    spec = PreprocessSpec()
    image = spec.normalise(torch.from_numpy(spec.to_uint8(grey)[0])).numpy()
    serving = ServingHead(model, TaskKind.CLASSIFICATION).eval()

    lines = ["| path | batch | p50 ms | p99 ms | images/s | vs PyTorch eager CPU (p50) | calls |",
             "|---|---|---|---|---|---|---|"]
    for batch in BATCHES:
        inputs = np.repeat(image, batch, axis=0)
        baseline = time_calls(torch_runner(serving, inputs, "cpu"), budget_s)
        base_ms = np.percentile(baseline, 50) * 1000
        lines.append(row("PyTorch eager, CPU fp32 (baseline)", batch, baseline, None))
        lines.append(row("ONNX Runtime CPU fp32", batch,
                         time_calls(ort_runner(normalised, [CPU_PROVIDER], inputs), budget_s), base_ms))
        lines.append(row("ONNX Runtime CPU int8 (dynamic)", batch,
                         time_calls(ort_runner(int8, [CPU_PROVIDER], inputs), budget_s), base_ms))
        greys = np.repeat(grey[None, None], batch, axis=0)
        lines.append(row(f"ONNX Runtime CPU fp32, self-contained ({grey.shape[0]}x{grey.shape[1]} grey in)",
                         batch, time_calls(ort_runner(full, [CPU_PROVIDER], greys, "grey"), budget_s), base_ms))
        if gpu_available():
            lines += gpu_rows(serving, normalised, work, inputs, batch, budget_s, base_ms)
    if gpu_available():
        lines.append(f"\nGPU capacity (fp16 matmul) as ResNet-18 images/s: {gpu_capacity_images_per_s():.0f}")
    else:
        lines.append("\nGPU paths (PyTorch CUDA eager and torch.compile, ONNX Runtime CUDA, TensorRT, "
                     "fp16): not measured, this machine has no CUDA GPU.")
    return lines, full, model


def gpu_rows(serving, normalised: Path, work: Path, inputs: np.ndarray, batch: int, budget_s: float,
             base_ms: float) -> list[str]:
    fp16 = work / "model_fp16_normalised.onnx"
    if not fp16.exists():
        onnx.save_model(half_precision(normalised), fp16)
    runners = {
        "PyTorch eager, CUDA fp32": torch_runner(serving, inputs, "cuda"),
        "torch.compile, CUDA fp32": torch_runner(serving, inputs, "cuda", compile_=True),
        "ONNX Runtime CUDA fp32": ort_runner(normalised, [CUDA_PROVIDER, CPU_PROVIDER], inputs),
        "ONNX Runtime TensorRT fp32": ort_runner(normalised, [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER], inputs),
        "ONNX Runtime CUDA fp16": ort_runner(fp16, [CUDA_PROVIDER, CPU_PROVIDER], inputs),
    }
    lines = []
    for name, runner in runners.items():
        if runner is None:
            lines.append(f"| {name} | {batch} | provider not available | | | | |")
        else:
            lines.append(row(name, batch, time_calls(runner, budget_s), base_ms))
    return lines


# ---------------------------------------------------------------------------
# The service under load


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_service(work: Path, onnx_path: Path, model: torch.nn.Module) -> tuple[subprocess.Popen, str]:
    raw = {"name": "bench", "output_dir": str(work / "out"),
           "data": {"root": str(work), "manifest": str(work / "m.csv"), "task": "classification",
                    "label_names": ["benign", "malignant"]},
           "registry": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "model_name": "bench"},
           "serve": {"host": "127.0.0.1", "port": free_port(), "max_batch": 16, "batch_window_ms": 5}}
    config = PipelineConfig.model_validate(raw)
    with tracking_run(config, "bench") as run_id:
        mlflow.log_metric("test_roc_auc", 0.5)
        register_model(config, run_id, model, onnx_path, "roc_auc", True, torch.zeros(1, 3, 224, 224))
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    env = os.environ | {"MEDXFER_API_KEY": ""}
    process = subprocess.Popen([sys.executable, "-m", "serve", str(config_path)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{raw['serve']['port']}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the service did not become ready")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Real images of seven sizes, as clients would send them: pydicom-data DICOMs (MR, CT,
# JPEG 2000 ultrasound and MR, a tall strip, a full-size CR) and a BreastMNIST PNG.
LOAD_DICOMS = ("MR_small.dcm", "CT_small.dcm", "US1_J2KR.dcm", "JPEG2000.dcm", "MR2_J2KR.dcm", "RG1_UNCR.dcm")
RSS_WINDOW_S = 30  # the server's RSS is reported as the mean of each window of this many seconds


def load_bodies() -> list[tuple[bytes, str]]:
    png = io.BytesIO()
    Image.fromarray(np.load(BUNDLED_NPZ)["test_images"][0]).save(png, "PNG")
    return ([(Path(get_testdata_file(name)).read_bytes(), "application/dicom") for name in LOAD_DICOMS]
            + [(png.getvalue(), "image/png")])


async def drive(url: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float, pid: int) -> dict:
    """`clients` concurrent loops for `seconds` (a closed, bounded load), each cycling
    through `bodies` from its own starting point so that concurrent requests differ in size."""
    latencies: list[float] = []
    errors = 0
    rss: list[float] = []  # one sample per second from the start
    stop_at = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, first: int) -> None:
        nonlocal errors
        sent = first
        while time.perf_counter() < stop_at:
            body, content_type = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/predict", content=body,
                                           headers={"Content-Type": content_type})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0) if ok else None
            errors += not ok

    async def sample_memory() -> None:
        while time.perf_counter() < stop_at:
            rss.append(rss_mib(pid))
            await asyncio.sleep(1.0)
        rss.append(rss_mib(pid))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(sample_memory(), *(client(http, i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    windows = [float(np.mean(rss[start:start + RSS_WINDOW_S])) for start in range(0, len(rss) - 1, RSS_WINDOW_S)]
    return {"clients": clients, "seconds": seconds, "requests": len(latencies), "errors": errors,
            "rps": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "rss_first": rss[0], "rss_windows": windows,
            "rss_last": rss[-1], "rss_max": max(rss)}


def load_benchmarks(work: Path, onnx_path: Path, model: torch.nn.Module,
                    levels: list[tuple[int, float]]) -> list[str]:
    """The service under each (clients, seconds) level in turn, one server process throughout."""
    process, url = start_service(work, onnx_path, model)
    bodies = load_bodies()
    lines = ["| clients | seconds | requests | errors | requests/s | p50 ms | p99 ms | images per network call "
             "| server RSS MiB: first sample; mean of each 30 s; last sample; max |",
             "|---|---|---|---|---|---|---|---|---|"]
    try:
        asyncio.run(drive(url, bodies, 1, 3, process.pid))  # warm-up, not reported
        for clients, seconds in levels:
            before = httpx.get(f"{url}/readyz").json()
            r = asyncio.run(drive(url, bodies, clients, seconds, process.pid))
            after = httpx.get(f"{url}/readyz").json()
            calls = after["network_calls"] - before["network_calls"]
            per_call = r["requests"] / calls if calls else float("nan")
            windows = ", ".join(f"{v:.0f}" for v in r["rss_windows"])
            lines.append(f"| {clients} | {seconds:.0f} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                         f"{r['p50']:.0f} | {r['p99']:.0f} | {per_call:.2f} | {r['rss_first']:.0f}; {windows}; "
                         f"{r['rss_last']:.0f}; {r['rss_max']:.0f} |")
        ready = httpx.get(f"{url}/readyz").json()
        lines.append(f"\nProvider {ready['model']['provider']}; over the whole run {ready['batches']} batches, "
                     f"{ready['network_calls']} network calls, mean batch size {ready['mean_batch_size']}.")
    finally:
        process.terminate()
        process.wait(timeout=30)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=4.0, help="timing budget per path and batch")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="seconds at 1 and at 8 clients")
    parser.add_argument("--soak-seconds", type=float, default=120.0,
                        help="seconds at 32 clients: the issue's 2-minute run for memory growth")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    with tempfile.TemporaryDirectory(prefix="medxfer-bench-") as tmp:
        work = Path(tmp)
        lines, full, model = model_benchmarks(work, args.budget_seconds)
        print("\n".join(lines), flush=True)
        if not args.skip_load:
            print("\nService under load (python -m serve on 127.0.0.1, real images of seven sizes):\n")
            levels = [(1, args.load_seconds), (8, args.load_seconds), (32, args.soak_seconds)]
            print("\n".join(load_benchmarks(work, full, model, levels)))


if __name__ == "__main__":
    main()
