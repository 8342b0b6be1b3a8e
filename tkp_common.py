"""TKP engine: the method and the two-stage driver every model script shares.

Top-K Pruning (TKP) keeps the K largest-magnitude taps of every convolution kernel (or the
N largest of every block of M consecutive weights of a Linear) and trains in two stages: an
auxiliary regularizer that pushes each kernel's energy into K taps, then a hard mask and
masked fine-tuning. README.md is the user's manual; DESIGN.md holds the method's fine print.

Sections (search for "# ===="):
  The two-stage driver: stage 1 -> mask -> recalibrate -> stage 2 -> QAT -> reports
  A trained model, rebuilt by the script that trained it (for --eval, benchmarks, deploy)
  CIFAR CNN scripts: the flags, data and plan they share

The method's pieces live in the package beside it, tkp_lib/: sparsity (plans, masks, the
regularizer), train (the update step, an epoch, evaluation, BatchNorm recalibration),
runtime (command line, processes, reading files), runs (a run's folder and saves), data
(data sets, transforms, loaders), report (MACs, sparsity, summary), qat (stage 3), figures
(PNGs); deployment is tkp_deploy.py's.
Scripts use `import tkp_common as tkp`; `__all__` lists what they use, including the names
re-exported from tkp_lib. May import: tkp_lib's training modules; none of them imports this
one. Nothing here reads global state or has side effects at import.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from tkp_lib import figures
from tkp_lib.data import (
    CIFAR_CLASSES,
    DeviceImageLoader,
    cifar32_transforms,
    cifar_splits,
    fake_splits,
    image_folder,
    make_loader,
    make_loaders,
    set_loader_epoch,
    skipped_images,
    upscaled_cifar_transforms,
)
from tkp_lib.qat import freeze_to_int8, int8_size_bytes, load_int8, prepare_qat, qat_layers, strip_qat
from tkp_lib.report import check_sparsity, format_summary, sparsity_report, stage_warnings, tap_frequencies
from tkp_lib.runs import Output, check_file_masks, check_final, check_saved_args, clean_up, prepare_output_dir
from tkp_lib.runtime import (
    BETA_MAX,
    ArgumentParser,
    Dist,
    Terminated,
    TKPError,
    add_topk_args,
    all_reduce_sum,
    amp_name,
    autocast,
    base_parser,
    clean_state_dict,
    cli,
    comma_list,
    derive_seed,
    device_name,
    format_duration,
    init_distributed,
    int_range,
    load_file,
    load_weights,
    main_process_first,
    nm_pattern,
    path_arg,
    plain,
    pretrained_state,
    read_state_dict,
    resolve_amp,
    seed_all,
    sigterm_stops,
    to_cpu,
    to_device,
    versions,
    weights_only_loads,
)
from tkp_lib.sparsity import (
    AuxRegularizer,
    Masker,
    Plan,
    broadcast_masks,
    compute_masks,
    nm_param_plan,
    nm_plan,
    topk_plan,
)
from tkp_lib.train import (
    Trainer,
    _to_device,
    build_trainer,
    continue_schedule,
    evaluate,
    match_state_layout,
    recalibrate_bn,
    train_one_epoch,
)

# What a model script uses: the driver and its hooks (defined here), and the helpers of
# tkp_lib a script needs to build its flags, model and data (re-exported).
__all__ = [
    # the driver
    "Script", "run", "cli", "TKPError", "load_trained", "import_script",
    # CNN scripts on CIFAR
    "cnn_parser", "cnn_script", "loads_imagenet_weights", "loads_pretrain_path", "start_from_pretrain_path",
    # flags, weights and data for scripts of their own (vit_small.py, clip_vit.py)
    "ArgumentParser", "base_parser", "int_range", "path_arg", "comma_list", "nm_pattern", "load_weights",
    "pretrained_state", "CIFAR_CLASSES", "image_folder", "fake_splits", "Plan", "nm_plan", "nm_param_plan",
    "topk_plan", "add_topk_args", "weights_only_loads",
]

CHECKPOINT_FORMAT = "tkp-checkpoint-1"
ROOT = Path(__file__).resolve().parent  # the folder of the model scripts




# ==== The two-stage driver ===============================================================

# Flags that do not change the science of a run: a resumed run may give them other values
# (every other flag given on the command line must equal the checkpoint's).
OPERATIONAL_FLAGS = {"output_dir", "resume", "eval", "num_workers", "data_loader", "compile", "device", "channels_last",
                     "progress_every", "batch_val", "val_freq", "data_root", "data_path",
                     "checkpoint_dir", "pretrain_path", "pretrained_path", "explicit_flags", "overwrite"}
# Flags a resumed run does not take from its checkpoint (every other flag that the command
# line does not give does, so that `--resume CKPT` alone continues the run exactly; the
# workers count too, as they draw the augmentations).
MACHINE_FLAGS = {"output_dir", "resume", "overwrite", "eval", "explicit_flags", "device", "progress_every"}
# Precision flags: a resume is checked on the precision they resolve to on this machine.
PRECISION_FLAGS = {"amp_dtype", "no_amp"}


@dataclass
class Script:
    """What a model script tells the driver.

    Three optional hooks serve a model whose loss or evaluation is not "cross-entropy of
    model(x) against y" (clip_vit.py); left at None, the driver does just that:
    `train_loss(model, x, y) -> (loss, logits, targets)` is the training forward and loss
    (run under autocast; `model` may be DDP-wrapped or compiled; train accuracy counts
    `logits.argmax(1) == targets`); `before_eval(module)` runs before every evaluation, under
    the run's autocast and without gradients (e.g. to rebuild a zero-shot classifier from the
    current weights); `mac_parts(args) -> {part: fn(model)}` counts MACs per part of the model,
    each fn running one sample through its part (default: one image of `input_shape`)."""
    name: str                                   # e.g. "vgg8"
    build_model: Callable                       # args -> nn.Module (weights loaded)
    build_data: Callable                        # args -> (train_set, val_set)
    build_plan: Callable                        # (module, args) -> Plan
    input_shape: Callable                       # args -> (C, H, W)
    dataset_name: Callable                      # args -> e.g. "cifar10"
    pretrained: Callable = lambda args: False   # args -> bool: starts from trained weights
    min_lr_ratio: float = 0.0                   # cosine floor as a fraction of --lr
    topk_metrics: tuple[int, ...] = (1,)        # (1,) or (1, 5)
    conv_net: bool = True                       # channels_last by default on CUDA
    train_loss: Callable | None = None          # (model, x, y) -> (loss, logits, targets)
    before_eval: Callable | None = None         # module -> None, before every evaluation
    mac_parts: Callable | None = None           # args -> {part: fn(model)} for the MAC count

    @property
    def file(self) -> str:
        """The file name of the script that defines the model (recorded in args.json)."""
        module = sys.modules.get(self.build_model.__module__)
        return Path(getattr(module, "__file__", None) or f"{self.name}.py").name


@dataclass
class Run:
    """Everything the steps of one run share. The driver's functions read and update it; a
    checkpoint is a snapshot of it (plus the stage's optimizer, schedule and scaler)."""
    args: argparse.Namespace
    script: Script
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    use_compile: bool
    out: Output
    module: nn.Module                    # the plain model: parameters, state_dict, masks
    model: nn.Module                     # what runs forward: maybe DDP-wrapped and compiled
    plan: Plan
    train_loader: object
    val_loader: object
    recal_loader: object
    memory_format: torch.memory_format
    epochs: dict                         # {stage: epochs}; stage 3 = QAT
    info: dict                           # args.json
    resume: dict | None = None           # the checkpoint being continued, until restored
    stage: int = 1
    epoch: int = 0                       # epochs of `stage` done
    masks: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    wall_start: float = field(default_factory=time.time)
    wall_before: float = 0.0             # wall time of the run before it was resumed
    durations: list = field(default_factory=list)

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.wall_start

    def evaluate(self, amp_dtype="run") -> dict:
        amp_dtype = self.amp_dtype if amp_dtype == "run" else amp_dtype
        run_before_eval(self.script, self.module, self.device, amp_dtype)
        return evaluate(self.model, self.val_loader, self.device, amp_dtype,
                        self.dist, self.script.topk_metrics, self.memory_format)


@torch.no_grad()
def run_before_eval(script: Script, module: nn.Module, device: torch.device, amp_dtype) -> None:
    """The script's `before_eval(module)` hook, if it has one, under the run's autocast."""
    if script.before_eval is not None:
        with autocast(device, amp_dtype):
            script.before_eval(module)


def _mac_parts(script: Script, args) -> dict | None:
    return script.mac_parts(args) if script.mac_parts is not None else None


def _apply_dry_run(args) -> None:
    """--dry-run: a one-step epoch per stage on a few generated images (every batch of the
    same size: on CPU each new shape costs kernel set-up time); a stage of 0 epochs (e.g.
    CLIP's --one-shot) stays at 0."""
    args.epochs_stage1, args.epochs_stage2 = (1 if e is None else min(e, 1) for e in (args.epochs_stage1,
                                                                                     args.epochs_stage2))
    args.batch_train = args.batch_val = 2
    args.bn_recal_batches = min(args.bn_recal_batches, 2)
    args.num_workers = 0


def _load_resume(args, parser: argparse.ArgumentParser | None) -> dict:
    """Read --resume and continue its run: every flag the command line did not give comes
    from the checkpoint (except --device, --output-dir and --progress-every); a science flag
    given with another value than the checkpoint's is refused. A damaged checkpoint (its
    args not what `parser` could produce, a part missing or of another kind) is one line."""
    ckpt = load_file(args.resume, "--resume checkpoint")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TKPError(f"{args.resume} is not a TKP checkpoint_last.pt (to start from weights, use "
                       f"the script's pretrained-weights flag)")
    _check_resume_parts(ckpt, args.resume)
    # model, masks and args as a final.pt holds them; finite but in QAT (its observers start at inf)
    check_final(ckpt, args.resume, parser, finite=ckpt["stage"] != 3, ignore=OPERATIONAL_FLAGS)
    saved, current = ckpt["args"], plain(vars(args))
    given = set(getattr(args, "explicit_flags", current))
    if current.get("beta") == "auto" and saved.get("beta_auto") is not None:
        args.beta = current["beta"] = saved["beta"]  # --beta auto continues with the beta it chose
    compared = given - OPERATIONAL_FLAGS - PRECISION_FLAGS
    diffs = [k for k in sorted(compared) if k in saved and k in current and current[k] != saved[k]]
    if diffs:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {current[k]!r})" for k in diffs[:3])
        raise TKPError(f"the checkpoint was made with {shown}; resume with the same flags (or leave them "
                       f"out: a resumed run takes them from its checkpoint), or start a new run in another "
                       f"--output-dir")
    for k, v in saved.items():
        if k in current and k not in given and k not in MACHINE_FLAGS:
            setattr(args, k, v)
    return ckpt


