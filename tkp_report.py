"""TKP reports: what a trained model costs and what its masks look like.

Owns: MAC counting (torch.utils.flop_counter), parameter and non-zero counts, the
theoretical speed-up (the paper's Speed-Up column), the sparsity check of a finished model,
tap frequencies, and summary.json's console line.
May import: tkp_runtime. Never the driver (tkp_common): plans and masks arrive as arguments.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


@torch.no_grad()
def layer_macs(module: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> tuple[dict, int]:
    """Dense multiply-accumulates of one image through `module`, counted by
    torch.utils.flop_counter (MACs = FLOPs / 2). Returns ({leaf module name: MACs}, total),
    the total including work that no leaf owns (e.g. attention's q@k and attn@v)."""
    from torch.utils.flop_counter import FlopCounterMode
    shadow = copy.deepcopy(module).to("meta").eval()  # shapes only: no arithmetic is done
    with FlopCounterMode(display=False) as counter:
        shadow(torch.zeros(1, *input_shape, device="meta"))
    counts = counter.get_flop_counts()
    root = type(module).__name__ + "."
    per_layer = {}
    for name, sub in module.named_modules():
        if name and not any(True for _ in sub.children()) and (root + name) in counts:
            per_layer[name] = sum(counts[root + name].values()) // 2
    return per_layer, counter.get_total_flops() // 2


def sparsity_report(module: nn.Module, plan, masks: dict, input_shape, device) -> dict:
    """Parameter and MAC counts, dense and kept, and the theoretical speed-up (dense MACs /
    MACs of the kept weights: the paper's Speed-Up column). Counted from the masks, not from
    the weights' zeros: a kept weight that happens to be 0 (e.g. rounded to 0 in int8) is
    not pruning, and an unmasked layer counts as dense."""
    # frozen parameters (GoogLeNet's auxiliary heads: training-only, not in the loss, never
    # run at inference) are not counted
    params = {n: p for n, p in module.named_parameters() if p.requires_grad or n in masks}
    total = sum(p.numel() for p in params.values())
    pruned_numel = sum(params[n].numel() for n in masks)
    pruned_nonzero = sum(int(masks[n].sum()) for n in masks)
    nonzero = total - pruned_numel + pruned_nonzero
    per_layer, macs_dense = layer_macs(module, input_shape, device)
    uncounted = [n for n in masks if n.removesuffix(".weight") not in per_layer]
    if uncounted:  # the speed-up would silently read too low
        raise RuntimeError(f"the MAC counter saw no work for pruned layers {uncounted[:3]} (a TKP bug)")
    macs_nonzero = macs_dense
    modules = dict(module.named_modules())
    layers = []
    for name, macs in per_layer.items():
        weight = getattr(modules[name], "weight", None)
        if f"{name}.weight" not in masks or weight.numel() == 0:
            continue
        density = int(masks[f"{name}.weight"].sum()) / weight.numel()
        nz = round(macs * density)
        macs_nonzero -= macs - nz
        layers.append({"layer": name, "shape": list(weight.shape), "density": density,
                       "macs_dense": macs, "macs_nonzero": nz})
    pruned_dense = sum(layer["macs_dense"] for layer in layers)
    pruned_nonzero_macs = sum(layer["macs_nonzero"] for layer in layers)
    return {
        "params_total": total, "params_nonzero": nonzero,
        "speedup_pruned_layers": pruned_dense / pruned_nonzero_macs if pruned_nonzero_macs else 1.0,
        "pruned_layers": len(masks), "pruned_layer_density": pruned_nonzero / pruned_numel if pruned_numel else 1.0,
        "macs_dense": macs_dense, "macs_nonzero": macs_nonzero,
        "speedup_theoretical": macs_dense / macs_nonzero if macs_nonzero else float("inf"),
        "layers": layers,
    }


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
    masked = s["sparsity"] != "dense"
    between = f"post-mask {pct(s.get('post_mask_top1'))}" if masked else f"between stages {pct(s.get('between_stages_top1'))}"
    return (f"{s['model']} {s['dataset']} {s['sparsity']}: init {pct(s.get('init_top1'))}, "
            f"stage 1 {pct(s.get('stage1_top1'))}, {between}, "
            f"final {pct(s.get('final_top1'))} (best {pct(s.get('best_top1'))}) | "
            f"params {s['params_nonzero']:,}/{s['params_total']:,} non-zero | "
            f"MACs {s['macs_nonzero'] / 1e6:,.1f}M/{s['macs_dense'] / 1e6:,.1f}M | "
            f"theoretical speed-up {s['speedup_theoretical']:.2f}x")
