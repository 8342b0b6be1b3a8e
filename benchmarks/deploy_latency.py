"""Deployment latency: the Top-K kernel of tkp_deploy against dense, per layer and whole model.

    python benchmarks/deploy_latency.py --checkpoint runs/vgg8-.../final.pt --json deploy_latency.json
    python benchmarks/deploy_latency.py --checkpoint final.pt --threads 1,2 --batch-sizes 1,32
    python benchmarks/deploy_latency.py --script vgg8 --topk 2        # random init, magnitude Top-K
    python benchmarks/deploy_latency.py --checkpoint final.pt --script my_model.py   # a script of your own
    python benchmarks/deploy_latency.py --shapes 64@32,128@16,64@56,256@14,512@7 --topk 1 --tap-group 32

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

  thread scaling    with several --threads (not with --shapes), once all runs are done: each
                    run's deployed model at that run's thread count, and dense eager NCHW and
                    channels_last at each of those counts, all interleaved in one measurement
                    (each round after torch.set_num_threads and one untimed call), so that the
                    share of the fewest threads' speed-up kept at more threads comes from one
                    run, not from runs minutes apart (compiled variants are left out: inductor's
                    code keeps the thread count it was compiled for);
  --shapes C@HW,...  isolated 3x3 stride-1 C->C layers on HW x HW inputs (no model), masked
                    with --topk and --tap-group as the engine masks them, per-layer timing only.

"theory" is dense MACs / non-zero MACs (summary.json's speedup_theoretical). torch.compile is
skipped with the reason where it does not work on this CPU (it needs a C++ compiler) or with
--no-compile. The per-layer table shows every pruned layer, also those deployment keeps
dense because the kernel is not faster there ("kept": dense); grouped and depthwise
convolutions stay dense (the summary line counts every kind). Tap-group layers are timed on
channels_last input, as the deployed network feeds them (their "layout" is nhwc).

Measured numbers: RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
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
from tkp_lib.runs import write_text_atomic  # noqa: E402
from tkp_lib.runtime import ArgumentParser, int_list, int_range, plain  # noqa: E402
from tkp_lib.sparsity import Masker, compute_masks, topk_plan  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="a run's final.pt")
    p.add_argument("--script", help="the model script (file or short name, e.g. vgg8): with --checkpoint, the one "
                                    "that trained it (when final.pt does not record it); without, the model from "
                                    "random init, each kernel's --topk largest taps")
    p.add_argument("--shapes", type=shape_list, help="instead of a model: isolated 3x3 layers C@HW (C->C "
                   "channels, HW x HW input), e.g. 64@32,512@7; random init, masked by --topk and --tap-group")
    p.add_argument("--topk", type=int_range(1), default=1, help="with --script: taps kept per kernel")
    p.add_argument("--tap-group", type=int_range(1), default=1,
                   help="with --script: G consecutive outputs share their --topk taps per input channel (the "
                        "largest summed squared weights of the group), deployed by tkp_lib.tapgroup.TapGroupConv2d")
    p.add_argument("--script-args", default="", help="with --script: its flags, e.g. '--img-size 32 --no-pretrain'")
    p.add_argument("--threads", type=int_list(), default=[1, 2],
                   help="CPU thread counts, each a run of its own; two or more (not with --shapes) end with the "
                        "thread scaling: dense eager and each run's deployed model at its own thread count, "
                        "interleaved in one measurement (the module docstring says more)")
    p.add_argument("--batch-sizes", type=int_list(), default=[1, 32], help="batch sizes timed")
    p.add_argument("--repeats", type=int_range(1), default=9, help="interleaved timing rounds (medians)")
    p.add_argument("--min-round-ms", type=float, default=4.0, help="minimum length of one timing round")
    p.add_argument("--tiles", type=D.tile_list, default=None,
                   help="Top-K register tiles to try, as tkp_deploy's --tiles, e.g. 4x4,4x4x1 (default: every tile)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init and inputs")
    p.add_argument("--json", default=None, help="write every measurement here")
    return p


def shape_list(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.split("@")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes C@HW like 64@32,512@7 (C, HW >= 1), got {text!r}")
    return shapes


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


def dense_eager(module: nn.Module, module_cl: nn.Module, x: torch.Tensor) -> dict:
    """The eager dense variants on x: NCHW, and channels_last (`module_cl`, a channels_last
    copy of `module`, on a channels_last copy of x)."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return {"dense_eager": lambda: module(x), "dense_channels_last": lambda: module_cl(x_cl)}


