"""Training throughput of a TKP script's model, measured through the engine's own code.

In one run it measures, for the same model, batch and settings:
  * compute-only images/s of a dense step (no regularizer, no mask), a stage-1 step
    (CE + beta * L_aux, every step) and a stage-2 step (masked), all through
    tkp_common.train_one_epoch on a batch already on the device; the three are timed in
    interleaved rounds and the median round is kept, so drift hits them alike;
  * each data loader alone (torch DataLoader with the script's transforms and
    --num-workers workers; the device-resident loader), images/s;
  * a full epoch (loader + training, stage 1) over --epoch-images generated images;
and prints a table and writes JSON with the ratios stage-1/dense, stage-2/dense (step
time ratios: 1.0 means free) and epoch/compute (epoch time / compute-only time for the
same images).

    python benchmarks/train_throughput.py --script vgg8                      # CPU or GPU
    python benchmarks/train_throughput.py --script googlenet --batch 256 --json out.json
    python benchmarks/train_throughput.py --script vit --batch 256 -- --model vit_small_patch16_224

Script flags after `--` go to the script's own parser (e.g. --topk 2, --img-size 96).
"""

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tkp_common as tkp  # noqa: E402
from tkp_lib import kernels  # noqa: E402
from tkp_lib.data import DeviceImageLoader, ImageArrayDataset, make_loader  # noqa: E402
from tkp_lib.runs import write_text_atomic  # noqa: E402
from tkp_lib.runtime import Dist, amp_name, device_name, init_distributed, resolve_amp  # noqa: E402
from tkp_lib.sparsity import AuxRegularizer, Masker, compute_masks  # noqa: E402
from tkp_lib.train import build_trainer, train_one_epoch  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--script", default="vgg8",
                   help="the model script: a file such as vgg8_optimized.py, or its short name (vgg8, vit, ...)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: the script's training batch)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and configuration")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per configuration first (in whole rounds of --steps)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (as in the scripts)")
    p.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast precision as in the scripts; off: fp32")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile (auto: on with CUDA, as in the scripts)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="channels_last memory format (auto: on with CUDA for CNNs)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers for the loader benchmark")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (on a shared machine, 1 is the least disturbed)")
    p.add_argument("--epoch-images", type=int, default=None, help="images in the full-epoch measurement")
    p.add_argument("--skip-epoch", action="store_true", help="skip the loader and full-epoch measurements")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("script_args", nargs="*", help="flags for the script's parser, after --")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loader, device, limit_images) -> float:
    seen, tic = 0, time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        seen += len(x)
        if seen >= limit_images:
            break
    sync(device)
    return seen / (time.perf_counter() - tic)


def script_args(bench):
    """The script's arguments for a benchmark: its defaults and the flags after `--`, no
    pretrained weights, the benchmark's batch, one micro-step per optimizer step."""
    script = tkp.import_script(bench.script)
    args = script.get_args_parser().parse_args(bench.script_args)
    if hasattr(args, "no_pretrain"):
        args.no_pretrain = True
    if hasattr(args, "pretrained"):
        args.pretrained = False
    if getattr(args, "batch_val", 0) is None:
        args.batch_val = args.batch_train
    args.batch_train = bench.batch or args.batch_train
    args.grad_accum, args.aux_loss_freq = 1, 1
    args.no_amp = bench.amp_dtype == "off"
    args.amp_dtype = "auto" if bench.amp_dtype == "off" else bench.amp_dtype
    return script, args


@dataclass
class Setup:
    script: object
    args: argparse.Namespace
    device: torch.device
    amp_dtype: object
    use_compile: bool
    channels_last: bool
    module: torch.nn.Module
    plan: tkp.Plan
    batch: tuple
    classes: int


