"""Ingest speed: images per second through preprocess_dataset, against baselines run on the same files.

Datasets (real images only, written to a temporary folder):
  (a) full-size chest and extremity CR from pydicom-data (RG1, RG3), uncompressed and
      lossless JPEG 2000, replicated with a fresh SOPInstanceUID per copy so every file
      has its own content (and its own cache key);
  (b) the 780 BUSI breast ultrasound images at 256 px (../shared/data/busi256), as DICOM.

Measured in one run, on the same files:
  naive   a plain loop: pydicom.dcmread + numpy min-max to uint8 + PIL resize and crop;
  monai   LoadImage + ScaleIntensity + Resize (only when monai imports);
  medxfer preprocess_dataset with 1 and 2 workers, cold (empty cache) and warm (cache hit).

Run: python -m benchmarks.ingest            (about 1.5 minutes on 2 cores)
     python -m benchmarks.ingest --cr-copies 100   (400 CR files: a bigger run, about 4 minutes)
     python -m benchmarks.ingest --reader-floor    (what the BUSI files cost to read, per step)
     python -m benchmarks.ingest --split           (where a cold 1-worker BUSI run spends its time)

--reader-floor times, per BUSI file held in memory, the steps a cold cache miss
cannot skip (pydicom's parse and decode, the sha256 cache key, the cache write: one
atomic file per entry as before, and packed into 64-entry shards as now) against the naive loop, and the other DICOM readers when they import
(dicomsdl, python-gdcm: not project dependencies), including whether a reader
survives a file cut short inside its pixel data (run in a child process,
because a reader that crashes takes its process with it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import tasks.decode
import tasks.preprocess
import tasks.transforms
from benchmarks.machine import machine
from configs import PreprocessConfig
from sample_data.breastmnist import ultrasound_dicom
from tasks.cache import ImageCache
from tasks.io import markdown_table, write_bytes_atomic
from tasks.preprocess import preprocess_dataset

CR_FILES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KR.dcm")
BUSI_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi256" / "breastmnist_split_busi256.npz"
RESIZE, CROP = 256, 224
SHARD_ENTRIES = 64  # the largest chunk of misses (tasks.preprocess.chunk_size)


def write_cr_copies(out_dir: Path, copies: int) -> list[str]:
    """`copies` of each CR file, each with its own SOPInstanceUID; relative paths."""
    paths = []
    for name in CR_FILES:
        source = pydicom.dcmread(get_testdata_file(name))
        for copy in range(copies):
            uid = generate_uid(entropy_srcs=[f"medxfer-bench-{name}-{copy}"])
            source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = uid
            rel = f"cr/{Path(name).stem}_{copy:04d}.dcm"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            source.save_as(out_dir / rel)
            paths.append(rel)
    return paths


def write_busi(out_dir: Path) -> list[str]:
    data = np.load(BUSI_NPZ)
    images = np.concatenate([data[f"{split}_images"] for split in ("train", "val", "test")])
    (out_dir / "busi").mkdir(parents=True, exist_ok=True)
    paths = []
    for index, pixels in enumerate(images):
        rel = f"busi/{index:04d}.dcm"
        ultrasound_dicom(pixels, index).save_as(out_dir / rel, enforce_file_format=True)
        paths.append(rel)
    return paths


def naive(path: Path | BinaryIO) -> np.ndarray:
    """What a first script does: decode, min-max to 8 bits, PIL resize, centre crop."""
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
    low, high = pixels.min(), pixels.max()
    grey = ((pixels - low) / max(high - low, 1e-6) * 255).astype(np.uint8)
    image = Image.fromarray(grey)
    scale = RESIZE / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - CROP) // 2, (image.height - CROP) // 2
    return np.asarray(image.crop((left, top, left + CROP, top + CROP)))


def monai_pipeline() -> Callable[[Path], np.ndarray] | None:
    try:
        from monai.transforms import Compose, LoadImage, Resize, ScaleIntensity
    except ImportError:
        return None
    # Its reader warns once per file that CR has no patient orientation: true, and not our concern.
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    chain = Compose([LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader"),
                     ScaleIntensity(), Resize((CROP, CROP))])
    return lambda path: np.asarray(chain(str(path)))


def per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def time_loop(function: Callable[[Path], np.ndarray], paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        function(path)
    return time.perf_counter() - start


def time_medxfer(root: Path, rel_paths: list[str], workers: int, cache_dir: Path) -> float:
    config = PreprocessConfig(resize=RESIZE, crop=CROP, cache_dir=cache_dir, workers=workers)
    manifest = pd.DataFrame({"path": rel_paths})
    start = time.perf_counter()
    prepared = preprocess_dataset(manifest, root, config)
    elapsed = time.perf_counter() - start
    if len(prepared.rejects):
        raise RuntimeError(f"benchmark files were rejected: {prepared.rejects.head()}")
    return elapsed


def bench(label: str, root: Path, rel_paths: list[str], scratch: Path, workers: list[int]) -> list[dict]:
    paths = [root / rel for rel in rel_paths]
    rows = []

    def record(method: str, seconds: float) -> None:
        rows.append({"dataset": label, "files": len(paths), "method": method,
                     "seconds": round(seconds, 2), "images_per_s": round(per_second(len(paths), seconds), 1)})
        print(f"  {method:28s} {seconds:8.2f} s  {rows[-1]['images_per_s']:8.1f} images/s", flush=True)

    print(f"{label}: {len(paths)} files", flush=True)
    record("naive loop (1 process)", time_loop(naive, paths))
    monai = monai_pipeline()
    if monai is None:
        print("  monai: not installed, skipped")
    else:
        record("MONAI LoadImage+Scale+Resize", time_loop(monai, paths))
    for count in workers:
        cache_dir = scratch / f"cache-{label}-{count}"
        record(f"medxfer {count} worker(s), cold", time_medxfer(root, rel_paths, count, cache_dir))
        record(f"medxfer {count} worker(s), warm", time_medxfer(root, rel_paths, count, cache_dir))
    return rows


def best_ms_per_item(function: Callable[[bytes], object], items: list[bytes], repeats: int = 5) -> float:
    """Best of `repeats` passes over `items`, in milliseconds per item."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e3