_RESUME_PARTS = (("optimizer", dict), ("scheduler", dict), ("scaler", dict), ("history", list), ("metrics", dict),
                 ("amp", str), ("wall_time_s", (int, float)))


def _check_resume_parts(ckpt: dict, path: str) -> None:
    """The parts of a checkpoint_last.pt beyond a final.pt's, of the kinds `_checkpoint` writes."""
    rng = ckpt.get("rng")
    ok = {"stage": ckpt.get("stage") in (1, 2, 3),
          "epoch": type(ckpt.get("epoch")) is int and ckpt["epoch"] >= 0,
          "step": type(ckpt.get("step")) is int and ckpt["step"] >= 0,
          "rng": isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
          and rng["torch"].dtype == torch.uint8 and isinstance(rng.get("python"), (list, tuple)),
          **{k: isinstance(ckpt.get(k), kind) for k, kind in _RESUME_PARTS}}
    bad = next((k for k, good in ok.items() if not good), None)
    if bad is not None:
        raise TKPError(f"{path} is damaged: its {bad} is missing or not what a checkpoint holds; resume from "
                       f"another copy, or start a new run")


def _check_precision(ckpt: dict, amp: str) -> None:
    """The precision the checkpoint trained in must be the one this machine resolves (flags
    such as --amp-dtype auto resolve differently on a CPU and on GPUs of other generations)."""
    if ckpt["amp"] != amp:
        raise TKPError(f"the checkpoint was trained with amp {ckpt['amp']} and this machine resolves "
                       f"amp {amp}; pass --amp-dtype {ckpt['amp']}" if ckpt["amp"] != "off" else
                       f"the checkpoint was trained in fp32 and this machine resolves amp {amp}; pass --no-amp")


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def run(args, script: Script) -> dict:
    """Run the two-stage pipeline of DESIGN.md §3 (or --eval) for one script. Returns the summary.
    The output folder is locked for the run; SIGTERM stops it as Ctrl-C does (Terminated)."""
    if args.eval:
        if args.resume:
            raise TKPError("--eval evaluates a final.pt and --resume continues a run: pass one of them")
        return evaluate_checkpoint(args, script)
    dist, device = init_distributed(args.device)
    if args.dry_run:
        _apply_dry_run(args)
    temporary = args.dry_run and args.output_dir is None and not args.resume
    folder, created, lock, finished = None, False, None, False
    try:
        with sigterm_stops(), backend_settings(device, args.dry_run):
            folder, created, lock = prepare_output_dir(args, script.name, dist)
            summary = _run(args, script, dist, device, folder)
        finished = True
        return summary
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        if folder is not None:
            _say_interrupted(e, folder, args, Output(folder, dist))
        raise
    finally:
        if folder is not None:
            clean_up(folder, created, temporary, not finished, lock, Output(folder, dist))
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@contextlib.contextmanager
def backend_settings(device: torch.device, dry_run: bool):
    """The process-wide backend settings a run trains with, put back afterwards (run() is also
    called in-process). On CUDA cuDNN times its algorithms once per input shape (a run has a
    few). A CPU dry run uses the plain CPU kernels on one thread: oneDNN sets up kernels per
    layer shape (20 s for DenseNet-121's first step), which would dominate a few-step run, and
    at batch 2 more threads only wait on each other, badly so when other jobs share the cores."""
    onednn, threads, autotune = torch.backends.mkldnn.enabled, torch.get_num_threads(), torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if dry_run and device.type == "cpu":
        torch.backends.mkldnn.enabled = False
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = onednn
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune


def _say_interrupted(e: KeyboardInterrupt, folder: Path, args, out: Output) -> None:
    how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    saved = folder / "checkpoint_last.pt"
    if saved.exists():
        out.print(f"{how}: continue with --resume {saved}")
    elif args.resume:
        out.print(f"{how} before the first epoch finished: continue with --resume {args.resume}")
    else:
        out.print(f"{how} before the first epoch finished: nothing was saved")


def _run(args, script: Script, dist: Dist, device: torch.device, folder: Path) -> dict:
    """The method, step by step: stage 1, mask, recalibrate, stage 2, QAT, reports."""
    r = _start(args, script, dist, device, folder)
    if r.stage == 1:
        train_stage1(r)
        apply_masks(r)
    if r.stage == 2:
        summary = train_stage2(r)
    if args.qat:
        train_qat(r)
    return finish_qat(r) if args.qat else summary


def _start(args, script: Script, dist: Dist, device: torch.device, folder: Path) -> Run:
    """Check --resume, build model, data, plan and loaders, write args.json; then restore the
    checkpoint, or evaluate the starting weights of a pretrained model."""
    wall_start = time.time()
    if "beta_ratio" in getattr(args, "explicit_flags", ()) and args.beta != "auto" and not args.resume:
        raise TKPError("--beta-ratio is the target of --beta auto; add --beta auto, or leave --beta-ratio out")
    resume = _load_resume(args, _script_parser(script)) if args.resume else None
    amp_dtype = resolve_amp(args, device)
    if resume is not None:
        _check_precision(resume, amp_name(amp_dtype))
    seed_all(derive_seed(args.seed, 0))
    with main_process_first(dist):  # rank 0 downloads weights and data; the others then read them
        module = script.build_model(args).to(device)
    plan = script.build_plan(module, args)  # before the data: a bad sparsity flag fails at once
    with main_process_first(dist):
        train_set, val_set = script.build_data(args)
    if len(train_set) == 0 or len(val_set) == 0:
        raise TKPError("the training or validation set is empty; check the data folder")
    loaders = make_loaders(args, train_set, val_set, device, dist)
    channels_last = (device.type == "cuda" and script.conv_net) if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    module.to(memory_format=memory_format)
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    epochs = {1: args.epochs_stage1, 2: args.epochs_stage2, 3: args.qat_epochs if args.qat else 0}
    r = Run(args, script, dist, device, amp_dtype, use_compile, Output(folder, dist), module, module, plan,
            *loaders, memory_format, epochs, info={}, resume=resume, wall_start=wall_start,
            metrics={"init_top1": None, "stage1_top1": None, "post_mask_top1": None,
                     "final_top1": None, "best_top1": None, "val_images": None, "warnings": []})
    r.model = _wrap(r)
    _write_args(r, len(train_set), len(val_set), channels_last)
    if resume is not None:
        _restore(r)
    elif script.pretrained(args):
        ev = r.evaluate()
        r.metrics.update({f"init_top{k}": ev[f"top{k}"] for k in script.topk_metrics})
        r.out.print(f"initial evaluation: top-1 {ev['top1']:.2f}%")
    return r


def _wrap(r: Run, compile: bool | None = None) -> nn.Module:
    """What runs forward: the module, DDP-wrapped across processes, compiled if asked for."""
    model = r.module
    if r.dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            r.module, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    # dynamic=False: the last, smaller batch of an epoch gets a static graph of its own; with
    # automatic dynamic shapes the graph compiled for it (symbolic batch size) would serve
    # every later full batch too
    return torch.compile(model, dynamic=False) if (r.use_compile if compile is None else compile) else model