def setup(bench) -> Setup:
    """Model, plan and one training batch on the device, with the benchmark's settings."""
    script, args = script_args(bench)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    _, device = init_distributed(bench.device)
    if device.type == "cuda":  # as tkp_common.run trains
        torch.backends.cudnn.benchmark = True
    amp_dtype = resolve_amp(args, device)
    use_compile = {"auto": device.type == "cuda", "on": True, "off": False}[bench.compile]
    channels_last = {"auto": device.type == "cuda" and script.SCRIPT.conv_net, "on": True,
                     "off": False}[bench.channels_last]
    fmt = torch.channels_last if channels_last else torch.preserve_format
    module = script.build_model(args).to(device).to(memory_format=fmt)
    plan = script.SCRIPT.build_plan(module, args)
    shape = script.SCRIPT.input_shape(args)
    classes = tkp.CIFAR_CLASSES.get(getattr(args, "dataset", ""), None) or args.num_classes
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch_train, *shape, generator=gen).to(device, memory_format=fmt),
             torch.randint(0, classes, (args.batch_train,), generator=gen).to(device))
    return Setup(script, args, device, amp_dtype, use_compile, channels_last, module, plan, batch, classes)


def trainer_for(s: Setup, kind: str):
    """A trainer of its own copy of the model: dense, stage 1 (regularizer) or stage 2 (masks)."""
    m = copy.deepcopy(s.module)
    parts = {}
    if kind == "stage1":
        beta = 1.0 if s.args.beta == "auto" else s.args.beta  # --beta auto: the time is the same
        parts = dict(regularizer=AuxRegularizer(m, s.plan, s.args.reg_type, s.args.alpha), beta=beta)
    elif kind == "stage2":
        masker = Masker(m, compute_masks(m, s.plan))
        masker.apply_()
        parts = dict(masker=masker)
    runner = torch.compile(m) if s.use_compile else m
    fmt = torch.channels_last if s.channels_last else torch.preserve_format
    return build_trainer(runner, m, args=s.args, device=s.device, amp_dtype=s.amp_dtype, min_lr=0.0,
                             total_steps=10**6, dist=Dist(), memory_format=fmt, **parts)


