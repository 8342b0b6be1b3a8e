"""The kernels' AVX2 + FMA build (for CPUs without AVX-512), built here with -mno-avx512f
(TKP_KERNEL_ISA=avx2) and run through the same F.conv2d fuzz tests as the native build, in a
fresh process (both builds register the same torch ops, so one process holds one of them)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from tkp_lib import kernels, tapgroup, topk_conv

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ["tests/test_deploy.py::test_kernel_matches_conv2d_over_random_shapes",
        "tests/test_deploy.py::test_kernel_epilogue_residual_relu_pool",
        "tests/test_deploy.py::test_kernel_uses_torch_threads_and_stays_exact",
        "tests/test_deploy.py::test_every_tile_matches_conv2d_where_the_last_tile_ends_early",
        "tests/test_deploy_groups.py::test_kernel_and_fallback_match_conv2d_over_random_shapes",
        "tests/test_deploy_groups.py::test_epilogue_residual_relu_pool_and_threads",
        "tests/test_deploy_groups.py::test_wide_inputs_and_every_walk_match_conv2d",
        "tests/test_deploy.py::test_batches_shared_out_over_threads_stay_exact",
        "tests/test_deploy.py::test_a_tile_this_build_lacks_runs_on_the_default",
        "tests/test_deploy_groups.py::test_whole_image_and_split_units_over_threads_match_conv2d",
        "tests/test_deploy_groups.py::test_a_tile_this_build_lacks_runs_on_the_default",
        "tests/test_kernel_inputs.py"]


def test_build_flags(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    suffix, flags = kernels.build_flags()
    assert suffix == "_avx2" and "-mno-avx512f" in flags and "-march=native" in flags
    assert ("-fopenmp" in flags) == torch._C.has_openmp  # at::parallel_for on torch's own OpenMP pool
    monkeypatch.setenv(kernels.ISA_ENV, "sse")
    with pytest.raises(RuntimeError, match="avx2"):
        kernels.build_flags()


def test_a_cpu_that_is_not_x86_gets_one_clear_line():
    """Built for a CPU that is not x86 (an Arm laptop or server), the kernels' first error is
    their own #error, the line deployment prints before it stays dense (not a missing
    immintrin.h). Simulated by compiling the shared headers with x86's macros undefined."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ here")
    source = '#include "simd.h"\n#include "parallel.h"\n'  # the kernels' order
    proc = subprocess.run([gxx, "-x", "c++", "-std=c++20", "-fsyntax-only", "-U__x86_64__", "-U__i386__",
                           "-I", str(ROOT / "tkp_lib" / "csrc"), "-"], input=source,
                          capture_output=True, text=True, timeout=120)
    line = kernels.one_line(RuntimeError(proc.stderr))
    assert proc.returncode != 0 and "#error" in line and "not x86" in line, proc.stderr[-2000:]


def test_native_build_reports_its_instruction_set():
    if not (topk_conv.kernel_available() and tapgroup.kernel_available()):
        pytest.skip("the kernels cannot be built here")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    want = "avx512" if " avx512f" in flags else "avx2"
    assert topk_conv.kernel().isa() == tapgroup.kernel().isa() == want


def test_avx2_build_matches_conv2d():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" not in flags or " fma" not in flags:
        pytest.skip("this CPU has no AVX2 + FMA")
    env = {**os.environ, kernels.ISA_ENV: "avx2", "OMP_NUM_THREADS": "2"}
    isa = subprocess.run([sys.executable, "-c", "from tkp_lib import topk_conv, tapgroup; "
                          "print(topk_conv.kernel().isa(), tapgroup.kernel().isa())"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert isa.returncode == 0 and isa.stdout.split()[-2:] == ["avx2", "avx2"], isa.stdout + isa.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FUZZ], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "skipped" not in summary, proc.stdout[-3000:] + proc.stderr[-2000:]
    if shutil.which("objdump"):  # and no AVX-512 instruction in what was built
        built = Path(torch.utils.cpp_extension._get_build_directory(f"tkp_topk_conv_{kernels.cpu_tag()}_avx2", False))
        code = subprocess.run(["objdump", "-d", *map(str, built.glob("*.so"))], capture_output=True, text=True)
        assert code.returncode == 0 and "zmm" not in code.stdout