def _write_args(r: Run, n_train: int, n_val: int, channels_last: bool) -> None:
    loader = ("device" if isinstance(r.train_loader, DeviceImageLoader)
              else f"torch ({r.args.num_workers} workers)")
    r.info = {"args": plain(vars(r.args)), "script": r.script.name, "script_file": r.script.file,
              "versions": versions(r.device), "device": device_name(r.device), "world_size": r.dist.world,
              "amp": amp_name(r.amp_dtype), "compile": r.use_compile, "channels_last": channels_last,
              "data_loader": loader, "pattern": r.plan.pattern, "pruned_layers": len(r.plan.targets),
              "skipped_layers": r.plan.skipped, "tap_group_per_kernel": r.plan.per_kernel,
              "aux_num_groups": r.plan.num_groups}
    r.out.write_json("args.json", r.info)
    r.out.print(f"{r.script.name}: {r.plan.pattern}, {len(r.plan.targets)} pruned layers, "
                f"{n_train} train / {n_val} val images, {r.info['device']}"
                f"{f' x {r.dist.world} processes' if r.dist.enabled else ''}, amp {r.info['amp']}, "
                f"compile {'on' if r.use_compile else 'off'}, data {loader}, output {r.out.folder}")
    for line in r.plan.skipped:
        r.out.print(f"  kept dense: {line}")
    if r.plan.per_kernel:
        names = r.plan.per_kernel
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        r.out.print(f"  tap groups do not apply to depthwise convs (each output channel reads its own input): "
                    f"{len(names)} layers keep per-kernel Top-K ({shown})")


def _restore(r: Run) -> None:
    """Model, masks, stage, epoch, history and metrics from the checkpoint being resumed (its
    optimizer, schedule, scaler and RNG states follow when the stage's trainer is built)."""
    ckpt = r.resume
    if ckpt["stage"] == 3:
        prepare_qat(r.module)
        r.model = _wrap(r, compile=False)
    load_weights(r.module, clean_state_dict(ckpt["model"]), r.args.resume)
    r.stage, r.epoch, r.history, r.metrics = ckpt["stage"], ckpt["epoch"], ckpt["history"], ckpt["metrics"]
    r.masks = {k: v.to(r.device) for k, v in ckpt["masks"].items()}
    if r.stage >= 2 and set(r.masks) != {t.name for t in r.plan.targets}:
        raise TKPError(f"the masks in {r.args.resume} do not match this model's pruned layers")
    r.wall_before = ckpt["wall_time_s"]
    r.out.write_log(r.history)
    r.out.print(f"resumed from {r.args.resume}: stage {r.stage}, {r.epoch} epochs of it done")


def _trainer(r: Run, stage: int, lr: float | None = None, min_lr: float | None = None, **parts) -> Trainer:
    """A fresh optimizer, schedule and scaler for `stage`; the resumed ones when the run
    continues a checkpoint of this stage."""
    lr = r.args.lr if lr is None else lr
    steps_per_epoch = math.ceil(len(r.train_loader) / r.args.grad_accum)
    trainer = build_trainer(r.model, r.module, args=r.args, device=r.device, amp_dtype=r.amp_dtype, lr=lr,
                            min_lr=r.script.min_lr_ratio * lr if min_lr is None else min_lr, dist=r.dist,
                            total_steps=steps_per_epoch * r.epochs[stage], memory_format=r.memory_format,
                            loss_fn=r.script.train_loss, **parts)
    if r.resume is not None:
        trainer.optimizer.load_state_dict(r.resume["optimizer"])
        match_state_layout(trainer.optimizer)
        trainer.scheduler.load_state_dict(r.resume["scheduler"])
        trainer.scaler.load_state_dict(r.resume["scaler"])
        trainer.step = r.resume["step"]
        if trainer.scheduler.T_max != max(steps_per_epoch * r.epochs[stage], 1):
            # saved by a run with another number of steps per epoch (another world size)
            continue_schedule(trainer, steps_per_epoch * r.epochs[stage], steps_per_epoch * r.epoch)
        _restore_rng(r.resume["rng"], r.device)
        r.resume = None
    return trainer


def _checkpoint(r: Run, trainer: Trainer) -> dict:
    """checkpoint_last.pt: everything needed to continue the run exactly."""
    return {"format": CHECKPOINT_FORMAT, "model": to_cpu(r.module.state_dict()), "masks": to_cpu(r.masks),
            "optimizer": to_cpu(trainer.optimizer.state_dict()), "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(), "stage": r.stage, "epoch": r.epoch, "step": trainer.step,
            "amp": amp_name(r.amp_dtype), "history": plain(r.history), "metrics": plain(r.metrics),
            "args": plain(vars(r.args)), "rng": _rng_state(r.device), "wall_time_s": r.wall_time()}


