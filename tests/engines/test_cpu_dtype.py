"""dtype auto on a CPU: bfloat16 only where the CPU computes it natively."""

from __future__ import annotations

import subprocess

from runner.engines._cpu import choose_dtype, cpu_flags, isa_cap, kv_cache_bytes, reserved_cpus

# Trimmed /proc/cpuinfo of the two machine kinds this project runs on.
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: avx avx2 avx512f avx512bw avx512_vnni\n"


def test_an_avx2_only_cpu_gets_float32_and_is_told_why(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(EPYC_AVX2)
    choice = choose_dtype("auto", on_cpu=True, flags=cpu_flags(info))
    assert choice.dtype == "float32"
    assert "emulated" in choice.reason


def test_an_amx_cpu_gets_bfloat16_naming_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(XEON_AMX)
    choice = choose_dtype("auto", on_cpu=True, flags=cpu_flags(info))
    assert choice.dtype == "bfloat16"
    assert choice.reason == "native on this CPU: amx_bf16, avx512_bf16"


def test_avx512_without_its_bf16_extension_is_not_native(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX512_NO_BF16)
    assert choose_dtype("auto", on_cpu=True, flags=cpu_flags(info)).dtype == "float32"


def test_a_dtype_set_in_the_spec_or_an_accelerator_is_left_alone():
    assert choose_dtype("bfloat16", on_cpu=True, flags=set()).dtype == "bfloat16"
    assert choose_dtype("auto", on_cpu=False, flags=None).dtype == "auto"
    assert choose_dtype("auto", on_cpu=True, flags=None).dtype == "auto"  # no /proc/cpuinfo: vLLM decides


def test_this_machines_flags_are_what_lscpu_reports(tmp_path):
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    listed = next(line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags:"))
    assert cpu_flags() == frozenset(listed)
    assert cpu_flags(tmp_path / "missing") is None


def test_kernels_capped_below_avx512_bf16_get_float32_on_an_amx_cpu(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(XEON_AMX)
    flags = cpu_flags(info)
    capped = ({"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"DNNL_MAX_CPU_ISA": "avx512_core"})
    for environ in capped:
        choice = choose_dtype("auto", on_cpu=True, flags=flags, cap=isa_cap(environ))
        assert choice.dtype == "float32"
        assert next(iter(environ)) in choice.reason
    for environ in ({}, {"ATEN_CPU_CAPABILITY": "amx"}, {"ONEDNN_MAX_CPU_ISA": "ALL"}):
        assert isa_cap(environ) is None
        assert choose_dtype("auto", on_cpu=True, flags=flags, cap=isa_cap(environ)).dtype == "bfloat16"


def test_the_kv_cache_is_the_specs_size_else_two_gib_on_a_cpu():
    assert kv_cache_bytes(0.5, on_cpu=True) == 2**29
    assert kv_cache_bytes(None, on_cpu=True) == 2 * 2**30
    assert kv_cache_bytes(3.0, on_cpu=False) == 3 * 2**30
    assert kv_cache_bytes(None, on_cpu=False) is None  # a GPU: what gpu_memory_utilization leaves


def test_no_core_is_reserved_on_two_cores_unless_the_spec_or_environment_says_so():
    assert reserved_cpus(None, usable_cores=2, environ={}) == "0"
    assert reserved_cpus(None, usable_cores=1, environ={}) == "0"
    assert reserved_cpus(None, usable_cores=8, environ={}) is None  # vLLM's default
    assert reserved_cpus(None, usable_cores=2, environ={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}) is None
    assert reserved_cpus(1, usable_cores=2, environ={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}) == "1"