def survives_truncation(reader_code: str, path: Path) -> str:
    """Whether `reader_code` (Python reading the file named by `path`) survives that file cut
    inside its pixel data: 'raises' or 'reads' if the child lives, else how it died."""
    cut = path.with_name(f"cut_{path.name}")
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    child = subprocess.run([sys.executable, "-c", reader_code.format(path=str(cut))], capture_output=True, text=True)
    if child.returncode < 0:
        return f"no: killed by signal {-child.returncode}"
    return "yes: " + (child.stdout.strip() or f"exit {child.returncode}")


def reader_floor(data_dir: Path) -> None:
    paths = [data_dir / rel for rel in write_busi(data_dir)]
    contents = [path.read_bytes() for path in paths]
    crop = np.zeros((CROP, CROP), np.uint8)
    image = crop.tobytes()
    entries = itertools.count()

    def write_entry(_: bytes) -> None:  # a new file each time, over 256 folders as the cache had
        entry = next(entries)
        write_bytes_atomic(data_dir / "cache" / f"{entry % 256:02x}" / f"{entry}.u8img", image)

    crops = ImageCache(data_dir / "shards", CROP)
    pending: list = []

    def add_to_shard(_: bytes) -> None:  # as the cache stores a chunk of misses: one shard per 64
        pending.append((f"{next(entries):064x}", crop, ["bench"]))
        if len(pending) == SHARD_ENTRIES:
            crops.put(pending)
            pending.clear()
    rows = [
        ("naive loop: dcmread + pixel_array + min-max + PIL resize", best_ms_per_item(
            lambda data: naive(io.BytesIO(data)), contents)),
        ("pydicom.dcmread", best_ms_per_item(lambda data: pydicom.dcmread(io.BytesIO(data)), contents)),
        ("pydicom.dcmread + pixel_array", best_ms_per_item(
            lambda data: pydicom.dcmread(io.BytesIO(data)).pixel_array, contents)),
        ("sha256 of the file (the cache key)", best_ms_per_item(lambda data: hashlib.sha256(data).digest(), contents)),
        ("one atomic file per entry (224 x 224 uint8; the cache before shards)",
         best_ms_per_item(write_entry, contents)),
        (f"entry packed into an atomic {SHARD_ENTRIES}-entry shard (the cache now)",
         best_ms_per_item(add_to_shard, contents)),
    ]
    survival = {"pydicom": survives_truncation(
        "import pydicom\ntry:\n    pydicom.dcmread({path!r}).pixel_array\n    print('reads')\n"
        "except Exception:\n    print('raises')", paths[0])}
    try:
        import dicomsdl
        rows.append(("dicomsdl open_memory + pixelData", best_ms_per_item(
            lambda data: dicomsdl.open_memory(data).pixelData(storedvalue=True), contents)))
        survival["dicomsdl"] = survives_truncation(
            "import dicomsdl\ntry:\n    dicomsdl.open_file({path!r}).pixelData(storedvalue=True)\n"
            "    print('reads')\nexcept Exception:\n    print('raises')", paths[0])
    except ImportError:
        print("dicomsdl: not installed, skipped")
    try:
        import gdcm

        def gdcm_read(path: Path) -> bytes:
            reader = gdcm.ImageReader()
            reader.SetFileName(str(path))
            if not reader.Read():
                raise ValueError(f"gdcm cannot read {path}")
            return reader.GetImage().GetBuffer()
        rows.append(("python-gdcm ImageReader + GetBuffer (from the file)", best_ms_per_item(
            gdcm_read, paths)))
        survival["python-gdcm"] = survives_truncation(
            "import gdcm\nreader = gdcm.ImageReader()\nreader.SetFileName({path!r})\n"
            "print('reads' if reader.Read() else 'refuses (Read() is false)')", paths[0])
    except ImportError:
        print("python-gdcm: not installed, skipped")
    naive_ms = rows[0][1]
    print(f"\nBUSI 256 px, {len(paths)} files, one process, best of 5 passes; 2x the naive loop is "
          f"a budget of {naive_ms / 2:.3f} ms per image\n")
    print(markdown_table(pd.DataFrame([{"step": step, "ms_per_file": round(ms, 3)} for step, ms in rows])))
    print("\nsurvives a file cut inside its pixel data: "
          + "; ".join(f"{reader}: {verdict}" for reader, verdict in survival.items()))


