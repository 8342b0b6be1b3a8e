"""TKP training: one update step, one epoch, evaluation, BatchNorm recalibration.

Owns: the Trainer (AdamW, per-step cosine, grad scaler, masks and regularizer of one stage),
the fixed order of an update (unscale -> regularizer gradient -> mask gradients -> clip ->
step -> scaler -> re-apply masks; DESIGN.md §4), the epoch loop with gradient accumulation
and its partial tail, evaluation summed across processes, and BatchNorm recalibration.
May import: tkp_lib.runtime, tkp_lib.sparsity. Never the driver (tkp_common).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tkp_lib.runtime import Dist, TKPError, all_reduce_sum, autocast, format_duration
from tkp_lib.sparsity import AuxRegularizer, Masker


@dataclass
class Trainer:
    """The objects one stage trains with. `model` is what runs forward (maybe compiled or
    DDP-wrapped); `module` is the plain model whose parameters and state_dict we own."""
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    criterion: nn.Module
    masker: Masker | None = None
    regularizer: AuxRegularizer | None = None
    beta: float = 0.0
    aux_every: int = 1
    grad_accum: int = 1
    clip_grad: float | None = None
    dist: Dist = field(default_factory=Dist)
    memory_format: torch.memory_format = torch.preserve_format
    step: int = 0  # optimizer steps taken in this stage
    loss_fn: Callable | None = None  # (model, x, y) -> (loss, logits, targets); None: criterion(model(x), y)

    def autocast(self):
        return autocast(self.device, self.amp_dtype)


def build_trainer(model, module, *, args, device, amp_dtype, min_lr, total_steps, dist, lr=None,
                  masker=None, regularizer=None, beta=0.0, memory_format=torch.preserve_format,
                  loss_fn=None) -> Trainer:
    """A fresh AdamW, per-step cosine schedule (lr -> min_lr) and grad scaler for one stage."""
    params = [p for p in module.parameters() if p.requires_grad]
    # the fused kernel: one pass over all parameters (CPU and CUDA), and it works with the
    # fp16 scaler's skipped steps
    optimizer = torch.optim.AdamW(params, lr=args.lr if lr is None else lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))
    # T_max = total_steps: the last step runs at a small positive lr, never at min_lr = 0
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Trainer(model, module, optimizer, scheduler, scaler, device, amp_dtype,
                   nn.CrossEntropyLoss(label_smoothing=args.label_smooth), masker, regularizer,
                   beta=beta, aux_every=args.aux_loss_freq,
                   grad_accum=args.grad_accum, clip_grad=args.clip_grad, dist=dist, memory_format=memory_format,
                   loss_fn=loss_fn)


def optimizer_step(t: Trainer) -> torch.Tensor | None:
    """One update, in a fixed order: unscale -> add regularizer gradient -> mask gradients ->
    clip -> step -> update scaler -> re-apply masks. Masking before clipping makes the clip
    norm that of the update actually applied. Returns L_aux when computed."""
    t.scaler.unscale_(t.optimizer)
    aux = None
    if t.regularizer is not None and t.step % t.aux_every == 0:
        aux = t.regularizer.add_grad_(t.beta)
    if t.masker is not None:
        t.masker.mask_grads_()
    if t.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(t.module.parameters(), t.clip_grad)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.masker is not None:
        t.masker.apply_()
    with warnings.catch_warnings():  # a first step skipped by the fp16 scaler is expected
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    return aux


def _to_device(batch, device, memory_format):
    x, y = batch
    return (x.to(device, non_blocking=True, memory_format=memory_format),
            y.to(device, non_blocking=True))


def _check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise TKPError(f"the training loss became {value} at {where}; nothing of this epoch was saved "
                       f"(checkpoint_last.pt holds the last good one); start a new run with a lower "
                       f"--lr, --clip-grad 1.0 or --amp-dtype bf16")


def train_one_epoch(t: Trainer, loader, *, progress: Callable[[str], None] | None = None, progress_every: float = 0,
                    label: str = "") -> dict:
    """One pass over `loader`. Every `grad_accum` micro-batches make one optimizer step; a
    shorter group at the end of the epoch steps too, its loss averaged over its own size."""
    t.model.train()
    n_batches = len(loader)
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # sum of ce * n, correct
    count = 0
    aux_sum, aux_count = torch.zeros((), device=t.device), 0
    ce_first = torch.zeros((), dtype=torch.float64, device=t.device)  # the first micro-batch's: where the epoch starts
    lr_first = t.optimizer.param_groups[0]["lr"]
    start = last_print = time.perf_counter()
    for i, batch in enumerate(loader):
        x, y = _to_device(batch, t.device, t.memory_format)
        group_start = i - i % t.grad_accum
        group_size = min(t.grad_accum, n_batches - group_start)
        last_in_group = i - group_start == group_size - 1
        sync = contextlib.nullcontext() if last_in_group or not t.dist.enabled else t.model.no_sync()
        with sync:
            with t.autocast():
                if t.loss_fn is None:
                    out, target = t.model(x), y
                    ce = t.criterion(out, y)
                else:  # the script's own training loss (Script.train_loss)
                    ce, out, target = t.loss_fn(t.model, x, y)
            t.scaler.scale(ce / group_size).backward()
        with torch.no_grad():
            if i == 0:
                ce_first += ce.detach().double()
            sums[0] += ce.detach().double() * len(y)
            sums[1] += (out.argmax(1) == target).sum()
        count += len(y)
        if last_in_group:
            aux = optimizer_step(t)
            if aux is not None:
                aux_sum += aux
                aux_count += 1
        now = time.perf_counter()
        if progress and progress_every and now - last_print >= progress_every and i + 1 < n_batches:
            last_print = now
            ce_mean = sums[0].item() / count
            _check_finite(ce_mean, label)
            rate = count / (now - start) * t.dist.world
            eta = (now - start) / (i + 1) * (n_batches - i - 1)
            progress(f"  {label} {i + 1}/{n_batches} ce {ce_mean:.4f} "
                     f"{rate:,.0f} img/s, epoch ETA {format_duration(eta)}")
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    seconds = time.perf_counter() - start
    totals = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=t.device), ce_first[None]])
    ce_sum, correct, count, ce_first = all_reduce_sum(totals, t.dist).tolist()
    ce_mean = ce_sum / max(count, 1)
    aux_mean = (aux_sum / aux_count).item() if aux_count else 0.0
    _check_finite(ce_mean + t.beta * aux_mean, label)
    return {"lr": lr_first, "train_loss": ce_mean + t.beta * aux_mean, "train_ce": ce_mean,
            "train_ce_first_batch": ce_first / t.dist.world, "train_aux": aux_mean,
            "train_acc": 100.0 * correct / max(count, 1),
            "epoch_seconds": seconds, "images_per_s": count / seconds if seconds > 0 else 0.0}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None, dist: Dist = Dist(),
             topk: tuple[int, ...] = (1,), memory_format=torch.preserve_format) -> dict:
    """Top-k accuracies (percent) and mean cross-entropy over the whole loader, summed across
    processes (each holds a disjoint shard); also the images counted and the classes (the
    width of the model's output)."""
    model.eval()
    sums = torch.zeros(2 + len(topk), dtype=torch.float64, device=device)  # loss, n, correct@k
    classes = 0
    for batch in loader:
        x, y = _to_device(batch, device, memory_format)
        with autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        classes = out.shape[1]
        pred = out.topk(min(max(topk), out.shape[1]), dim=1).indices
        hits = pred == y[:, None]
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                             hits.new_full((), len(y), dtype=torch.float64)]  # (no host-to-device copy)
                            + [hits[:, :k].any(1).sum().double() for k in topk])
    sums = all_reduce_sum(sums, dist).tolist()
    n = max(sums[1], 1)
    result = {"loss": sums[0] / n, "images": int(sums[1]), "classes": classes}
    for k, c in zip(topk, sums[2:]):
        result[f"top{k}"] = 100.0 * c / n
    return result


