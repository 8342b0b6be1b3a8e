"""Deployment latency: the Top-K kernel of tkp_deploy against dense, per layer and whole model.

    python benchmarks/deploy_latency.py --checkpoint runs/vgg8-.../final.pt --json deploy_latency.json
    python benchmarks/deploy_latency.py --checkpoint final.pt --threads 1,2 --batch-sizes 1,32
    python benchmarks/deploy_latency.py --script vgg8 --topk 2        # random init, magnitude Top-K
    python benchmarks/deploy_latency.py --checkpoint final.pt --script my_model.py   # a script of your own

For each thread count (torch.set_num_threads) the model is deployed as `python tkp_deploy.py`
deploys it (BatchNorm folded, each pruned layer's register tile chosen by measurement) and
then, fp32, at every batch size, with every variant timed interleaved in one run (medians of
`--repeats` rounds, each round at least `--min-round-ms`):

  per pruned layer  the Top-K kernel against the same convolution dense (BatchNorm folded),
                    eager (NCHW and channels_last) and torch.compile'd; speed-up = the
                    fastest dense / Top-K;
  whole model       dense eager (NCHW), dense channels_last, dense torch.compile'd (inductor,
                    freezing), against the deployed model eager and torch.compile'd;
                    speed-up = fastest dense / fastest deployed.

"theory" is dense MACs / non-zero MACs (the README's speedup_theoretical). torch.compile is
skipped with the reason where it does not work on this CPU (it needs a C++ compiler) or with
--no-compile. The per-layer table shows every pruned layer, also those deployment keeps
dense because the kernel is not faster there ("kept": dense); grouped and depthwise
convolutions stay dense (the summary line counts every kind).

On a machine other processes keep busy, OpenMP threads that spin while they wait for each
other can make a 2-thread run 10-100x slower than a 1-thread one (dense and Top-K alike);
OMP_WAIT_POLICY=PASSIVE (set before Python starts) makes such runs comparable.

Measured numbers: tkp_deploy.py's docstring.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/deploy_latency.py`
    sys.path.insert(0, str(ROOT))

import tkp_common as tkp  # noqa: E402
import tkp_deploy as D  # noqa: E402
from tkp_lib import deploy_layers, kernels, tapgroup, topk_conv  # noqa: E402
from tkp_lib.runtime import int_list, plain  # noqa: E402
from tkp_lib.sparsity import Masker, compute_masks, topk_plan  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="a run's final.pt")
    p.add_argument("--script", help="the model script (file or short name, e.g. vgg8): with --checkpoint, the one "
                                    "that trained it (when final.pt does not record it); without, the model from "
                                    "random init, each kernel's --topk largest taps")
    p.add_argument("--topk", type=int, default=1, help="with --script: taps kept per kernel")
    p.add_argument("--tap-group", type=int, default=1,
                   help="with --script: G consecutive outputs share their --topk taps per input channel (the "
                        "largest summed squared weights of the group), deployed by tkp_tapgroup.TapGroupConv2d")
    p.add_argument("--script-args", default="", help="with --script: its flags, e.g. '--img-size 32 --no-pretrain'")
    p.add_argument("--threads", type=int_list(), default=[1, 2], help="CPU thread counts, each a run of its own")
    p.add_argument("--batch-sizes", type=int_list(), default=[1, 32], help="batch sizes timed")
    p.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds (medians)")
    p.add_argument("--min-round-ms", type=float, default=4.0, help="minimum length of one timing round")
    p.add_argument("--tiles", type=D.tile_list, default=None, help="register tiles to try (default: all)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init and inputs")
    p.add_argument("--json", default=None, help="write every measurement here")
    return p


# ---- the model ----------------------------------------------------------------------------------

def random_topk_model(script: str, topk: int, script_args: list[str], tap_group: int = 1
                      ) -> tuple[nn.Module, tuple, str]:
    """A script's model from random init (no pretrained weights), masked by the engine's own
    Top-K plan (topk_plan with `tap_group`; kernels with more than `topk` taps keep their
    best `topk`): speed depends on shapes and K only."""
    module = tkp.import_script(script)
    args = module.get_args_parser().parse_args(script_args)
    args.eval, args.dry_run = "random init", False  # so that the script loads no weights
    model = module.build_model(args).eval()
    plan = topk_plan(model, topk, tap_group=tap_group)
    Masker(model, compute_masks(model, plan)).apply_()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics as a trained model has them, not 0 and 1
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model, tuple(module.SCRIPT.input_shape(args)), module.SCRIPT.file


# ---- timing ---------------------------------------------------------------------------------------

def compiled(module: nn.Module, x: torch.Tensor):
    """(module compiled for x's shape by inductor with freezing, None) or (None, why not)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    try:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            fn = torch.compile(copy.deepcopy(module), dynamic=False)
            fn(x)
        return fn, None
    except Exception as e:  # no C++ compiler, an inductor error: the benchmark goes on eagerly
        return None, kernels.one_line(e)


def time_layers(folded, records: list[dict], input_shape: tuple, batches: list[int], use_compile: bool,
                timing: dict) -> list[dict]:
    """Per pruned layer and batch size: dense eager, dense compiled and the Top-K kernel with
    the tile deployment chose, interleaved. Layers of one shape share one measurement."""
    shapes = deploy_layers.conv_input_shapes(folded, torch.zeros(1, *input_shape))
    rows, done = [], {}
    for rec in records:
        if rec["tile"] is None:  # not a Top-K layer (dense, or the kernel does not take it)
            continue
        conv = folded.get_submodule(rec["name"])
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
               shapes[rec["name"]][1:], rec["k"], tuple(rec["tile"]), rec["deploy"], rec.get("group"))
        if key not in done:
            if rec["deploy"] == "tapgroup":  # the tap-group kernel (tkp_tapgroup), in the "topk" column
                topk = tapgroup.TapGroupConv2d.from_conv(conv, rec["group"], rec["group_k"], rec["tile"])
            else:
                topk = topk_conv.TopKConv2d.from_conv(conv, rec["tile"])
            conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
            per_batch = {}
            for b in batches:
                x = torch.randn(b, *shapes[rec["name"]][1:])
                x_cl = x.contiguous(memory_format=torch.channels_last)
                fns = {"dense_eager": lambda: conv(x), "dense_channels_last": lambda: conv_cl(x_cl),
                       "topk": lambda: topk(x)}
                why = "--no-compile"
                if use_compile:
                    fn, why = compiled(conv, x)
                    if fn is not None:
                        fns["dense_compiled"] = lambda: fn(x)
                t = kernels.median_ms(fns, **timing)
                dense = min(v for k, v in t.items() if k.startswith("dense"))
                per_batch[b] = {**{f"{k}_ms": v for k, v in t.items()}, "speedup": dense / t["topk"],
                                "compile": why or "ok"}
            done[key] = per_batch
        rows.append({"name": rec["name"], "k": rec["k"], "theoretical": rec["theoretical"], "tile": rec["tile"],
                     "kept": rec["deploy"], "shape": f"{conv.in_channels}->{conv.out_channels} "
                     f"{conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]} @{shapes[rec['name']][2]}",
                     "batches": done[key]})
    return rows