def time_layer(conv: nn.Conv2d, kernel_module: nn.Module, in_shape: tuple, batches: list[int], use_compile: bool,
               timing: dict) -> dict:
    """{batch: {variant_ms, speedup, compile}}: the kernel layer against `conv` dense eager (NCHW
    and channels_last) and compiled, interleaved; the kernel gets channels_last input where
    it works in it (deploy_layers.NHWC_LAYERS), as in the deployed network."""
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    nhwc = isinstance(kernel_module, deploy_layers.NHWC_LAYERS)
    per_batch = {}
    for b in batches:
        x = torch.randn(b, *in_shape)
        x_kernel = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        fns = {**dense_eager(conv, conv_cl, x), "topk": lambda: kernel_module(x_kernel)}
        why = "--no-compile"
        if use_compile:
            fn, why = compiled(conv, x)
            if fn is not None:
                fns["dense_compiled"] = lambda: fn(x)
        t = kernels.median_ms(fns, **timing)
        dense = min(v for k, v in t.items() if k.startswith("dense"))
        per_batch[b] = {**{f"{k}_ms": v for k, v in t.items()}, "speedup": dense / t["topk"], "compile": why or "ok",
                        "layout": "nhwc" if nhwc else "nchw"}
    return per_batch


def kernel_module(conv: nn.Conv2d, rec: dict) -> nn.Module:
    """The kernel layer deployment made of `conv` (record `rec` of choose_layers)."""
    if rec["deploy"] == "tapgroup":  # the tap-group kernel, in the "topk" column
        return tapgroup.TapGroupConv2d.from_conv(conv, rec["group"], rec["group_k"], rec["tile"])
    return topk_conv.TopKConv2d.from_conv(conv, rec["tile"])


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
            done[key] = time_layer(conv, kernel_module(conv, rec), shapes[rec["name"]][1:], batches, use_compile,
                                   timing)
        rows.append({"name": rec["name"], "k": rec["k"], "theoretical": rec["theoretical"], "tile": rec["tile"],
                     "kept": rec["deploy"], "shape": f"{conv.in_channels}->{conv.out_channels} "
                     f"{conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]} @{shapes[rec['name']][2]}",
                     "batches": done[key]})
    return rows


def shape_layers(shapes: list[tuple[int, int]], topk: int, tap_group: int) -> nn.Sequential:
    """Isolated 3x3 stride-1 C->C convolutions, random init, masked by the engine's Top-K plan."""
    model = nn.Sequential(*[nn.Conv2d(c, c, 3, padding=1, bias=False) for c, _ in shapes]).eval()
    Masker(model, compute_masks(model, topk_plan(model, topk, tap_group=tap_group))).apply_()
    return model


def run_shapes(args, timing: dict) -> dict:
    """--shapes: per isolated layer, the kernel deployment would choose against dense."""
    model = shape_layers(args.shapes, args.topk, args.tap_group)
    result = {"source": f"isolated 3x3 layers, top-{args.topk}, tap group {args.tap_group}", "runs": [],
              "torch": str(torch.__version__), "batch_sizes": args.batch_sizes}
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = []
        for (c, hw), conv in zip(args.shapes, model):
            gm = deploy_layers.fold_batchnorm(nn.Sequential(conv))
            rec, = deploy_layers.choose_layers(gm, (c, hw, hw), args.batch_sizes, repeats=args.repeats,
                                               tiles=args.tiles, log=lambda s: None)
            row = {"name": f"{c}@{hw}", "k": rec["k"], "theoretical": rec["theoretical"], "tile": rec["tile"],
                   "kept": rec["deploy"], "shape": f"{c}->{c} 3x3/1 @{hw}", "batches": {}}
            if rec["tile"] is not None:
                row["batches"] = time_layer(conv, kernel_module(conv, rec), (c, hw, hw), args.batch_sizes,
                                            args.compile, timing)
            rows.append(row)
        run = {"threads": threads, "layers": rows}
        result["runs"].append(run)
        print(format_layers(run, args.batch_sizes), flush=True)
    return result


def time_whole(dense: nn.Module, deployed: nn.Module, input_shape: tuple, batches: list[int], use_compile: bool,
               timing: dict) -> dict:
    """Per batch size: the dense variants and the deployed model, interleaved."""
    out = {}
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    for b in batches:
        x = torch.randn(b, *input_shape)
        fns = {**dense_eager(dense, dense_cl, x), "deploy_eager": lambda: deployed(x)}
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