def step_times(s: Setup, bench, trainers: dict) -> tuple[dict, dict]:
    """Median seconds per step of each trainer (and the fastest and slowest round): rounds of
    `--steps` steps through the engine's epoch loop, the trainers in alternation."""
    steps = [s.batch] * bench.steps
    t = kernels.measure_interleaved({k: (lambda tr=tr: train_one_epoch(tr, steps)) for k, tr in trainers.items()},
                                    repeats=bench.rounds, min_round_s=0.0, warmup=-(-bench.warmup // bench.steps),
                                    sync=lambda: sync(s.device), grad=True)
    return ({k: v.median_ms / 1e3 / bench.steps for k, v in t.items()},
            {k: {"min": v.min_ms / 1e3 / bench.steps, "max": v.max_ms / 1e3 / bench.steps} for k, v in t.items()})


def tkp_work_alone(s: Setup, trainers: dict) -> dict:
    """Seconds per step of the regularizer and of the masking, timed in isolation: they are
    small next to a step, so the end-to-end ratios carry the machine's noise and these do not."""
    if "stage1" not in trainers:
        return {}
    t1, t2 = trainers["stage1"], trainers["stage2"]
    for p in [*t1.module.parameters(), *t2.module.parameters()]:
        p.grad = torch.zeros_like(p)
    beta = 1.0 if s.args.beta == "auto" else s.args.beta  # its value does not change the time
    fns = {"regularizer": lambda: t1.regularizer.add_grad_(beta),
           "masking": lambda: (t2.masker.mask_grads_(), t2.masker.apply_())}
    t = kernels.measure_interleaved(fns, repeats=5, sync=lambda: sync(s.device))
    extra = {name: v.median_ms / 1e3 for name, v in t.items()}
    return extra


def epoch_measurements(s: Setup, bench, trainers: dict, step: dict) -> dict:
    """Each loader alone, then a full epoch (loader + training) over generated images."""
    train_set, _ = s.script.SCRIPT.build_data(argparse.Namespace(**{**vars(s.args), "dry_run": True}))
    n = bench.epoch_images or max(8 * s.args.batch_train, 512)
    side = train_set.images.shape[1]
    pixels = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    data = ImageArrayDataset(pixels, np.arange(n) % s.classes, train_set.transform)
    loaders = {"torch": make_loader(data, s.args.batch_train, train=True, num_workers=bench.num_workers,
                                        device=s.device, dist=Dist())}
    out = {}
    try:
        loaders["device"] = DeviceImageLoader(data, s.args.batch_train, train=True, device=s.device)
    except ValueError as e:
        out["device_loader"] = f"unavailable: {e}"
    out["loader_images_per_s"] = {k: loader_rate(v, s.device, n) for k, v in loaders.items()}
    kind = "device" if s.device.type == "cuda" and "device" in loaders else "torch"
    trained = "stage1" if "stage1" in trainers else "dense"
    sync(s.device)
    tic = time.perf_counter()
    train_one_epoch(trainers[trained], loaders[kind])
    sync(s.device)
    epoch = time.perf_counter() - tic
    out.update(epoch_loader=kind, epoch_images=n, epoch_seconds=epoch, epoch_images_per_s=n / epoch,
               epoch_over_compute=epoch / (step[trained] * len(loaders[kind])))
    return out


def print_report(result: dict, bench) -> None:
    print(f"{bench.script} {result['pattern']} on {result['device']}, batch {result['batch']}, amp {result['amp']}, "
          f"compile {'on' if result['compile'] else 'off'}, "
          f"channels_last {'on' if result['channels_last'] else 'off'}, "
          f"torch {result['torch']}")
    for k, v in result["step_seconds"].items():
        print(f"  {k:8s} step {v * 1e3:9.2f} ms   {result['images_per_s'][k]:10,.0f} img/s")
    for k, v in result["tkp_seconds_per_step"].items():
        print(f"  {k:12s} alone {v * 1e3:8.3f} ms per step")
    for k, v in result.get("loader_images_per_s", {}).items():
        print(f"  loader {k:7s}            {v:10,.0f} img/s")
    if "epoch_seconds" in result:
        print(f"  epoch ({result['epoch_loader']} loader, {result['epoch_images']} images) "
              f"{result['epoch_images_per_s']:,.0f} img/s")
    for k, v in result["ratios"].items():
        print(f"  {k:42s} {v:.3f}")


def main(argv=None):
    bench = get_args_parser().parse_args(argv)
    threads, autotune = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:  # setup() sets both as training does; main() is also called in-process (tests)
        return _main(bench)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune


def _main(bench) -> dict:
    s = setup(bench)
    kinds = ["dense", "stage1", "stage2"] if s.plan.targets else ["dense"]
    trainers = {k: trainer_for(s, k) for k in kinds}
    step, rounds = step_times(s, bench, trainers)
    extra = tkp_work_alone(s, trainers)
    result = {
        "script": bench.script, "device": device_name(s.device), "torch": str(torch.__version__),
        "batch": s.args.batch_train, "input_shape": list(s.batch[0].shape[1:]), "amp": amp_name(s.amp_dtype),
        "compile": s.use_compile, "channels_last": s.channels_last, "pattern": s.plan.pattern,
        "step_seconds": step, "step_seconds_rounds": rounds,
        "images_per_s": {k: s.args.batch_train / v for k, v in step.items()},
        "ratios": {f"{k}/dense": step[k] / step["dense"] for k in kinds if k != "dense"},
        "tkp_seconds_per_step": extra,
    }
    if extra:
        result["ratios"]["stage1/dense (dense + regularizer time)"] = 1 + extra["regularizer"] / step["dense"]
        result["ratios"]["stage2/dense (dense + masking time)"] = 1 + extra["masking"] / step["dense"]

    def save():  # the step times first: a run stopped in the epoch measurement keeps them
        if bench.json:
            write_text_atomic(Path(bench.json), json.dumps(result, indent=2) + "\n")

    save()
    if not bench.skip_epoch:
        result.update(epoch_measurements(s, bench, trainers, step))
        result["ratios"]["epoch/compute"] = result.pop("epoch_over_compute")
        save()
    print_report(result, bench)
    return result


if __name__ == "__main__":
    main()
