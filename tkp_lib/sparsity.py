"""TKP sparsity: what gets pruned, the masks, and the auxiliary regularizer of stage 1.

Owns: plans (Top-K over Conv2d kernels, with optional tap groups; N:M over Linear or any 2-D
weight), deterministic masks, their enforcement beside the model (Masker), their broadcast
across processes, and the regularizer L_aux with its closed-form gradient (DESIGN.md §1, §2).
May import: tkp_lib.runtime. Never the driver (tkp_common), which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from tkp_lib.runtime import Dist, TKPError, matches_prefix

# ==== Plans, Top-K and N:M masks, mask enforcement ========================================


@dataclass(frozen=True)
class Target:
    """One masked weight: its groups are `weight.reshape(-1, group)` (a conv kernel's taps,
    or M consecutive inputs of a Linear row); each keeps its `keep` largest |w|. With
    `share` > 1 (--tap-group), the kernels of `share` consecutive output channels keep the
    same tap positions for each input channel: the `keep` positions of largest squared
    weight summed over those channels (a smaller last group where the count does not divide).
    A grouped conv's `conv_groups` groups of outputs read different inputs: shared taps never
    cross them (each conv group's outputs are grouped by `share` on their own)."""
    name: str
    group: int
    keep: int
    share: int = 1
    conv_groups: int = 1


@dataclass
class Plan:
    """What gets pruned. `num_groups` normalises L_aux (DESIGN.md §2)."""
    pattern: str                      # "top-1", "2:4", "dense"
    targets: list[Target] = field(default_factory=list)
    num_groups: int = 0
    skipped: list[str] = field(default_factory=list)  # targeted but left dense, with the reason
    per_kernel: list[str] = field(default_factory=list)  # depthwise convs: per-kernel Top-K despite --tap-group


def topk_plan(model: nn.Module, topk: int, exclude: list[str] = (), dense: bool = False,
              tap_group: int = 1) -> Plan:
    """Top-K over every Conv2d kernel (DESIGN.md §1). Kernels with kh*kw <= topk stay dense but still
    count towards num_groups, as in the reference; layers in `exclude` are neither. With
    `tap_group` G > 1, each G consecutive output channels share their kept taps per input
    channel (--tap-group; DESIGN.md §1). Only outputs that read the same inputs share taps: a
    depthwise conv (each output channel reads its own input channel) keeps per-kernel Top-K
    (listed in `plan.per_kernel`), and in a grouped conv the tap groups stay within each conv
    group's outputs (at most that many outputs per tap group)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = [p for p in exclude if not any(matches_prefix(n, [p]) for n in convs)]
    if unknown:
        raise TKPError(f"--exclude-layers: no Conv2d named {', '.join(unknown)}; "
                       f"Conv2d layers are: {', '.join(list(convs)[:12])}{' ...' if len(convs) > 12 else ''}")
    largest = max((m.kernel_size[0] * m.kernel_size[1] for m in convs.values()), default=9)
    if topk > max(9, largest - 1):
        raise TKPError(f"--topk {topk} keeps every tap of the largest kernel ({largest} taps); choose "
                       f"1..{max(9, largest - 1)}")
    if dense:
        return Plan("dense")
    plan = Plan(f"top-{topk}" if tap_group == 1 else f"top-{topk}-g{tap_group}")
    for name, conv in convs.items():
        if matches_prefix(name, exclude):
            plan.skipped.append(f"{name} (--exclude-layers)")
            continue
        kh, kw = conv.kernel_size
        plan.num_groups += conv.weight.shape[0] * conv.weight.shape[1]
        if kh * kw > topk:
            outputs_per_group = conv.out_channels // conv.groups  # the outputs that read the same inputs
            share = min(tap_group, outputs_per_group)
            if tap_group > 1 and share == 1:
                plan.per_kernel.append(name)
            plan.targets.append(Target(f"{name}.weight", kh * kw, topk, share, conv.groups if share > 1 else 1))
    return plan


def nm_plan(model: nn.Module, n: int, m: int, module_names: list[str]) -> Plan:
    """N:M over the input dimension of the named Linear modules (DESIGN.md §1). A Linear whose
    input width is not a multiple of M is skipped and reported, never padded."""
    modules = dict(model.named_modules())
    for name in module_names:
        if not isinstance(modules[name], nn.Linear):
            raise TKPError(f"{name} is a {type(modules[name]).__name__}, not a Linear; it cannot be N:M pruned")
    return nm_param_plan(model, n, m, [f"{name}.weight" for name in module_names])


def nm_param_plan(model: nn.Module, n: int, m: int, param_names: list[str]) -> Plan:
    """N:M over the last (input) dimension of the named 2-D weight parameters, whichever
    module reads them: a Linear's `weight`, or a weight used directly, such as
    nn.MultiheadAttention's packed `in_proj_weight` (DESIGN.md §1). A weight whose input
    width is not a multiple of M is skipped and reported (as its name without `.weight`)."""
    plan = Plan(f"{n}:{m}")
    params = dict(model.named_parameters())
    for name in param_names:
        if params[name].dim() != 2:
            raise TKPError(f"{name} has shape {tuple(params[name].shape)}; N:M needs a 2-D (out, in) weight")
        out_f, in_f = params[name].shape
        if in_f % m:
            plan.skipped.append(f"{name.removesuffix('.weight')} (input width {in_f} is not a multiple of {m})")
            continue
        plan.num_groups += out_f * in_f // m
        plan.targets.append(Target(name, m, n))
    return plan


def group_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, 0 = largest. Ties go to the lower index (a stable
    sort), so the same values give the same ranks on every device and every run."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))


def rank_scores(w: torch.Tensor, t: Target) -> torch.Tensor:
    """What the entries of each group are ranked by, as (groups, t.group): |w|; or, for taps
    shared by `t.share` output channels, the squared weight summed over those channels (the
    same score at the same tap of every kernel of an output group; the output groups of a
    grouped conv are formed within each of its `t.conv_groups` conv groups)."""
    if t.share == 1:
        return w.reshape(-1, t.group).abs()
    cg, out = t.conv_groups, w.shape[0] // t.conv_groups
    energy = w.reshape(cg, out, -1, t.group).square()                       # (conv groups, O/cg, I/cg, taps)
    energy = F.pad(energy, (0, 0, 0, 0, 0, -out % t.share))                 # zero rows: a smaller last group
    summed = energy.reshape(cg, -1, t.share, *energy.shape[2:]).sum(2)      # (cg, groups of outputs, I/cg, taps)
    return summed.repeat_interleave(t.share, dim=1)[:, :out].reshape(-1, t.group)


def compute_masks(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask}, True = kept: the `keep` best-ranked entries of every
    group (largest |w|; with shared taps, largest summed squared weight)."""
    params = dict(model.named_parameters())
    masks = {}
    with torch.no_grad():
        for t in plan.targets:
            w = params[t.name]
            keep = group_ranks(rank_scores(w.detach(), t)) < t.keep
            masks[t.name] = keep.reshape(w.shape)
    return masks


class Masker:
    """Enforces masks that live beside the model (not in its state_dict).

    `mask_grads_()` runs after backward (and unscaling), `apply_()` after every optimizer
    step, including steps that a GradScaler skips. Both write exact zeros (`masked_fill_`:
    an inf or NaN in a pruned slot becomes 0 too, which a multiply by 0 would not do)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [n for n in masks if n not in params]
        if missing:
            raise TKPError(f"masks name parameters this model does not have: {missing[:3]}")
        self.masks = masks
        self.params = [params[n] for n in masks]
        self.pruned = [~m.to(p.device) for p, m in zip(self.params, masks.values())]

    @torch.no_grad()
    def apply_(self) -> None:
        for p, pruned in zip(self.params, self.pruned):
            p.masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for p, pruned in zip(self.params, self.pruned):
            if p.grad is not None:
                p.grad.masked_fill_(pruned, 0.0)


def broadcast_masks(masks: dict[str, torch.Tensor], dist: Dist, device: torch.device) -> dict:
    """Make every rank hold rank 0's masks (a no-op in a single process)."""
    if not dist.enabled:
        return masks
    out = {}
    for name, mask in masks.items():
        buf = mask.to(device=device, dtype=torch.uint8)
        torch_dist.broadcast(buf, src=0)
        out[name] = buf.bool()
    return out


# ==== Auxiliary regularizer (stage 1) ====================================================


def aux_coefficients(reg_type: str, group: int, keep: int, alpha: float) -> torch.Tensor:
    """c[r] for ranks r = 0..group-1: 0 for the kept ranks, then 1 (l2) or exp(-alpha*(r-K))."""
    r = torch.arange(group, dtype=torch.float64)
    if reg_type == "l2":
        c = torch.ones(group, dtype=torch.float64)
    elif reg_type == "exponential":
        c = torch.exp(-alpha * (r - keep))
    else:
        raise ValueError(reg_type)
    c[:keep] = 0
    return c.float()


class AuxRegularizer:
    """L_aux = (1/num_groups) * sum_groups sum_r c[r] * s_r, s = squared weights sorted
    descending (DESIGN.md §2). With shared taps (--tap-group), each kernel's taps are ranked
    by the energy of their position summed over the output group, and every kernel of the
    group is penalised at the positions its group excludes.

    Because sorting only permutes entries, dL_aux/dw = 2 * c[rank(w)] * w / num_groups: the
    same gradient autograd gives through torch.sort. We compute the ranks of all layers'
    groups of one shape in one sort, and add beta times that gradient to `.grad` directly,
    once per optimizer step, so the forward/backward pass carries no regularizer at all."""

    def __init__(self, model: nn.Module, plan: Plan, reg_type: str, alpha: float):
        params = dict(model.named_parameters())
        self.num_groups = plan.num_groups
        self.buckets = []  # (params, targets, group, coefficients) per distinct (group, keep)
        shapes = sorted({(t.group, t.keep) for t in plan.targets})
        for group, keep in shapes:
            targets = [t for t in plan.targets if (t.group, t.keep) == (group, keep)]
            ps = [params[t.name] for t in targets]
            coef = aux_coefficients(reg_type, group, keep, alpha).to(ps[0].device)
            self.buckets.append((ps, targets, group, coef))

    @torch.no_grad()
    def add_grad_(self, beta: float) -> torch.Tensor:
        """Add beta * dL_aux/dw to every target's .grad; return L_aux (a 0-dim tensor)."""
        total = None
        for ps, targets, group, coef in self.buckets:
            w = torch.cat([p.reshape(-1, group) for p in ps])
            scores = torch.cat([rank_scores(p, t) for p, t in zip(ps, targets)])
            c = coef[group_ranks(scores)]                        # c[rank] at each entry
            cw = c * w
            value = (cw * w).sum()
            total = value if total is None else total + value
            if beta:
                pieces = torch.split(cw, [p.numel() // group for p in ps])
                grads = []
                for p in ps:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
                torch._foreach_add_(grads, [x.view(p.shape) for x, p in zip(pieces, ps)],
                                    alpha=2.0 * beta / self.num_groups)
        if total is None:
            return torch.zeros(())
        return total / self.num_groups
