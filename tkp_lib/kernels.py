"""Native kernels and timing: the two things every deployment module and benchmark shares.

Owns: building the C++ kernels of tkp_lib/csrc/ on first use (torch.utils.cpp_extension,
g++ -O3 -march=native, cached in torch's extension folder, TORCH_EXTENSIONS_DIR), once per
process, with one line that says why where they cannot be built; and `measure_interleaved`,
the one timing helper (benchmarks and tkp_deploy's per-layer choice use it).

Instruction set: csrc/simd.h picks AVX-512 where -march=native offers it, else AVX2 + FMA,
else the build fails with a clear line. TKP_KERNEL_ISA=avx2 builds the AVX2 variant on an
AVX-512 machine too (-mno-avx512f, its own extension name): what the tests use to check it.
Threads: where torch runs its intra-op threads on OpenMP, the kernels are compiled with
-fopenmp, so that at::parallel_for (inline in torch's headers) runs on torch's own OpenMP
pool; without it, at::parallel_for runs the whole range on the calling thread.
May import: torch and the standard library only (a leaf: every deployment module imports it).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
NO_KERNEL_ENV = "TKP_DEPLOY_NO_KERNEL"  # set to 1: never build, run every layer's plain fallback
ISA_ENV = "TKP_KERNEL_ISA"  # "avx2": build the AVX2 + FMA variant even where AVX-512 is there

_builds: dict[str, dict] = {}  # {source stem: {"module": extension or None, "why": str}}


def native(stem: str, what: str, fallback: str):
    """The extension built from csrc/<stem>.cpp, or None where it cannot be built (no
    compiler, an instruction set the source needs, TKP_DEPLOY_NO_KERNEL=1). The first call
    builds it (seconds; cached by torch across processes) and, on failure, prints one line:
    "<what> is unavailable (<why>); <fallback>". Later calls answer at once, without retrying."""
    if stem not in _builds:
        try:
            if os.environ.get(NO_KERNEL_ENV, "") not in ("", "0"):
                raise RuntimeError(f"{NO_KERNEL_ENV} is set")
            from torch.utils import cpp_extension
            isa, flags = build_flags()
            # -march=native: one build per kind of CPU, should the extension folder be shared by several.
            # csrc/ stays C++17: torch 2.11's cpp_extension compiles with -std=c++17 (2.14: c++20), and a
            # C++20-only line would turn the kernels off there with one line, not fail a test here
            module = cpp_extension.load(name=f"tkp_{stem}_{cpu_tag()}{isa}", sources=[str(CSRC / f"{stem}.cpp")],
                                        extra_cflags=flags, verbose=False)
            _builds[stem] = {"module": module, "why": ""}
        except Exception as e:  # deploy with the plain fallback
            _builds[stem] = {"module": None, "why": one_line(e)}
            print(f"{what} is unavailable ({_builds[stem]['why']}); {fallback}", flush=True)
    return _builds[stem]["module"]


def free_cached_outputs() -> int:
    """Frees the freed outputs the built kernels keep for their next calls (up to 16 and 256
    MiB each, csrc/outputs.h), e.g. when a process is done with a deployed model; the bytes
    freed. Outputs still in use are not touched; later calls cache again."""
    return sum(b["module"].release_outputs() for b in _builds.values() if b["module"] is not None)


def build_flags() -> tuple[str, list[str]]:
    """(extension name suffix, compiler flags) for this process: -march=native, -mno-avx512f
    under TKP_KERNEL_ISA=avx2, -fopenmp where torch's intra-op threads are OpenMP's."""
    isa = os.environ.get(ISA_ENV, "").lower()
    if isa not in ("", "native", "avx2"):
        raise RuntimeError(f"{ISA_ENV}={isa!r}: expected avx2 or native")
    flags = ["-O3", "-march=native"] + (["-mno-avx512f"] if isa == "avx2" else [])
    if torch._C.has_openmp:  # the headers' at::parallel_for becomes an OpenMP region of torch's runtime
        flags.append("-fopenmp")
    return ("_avx2" if isa == "avx2" else ""), flags


def problem(stem: str) -> str:
    """Why csrc/<stem>.cpp could not be built ('' when it was, or before the first attempt)."""
    return _builds.get(stem, {}).get("why", "")


def unsupported_conv(conv) -> str | None:
    """Why the kernel layers cannot compute the nn.Conv2d `conv` (groups, dilation, a padding
    mode other than zeros, string padding), or None where they can."""
    if conv.groups != 1:
        return f"groups={conv.groups} (depthwise or grouped convolution): the kernels take groups=1 only"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={tuple(conv.dilation)}: the kernels take dilation 1 only"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} ({conv.padding_mode}): the kernels take explicit zero padding only"
    return None


def cpu_tag() -> str:
    """A short name for this CPU's model and instruction set (from /proc/cpuinfo on Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return f"{platform.machine()}_{hashlib.sha1(chr(10).join(lines).encode()).hexdigest()[:8]}"


def one_line(e: BaseException) -> str:
    """The telling line of an exception (a compiler's '#error' or 'error:' line when there
    is one, not ninja's whole log), at most 300 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "#error" in ln or " error:" in ln or ln.startswith("error:"):
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


@dataclass
class Timed:
    """One function's timing: milliseconds per call over the rounds, the first call's
    seconds (compilation, algorithm search), calls per round."""
    median_ms: float
    min_ms: float
    max_ms: float
    first_call_s: float
    calls: int
    rounds: int


def measure_interleaved(fns: dict[str, Callable], *, repeats: int = 7, min_round_s: float = 0.004,
                        warmup: int = 1, sync: Callable[[], None] | None = None,
                        prepare: dict[str, Callable] | None = None, grad: bool = False) -> dict[str, Timed]:
    """{name: Timed}, the functions timed in alternation so that drift (clocks, other
    processes) hits them alike. Each function's first call is timed alone, then `warmup`
    calls; its calls per round grow until a round lasts `min_round_s`; then `repeats` rounds
    in which each function in turn (after its `prepare[name]()`, untimed, if given) runs its
    calls back to back between two `sync()` (e.g. torch.cuda.synchronize); without gradients
    unless `grad` (a training step)."""
    sync = sync or (lambda: None)
    prepare = prepare or {}

    def run(name: str, n: int) -> float:
        if name in prepare:
            prepare[name]()
        fn = fns[name]
        sync()
        tic = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return time.perf_counter() - tic

    calls, first = {}, {}
    with torch.set_grad_enabled(grad):
        for name in fns:
            first[name] = run(name, 1)
            for _ in range(warmup):
                fns[name]()
            n = 1
            while True:
                t = run(name, n)
                if t >= min_round_s or n >= 1 << 14:
                    break
                n = min(1 << 14, n * max(2, math.ceil(min_round_s / max(t, 1e-7))))
            calls[name] = n
        per_call = {name: [] for name in fns}
        for _ in range(repeats):
            for name in fns:
                per_call[name].append(run(name, calls[name]) / calls[name] * 1e3)
    return {name: Timed(statistics.median(v), min(v), max(v), first[name], calls[name], repeats)
            for name, v in per_call.items()}


def median_ms(fns: dict[str, Callable], **kwargs) -> dict[str, float]:
    """{name: median milliseconds per call} of measure_interleaved."""
    return {name: t.median_ms for name, t in measure_interleaved(fns, **kwargs).items()}