def train_epochs(r: Run, trainer: Trainer) -> None:
    """The remaining epochs of stage `r.stage`: train, validate when due, save the checkpoint,
    append the log, print the epoch line."""
    stage, args = r.stage, r.args
    while r.epoch < r.epochs[stage]:
        # every epoch's randomness follows from (seed, stage, epoch, rank): a resumed run
        # draws what the uninterrupted run would have drawn
        seed = derive_seed(args.seed, stage, r.epoch)
        rank_seed = derive_seed(seed, r.dist.rank)
        seed_all(rank_seed)
        set_loader_epoch(r.train_loader, seed, rank_seed)
        label = f"stage {stage} epoch {r.epoch + 1}/{r.epochs[stage]}"
        tic = time.perf_counter()
        skipped_before = skipped_images(r.train_loader)
        stats = train_one_epoch(trainer, r.train_loader, progress=r.out.print,
                                progress_every=args.progress_every, label=label)
        # unreadable training images served by the next readable one (tkp_data), all ranks
        stats["skipped_images"] = int(all_reduce_sum(torch.tensor(
            [skipped_images(r.train_loader) - skipped_before], device=r.device), r.dist).item())
        last = r.epoch + 1 == r.epochs[stage]
        val = r.evaluate() if (r.epoch + 1) % args.val_freq == 0 or last else None
        if val is not None:
            r.metrics["val_images"] = val["images"]  # every validation image, once, over all ranks
            if stage == 2:
                r.metrics["best_top1"] = max(r.metrics["best_top1"] or 0.0, val["top1"])
            if last:
                name = {1: "stage1", 2: "final", 3: "qat_train"}[stage]
                r.metrics.update({f"{name}_top{k}": val[f"top{k}"] for k in r.script.topk_metrics})
        r.history.append({"stage": stage, "epoch": r.epoch + 1, **stats, "val_loss": val and val["loss"],
                          **{f"val_top{k}": val and val[f"top{k}"] for k in r.script.topk_metrics}})
        flagged = stage_warnings(stage, [e for e in r.history if e["stage"] == stage], val) if last else []
        if flagged:  # in the stage's last record, and in summary.json
            r.history[-1]["warnings"] = flagged
            r.metrics["warnings"] = r.metrics.get("warnings", []) + flagged
        r.durations.append(time.perf_counter() - tic)
        r.epoch += 1
        # the checkpoint first, then the log: a logged epoch is always a saved epoch
        r.out.save(_checkpoint(r, trainer), "checkpoint_last.pt")
        r.out.write_log(r.history)
        r.out.print(_epoch_line(r, label, stats, val))
        for line in flagged:
            r.out.print(f"warning: {line}")


def _epoch_line(r: Run, label: str, stats: dict, val: dict | None) -> str:
    done = sum(r.epochs[s] for s in range(1, r.stage)) + r.epoch
    eta = sum(r.durations) / len(r.durations) * (sum(r.epochs.values()) - done)
    val_text = " ".join(f"val@{k} {val[f'top{k}']:.2f}%" for k in r.script.topk_metrics) if val else "val -"
    return (f"{label} | loss {stats['train_loss']:.4f} ce {stats['train_ce']:.4f} "
            f"aux {stats['train_aux']:.3e} | train {stats['train_acc']:.2f}% | {val_text} | "
            f"lr {stats['lr']:.2e} | {stats['images_per_s']:,.0f} img/s | "
            f"{r.durations[-1]:.1f}s | ETA {format_duration(eta)}")


def train_stage1(r: Run) -> None:
    """Stage 1 (DESIGN.md §3.2): cross-entropy + beta * L_aux, no mask yet."""
    regularize = r.args.reg_type != "none" and bool(r.plan.targets)
    regularizer = AuxRegularizer(r.module, r.plan, r.args.reg_type, r.args.alpha) if regularize else None
    starting = regularize and r.resume is None and r.epoch == 0 and r.epochs[1] > 0
    if r.args.beta == "auto":  # never on a resume: the checkpoint holds the beta chosen
        choose_beta(r, regularizer if starting else None)
    elif starting:
        _report_aux_start(r, _measure_start(r, regularizer))
    trainer = _trainer(r, 1, regularizer=regularizer, beta=r.args.beta if regularize else 0.0)
    train_epochs(r, trainer)
    if r.epochs[1] == 0:
        r.metrics["stage1_top1"] = r.metrics["init_top1"]


def choose_beta(r: Run, regularizer: AuxRegularizer | None) -> None:
    """--beta auto (README, "Choosing --beta"): beta = --beta-ratio * CE / L_aux, both measured
    as _report_aux_start measures them, on rank 0 and sent to every rank; 0 where stage 1 has
    nothing to regularize (`regularizer` None) or L_aux is already 0. The value is recorded in
    args (args.json, checkpoints, final.pt) with what it came from, `beta_auto`, and in
    summary.json; a resumed run takes it from its checkpoint."""
    ratio = r.args.beta_ratio
    if regularizer is None:
        why = ("there is no stage 1" if r.epochs[1] == 0 else "--reg-type is none" if r.args.reg_type == "none"
               else "no layer is pruned")
        r.args.beta, r.args.beta_auto = 0.0, {"ratio": ratio, "ce": None, "l_aux": None, "note": why}
        r.out.print(f"--beta auto: {why}, so beta plays no part: 0")
    else:
        measured = torch.tensor(_measure_start(r, regularizer), dtype=torch.float64, device=r.device)
        if r.dist.enabled:
            torch_dist.broadcast(measured, src=0)
        l_aux, ce = measured.tolist()
        beta = ratio * ce / l_aux if l_aux > 0 else 0.0
        if not math.isfinite(beta) or beta > BETA_MAX:  # BETA_MAX: what --beta takes (float32 gradients)
            raise TKPError(f"--beta auto: the starting cross-entropy is {ce} and L_aux {l_aux}, so no beta up to "
                           f"{BETA_MAX:g} puts their ratio at {ratio:g}; give --beta a number")
        r.args.beta, r.args.beta_auto = beta, {"ratio": ratio, "ce": ce, "l_aux": l_aux}
        r.out.print(f"--beta auto: beta {beta:.6g} = {ratio:g} x cross-entropy {ce:.4g} / L_aux {l_aux:.4g}"
                    if l_aux > 0 else "--beta auto: L_aux is already 0 (every kernel keeps at most K non-zero "
                    "taps), so beta is 0")
        _report_aux_start(r, (l_aux, ce))
    r.info["args"] = plain(vars(r.args))
    r.out.write_json("args.json", r.info)


