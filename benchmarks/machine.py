"""The machine a benchmark ran on, printed beside its figures: the CPU by name with the flags that
decide its speed (read by tasks.hardware, as training precision and int8 read them), the cores this
process may use, memory, the GPU, the library versions, and the load when it started; and the CPU
time a process has used, for figures per image."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort
import torch

from tasks.hardware import cpu_info


def machine() -> str:
    """e.g. `AMD EPYC, 2 cores, flags: avx2 avx512f avx512_vnni avx512_bf16 (x86_64), 2 usable, ...`."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu_info().describe()} ({platform.machine()}), {len(os.sched_getaffinity(0))} usable, "
            f"{memory_gib:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__}; "
            f"load average {os.getloadavg()[0]:.1f}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