@torch.no_grad()
def recalibrate_bn(module: nn.Module, loader, batches: int, device: torch.device, amp_dtype=None,
                   memory_format=torch.preserve_format) -> int:
    """Reset BatchNorm running statistics and re-estimate them as a cumulative average over
    `batches` training batches (no gradients, dropout off). Returns the batches used."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches == 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    module.eval()
    for bn in bns:
        bn.train()
    used = 0
    for batch in loader:
        if used == batches:
            break
        x, _ = _to_device(batch, device, memory_format)
        with autocast(device, amp_dtype):
            module(x)
        used += 1
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    module.eval()
    return used


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every loaded optimizer state tensor its parameter's memory layout. A resume may
    change --channels-last (or the device, whose default differs), and AdamW's fused kernel
    walks storage in order: moments in another layout would update other weights."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def continue_schedule(trainer: Trainer, total_steps: int, steps_done: int) -> None:
    """Continue a per-step cosine over `total_steps` from `steps_done`: the stage's remaining
    epochs follow the same curve (lr by fraction of the stage done) whatever the steps per
    epoch were before the resume."""
    sched = trainer.scheduler
    sched.T_max, sched.last_epoch = max(total_steps, 1), steps_done
    for group, base in zip(trainer.optimizer.param_groups, sched.base_lrs):
        group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * steps_done / sched.T_max)) / 2
    sched._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]
    trainer.step = steps_done
