"""The inference service's memory under concurrent maximum-size requests (issue 10).

Run (it measures memory: alone on the machine):
    flock -x /tmp/medxfer-bench.lock env PYTHONPATH=$PWD .venv/bin/python -m benchmarks.serve_memory \
        [--clients 1 2 4] [--seconds 20]
A smoke run (checks that it works, figures not kept): --clients 1 --seconds 2.

Starts the real service (python -m serve, default `serve` and `preprocess` settings: 64 MiB bodies,
preprocess.max_pixels 50 million, one decode slot per core) with a random-weights ResNet-18 champion
in a temporary MLflow store, and for each number of concurrent clients has each client post, in a
loop, the largest requests the limits let through, all made from a real chest CR (pydicom-data's
RG1_UNCR) resized:
  - an 8-bit DICOM of 7071 x 7071 pixels (50.0 million: preprocess.max_pixels; a 50 MB body),
  - a 16-bit DICOM of 5792 x 5792 pixels (33.5 million: the most a 64 MiB body holds at 16 bits),
  - the 12000 x 12000 PNG decompression bomb of 140 KB (refused from its header, 413).
The server's RSS is sampled every 50 ms. Printed per level: the RSS at rest, the peak, the peak above
rest per client, and the bound the README states (rest + clients x body in flight + decode slots x
one decode), with the per-decode figure measured at one client.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from benchmarks.machine import machine
from benchmarks.inference import random_champion, rss_mib, start_service
from configs import ServeConfig
from tasks.preprocess import resolve_workers
from tests import damaged

MAX_BODY = ServeConfig().max_body_bytes


def _dicom(pixels: np.ndarray, bits: int) -> bytes:
    """CT_small's header around `pixels` (rows x columns, `bits` allocated, unsigned)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("WindowCenter", "WindowWidth", "PixelPaddingValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def largest_bodies() -> dict[str, tuple[bytes, str]]:
    """The largest requests the default limits admit, from a real CR, and the PNG bomb."""
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array.astype(np.float32)
    grey = Image.fromarray((cr - cr.min()) / (cr.max() - cr.min()), mode="F")
    side_8 = 7071  # 7071**2 = 49,999,041 <= preprocess.max_pixels
    side_16 = 5792  # 5792**2 * 2 bytes = 67,094,528: the pixel data of the largest 16-bit body
    eight = np.asarray(grey.resize((side_8, side_8), Image.BILINEAR)) * 255
    sixteen = np.asarray(grey.resize((side_16, side_16), Image.BILINEAR)) * 65535
    bodies = {"8-bit 7071x7071 DICOM": (_dicom(np.round(eight).astype(np.uint8), 8), "application/dicom"),
              "16-bit 5792x5792 DICOM": (_dicom(np.round(sixteen).astype(np.uint16), 16), "application/dicom"),
              "12000x12000 PNG bomb": (damaged.png_bomb(), "image/png")}
    for name, (body, _) in bodies.items():
        assert len(body) <= MAX_BODY, (name, len(body))
    return bodies


class RssSampler:
    """The RSS of process `pid`, sampled every `interval` s on a thread while in use."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mib(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def hammer(url: str, body: bytes, content_type: str, clients: int, seconds: float) -> dict[int, int]:
    """`clients` loops posting `body` for `seconds`; the count of each status."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds

    async def client() -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            while time.monotonic() < deadline:
                response = await http.post(f"{url}/v1/predict", content=body, headers={"Content-Type": content_type})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if sorted(args.clients)[0] != 1:
        parser.error("--clients must include 1: the one-client run measures one decode, which the bound uses")
    args.clients = sorted(set(args.clients))
    print(f"Machine: {machine()}")
    slots = resolve_workers(ServeConfig().decode_slots)
    with tempfile.TemporaryDirectory(prefix="medxfer-serve-memory-") as tmp:
        work = Path(tmp)
        model, _, onnx_path = random_champion(work)
        bodies = largest_bodies()
        process, url = start_service(work, onnx_path, model)
        try:
            httpx.post(f"{url}/v1/predict", content=bodies["8-bit 7071x7071 DICOM"][0],  # warm: sessions, arenas
                       headers={"Content-Type": "application/dicom"}, timeout=300)
            time.sleep(2)
            rest = rss_mib(process.pid)
            print(f"Service RSS at rest after one warm-up request: {rest:.0f} MiB; decode slots {slots}; "
                  f"body limit {MAX_BODY / 2**20:.0f} MiB")
            print("\n| request | clients | requests | statuses | peak RSS MiB | above rest MiB | bound MiB |")
            print("|---|---|---|---|---|---|---|")
            per_decode: dict[str, float] = {}
            for name, (body, content_type) in bodies.items():
                for clients in args.clients:
                    with RssSampler(process.pid) as sampler:
                        statuses = asyncio.run(hammer(url, body, content_type, clients, args.seconds))
                    peak = max(sampler.samples)
                    body_mib = len(body) / 2**20
                    if clients == 1:
                        # One request in flight: the body (twice: read, then joined) and one decode.
                        per_decode[name] = max(0.0, peak - rest - 2 * body_mib)
                    bound = rest + clients * 2 * body_mib + min(clients, slots) * per_decode[name]
                    status_text = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
                    print(f"| {name} ({body_mib:.1f} MiB body) | {clients} | {sum(statuses.values())} | "
                          f"{status_text} | {peak:.0f} | {peak - rest:.0f} | {bound:.0f} |")
                    time.sleep(2)
            print(f"\nOne decode of each, above rest and its body (from the 1-client rows): "
                  + "; ".join(f"{name}: {mib:.0f} MiB" for name, mib in per_decode.items()))
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