def time_whole(dense: nn.Module, deployed: nn.Module, input_shape: tuple, batches: list[int], use_compile: bool,
               timing: dict) -> dict:
    """Per batch size: the dense variants and the deployed model, interleaved."""
    out = {}
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    for b in batches:
        x = torch.randn(b, *input_shape)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns = {"dense_eager": lambda: dense(x), "dense_channels_last": lambda: dense_cl(x_cl),
               "deploy_eager": lambda: deployed(x)}
        notes = {}
        if use_compile:
            for name, module in (("dense_compiled", dense), ("deploy_compiled", deployed)):
                fn, why = compiled(module, x)
                if fn is not None:
                    fns[name] = (lambda fn=fn: fn(x))
                else:
                    notes[name] = why
        t = kernels.median_ms(fns, **timing)
        best_dense = min((k for k in t if k.startswith("dense")), key=t.get)
        best_deploy = min((k for k in t if k.startswith("deploy")), key=t.get)
        out[b] = {**{f"{k}_ms": v for k, v in t.items()}, "best_dense": best_dense, "best_deploy": best_deploy,
                  "speedup": t[best_dense] / t[best_deploy], "speedup_eager": t["dense_eager"] / t["deploy_eager"],
                  "notes": notes}
    return out


# ---- report -----------------------------------------------------------------------------------------

