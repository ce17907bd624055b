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
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from configs import PreprocessConfig
from sample_data.breastmnist import ultrasound_dicom
from tasks.io import markdown_table
from tasks.preprocess import preprocess_dataset

CR_FILES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KR.dcm")
BUSI_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi256" / "breastmnist_split_busi256.npz"
RESIZE, CROP = 256, 224


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


def naive(path: Path) -> np.ndarray:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr-copies", type=int, default=25, help="copies of each of the 4 CR files")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-busi", action="store_true")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"({len(os.sched_getaffinity(0))} usable), {platform.python_implementation()} "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at start")
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
