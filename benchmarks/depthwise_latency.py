"""Depthwise Top-K latency: tkp::depthwise_topk2d against oneDNN's depthwise convolution, per layer.

    python benchmarks/depthwise_latency.py --threads 1 --batch-sizes 1,32 --json depthwise.json
    python benchmarks/depthwise_latency.py --models convnext_t --batch-sizes 32 --repeats 15 --runs 3

The depthwise layer shapes of MobileNetV2 on CIFAR (32 px input, stride-1 stem; 3x3, stride 1
and 2), of ConvNeXt-T at 224 px (7x7) and of the tiny ConvNeXt of tests/user_models (7x7, 32
px), each with random weights of which every kernel keeps its K largest |w| taps (at its own
positions, as Top-K training leaves them). At each batch size, fp32, timed interleaved
(tkp_lib.kernels.measure_interleaved, medians of --repeats rounds): the dense depthwise
convolution eager in NCHW and in channels_last (input and weight already channels_last, the
layout oneDNN's depthwise kernel is built for), and DepthwiseTopKConv2d (NCHW) for every K.
ratio = the faster dense / Top-K: above 1 the kernel is faster. With --runs N the whole
measurement is repeated N times (on a busy machine other processes' load comes and goes) and
each time and each ratio is the median over the runs; the table also gives the lowest and
highest ratio of the runs. tkp_deploy compares a layer with the dense convolution in the
model's own layout (NCHW) only, and keeps the faster.

Measured numbers: RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/depthwise_latency.py`
    sys.path.insert(0, str(ROOT))

from tkp_lib import depthwise, kernels  # noqa: E402
from tkp_lib.runtime import int_list  # noqa: E402

# (channels, input size, stride) of each distinct depthwise layer; kernel size and K per model
MODELS = {
    # torchvision's MobileNetV2 widths with the usual CIFAR strides (1, 1, 2, 2, 1, 2, 1)
    "mobilenetv2_cifar": {"kernel": 3, "ks": [1, 2, 4], "layers": [
        (32, 32, 1), (96, 32, 1), (144, 32, 1), (144, 32, 2), (192, 16, 1), (192, 16, 2), (384, 8, 1),
        (576, 8, 1), (576, 8, 2), (960, 4, 1)]},
    "convnext_t": {"kernel": 7, "ks": [1, 4, 9], "layers": [(96, 56, 1), (192, 28, 1), (384, 14, 1), (768, 7, 1)]},
    "convnext_tiny_test": {"kernel": 7, "ks": [1, 4, 9], "layers": [(16, 16, 1), (32, 8, 1), (64, 4, 1)]},
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--ks", type=int_list(), default=None, help="K kept taps to time (default: the model's)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--batch-sizes", type=int_list(), default=[1, 32], help="batch sizes timed")
    p.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds (medians)")
    p.add_argument("--min-round-ms", type=float, default=4.0, help="minimum length of one timing round")
    p.add_argument("--runs", type=int, default=1, help="repeat everything; report the medians over the runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--json", default=None, help="write every measurement here")
    return p


def topk_depthwise(channels: int, kernel: int, stride: int, k: int, gen: torch.Generator) -> nn.Conv2d:
    """A depthwise Conv2d (same padding) whose kernels keep their k largest |w| taps."""
    conv = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels).eval()
    w = torch.randn(channels, kernel * kernel, generator=gen)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(k, dim=1).indices, True)
    with torch.no_grad():
        conv.weight.copy_((w * keep).reshape(channels, 1, kernel, kernel))
    return conv


def time_layer(channels: int, size: int, stride: int, kernel: int, ks: list[int], batch: int, args,
               gen: torch.Generator) -> list[dict]:
    """One row per K: dense NCHW, dense channels_last and Top-K ms, all timed in one interleaved run."""
    x = torch.randn(batch, channels, size, size, generator=gen)
    convs = {k: topk_depthwise(channels, kernel, stride, k, gen) for k in ks}
    dense = convs[ks[-1]]
    dense_cl = topk_depthwise(channels, kernel, stride, ks[-1], gen).to(memory_format=torch.channels_last)
    dense_cl.load_state_dict(dense.state_dict())
    x_cl = x.contiguous(memory_format=torch.channels_last)
    layers = {k: depthwise.DepthwiseTopKConv2d.from_conv(c) for k, c in convs.items()}
    for k, m in layers.items():  # the kernel computes this layer
        ref = convs[k](x)
        assert float((m(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (channels, size, k)
    fns = {"nchw": lambda: dense(x), "channels_last": lambda: dense_cl(x_cl),
           **{f"k{k}": (lambda m=m: m(x)) for k, m in layers.items()}}
    t = kernels.median_ms(fns, repeats=args.repeats, min_round_s=args.min_round_ms / 1e3)
    best = min(t["nchw"], t["channels_last"])
    return [{"channels": channels, "size": size, "stride": stride, "kernel": kernel, "k": k, "batch": batch,
             "nchw_ms": t["nchw"], "channels_last_ms": t["channels_last"], "topk_ms": t[f"k{k}"],
             "ratio": best / t[f"k{k}"], "ratio_nchw": t["nchw"] / t[f"k{k}"]} for k in ks]


def machine() -> dict:
    model = platform.processor()
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "torch": str(torch.__version__), "isa": depthwise.kernel().isa()}


def measure(args, gen: torch.Generator) -> list[dict]:
    """One run: every layer, batch size and K (rows in a fixed order)."""
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        for channels, size, stride in spec["layers"]:
            for batch in args.batch_sizes:
                for r in time_layer(channels, size, stride, spec["kernel"], args.ks or spec["ks"], batch, args, gen):
                    rows.append({"model": name, **r})
    return rows


def combine(runs: list[list[dict]]) -> list[dict]:
    """Per row: the median over the runs of each time and of each ratio (a run's ratio compares times taken
    interleaved), and the runs' lowest and highest ratio."""
    out = []
    for versions in zip(*runs):
        row = dict(versions[0])
        for key in ("nchw_ms", "channels_last_ms", "topk_ms", "ratio", "ratio_nchw"):
            row[key] = statistics.median(v[key] for v in versions)
        row["ratio_range"] = [min(v["ratio"] for v in versions), max(v["ratio"] for v in versions)]
        out.append(row)
    return out


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    if not depthwise.kernel_available():
        sys.exit(f"depthwise_latency: the kernel cannot be built here ({depthwise.kernel_problem()})")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    result = {"machine": machine(), "threads": args.threads, "runs": args.runs, "loads": []}
    print(f"{result['machine']['cpu']}, torch {result['machine']['torch']}, {result['machine']['isa']}, "
          f"{args.threads} thread(s)", flush=True)
    runs = []
    with torch.no_grad():
        for i in range(args.runs):
            before = os.getloadavg()[0]
            runs.append(measure(args, gen))
            result["loads"].append([before, os.getloadavg()[0]])
            print(f"run {i + 1}/{args.runs}: load {before:.2f} -> {result['loads'][-1][1]:.2f}", flush=True)
    result["rows"] = combine(runs)
    print(f"{'model':<19} {'layer':<18} {'K':>2} {'batch':>5} {'NCHW ms':>9} {'NHWC ms':>9} {'Top-K ms':>9} "
          f"{'ratio':>6}  {'runs':>11}")
    for r in result["rows"]:
        layer = f"{r['channels']}x{r['size']}x{r['size']} {r['kernel']}x{r['kernel']}/{r['stride']}"
        print(f"{r['model']:<19} {layer:<18} {r['k']:>2} {r['batch']:>5} {r['nchw_ms']:>9.4f} "
              f"{r['channels_last_ms']:>9.4f} {r['topk_ms']:>9.4f} {r['ratio']:>5.2f}x  "
              f"{r['ratio_range'][0]:>4.2f}-{r['ratio_range'][1]:.2f}x")
    print("ratio = min(NCHW, NHWC) / Top-K, median over the runs; runs: the runs' lowest and highest ratio")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