def node_calls(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, tuple]:
    """{node name: (call, output)} of every call node of gm: the node as a call of its own on
    copies of the inputs it got in one run on x (an in-place node changes only its copies),
    and (a copy of) what it returned there."""
    def copied(v):
        return torch.fx.node.map_aggregate(v, lambda t: t.clone() if isinstance(t, torch.Tensor) else t)

    def call(n, args, kwargs):  # as torch.fx.Interpreter.call_*, the module looked up once, not per call
        if n.op == "call_module":
            return functools.partial(gm.get_submodule(n.target), *args, **kwargs)
        if n.op == "call_function":
            return functools.partial(n.target, *args, **kwargs)
        return functools.partial(getattr(args[0], n.target), *args[1:], **kwargs)

    calls = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op not in ("call_module", "call_function", "call_method"):
                return super().run_node(n)
            args, kwargs = copied(self.fetch_args_kwargs_from_env(n))
            out = super().run_node(n)
            calls[n.name] = (call(n, args, kwargs), copied(out))
            return out

    with torch.no_grad():
        Capture(gm).run(x.clone())
    return calls


def time_parts(gm: torch.fx.GraphModule, x: torch.Tensor, timing: dict) -> dict:
    """{"whole_ms", "nodes": {node name: ms}} of the deployed graph on x: each node called
    alone (node_calls: no interpreter's time counted in it, which adds tens of microseconds
    per node, more than a small node takes), interleaved with the whole model. The nodes' sum
    is less than the whole: the rest is the calls between them and what one node's data
    evicts from the caches for the next."""
    nodes = {name: fn for name, (fn, _) in node_calls(gm, x).items()}
    r = kernels.median_ms({**nodes, " whole": lambda: gm(x)}, repeats=timing["repeats"],
                          min_round_s=timing["min_round_s"] / 3)
    return {"whole_ms": r.pop(" whole"), "nodes": r}


# ---- report -----------------------------------------------------------------------------------------

def format_layers(r: dict, batches: list[int]) -> str:
    lines = [f"threads {r['threads']}" + (f": {r['summary']}" if "summary" in r else "")]
    head = f"  {'layer':<26} {'shape':<20} {'K':>2} {'theory':>7} " + " ".join(
        f"| b{b}: {'NCHW':>7} {'NHWC':>7} {'comp.':>7} {'Top-K':>7} {'speed-up':>8} " for b in batches) + "| tile  kept"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for row in r["layers"]:
        if not row["batches"]:
            lines.append(f"  {row['name']:<26} {row['shape']:<20} {row['k']:>2}  no kernel layer ({row['kept']})")
            continue
        cells = []
        for b in batches:
            t = row["batches"][b]
            comp = f"{t['dense_compiled_ms']:7.3f}" if "dense_compiled_ms" in t else f"{'-':>7}"
            cells.append(f"| {'':>{len(str(b)) + 3}}{t['dense_eager_ms']:7.3f} {t['dense_channels_last_ms']:7.3f} "
                         f"{comp} {t['topk_ms']:7.3f} {t['speedup']:7.2f}x ")
        lines.append(f"  {row['name']:<26} {row['shape']:<20} {row['k']:>2} {row['theoretical']:6.2f}x "
                     + "".join(cells) + f"| {deploy_layers.tile_name(row['tile'])}  {row['kept']}")
    return "\n".join(lines)


def time_scaling(dense: nn.Module, deployed: dict[int, nn.Module], input_shape: tuple, batches: list[int],
                 timing: dict) -> dict:
    """Per batch size: dense eager (NCHW, channels_last) and the deployed model of each thread
    count's run (`deployed`: {threads: model}), each at its thread count, all interleaved;
    {"ms": {"name@threads": ms}, "dense_ms": {threads: the faster dense}, "speedup": {threads:
    fastest dense / deployed}, "share": {threads: its speed-up / the fewest threads' speed-up}}."""
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    before, out = torch.get_num_threads(), {}
    try:
        for b in batches:
            x = torch.randn(b, *input_shape)
            fns, prepare = {}, {}
            for t, model in deployed.items():
                variants = {**dense_eager(dense, dense_cl, x), "deploy_eager": lambda model=model: model(x)}
                for name, fn in variants.items():
                    fns[f"{name}@{t}"] = fn
                    prepare[f"{name}@{t}"] = functools.partial(_at_threads, t, fn)
            ms = kernels.median_ms(fns, prepare=prepare, **timing)
            dense_ms = {t: min(ms[f"dense_eager@{t}"], ms[f"dense_channels_last@{t}"]) for t in deployed}
            speedup = {t: dense_ms[t] / ms[f"deploy_eager@{t}"] for t in deployed}
            low = min(deployed)
            out[b] = {"ms": ms, "dense_ms": dense_ms, "speedup": speedup,
                      "share": {t: v / speedup[low] for t, v in speedup.items()}}
    finally:
        torch.set_num_threads(before)
    return out


def _at_threads(threads: int, fn) -> None:
    """Sets the thread count, then one untimed call (wakes or parks torch's workers)."""
    torch.set_num_threads(threads)
    fn()


