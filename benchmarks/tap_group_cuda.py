"""Tap-group convolutions on a GPU: TapGroupConv2d's torch-ops path against cuDNN dense.

    python benchmarks/tap_group_cuda.py                                   # CUDA, bf16, batch 256
    python benchmarks/tap_group_cuda.py --device cpu --dtype fp32 --batch 8 --json out.json

For each layer shape (3x3, stride 1, padding 1: VGG-8's 64 and 128-channel layers and two
wider ones) a random convolution is masked with K taps shared by every G consecutive output
channels (tkp_common's tap-group plan) and timed, interleaved in one run, as
  dense            F.conv2d on the masked weight (cuDNN on CUDA), NCHW and channels_last;
  tap groups       TapGroupConv2d.forward_torch (unfold, gather of each group's kept rows,
                   batched matmul), eager and torch.compile'd;
speed-up = the faster dense / the faster tap-group variant. Outputs are checked against dense
(relative error). Nothing here needs the C++ kernel, which is CPU-only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/tap_group_cuda.py`
    sys.path.insert(0, str(ROOT))

import tkp_common as tkp  # noqa: E402
from tkp_lib import kernels  # noqa: E402
from tkp_lib.runs import write_text_atomic  # noqa: E402
from tkp_lib.runtime import HelpFormatter, device_name, versions  # noqa: E402
from tkp_lib.sparsity import Masker, compute_masks, topk_plan  # noqa: E402
from tkp_lib.tapgroup import DEFAULT_TILE, TapGroupConv2d  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(64, 64, 32), (128, 128, 16), (128, 128, 32), (256, 256, 16)]  # (C_in, C_out, H = W)


def get_args_parser() -> tkp.ArgumentParser:
    p = tkp.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="precision of both variants")
    p.add_argument("--batch", type=tkp.int_range(1), default=256, help="images per call")
    p.add_argument("--topk", type=tkp.int_range(1, 8), default=1, help="taps kept per kernel")
    p.add_argument("--tap-group", type=tkp.int_range(1), default=32, help="output channels sharing their taps")
    p.add_argument("--repeats", type=tkp.int_range(1), default=20, help="interleaved rounds (medians)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    return p


def one_layer(c_in: int, c_out: int, size: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    model = nn.Sequential(conv)
    Masker(model, compute_masks(model, topk_plan(model, args.topk, tap_group=args.tap_group))).apply_()
    # a tile named, so that no default is looked up in the CPU kernel (which would build it,
    # a minute on a fresh machine): forward_torch uses none
    grouped = TapGroupConv2d.from_conv(conv, args.tap_group, args.topk, DEFAULT_TILE).to(device, dtype)
    weight = conv.weight.detach().to(device, dtype)
    x = torch.randn(args.batch, c_in, size, size, device=device, dtype=dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = F.conv2d(x, weight, padding=1)
        err = float((grouped.forward_torch(x).float() - ref.float()).abs().max() / ref.float().abs().max())
        fns = {"dense": lambda: F.conv2d(x, weight, padding=1),
               "dense_channels_last": lambda: F.conv2d(x_cl, w_cl, padding=1),
               "tap_group": lambda: grouped.forward_torch(x)}
        if args.compile:
            compiled = torch.compile(grouped.forward_torch, dynamic=False)  # the layers' shapes differ
            fns["tap_group_compiled"] = lambda: compiled(x)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        ms = kernels.median_ms(fns, repeats=args.repeats, warmup=3, sync=sync)
    dense = min(ms["dense"], ms["dense_channels_last"])
    sparse = min(v for k, v in ms.items() if k.startswith("tap_group"))
    return {"c_in": c_in, "c_out": c_out, "size": size, "ms": ms, "rel_error": err, "speedup": dense / sparse}


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise tkp.TKPError("--device cuda: torch sees no GPU; pass --device cpu")
    dtype = DTYPES[args.dtype]
    rows = []
    result = {"benchmark": "tap_group_cuda", "device": device_name(device), "dtype": args.dtype,
              "batch": args.batch, "topk": args.topk, "tap_group": args.tap_group,
              "versions": versions(device), "layers": rows}
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # dense at its fastest cuDNN algorithm, found in the warm-up
    try:
        for shape in SHAPES:
            rows.append(one_layer(*shape, args, device, dtype))
            if args.json:  # after each layer: a run stopped by a time limit keeps what it measured
                write_text_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
    finally:
        torch.backends.cudnn.benchmark = autotune
    print(f"tap groups (Top-{args.topk}, G={args.tap_group}) vs dense on {result['device']}, "
          f"{args.dtype}, batch {args.batch}")
    for r in rows:
        times = ", ".join(f"{k} {v:.3f}" for k, v in r["ms"].items())
        print(f"  {r['c_in']:>4}->{r['c_out']:<4} @{r['size']:>3} px: {r['speedup']:.2f}x  ({times} ms; "
              f"rel. error {r['rel_error']:.1e})")
    return result


if __name__ == "__main__":
    tkp.cli(main)
