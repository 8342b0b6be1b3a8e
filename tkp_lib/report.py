"""TKP reports: what a trained model costs and what its masks look like.

Owns: MAC counting (torch.utils.flop_counter), parameter and non-zero counts, the
theoretical speed-up (the paper's Speed-Up column), the sparsity check of a finished model,
tap frequencies, and summary.json's console line.
May import: tkp_lib.runtime. Never the driver (tkp_common): plans and masks arrive as arguments.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode


class _OperandMacs(TorchDispatchMode):
    """Adds the MACs of every operation torch.utils.flop_counter counts (matrix products,
    convolutions, attention) to each watched parameter among its operands, found as itself or
    as a view of it (a Linear's weight reaches the product transposed)."""

    def __init__(self, watched: dict[int, str]):
        super().__init__()
        self.watched, self.macs = watched, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(getattr(func, "overloadpacket", func))
        if formula is not None:
            owners = {self.watched.get(id(a if a._base is None else a._base))
                      for a in args if isinstance(a, torch.Tensor)} - {None}
            for name in owners:
                self.macs[name] = self.macs.get(name, 0) + formula(*args, **kwargs, out_val=out) // 2
        return out


@torch.no_grad()
def weight_macs(module: nn.Module, run: Callable[[nn.Module], object], names: list[str]) -> tuple[dict, int]:
    """Dense multiply-accumulates of `run(copy)` (one sample through the model, or through a
    part of it) on a meta-device copy of `module` (shapes only: no arithmetic is done), counted
    by torch.utils.flop_counter (MACs = FLOPs / 2). Returns ({name: MACs of the products it is
    an operand of} for the parameters `names`, total); the total includes work no parameter
    takes part in (attention's q@k and attn@v). A parameter is found among the operands as
    itself or as a view, so a weight that no leaf module owns counts too (MultiheadAttention's
    packed in_proj_weight); one the products do not see as such (a fake-quantized weight) gets
    the MACs of its module when that is a leaf."""
    from torch.utils.flop_counter import FlopCounterMode
    shadow = copy.deepcopy(module).to("meta").eval()
    params = dict(shadow.named_parameters())
    with FlopCounterMode(display=False) as counter, _OperandMacs({id(params[n]): n for n in names}) as seen:
        run(shadow)
    macs, counts, root = dict(seen.macs), counter.get_flop_counts(), type(module).__name__ + "."
    leaves = {n for n, sub in shadow.named_modules() if n and next(sub.children(), None) is None}
    for name in names:
        leaf = name.rpartition(".")[0]
        if name not in macs and leaf in leaves and root + leaf in counts:
            macs[name] = sum(counts[root + leaf].values()) // 2
    return macs, counter.get_total_flops() // 2


def _mac_totals(macs_dense: int, layers: list[dict]) -> dict:
    """Dense and non-zero MACs and the theoretical speed-ups, from the pruned layers' rows."""
    pruned_dense = sum(layer["macs_dense"] for layer in layers)
    pruned_nonzero = sum(layer["macs_nonzero"] for layer in layers)
    macs_nonzero = macs_dense - pruned_dense + pruned_nonzero
    return {"macs_dense": macs_dense, "macs_nonzero": macs_nonzero,
            "speedup_theoretical": macs_dense / macs_nonzero if macs_nonzero else float("inf"),
            "speedup_pruned_layers": pruned_dense / pruned_nonzero if pruned_nonzero else 1.0}


def sparsity_report(module: nn.Module, plan, masks: dict, input_shape, device, parts: dict | None = None,
                    strict: bool = True) -> dict:
    """Parameter and MAC counts, dense and kept, and the theoretical speed-up (dense MACs /
    MACs of the kept weights: the paper's Speed-Up column). Counted from the masks, not from
    the weights' zeros: a kept weight that happens to be 0 (e.g. rounded to 0 in int8) is
    not pruning, and an unmasked layer counts as dense. MACs are those of one image of
    `input_shape` through the model; with `parts` ({name: fn(model)}, each running one sample
    through a part of the model, e.g. a CLIP's image and text encoders) they are counted per
    part (`macs_parts`), and the totals are the sums over the parts. A pruned layer the runs
    do not reach is an error, unless `strict` is False: then the figures are those of the runs
    and the layers they skip are listed under "not_run" (a benchmark that times CLIP's image
    encoder alone, whose text encoder runs once per set of class names)."""
    # frozen parameters (GoogLeNet's auxiliary heads: training-only, not in the loss, never
    # run at inference) are not counted
    params = {n: p for n, p in module.named_parameters() if p.requires_grad or n in masks}
    total = sum(p.numel() for p in params.values())
    pruned_numel = sum(params[n].numel() for n in masks)
    pruned_nonzero = sum(int(masks[n].sum()) for n in masks)
    runs = parts or {"model": lambda m: m(torch.zeros(1, *input_shape, device="meta"))}
    layers, by_part, counted = [], {}, set()
    for part, run in runs.items():
        macs, part_dense = weight_macs(module, run, list(masks))
        rows = []
        for name in (n for n in masks if n in macs and params[n].numel()):
            density = int(masks[name].sum()) / params[name].numel()
            rows.append({"layer": name.removesuffix(".weight"), **({"part": part} if parts else {}),
                         "shape": list(params[name].shape), "density": density,
                         "macs_dense": macs[name], "macs_nonzero": round(macs[name] * density)})
        counted |= set(macs)
        layers += rows
        by_part[part] = _mac_totals(part_dense, rows)
    uncounted = [n for n in masks if n not in counted]
    if uncounted and strict:  # the speed-up would silently read too low
        raise RuntimeError(f"the MAC counter saw no work for pruned layers {uncounted[:3]} (a TKP bug)")
    report = {"params_total": total, "params_nonzero": total - pruned_numel + pruned_nonzero,
              "pruned_layers": len(masks),
              "pruned_layer_density": pruned_nonzero / pruned_numel if pruned_numel else 1.0,
              **_mac_totals(sum(p["macs_dense"] for p in by_part.values()), layers)}
    if uncounted:
        report["not_run"] = [n.removesuffix(".weight") for n in uncounted]
    if parts:
        report["macs_parts"] = by_part
    return {**report, "layers": layers}


def check_sparsity(module: nn.Module, plan, masks: dict) -> None:
    """Raise if any pruned entry is non-zero or any group holds more than `keep` non-zeros."""
    params = dict(module.named_parameters())
    for t in plan.targets:
        w = params[t.name].detach()
        if (w[~masks[t.name].to(w.device)] != 0).any():
            raise RuntimeError(f"{t.name}: a pruned weight is non-zero (a TKP bug; please report it)")
        if (w.reshape(-1, t.group).count_nonzero(dim=1) > t.keep).any():
            raise RuntimeError(f"{t.name}: a group has more than {t.keep} non-zeros (a TKP bug)")


def tap_frequencies(masks: dict, plan) -> dict:
    """For Top-K kernels: the fraction of kernels of each layer that keep each tap position,
    as a kh x kw grid (row-major) — which of the positions survive."""
    out = {}
    for t in plan.targets:
        mask = masks[t.name]
        if mask.dim() == 4:
            kh, kw = mask.shape[2:]
            freq = mask.reshape(-1, kh * kw).float().mean(0).reshape(kh, kw)
            out[t.name.removesuffix(".weight")] = [[round(v, 4) for v in row] for row in freq.tolist()]
    return out


def format_summary(s: dict) -> str:
    """summary.json as one console line."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}%"
    parts = "".join(f", {name} {p['macs_nonzero'] / 1e6:,.1f}M/{p['macs_dense'] / 1e6:,.1f}M "
                    f"({p['speedup_theoretical']:.2f}x)" for name, p in s.get("macs_parts", {}).items())
    parts = f" ({parts[2:]})" if parts else ""
    masked = s["sparsity"] != "dense"
    between = (f"post-mask {pct(s.get('post_mask_top1'))}" if masked
               else f"between stages {pct(s.get('between_stages_top1'))}")
    return (f"{s['model']} {s['dataset']} {s['sparsity']}: init {pct(s.get('init_top1'))}, "
            f"stage 1 {pct(s.get('stage1_top1'))}, {between}, "
            f"final {pct(s.get('final_top1'))} (best {pct(s.get('best_top1'))}) | "
            f"params {s['params_nonzero']:,}/{s['params_total']:,} non-zero | "
            f"MACs {s['macs_nonzero'] / 1e6:,.1f}M/{s['macs_dense'] / 1e6:,.1f}M{parts} | "
            f"theoretical speed-up {s['speedup_theoretical']:.2f}x")


def stage_warnings(stage: int, epochs: list[dict], val: dict) -> list[str]:
    """Signs that stage `stage` failed although its loss stayed finite (a NaN/inf loss stops
    the run instead), from its epochs' log records and its last validation:
    - diverged: its last epoch's mean training loss (cross-entropy, or the script's own loss)
      is more than 10x the loss of its first batch, and above ln(classes), a uniform guess's
      (--lr 1e4 on VGG-8: 2.3 at the start, 1e13 after it);
    - at chance: its validation top-1 is within three standard errors of chance (100/classes
      percent), judged only on at least 10 validation images per class and 100 in all: on
      fewer the figure is noise (20 images at chance are no finding)."""
    name = {1: "stage 1", 2: "stage 2", 3: "QAT"}[stage]
    classes, images, out = val["classes"], val["images"], []
    first, last = epochs[0].get("train_ce_first_batch"), epochs[-1]["train_ce"]
    if first is not None and classes > 1 and last > 10 * first and last > math.log(classes):
        out.append(f"{name}: the training loss ended at {last:.3g}, {last / first:.3g} times the {first:.3g} it "
                   f"started at: training diverged; try a lower --lr, or --clip-grad 1.0")
    chance = 1 / classes if classes > 1 else 0.0
    margin = 3 * math.sqrt(chance * (1 - chance) / images) if images else 0.0
    if classes > 1 and images >= max(10 * classes, 100) and val["top1"] <= 100 * (chance + margin):
        out.append(f"{name}: validation top-1 {val['top1']:.2f}% is at chance ({100 * chance:.2f}% for {classes} "
                   f"classes, on {images} images): the model learned nothing; check the data and labels, or "
                   f"lower --lr")
    return out