def format_scaling(r: dict) -> str:
    lines = []
    for b, s in r.items():
        ms, low = s["ms"], min(s["share"])
        cells = ", ".join(f"{t} thread(s) {v:.2f}x (dense {s['dense_ms'][t]:.3f}, deployed "
                          f"{ms[f'deploy_eager@{t}']:.3f} ms)" for t, v in s["speedup"].items())
        shares = ", ".join(f"{t} threads {v:.0%}" for t, v in s["share"].items() if t != low)
        lines.append(f"thread scaling, batch {b}, interleaved, eager: {cells}; share of the {low}-thread "
                     f"speed-up: {shares}")
    return "\n".join(lines)


def format_threads(r: dict, batches: list[int]) -> str:
    lines = [format_layers(r, batches)]
    for b in batches:
        w = r["whole"][b]
        parts = ", ".join(f"{k.removesuffix('_ms')} {v:.3f}" for k, v in w.items() if k.endswith("_ms"))
        notes = "; ".join(f"{k}: {v}" for k, v in w["notes"].items())
        lines.append(f"  whole model, batch {b}: {parts} ms -> {w['speedup']:.2f}x ({w['best_deploy']} vs "
                     f"{w['best_dense']}; eager vs eager {w['speedup_eager']:.2f}x; theory {r['theoretical']:.2f}x)"
                     + (f" [{notes}]" if notes else ""))
        if r.get("parts", {}).get(b):
            whole, nodes = r["parts"][b]["whole_ms"], r["parts"][b]["nodes"]
            top = sorted(nodes.items(), key=lambda kv: -kv[1])[:8]
            lines.append(f"    deployed, each node alone (sum {sum(nodes.values()):.3f} of {whole:.3f} ms, shares of "
                         "the whole): " + ", ".join(f"{k} {v:.3f} ({v / whole:.0%})" for k, v in top))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _main(args)
    finally:  # main() is also called in-process (tests)
        torch.set_num_threads(threads)


def save(path: str | None, result: dict) -> None:
    """Every measurement so far, to --json (rewritten after each run: a long benchmark that
    stops keeps what it measured)."""
    if path:
        write_text_atomic(Path(path), json.dumps(plain(result), indent=1))


def _main(args) -> dict:
    torch.manual_seed(args.seed)
    timing = {"repeats": args.repeats, "min_round_s": args.min_round_ms / 1e3}
    D.check_tiles(args.tiles)
    if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
        raise D.DeployError(f"--json {args.json}: name a file in a folder that exists")
    if args.shapes:
        result = run_shapes(args, timing)
        save(args.json, result)
        return result
    if args.checkpoint:
        model, input_shape, script = D.rebuild_model(args.checkpoint, args.script)
        source = args.checkpoint
    elif not args.script:
        raise D.DeployError("pass --checkpoint FINAL.pt (a run's final.pt), --script NAME (random init) or "
                            "--shapes C@HW,... (isolated layers)")
    else:
        model, input_shape, script = random_topk_model(args.script, args.topk, args.script_args.split(),
                                                       args.tap_group)
        source = f"{script}, random init, top-{args.topk}" + (f", tap group {args.tap_group}"
                                                             if args.tap_group > 1 else "")
    if not topk_conv.kernel_available():
        raise D.DeployError(f"the Top-K kernel is unavailable ({topk_conv.kernel_problem()}): nothing to benchmark")
    folded = deploy_layers.fold_batchnorm(model)
    theoretical = deploy_layers.theoretical_speedup(deploy_layers.layer_macs(folded, torch.zeros(1, *input_shape)))
    result = {"source": source, "script": script, "input_shape": list(input_shape), "batch_sizes": args.batch_sizes,
              "torch": str(torch.__version__), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads by default", "theoretical": theoretical, "runs": []}
    print(f"deploy_latency: {source}, input {input_shape}, fp32, batch sizes {args.batch_sizes}, torch "
          f"{torch.__version__}", flush=True)
    deployed_at = {}  # {threads: that run's deployed model}, for the thread scaling
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
               "whole": time_whole(folded, deployed, input_shape, args.batch_sizes, args.compile, timing),
               "parts": {b: time_parts(deployed, torch.randn(b, *input_shape), timing) for b in args.batch_sizes}}
        result["runs"].append(run)
        deployed_at[threads] = deployed
        print(format_threads(run, args.batch_sizes), flush=True)
        save(args.json, result)
    if len(deployed_at) > 1:
        result["scaling"] = time_scaling(folded, deployed_at, input_shape, args.batch_sizes, timing)
        print(format_scaling(result["scaling"]), flush=True)
        save(args.json, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except tkp.TKPError as e:  # bad input: one line, exit status 2
        print(f"deploy_latency: {e}", file=sys.stderr)
        sys.exit(2)
