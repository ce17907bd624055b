"""Retrieval speed from a real Orthanc over loopback: medxfer's PACS source against a plain loop.

The baseline is what a first script does with dicomweb-client: one QIDO-RS search, then
`retrieve_instance` and `save_as` per instance, one at a time. medxfer's retrieval
(`tasks.pacs.retrieve`) fetches the stored bytes (no decode and re-encode), checks them,
stores them by content hash and indexes them, `max_parallel` at a time; DIMSE C-GET is timed
too. Both run on the same studies in the same run; Orthanc runs on the same machine, so its own
CPU time (read from /proc) is reported beside the client's: on 2 cores they share the CPUs.

Run one benchmark at a time (they share the machine with the tests):

    flock -x /tmp/medxfer-bench.lock .venv/bin/python -m benchmarks.pacs

Data: the bundled BreastMNIST sample (780 ultrasound images, 28 px, 1.6 KB files: the cost
per request) and, where ../shared/data is present, the same 780 BUSI images at 256 px
(66 KB files).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from dicomweb_client.api import DICOMwebClient

from benchmarks.machine import cpu_seconds, machine
from configs import DicomWebConfig, DimseConfig, PacsQuery
from sample_data.breastmnist import ultrasound_dicom, write_breastmnist_dicom
from sample_data.orthanc import LocalOrthanc
from stack.settings import free_port
from tasks.dicom_results import dicom_bytes
from tasks.io import markdown_table
from tasks.pacs.dicomweb import DicomWebPacs
from tasks.pacs.dimse import DimsePacs
from tasks.pacs.retrieve import checked, retrieve
from tasks.pacs.retry import RetryPolicy
from tasks.pacs.store import InstanceStore

BUSI_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi256" / "breastmnist_split_busi256.npz"
RETRY = RetryPolicy(3, 0.5, 2.0)
TIMEOUT = 60.0


def load(orthanc: LocalOrthanc, dataset: str, scratch: Path) -> int:
    if dataset == "breastmnist":
        write_breastmnist_dicom(scratch / "sample")
        return orthanc.upload_folder(scratch / "sample")
    data = np.load(BUSI_NPZ)
    images = np.concatenate([data[f"{split}_images"] for split in ("train", "val", "test")])
    for index, pixels in enumerate(images):
        orthanc.upload(dicom_bytes(ultrasound_dicom(pixels, index)))
    return len(images)


def timed(run, orthanc: LocalOrthanc, count: int) -> dict:
    """Wall time, images/s, and CPU time per image of this process and of Orthanc, for `run()`."""
    started, ours, theirs = time.perf_counter(), time.process_time(), cpu_seconds(orthanc.process.pid)
    run()
    wall = time.perf_counter() - started
    return {"seconds": wall, "images_per_s": count / wall,
            "client_cpu_ms": 1000 * (time.process_time() - ours) / count,
            "orthanc_cpu_ms": 1000 * (cpu_seconds(orthanc.process.pid) - theirs) / count}


def baseline_loop(url: str, refs, out: Path) -> None:
    """The plain sequential dicomweb-client loop: retrieve_instance (decoded), save_as."""
    client = DICOMwebClient(url)
    out.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        ds = client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid)
        ds.save_as(out / f"{ref.sop_uid}.dcm", enforce_file_format=True)


def breakdown(pacs: DicomWebPacs, refs, store_dir: Path) -> dict:
    """Where one sequential retrieval's time goes, ms per image: wall time and this thread's CPU
    time per stage (the store's one index commit at the end is counted in its stage)."""
    stages = ("wado_rs", "check", "store")
    steps = {f"{stage}_{clock}_ms": 0.0 for stage in stages for clock in ("wall", "cpu")}

    def add(stage: str, wall: float, cpu: float) -> None:
        steps[f"{stage}_wall_ms"] += 1000 * wall / len(refs)
        steps[f"{stage}_cpu_ms"] += 1000 * cpu / len(refs)

    with InstanceStore(store_dir, "bench-salt") as store:
        for ref in refs:
            t0, c0 = time.perf_counter(), time.thread_time()
            data = pacs.fetch(ref)
            t1, c1 = time.perf_counter(), time.thread_time()
            checked(ref, data)
            t2, c2 = time.perf_counter(), time.thread_time()
            store.put(ref.sop_uid, data)
            t3, c3 = time.perf_counter(), time.thread_time()
            add("wado_rs", t1 - t0, c1 - c0)
            add("check", t2 - t1, c2 - c1)
            add("store", t3 - t2, c3 - c2)
        t0, c0 = time.perf_counter(), time.thread_time()
        store.commit()
        add("store", time.perf_counter() - t0, time.thread_time() - c0)
    return steps


# Where a profiled function's own time is counted: its file's library (the first that matches).
LIBRARIES = (("dicomweb_client", "dicomweb-client"), ("/requests/", "requests"), ("/urllib3/", "urllib3"),
             ("/http/client", "http.client"), ("/email/", "http.client (email header parser)"),
             ("/pydicom/", "pydicom (check)"), ("sqlite3", "sqlite index"), ("/tasks/", "medxfer"),
             ("socket", "socket I/O"), ("/concurrent/", "thread pool"), ("/threading", "thread pool"),
             ("/re/", "re (compiling regexes)"), ("tempfile", "tempfile (atomic write)"),
             ("posix.", "os calls (open, mkdir, rename, stat)"), ("hashlib", "hashlib"))


def _library(filename: str, function: str) -> str:
    where = f"{filename}:{function}"
    return next((name for key, name in LIBRARIES if key in where), "other (builtins and the rest)")


def profile_by_library(pacs: DicomWebPacs, refs, store_dir: Path) -> dict[str, float]:
    """The sequential retrieval of `breakdown` (in this thread: cProfile sees only the thread it
    runs in, not a pool's) under cProfile: each function's own CPU time by library, ms per image
    (this thread's CPU clock, so waiting for Orthanc is not in it; the profiler's own overhead
    inflates the many small Python calls most)."""
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    breakdown(pacs, refs, store_dir)
    profiler.disable()
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        name = _library(filename, function)
        totals[name] = totals.get(name, 0.0) + 1000 * own / len(refs)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def bench(dataset: str, parallel: list[int], repeats: int) -> tuple[list[dict], dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"medxfer-bench-pacs-{dataset}-") as tmp:
        scratch = Path(tmp)
        orthanc = LocalOrthanc(scratch / "orthanc", modalities={"medxfer": ("MEDXFER", "127.0.0.1", free_port())})
        orthanc.start()
        try:
            count = load(orthanc, dataset, scratch)
            web = DicomWebPacs(DicomWebConfig(url=orthanc.dicomweb_url), TIMEOUT, RETRY, max(parallel))
            t0 = time.perf_counter()
            refs = web.find({}, PacsQuery())
            print(f"{dataset}: {count} instances in Orthanc; QIDO-RS found {len(refs)} in "
                  f"{time.perf_counter() - t0:.2f} s")

            def row(label: str, run, parallelism: int, store: Path | None = None) -> None:
                results = [timed(lambda: run(attempt), orthanc, len(refs)) for attempt in range(repeats)]
                best = max(results, key=lambda r: r["images_per_s"])
                rows.append({"dataset": dataset, "retrieval": label, "parallel": parallelism,
                             "images/s (best)": round(best["images_per_s"], 1),
                             "images/s (median)": round(statistics.median(r["images_per_s"] for r in results), 1),
                             "client CPU ms/img": round(best["client_cpu_ms"], 2),
                             "Orthanc CPU ms/img": round(best["orthanc_cpu_ms"], 2)})
                print(rows[-1])

            row("baseline: dicomweb-client loop", lambda a: baseline_loop(orthanc.dicomweb_url, refs,
                                                                          scratch / f"baseline-{a}"), 1)
            for p in parallel:
                def medxfer(attempt: int, p: int = p) -> None:
                    pacs = DicomWebPacs(DicomWebConfig(url=orthanc.dicomweb_url), TIMEOUT, RETRY, p)
                    with InstanceStore(scratch / f"store-web-{p}-{attempt}", "bench-salt") as store:
                        retrieve(pacs, refs, store, p)
                    pacs.close()
                row("medxfer DICOMweb (cold store)", medxfer, p)
            for p in sorted({1, max(parallel)}):
                def dimse(attempt: int, p: int = p) -> None:
                    pacs = DimsePacs(DimseConfig(host="127.0.0.1", port=orthanc.dicom_port, called_ae="ORTHANC"),
                                     TIMEOUT, RETRY, p)
                    with InstanceStore(scratch / f"store-dimse-{p}-{attempt}", "bench-salt") as store:
                        retrieve(pacs, refs, store, p)
                    pacs.close()
                row("medxfer DIMSE C-GET (cold store)", dimse, p)

            def warm(attempt: int) -> None:
                with InstanceStore(scratch / f"store-web-{max(parallel)}-0", "bench-salt") as store:
                    retrieve(web, refs, store, max(parallel))
            row("medxfer, every instance already held", warm, max(parallel))
            steps = {"dataset": dataset} | {k: round(v, 2) for k, v in breakdown(web, refs, scratch / "steps").items()}
            print(f"sequential medxfer retrieval, ms per image: {steps}")
            profiled = profile_by_library(web, refs, scratch / "profiled")
            print(f"{dataset}: a sequential retrieval's own CPU time by library (cProfile), ms per image:")
            for name, ms in profiled.items():
                print(f"  {name}: {ms:.2f}")
            web.close()
        finally:
            orthanc.stop()
    return rows, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["breastmnist", "busi"], choices=["breastmnist", "busi"])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows, steps = [], []
    for dataset in args.datasets:
        if dataset == "busi" and not BUSI_NPZ.exists():
            print(f"busi: skipped, {BUSI_NPZ} is absent (it lives in ../shared/data)")
            continue
        dataset_rows, dataset_steps = bench(dataset, args.parallel, args.repeats)
        rows, steps = rows + dataset_rows, steps + [dataset_steps]
    print(markdown_table(pd.DataFrame(rows)))
    print("\nWhere a sequential medxfer retrieval spends its time (ms per image, wall and CPU):\n")
    print(markdown_table(pd.DataFrame(steps)))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
