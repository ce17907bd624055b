"""CPU feature detection and the training precision it chooses."""

import numpy as np
import torch

from configs import ModelConfig, Precision
from tasks.hardware import CpuInfo, cpu_info, parse_cpuinfo, training_precision
from tests.test_train_evaluate import breast_splits, config_for, fit  # noqa: F401  (module fixture)

# /proc/cpuinfo excerpts of the two CPUs this project meets (flags lines shortened).
AMD_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni
"""
INTEL_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni
"""
OLD_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
flags\t\t: fpu sse2 avx avx2 fma
"""


def cpu(text: str) -> CpuInfo:
    model, flags = parse_cpuinfo(text)
    return CpuInfo(model, 2, flags)


def test_flags_are_read_from_cpuinfo():
    epyc, xeon, old = cpu(AMD_EPYC), cpu(INTEL_XEON), cpu(OLD_XEON)
    assert epyc.model == "AMD EPYC" and epyc.native_bf16 and epyc.vnni
    assert xeon.vnni and not xeon.native_bf16
    assert not old.vnni and not old.native_bf16
    assert epyc.describe() == "AMD EPYC, 2 cores, flags: avx2 avx512f avx512_vnni avx512_bf16"
    assert "none of" in CpuInfo("x", 1, frozenset()).describe()


def test_this_machine_is_described_with_its_own_flags():
    here = cpu_info()
    assert here.cores >= 1 and here.model
    assert here.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & here.flags)


def test_auto_picks_bf16_only_where_it_is_native():
    epyc = training_precision(Precision.AUTO, None, "cpu", cpu(AMD_EPYC))
    assert (epyc.precision, epyc.channels_last) == (Precision.BF16, True)
    assert "avx512_bf16" in epyc.reason and "AMD EPYC" in epyc.reason
    xeon = training_precision(Precision.AUTO, None, "cpu", cpu(INTEL_XEON))
    assert (xeon.precision, xeon.channels_last) == (Precision.FP32, False)
    assert "emulated" in xeon.reason
    gpu = training_precision(Precision.AUTO, None, "cuda", cpu(INTEL_XEON), cuda_native_bf16=True)
    assert gpu.precision is Precision.BF16 and gpu.channels_last
    old_gpu = training_precision(Precision.AUTO, None, "cuda", cpu(AMD_EPYC), cuda_native_bf16=False)
    assert old_gpu.precision is Precision.FP32  # the CUDA device decides, not the host CPU


def test_explicit_settings_win():
    forced = training_precision(Precision.FP32, None, "cpu", cpu(AMD_EPYC))
    assert forced.precision is Precision.FP32 and not forced.channels_last and "set in the config" in forced.reason
    assert training_precision(Precision.BF16, False, "cpu", cpu(INTEL_XEON)).channels_last is False
    assert training_precision(Precision.AUTO, True, "cpu", cpu(INTEL_XEON)).channels_last is True


def test_training_records_the_precision_auto_chose_here(tmp_path, breast_splits):
    config = config_for(tmp_path, "classification", epochs=1)
    config = config.model_copy(update={"model": ModelConfig(weights="none", freeze="full")})
    assert config.train.precision is Precision.AUTO  # the default
    result = fit(config, breast_splits["train"], breast_splits["val"])
    expected = training_precision(Precision.AUTO, None, "cpu", cpu_info())
    assert (result.precision, result.channels_last, result.precision_reason) == \
           (expected.precision.value, expected.channels_last, expected.reason)
    assert np.isfinite(result.history[0].train_loss)
    # Handed back as evaluation and export expect it, whatever it trained in: fp32, contiguous.
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.model.backbone.conv1.weight.is_contiguous()
