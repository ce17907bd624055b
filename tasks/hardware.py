"""What this machine's CPU can do fast, read from its feature flags (not assumed).

CPUs differ between sites: native bfloat16 (`avx512_bf16`, AMX) makes bf16 training fast and
is emulated, slowly, elsewhere; VNNI (`avx512_vnni`, `avx_vnni`, AMX) gives int8 inference its
speed and, without it, ONNX Runtime's uint8 x int8 kernels can saturate unless weights use
7 bits. Training precision, int8 quantisation and the benchmarks all read the flags here.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from configs import Precision

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Flags worth naming beside a speed figure: vector width, int8 dot products, bf16, AMX.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    flags: frozenset[str]
    machine: str = "x86_64"  # platform.machine()

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in BF16_FLAGS)

    @property
    def vnni(self) -> bool:
        return any(flag in self.flags for flag in VNNI_FLAGS)

    @property
    def int8_saturates(self) -> bool:
        """x86 without VNNI: ONNX Runtime's uint8 x int8 kernels add pairs of products in int16,
        which can saturate unless weights are quantised to 7 bits (`reduce_range`)."""
        return self.machine in ("x86_64", "AMD64") and not self.vnni

    def describe(self) -> str:
        """e.g. `AMD EPYC, 2 cores, flags: avx2 avx512f avx512_vnni avx512_bf16`."""
        named = " ".join(flag for flag in REPORTED_FLAGS if flag in self.flags) or "none of " + " ".join(REPORTED_FLAGS)
        return f"{self.model}, {self.cores} cores, flags: {named}"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The model name and the flags of the first processor in /proc/cpuinfo's text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, ARM
            flags = frozenset(value.split())
    return model, flags


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU; no flags where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        model, flags = "", frozenset()
    return CpuInfo(model or platform.processor() or platform.machine(), os.cpu_count() or 1, flags,
                   platform.machine())


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision training runs in, its memory format, and why (logged and recorded)."""

    precision: Precision  # FP32 or BF16, never AUTO
    channels_last: bool
    reason: str


def training_precision(precision: Precision, channels_last: bool | None, device_type: str,
                       cpu: CpuInfo, cuda_native_bf16: bool = False) -> PrecisionChoice:
    """`auto`: bf16 autocast (with channels_last) on a CUDA device with native bf16 and on CPUs
    with avx512_bf16 or AMX, fp32 elsewhere (emulated bf16 is slower than fp32). An explicit
    `fp32`/`bf16` is kept. `channels_last` unset follows the precision: on with bf16, where
    NHWC convolutions are fastest (benchmarks/RESULTS.md, issue 4)."""
    if precision is not Precision.AUTO:
        chosen, reason = precision, f"train.precision: {precision.value}, set in the config"
    elif device_type == "cuda":
        chosen = Precision.BF16 if cuda_native_bf16 else Precision.FP32
        reason = f"auto: the CUDA device {'has' if cuda_native_bf16 else 'has no'} native bf16"
    elif cpu.native_bf16:
        chosen = Precision.BF16
        reason = f"auto: the CPU ({cpu.model}) has {', '.join(f for f in BF16_FLAGS if f in cpu.flags)}"
    else:
        chosen = Precision.FP32
        reason = f"auto: the CPU ({cpu.model}) has neither {' nor '.join(BF16_FLAGS)}, so bf16 would be emulated"
    layout = chosen is Precision.BF16 if channels_last is None else channels_last
    return PrecisionChoice(chosen, layout, reason)