def time_split(data_dir: Path, runs: int = 3) -> None:
    """Milliseconds per file of a cold 1-worker medxfer run on the BUSI files, stage by stage
    (perf_counter wrappers; nested stages are inside their callers), against the naive loop's
    floor; the best of `runs` each."""
    rel_paths = write_busi(data_dir)
    paths = [data_dir / rel for rel in rel_paths]
    contents = [path.read_bytes() for path in paths]

    def best(function: Callable[[], object]) -> float:
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - start)
        return min(seconds)

    runs_made = itertools.count()

    def medxfer() -> None:
        time_medxfer(data_dir, rel_paths, 1, data_dir / f"cache-{next(runs_made)}")
    time_loop(naive, paths)
    rows = [("naive loop, whole", best(lambda: time_loop(naive, paths))),
            ("  of which dcmread + pixel_array (from memory)",
             best(lambda: [pydicom.dcmread(io.BytesIO(data)).pixel_array for data in contents])),
            ("medxfer 1 worker cold, whole", best(medxfer))]
    stages = [(tasks.preprocess, "_map_files", "  the per-file loop"),
              (tasks.preprocess, "_probe_cache", "    read + sha256 key + cache look-up"),
              (tasks.preprocess, "load_grey", "    decode (load_grey)"),
              (tasks.decode, "read_dataset", "      pydicom dcmread"),
              (tasks.decode, "transfer_syntax", "      transfer syntax check"),
              (tasks.decode, "pixel_geometry", "      header geometry"),
              (tasks.decode, "_decode_dicom_frames", "      pydicom decoder.as_array"),
              (tasks.decode, "monochrome_to_grey", "      modality LUT, VOI, percentile window"),
              (tasks.transforms.PreprocessSpec, "to_uint8", "    crop + quantise (to_uint8)"),
              (tasks.preprocess, "_store", "    cache shard write"),
              (np, "stack", "  stacking the output array")]
    spent: dict[str, list[float]] = {label: [] for _, _, label in stages}
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in stages]
    run_spent: dict[str, float] = {}

    def timed(function: Callable, label: str) -> Callable:
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                run_spent[label] += time.perf_counter() - start
        return call
    try:
        for (owner, name, function), (_, _, label) in zip(originals, stages):
            setattr(owner, name, timed(function, label))
        for _ in range(runs):
            run_spent.update(dict.fromkeys(spent, 0.0))
            medxfer()
            for label, seconds in run_spent.items():
                spent[label].append(seconds)
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)
    rows += [(label, min(seconds)) for label, seconds in spent.items()]
    print(f"\nBUSI 256 px, {len(paths)} files, one process, best of {runs}\n")
    print(markdown_table(pd.DataFrame([{"step": step, "ms_per_file": round(seconds / len(paths) * 1e3, 3)}
                                       for step, seconds in rows])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr-copies", type=int, default=25, help="copies of each of the 4 CR files")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-busi", action="store_true")
    parser.add_argument("--reader-floor", action="store_true", help="time the per-file read steps on BUSI only")
    parser.add_argument("--split", action="store_true", help="time a cold BUSI run stage by stage")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    if args.reader_floor or args.split:
        if not BUSI_NPZ.exists():
            raise SystemExit(f"--reader-floor and --split need the BUSI images: {BUSI_NPZ} not found")
        with tempfile.TemporaryDirectory(prefix="medxfer-bench-") as tmp:
            (reader_floor if args.reader_floor else time_split)(Path(tmp))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="medxfer-bench-") as tmp:
        scratch = Path(tmp)
        data = scratch / "data"
        cr = write_cr_copies(data, args.cr_copies)
        rows += bench("CR full-size (uncompressed + JPEG 2000)", data, cr, scratch, args.workers)
        if not BUSI_NPZ.exists():
            print(f"BUSI skipped: {BUSI_NPZ} not found")
        elif not args.skip_busi:
            rows += bench("BUSI 256 px as DICOM", data, write_busi(data), scratch, args.workers)
        shutil.rmtree(data)
    print(f"load average {os.getloadavg()[0]:.1f} at end\n")
    print(markdown_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
