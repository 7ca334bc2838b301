"""Whether bf16 is fast on a device: what `train.precision=auto` and `model.lm_dtype=auto` choose from."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from ..errors import FrozenPrefixError

# x86 CPU flags of native bf16 matrix products (AVX512-BF16, AMX). Without them oneDNN emulates bf16: matmuls run
# hundreds of times slower than in fp32 and a training step about 30x slower (ENVIRONMENT.md, the project's
# measurements of other machines); with them a matmul of the LM's shapes runs about 4x faster than in fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# "0" keeps auto at fp32 on every CPU, "1" picks bf16 on any CPU; unset: the CPU's flags decide. The test suite
# sets "0" so that its results do not depend on the machine it runs on.
ENV_OVERRIDE = "FROZEN_PREFIX_CPU_BF16"


def _torch_reports_native_bf16() -> bool:
    """What PyTorch's own CPU checks say (x86 only; False where this torch lacks them)."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check() for check in checks if check is not None)


@functools.cache
def _cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (or FROZEN_PREFIX_CPU_BF16 says so)."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise FrozenPrefixError(f"{ENV_OVERRIDE}={forced!r} is not 0 or 1; set it to 0 (fp32) or 1 (bf16), or unset it")
    return _torch_reports_native_bf16() or any(flag in _cpu_flags() for flag in NATIVE_BF16_FLAGS)


def bf16_is_fast(device: torch.device) -> bool:
    """True where bf16 pays: CUDA with bf16 support, or a CPU with native bf16 matrix products."""
    if device.type == "cuda":  # not counting emulation: bf16 on a V100 or T4 is slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(device: torch.device, precision: str) -> str:
    """'auto': bf16 where it is fast (CUDA, CPUs with native bf16), else fp32 (an emulated bf16 step is ~30x slower)."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a precision; fp32 runs as it is."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