@torch.no_grad()
def _measure_start(r: Run, regularizer: AuxRegularizer) -> tuple[float, float]:
    """(L_aux of the starting weights, cross-entropy of the starting model on one validation
    batch): what the starting ratio and --beta auto are made of."""
    l_aux = float(regularizer.add_grad_(0.0))
    x, y = _to_device(next(iter(r.val_loader)), r.device, r.memory_format)
    # BatchNorm on the batch's statistics, as in training (a model trained from scratch has
    # no running statistics yet), and left as it was; dropout off
    bns = [m for m in r.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    r.module.eval()
    for bn in bns:
        bn.train()
    with autocast(r.device, r.amp_dtype):
        if r.script.train_loss is None:
            ce = F.cross_entropy(r.module(x).float(), y).item()
        else:  # the script's own training loss (e.g. CLIP's contrastive loss)
            ce = r.script.train_loss(r.module, x, y)[0].float().item()
    for bn, state in zip(bns, saved):
        bn.load_state_dict(state)
    return l_aux, ce


def _report_aux_start(r: Run, measured: tuple[float, float]) -> None:
    """Print beta * L_aux next to the cross-entropy of the starting model (on one validation
    batch): the guide to --beta for a new model (README, "Choosing --beta")."""
    l_aux, ce = measured
    aux = l_aux * r.args.beta
    r.metrics["aux_start"] = {"beta_aux": aux, "ce": ce}
    r.out.print(f"stage 1 starts at beta * L_aux = {aux:.3g} next to cross-entropy {ce:.3g} (ratio {aux / ce:.2g}; "
                f"the defaults were tuned at about 5 for VGG-8: README, 'Choosing --beta')")


def apply_masks(r: Run) -> None:
    """Mask (DESIGN.md §3.3), BatchNorm recalibration (§3.4) and the post-mask evaluation. A dense
    run (no targets) goes through the same steps without a mask: its evaluation between the
    stages is reported as such, and its best top-1 comes from stage 2 alone."""
    r.masks = broadcast_masks(compute_masks(r.module, r.plan), r.dist, r.device)
    Masker(r.module, r.masks).apply_()
    seed_all(derive_seed(r.args.seed, 3))
    set_loader_epoch(r.recal_loader, derive_seed(r.args.seed, 3))
    used = recalibrate_bn(r.module, r.recal_loader, r.args.bn_recal_batches, r.device, r.amp_dtype,
                          r.memory_format)
    ev = r.evaluate()
    r.metrics["val_images"] = ev["images"]
    recal = f"BatchNorm recalibrated on {used} batches" if used else "no BatchNorm recalibration"
    if r.plan.targets:
        r.metrics["post_mask_top1"] = r.metrics["best_top1"] = ev["top1"]
        r.out.print(f"masked {len(r.masks)} layers ({r.plan.pattern}); {recal}; post-mask top-1 {ev['top1']:.2f}%")
    else:
        r.metrics["between_stages_top1"] = ev["top1"]
        r.out.print(f"between the stages ({r.plan.pattern}): {recal}; top-1 {ev['top1']:.2f}%")
    r.stage, r.epoch = 2, 0


def train_stage2(r: Run) -> dict:
    """Stage 2 (DESIGN.md §3.5): masked fine-tuning with a fresh optimizer, schedule and scaler;
    then the reports of the float model. Returns the summary."""
    masker = Masker(r.module, r.masks)
    masker.apply_()  # also re-zeroes the weights after a resume
    fresh = r.resume is None
    trainer = _trainer(r, 2, masker=masker)
    if fresh and r.epoch == 0:  # the post-mask state is a checkpoint of its own
        r.out.save(_checkpoint(r, trainer), "checkpoint_last.pt")
    train_epochs(r, trainer)
    if r.epochs[2] == 0:
        r.metrics["final_top1"] = r.metrics["post_mask_top1"] or r.metrics.get("between_stages_top1")
        r.metrics["best_top1"] = r.metrics["best_top1"] or r.metrics["final_top1"]
    summary = write_reports(r)
    r.stage, r.epoch = 3, 0
    return summary


def train_qat(r: Run) -> None:
    """Stage 3 (--qat): quantization-aware training, masks enforced. Eager, because dynamo
    does not trace torch.ao's FakeQuantize (a graph break at every quantized layer)."""
    masker = Masker(r.module, r.masks)
    masker.apply_()
    if not qat_layers(r.module):
        prepare_qat(r.module)
        r.model = _wrap(r, compile=False)
    trainer = _trainer(r, 3, lr=r.args.qat_lr or 0.1 * r.args.lr, min_lr=0.0, masker=masker)
    train_epochs(r, trainer)


def finish_qat(r: Run) -> dict:
    """Freeze the scales, make the weights their int8 values, evaluate in fp32, write
    final_qat.pt and the reports."""
    int8 = freeze_to_int8(r.module)
    check_sparsity(r.module, r.plan, r.masks)
    ev = r.evaluate(amp_dtype=None)  # bf16/fp16 would round the de-quantized weights and inputs again
    strip_qat(r.module)  # final_qat.pt's "model" loads into the plain model
    r.metrics.update({f"qat_top{k}": ev[f"top{k}"] for k in r.script.topk_metrics})
    r.metrics.update(size_bytes_dense_fp32=4 * sum(p.numel() for p in r.module.parameters() if p.requires_grad),
                     size_bytes_sparse_int8=int8_size_bytes(r.module, int8, r.masks))
    r.out.save({"model": to_cpu(r.module.state_dict()), "int8": int8, "masks": to_cpu(r.masks),
                "args": plain(vars(r.args)), "metrics": plain(r.metrics)},
               "final_qat.pt")
    r.out.print(f"QAT: top-1 {ev['top1']:.2f}% with int8 weights and inputs (float {r.metrics['final_top1']:.2f}%); "
                f"{r.metrics['size_bytes_sparse_int8'] / 2**20:.2f} MiB sparse int8 vs "
                f"{r.metrics['size_bytes_dense_fp32'] / 2**20:.2f} MiB dense fp32")
    return write_reports(r, write_final=False, quiet=True)


def write_reports(r: Run, write_final: bool = True, quiet: bool = False) -> dict:
    """Check the sparsity, count (from the masks: int8 rounding to zero is not pruning), and
    write final.pt (the float model) and summary.json (after QAT: the same figures, plus the
    int8 model's under their own keys, qat_*, size_bytes_*)."""
    check_sparsity(r.module, r.plan, r.masks)
    report = sparsity_report(r.module, r.plan, r.masks, r.script.input_shape(r.args), r.device,
                             parts=_mac_parts(r.script, r.args))
    summary = {"model": r.script.name, "dataset": r.script.dataset_name(r.args), "sparsity": r.plan.pattern,
               **r.metrics, **{k: v for k, v in report.items() if k != "layers"}, "sparsity_exact": True,
               "epochs_stage1": r.epochs[1], "epochs_stage2": r.epochs[2], "epochs_qat": r.epochs[3],
               "device": r.info["device"], "amp": r.info["amp"], "compile": r.info["compile"],
               "world_size": r.info["world_size"], "torch": str(torch.__version__), "wall_time_s": r.wall_time(),
               "beta": r.args.beta, "beta_auto": getattr(r.args, "beta_auto", None),
               "layers": report["layers"], "tap_frequencies": tap_frequencies(r.masks, r.plan)}
    if write_final:
        r.out.save({"model": to_cpu(r.module.state_dict()), "masks": to_cpu(r.masks), "args": plain(vars(r.args)),
                    "metrics": plain({k: v for k, v in summary.items() if k not in ("layers", "tap_frequencies")})},
                   "final.pt")
    r.out.write_json("summary.json", summary)
    if quiet:
        return summary
    r.out.print(format_summary(summary))
    if r.dist.is_main:
        figures.draw(r.out.folder, log=r.out.print)  # PNGs where matplotlib is installed, else one line
    return summary

def checkpoint_args(base: dict, ckpt_args: dict, path: str) -> argparse.Namespace:
    """`base` (this command's arguments, or a script's defaults) overlaid with a checkpoint's
    science flags; `eval` set to `path`, so the script loads no pretrained weights; `dry_run`
    (generated data) this command's, not the checkpoint's."""
    saved = argparse.Namespace(**{**base, **{k: v for k, v in ckpt_args.items() if k not in OPERATIONAL_FLAGS}})
    saved.eval, saved.dry_run = path, bool(base.get("dry_run"))
    return saved


def _script_parser(script: Script) -> argparse.ArgumentParser | None:
    """The command line of the script that defines `script` (its get_args_parser()), if any."""
    make = getattr(sys.modules.get(script.build_model.__module__), "get_args_parser", None)
    return make() if callable(make) else None


def evaluate_checkpoint(args, script: Script) -> dict:
    """--eval CKPT: rebuild the model from a final.pt (or a final_qat.pt, evaluated with its
    int8 weights and input quantization, in fp32), evaluate it, print its summary."""
    ckpt = load_file(args.eval, "--eval checkpoint")
    check_final(ckpt, args.eval, _script_parser(script), ignore=OPERATIONAL_FLAGS)
    dist, device = init_distributed(args.device)
    try:
        with backend_settings(device, dry_run=False):
            return _evaluate_checkpoint(args, script, ckpt, dist, device)
    finally:
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _evaluate_checkpoint(args, script: Script, ckpt: dict, dist: Dist, device: torch.device) -> dict:
    saved = checkpoint_args(vars(args), ckpt["args"], args.eval)
    if saved.dry_run:  # the dry run's generated validation images, as its run saw them
        _apply_dry_run(saved)
    module = script.build_model(saved).to(device)
    load_weights(module, clean_state_dict(ckpt["model"]), args.eval)
    plan = script.build_plan(module, saved)
    masks = {k: v.to(device) for k, v in ckpt["masks"].items()}
    check_file_masks(module, plan, masks, args.eval, script.name)
    _, val_set = script.build_data(saved)
    loader = make_loader(val_set, saved.batch_val, train=False, num_workers=saved.num_workers,
                         device=device, dist=dist)
    report = sparsity_report(module, plan, masks, script.input_shape(saved), device, parts=_mac_parts(script, saved))
    quantized = "int8" in ckpt
    if quantized:
        load_int8(module, {k: to_device(v, device) for k, v in ckpt["int8"].items()})
    # the precision the checkpoint was trained with (fp32 for the int8 model: bf16/fp16
    # would round its de-quantized weights again)
    amp_dtype = None if quantized else resolve_amp(saved, device)
    run_before_eval(script, module, device, amp_dtype)
    ev = evaluate(module, loader, device, amp_dtype, dist, script.topk_metrics)
    name = "qat" if quantized else "final"
    summary = {"model": script.name, "dataset": script.dataset_name(saved), "sparsity": plan.pattern,
               **{f"{name}_top{k}": ev[f"top{k}"] for k in script.topk_metrics},
               "val_images": ev["images"], **{k: v for k, v in report.items() if k != "layers"},
               "sparsity_exact": True}
    if dist.is_main:
        print(json.dumps(summary, indent=2))
    return summary


# ==== A trained model, rebuilt by the script that trained it =============================


@dataclass
class Trained:
    """A final.pt's model, rebuilt by its script: fp32, CPU, eval mode, masks checked."""
    script: Script
    args: argparse.Namespace     # the script's defaults overlaid with the checkpoint's science flags
    model: nn.Module
    plan: Plan
    masks: dict
    checkpoint: dict


def script_files(folder: Path = ROOT) -> list[Path]:
    """The model scripts in `folder`: every .py file that defines a `SCRIPT = tkp.Script(...)`
    or a script made by `tkp.cnn_script(...)` (a copied script counts too)."""
    return sorted(p for p in folder.glob("*.py")
                  if not p.name.startswith("tkp_") and re.search(r"^SCRIPT = tkp\.", p.read_text(), re.M))


def import_script(name: str):
    """A model script's module by file name, path or short name: 'vgg8_optimized.py',
    'vgg8_optimized', or 'vgg8' (its Script's name)."""
    path = Path(name)
    if path.suffix == ".py" and path.is_file():
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            if sys.modules.get(path.stem) is module:  # no half-imported module left behind
                del sys.modules[path.stem]
            raise
        return module
    for p in script_files():
        if name in (p.name, p.stem, p.stem.removesuffix("_optimized")):
            return import_script(str(p))
    unimportable = []
    for p in script_files():  # by the Script's own name (e.g. 'vit', 'densenet121')
        try:
            module = import_script(str(p))
        except ImportError as e:  # another script's own package missing (clip_vit.py: open_clip)
            unimportable.append(f"{p.name} ({e})")
            continue
        if module.SCRIPT.name == name:
            return module
    known = ", ".join(p.stem.removesuffix("_optimized") for p in script_files())
    why = f" (not importable: {'; '.join(unimportable)})" if unimportable else ""
    raise TKPError(f"no model script {name!r} in {ROOT}; choose from {known}{why}")


def _fits(model: nn.Module, state: dict) -> bool:
    own = model.state_dict()
    keys = {k for k in own if not k.endswith("num_batches_tracked")}
    return keys <= set(state) and set(state) <= set(own) and all(own[k].shape == state[k].shape for k in keys)


def _script_candidates(ckpt: dict, script: str | None) -> list:
    """The scripts that may have trained `ckpt`: `script` when given; else the one its
    metrics name (summary's "model"), then every other model script."""
    if script:
        return [import_script(script)]
    modules = [import_script(str(p)) for p in script_files()]
    metrics = ckpt.get("metrics")
    named = str(metrics.get("model")) if isinstance(metrics, dict) else None
    return sorted(modules, key=lambda m: m.SCRIPT.name != named)


def load_trained(path: str, script: str | None = None, what: str = "checkpoint") -> Trained:
    """Rebuild the model of a final.pt with the script that trained it: `script` when given,
    else the one final.pt's metrics name, else the first model script whose model its
    weights fit. The script's defaults are overlaid with final.pt's science flags. A damaged
    file is one line that blames it (check_final)."""
    ckpt = load_file(path, what)
    check_final(ckpt, path)
    state = clean_state_dict(ckpt["model"])
    metrics = ckpt.get("metrics")
    named = metrics.get("model") if isinstance(metrics, dict) else None
    for module in _script_candidates(ckpt, script):
        parser = module.get_args_parser()
        try:
            check_saved_args(ckpt["args"], parser, path, OPERATIONAL_FLAGS)
        except TKPError:
            if script or module.SCRIPT.name == named:
                raise
            continue  # the args of another script's model
        args = checkpoint_args(vars(parser.parse_args([])), ckpt["args"], path)
        model = module.build_model(args)
        if not _fits(model, state):
            if script:
                raise TKPError(f"{path} does not fit the model of {module.__name__}; leave the script out "
                               f"to infer it")
            continue
        load_weights(model, state, path)
        plan = module.SCRIPT.build_plan(model, args)
        masks = dict(ckpt["masks"])
        check_file_masks(model, plan, masks, path, module.SCRIPT.name)
        return Trained(module.SCRIPT, args, model.eval(), plan, masks, ckpt)
    raise TKPError(f"{path}: no model script in {ROOT} builds a model these weights fit; name the script")


# ==== CIFAR CNN scripts: the flags, data and plan they share ==============================


def cnn_parser(description: str, *, dataset: str, pretrain_help: str,
               no_pretrain_help: str = "train from scratch", img_size: int | None = None,
               **defaults) -> ArgumentParser:
    """The command line of a Top-K CNN script on CIFAR: the shared flags, Top-K sparsity,
    batches, and the model-and-data group (--dataset, --data-root, [--img-size],
    --pretrain-path, --no-pretrain); `defaults` are the script's table row."""
    p = base_parser(description)
    add_topk_args(p)
    g = p.add_argument_group("model and data")
    g.add_argument("--dataset", choices=list(CIFAR_CLASSES), default=dataset, help="CIFAR-10 or CIFAR-100")
    g.add_argument("--data-root", default="./data", help="folder that holds (or receives) CIFAR")
    if img_size is not None:
        g.add_argument("--img-size", type=int_range(32), default=img_size, help="training and validation crop size")
    g.add_argument("--pretrain-path", default=None, help=pretrain_help)
    g.add_argument("--no-pretrain", action="store_true", help=no_pretrain_help)
    p.set_defaults(**defaults)
    return p


def loads_pretrain_path(args) -> bool:
    """A from-scratch CNN starts from --pretrain-path when it is given (not under --dry-run,
    nor under --eval, whose weights come from the checkpoint)."""
    return bool(args.pretrain_path) and not (args.no_pretrain or args.dry_run or args.eval)


def loads_imagenet_weights(args) -> bool:
    """An ImageNet-pretrained CNN starts from its weights unless --no-pretrain (not under
    --dry-run, nor under --eval, whose weights come from the checkpoint)."""
    return not (args.no_pretrain or args.dry_run or args.eval)


def start_from_pretrain_path(model: nn.Module, args) -> nn.Module:
    """Load --pretrain-path (a state_dict, our final.pt, most training scripts' files) into
    `model` when `loads_pretrain_path(args)`."""
    if loads_pretrain_path(args):
        load_weights(model, read_state_dict(args.pretrain_path, "--pretrain-path"), args.pretrain_path)
    return model


def cnn_script(name: str, build_model: Callable, *, upscaled: bool = False,
               pretrained: Callable = loads_pretrain_path) -> Script:
    """The Script of a Top-K CNN on CIFAR: Top-K plan over every Conv2d (--topk,
    --exclude-layers, --dense-baseline) and the CIFAR recipe: 32 px from scratch, or
    `upscaled` to --img-size for ImageNet-pretrained models (DESIGN.md §5)."""
    def build_data(args):
        transforms = upscaled_cifar_transforms(args.img_size) if upscaled else cifar32_transforms(args.dataset)
        return cifar_splits(args, *transforms)

    def build_plan(model, args) -> Plan:
        return topk_plan(model, args.topk, args.exclude_layers, dense=args.dense_baseline,
                         tap_group=getattr(args, "tap_group", 1))

    return Script(name=name, build_model=build_model, build_data=build_data, build_plan=build_plan,
                  input_shape=lambda args: (3, args.img_size, args.img_size) if upscaled else (3, 32, 32),
                  dataset_name=lambda args: args.dataset, pretrained=pretrained)