def format_threads(r: dict, batches: list[int]) -> str:
    lines = [f"threads {r['threads']}: {r['summary']}"]
    head = f"  {'layer':<26} {'shape':<20} {'K':>2} {'theory':>7} " + " ".join(
        f"| b{b}: {'NCHW':>7} {'NHWC':>7} {'comp.':>7} {'Top-K':>7} {'speed-up':>8} " for b in batches) + "| tile  kept"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for row in r["layers"]:
        cells = []
        for b in batches:
            t = row["batches"][b]
            comp = f"{t['dense_compiled_ms']:7.3f}" if "dense_compiled_ms" in t else f"{'-':>7}"
            cells.append(f"| {'':>{len(str(b)) + 3}}{t['dense_eager_ms']:7.3f} {t['dense_channels_last_ms']:7.3f} "
                         f"{comp} {t['topk_ms']:7.3f} {t['speedup']:7.2f}x ")
        lines.append(f"  {row['name']:<26} {row['shape']:<20} {row['k']:>2} {row['theoretical']:6.2f}x "
                     + "".join(cells) + f"| {row['tile'][0]}x{row['tile'][1]}  {row['kept']}")
    for b in batches:
        w = r["whole"][b]
        parts = ", ".join(f"{k.removesuffix('_ms')} {v:.3f}" for k, v in w.items() if k.endswith("_ms"))
        notes = "; ".join(f"{k}: {v}" for k, v in w["notes"].items())
        lines.append(f"  whole model, batch {b}: {parts} ms -> {w['speedup']:.2f}x ({w['best_deploy']} vs "
                     f"{w['best_dense']}; eager vs eager {w['speedup_eager']:.2f}x; theory {r['theoretical']:.2f}x)"
                     + (f" [{notes}]" if notes else ""))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model, input_shape, script = D.rebuild_model(args.checkpoint, args.script)
        source = args.checkpoint
    elif not args.script:
        raise D.DeployError("pass --checkpoint FINAL.pt (a run's final.pt) or --script NAME (random init)")
    else:
        model, input_shape, script = random_topk_model(args.script, args.topk, args.script_args.split(),
                                                       args.tap_group)
        source = f"{script}, random init, top-{args.topk}" + (f", tap group {args.tap_group}"
                                                             if args.tap_group > 1 else "")
    if not topk_conv.kernel_available():
        raise D.DeployError(f"the Top-K kernel is unavailable ({topk_conv.kernel_problem()}): nothing to benchmark")
    timing = {"repeats": args.repeats, "min_round_s": args.min_round_ms / 1e3}
    folded = deploy_layers.fold_batchnorm(model)
    theoretical = deploy_layers.theoretical_speedup(deploy_layers.layer_macs(folded, torch.zeros(1, *input_shape)))
    result = {"source": source, "script": script, "input_shape": list(input_shape), "batch_sizes": args.batch_sizes,
              "torch": str(torch.__version__), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads by default", "theoretical": theoretical, "runs": []}
    print(f"deploy_latency: {source}, input {input_shape}, fp32, batch sizes {args.batch_sizes}, torch "
          f"{torch.__version__}", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        records = deploy_layers.choose_layers(folded, input_shape, args.batch_sizes, repeats=args.repeats,
                                              tiles=args.tiles, log=lambda s: None)
        deployed = deploy_layers.apply_layers(copy.deepcopy(folded), records, input_shape)
        check = deploy_layers.verify(deployed, model, torch.randn(8, *input_shape))
        if not check["ok"]:
            raise D.DeployError(f"the deployed model does not match the masked model: {check}")
        run = {"threads": threads, "theoretical": theoretical, "check": check,
               "summary": deploy_layers.summary(records),
               "layers": time_layers(folded, records, input_shape, args.batch_sizes, args.compile, timing),
               "whole": time_whole(folded, deployed, input_shape, args.batch_sizes, args.compile, timing)}
        result["runs"].append(run)
        print(format_threads(run, args.batch_sizes), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(plain(result), indent=1))
    return result


if __name__ == "__main__":
    try:
        main()
    except tkp.TKPError as e:
        sys.exit(f"deploy_latency: {e}")
