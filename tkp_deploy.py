"""Deploy a Top-K pruned CNN on the CPU: final.pt -> deploy.pt, a model that computes only the kept taps.

    python tkp_deploy.py runs/vgg8-.../final.pt --output runs/vgg8-.../deploy.pt
    python tkp_deploy.py final.pt --output deploy.pt --threads 1 --batch-sizes 1,32 --json deploy.json

    import tkp_deploy
    model = tkp_deploy.load("deploy.pt")      # an eval-mode nn.Module: CPU, NCHW float32 input
    logits = model(images)

What `python tkp_deploy.py` does:

1. rebuilds the trained model with the script that trained it (tkp_common.load_trained:
   --script, else the script final.pt's metrics name, else the model script next to this
   file whose model the weights fit);
2. traces it with torch.fx (the modules deploy.pt holds as leaves, every other module
   traced through: tkp_lib.deploy_layers.trace) and folds eval-mode BatchNorm into the
   preceding convolution (fold_batchnorm); a model torch.fx cannot trace, or one that uses an
   operation deploy.pt cannot hold (tkp_lib.deploy_ops), is refused here in one line naming
   the module, before any timing;
3. replaces every pruned Conv2d the kernels take by a TopKConv2d (tkp_lib.topk_conv: the
   kept taps of every kernel), for tap-group masks a TapGroupConv2d (tkp_lib.tapgroup), for
   depthwise convolutions a DepthwiseTopKConv2d (tkp_lib.depthwise), where it measures
   faster than its dense convolution at every --batch-sizes on this machine
   (tkp_lib.deploy_layers.choose_layers), and folds a residual add, ReLU and 2x2 max pool it
   alone feeds into its epilogue (a depthwise layer: also a ReLU6); other grouped
   convolutions stay dense;
4. checks the deployed model against the masked model (fp32, max |difference| / max
   |reference| <= 1e-4 and identical top-1 on a batch of standard-normal inputs at the
   training input shape: the training data need not be on the deploying machine);
5. prints a per-layer and whole-model table (dense ms, deploy ms, measured and theoretical
   speed-up; dense = the same model with BatchNorm folded, eager) and saves deploy.pt
   (tkp_lib.deploy_format: plain values and tensors, opened with weights_only=True; nothing
   read from it becomes code).

The kernels are compiled from source on first use (tkp_lib.kernels). Where they cannot be
built (no compiler, neither AVX-512 nor AVX2, or TKP_DEPLOY_NO_KERNEL=1), deployment keeps every
convolution dense and prints one line that says why; a deploy.pt loaded there runs its
kernel layers with their plain torch fallback. Measured speed-ups: RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from tkp_lib import topk_conv
from tkp_lib.deploy_format import DeployError, load, save  # noqa: F401  (load: the public API)
from tkp_lib.deploy_layers import (
    REL_TOLERANCE,
    apply_layers,
    choose_layers,
    fold_batchnorm,
    layer_macs,
    summary,
    theoretical_speedup,
    tile_name,
    time_models,
    verify,
)
from tkp_lib.runtime import ArgumentParser, TKPError, int_list, int_range, plain


def rebuild_model(final_path: str, script: str | None = None) -> tuple[nn.Module, tuple, str]:
    """(model in eval mode with final.pt's weights loaded strictly, input shape (C, H, W),
    script file name), by tkp_common.load_trained: the script `script` names, else the one
    final.pt's metrics name, else the first model script whose model the weights fit; its
    defaults overlaid with final.pt's flags, no pretrained weights loaded, masks checked.
    (Only deployment needs the training scripts; `load` does not.)"""
    import tkp_common as tkp
    trained = tkp.load_trained(final_path, script, "final.pt")
    return trained.model, tuple(trained.script.input_shape(trained.args)), trained.script.file



def tile_list(text: str) -> list[tuple[int, int, int]]:
    try:
        tiles = [tuple(int(v) for v in t.lower().split("x")) for t in text.split(",") if t.strip()]
    except ValueError:
        tiles = []
    if not tiles or any(len(t) not in (2, 3) for t in tiles):
        raise argparse.ArgumentTypeError(f"expected tiles like 4x4,2x8x1 (M output channels x S vectors, then "
                                         f"1 for one input copy per kernel column), got {text!r}")
    return [topk_conv.as_tile(t) for t in tiles]


def check_tiles(tiles) -> None:
    """--tiles names only tiles this build compiles in (DeployError otherwise), where the kernel is built."""
    if tiles and topk_conv.kernel_available():
        unknown = [tile_name(t) for t in tiles if t not in topk_conv.tile_kinds()]
        if unknown:
            raise DeployError(f"--tiles {','.join(unknown)} not compiled in; choose from "
                              f"{','.join(tile_name(t) for t in topk_conv.tile_kinds())}")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Deploy a Top-K pruned CNN (final.pt) with the Top-K CPU kernel",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a run's final.pt")
    p.add_argument("--output", required=True, help="where to write deploy.pt")
    p.add_argument("--script", default=None,
                   help="the model script (file or short name, e.g. vgg8) when final.pt does not record it")
    p.add_argument("--threads", type=int_range(1), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--batch-sizes", type=int_list(), default=[1, 32], help="batch sizes timed per layer and whole")
    p.add_argument("--repeats", type=int_range(1), default=7, help="interleaved timing rounds (medians)")
    p.add_argument("--verify-batch", type=int_range(1), default=32, help="inputs in the deployed-vs-masked check")
    p.add_argument("--tiles", type=tile_list, default=None,
                   help="Top-K register tiles to try per layer, MxS[x1], e.g. 4x4,4x4x1: M output channels x S "
                        "vectors (M = 0: the aligned tiles, which have no x1), x1: one input copy per kernel "
                        "column (stride-1 layers; x0, the default, one padded copy) (default: every tile compiled in)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs of the check and the timing")
    p.add_argument("--json", default=None, help="write the report here")
    return p


RUN_FILES = ("final.pt", "final_qat.pt", "checkpoint_last.pt")  # a run's files, which deploy.pt must not replace


def check_paths(args) -> None:
    """--output (and --json) name a file deployment can write, in a folder that exists, and
    not the checkpoint or another run file: a DeployError before any timing otherwise."""
    out = Path(args.output)
    same = out.exists() and Path(args.checkpoint).exists() and out.samefile(args.checkpoint)
    if same or out.name in RUN_FILES:
        what = "the checkpoint it deploys" if same else "a run file"
        raise DeployError(f"--output {args.output} would replace {what}: name the deployed model another file, "
                          f"e.g. {out.with_name('deploy.pt')}")
    for flag, path in (("--output", out), ("--json", Path(args.json) if args.json else None)):
        if path is not None and path.is_dir():
            raise DeployError(f"{flag} {path} is a folder: name a file in it")
        if path is not None and not path.parent.is_dir():
            raise DeployError(f"{flag} {path}: {path.parent} is not a folder that exists; create it first")


def format_report(report: dict) -> str:
    batches = report["batch_sizes"]
    head = f"{'layer':<28} {'shape':<22} {'K':>2} {'theory':>7}  " + "  ".join(
        f"{'b' + str(b) + ' dense':>10} {'deploy':>8} {'speed-up':>8}" for b in batches) + "  decision"
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        shape = f"{r['in_channels']}->{r['out_channels']} {r['kernel_size'][0]}x{r['kernel_size'][1]}" \
                f"/{r['stride'][0]} @{r['input_hw'][0]}"
        cells = []
        for b in batches:
            t = r["timings"].get(b) or r["timings"].get(str(b))
            if t:
                ms = t["kernel_ms"] if r["deploy"] != "dense" else t["dense_ms"]
                cells.append(f"{t['dense_ms']:>10.3f} {ms:>8.3f} {t['dense_ms'] / ms:>7.2f}x")
            else:
                cells.append(f"{'-':>10} {'-':>8} {'-':>8}")
        decision = f"Top-K tile {tile_name(r['tile'])}" if r["deploy"] == "topk" else f"dense ({r['why']})"
        if r["deploy"] == "tapgroup":
            decision = f"tap group {r['group']}, tile {tile_name(r['tile'])}"
        if r["deploy"] == "depthwise":
            decision = "depthwise Top-K"
        lines.append(f"{r['name']:<28} {shape:<22} {r['k']:>2} {r['theoretical']:>6.2f}x  " + "  ".join(cells)
                     + f"  {decision}")
    w = report["whole_model"]
    lines.append("-" * len(head))
    cells = [f"{w[str(b)]['dense_ms']:>10.3f} {w[str(b)]['deploy_ms']:>8.3f} {w[str(b)]['speedup']:>7.2f}x"
             for b in batches]
    lines.append(f"{'whole model':<28} {'':<22} {'':>2} {report['theoretical']:>6.2f}x  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    check_paths(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, input_shape, script = rebuild_model(args.checkpoint, args.script)
    print(f"tkp_deploy: {args.checkpoint} ({script}, input {tuple(input_shape)}), {torch.get_num_threads()} "
          f"thread(s), batch sizes {args.batch_sizes}", flush=True)
    folded = fold_batchnorm(model)
    dense = copy.deepcopy(folded)
    check_tiles(args.tiles)
    records = choose_layers(folded, input_shape, args.batch_sizes, repeats=args.repeats, tiles=args.tiles)
    deployed = apply_layers(folded, records, input_shape)

    x = torch.randn(args.verify_batch, *input_shape)
    check = verify(deployed, model, x)
    print(f"check against the masked model ({check['batch']} inputs): max relative error "
          f"{check['max_rel_error']:.2e} (<= {REL_TOLERANCE:g}), top-1 identical: {check['top1_identical']}")
    if not check["ok"]:
        raise DeployError("the deployed model " + (f"fails ({check['error']})" if "error" in check else
                                                   "does not match the masked model")
                          + "; deploy.pt not written: please open an issue with the model")

    whole = time_models({"dense": dense, "deploy": deployed}, input_shape, args.batch_sizes, repeats=args.repeats)
    macs = layer_macs(dense, torch.zeros(1, *input_shape))
    report = {
        "checkpoint": str(args.checkpoint), "script": script, "input_shape": list(input_shape),
        "threads": torch.get_num_threads(), "batch_sizes": args.batch_sizes, "torch": str(torch.__version__),
        "kernel": "available" if topk_conv.kernel_available() else f"unavailable: {topk_conv.kernel_problem()}",
        "layers": records, "check": check, "theoretical": theoretical_speedup(macs),
        "whole_model": {str(b): {"dense_ms": t["dense"], "deploy_ms": t["deploy"], "speedup": t["dense"] / t["deploy"]}
                        for b, t in whole.items()},
    }
    print(format_report(report))
    print("dense = the same model with BatchNorm folded, eager; medians of interleaved rounds; theory = dense MACs /"
          " non-zero MACs")
    meta = {k: report[k] for k in ("checkpoint", "script", "threads", "batch_sizes", "torch", "kernel", "theoretical")}
    meta["check"] = check
    save(deployed, args.output, input_shape=input_shape, layers=plain(records), meta=plain(meta))
    print(f"wrote {args.output} ({summary(records)})")
    if args.json:
        Path(args.json).write_text(json.dumps(plain(report), indent=1))
    return report


if __name__ == "__main__":
    try:
        main()
    except TKPError as e:  # bad input: one line, exit status 2
        print(f"tkp_deploy: {e}", file=sys.stderr)
        sys.exit(2)
