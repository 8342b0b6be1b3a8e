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
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tkp_common as tkp  # noqa: E402

SCRIPTS = {"vgg8": "vgg8_optimized", "googlenet": "googlenet_optimized", "densenet": "densenet_optimized",
           "resnet56": "resnet56_optimized", "vgg19": "vgg19_optimized", "vit": "vit_small"}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--script", choices=SCRIPTS, default="vgg8")
    p.add_argument("--batch", type=int, default=None, help="batch (default: the script's training batch)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and configuration")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
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


def timed_steps(trainer, batch, steps, device) -> float:
    """Seconds for `steps` training steps through the engine's epoch loop."""
    sync(device)
    tic = time.perf_counter()
    tkp.train_one_epoch(trainer, [batch] * steps)
    sync(device)
    return time.perf_counter() - tic


def loader_rate(loader, device, limit_images) -> float:
    seen, tic = 0, time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        seen += len(x)
        if seen >= limit_images:
            break
    sync(device)
    return seen / (time.perf_counter() - tic)


def main(argv=None):
    bench = get_args_parser().parse_args(argv)
    script = importlib.import_module(SCRIPTS[bench.script])
    args = script.get_args_parser().parse_args(bench.script_args)
    for flag in ("no_pretrain",):
        if hasattr(args, flag):
            setattr(args, flag, True)
    if hasattr(args, "pretrained"):
        args.pretrained = False
    if getattr(args, "batch_val", 0) is None:
        args.batch_val = args.batch_train
    args.batch_train = bench.batch or args.batch_train
    args.grad_accum, args.aux_loss_freq = 1, 1

    if bench.threads:
        torch.set_num_threads(bench.threads)
    dist, device = tkp.init_distributed(bench.device)
    args.no_amp = bench.amp_dtype == "off"
    args.amp_dtype = "auto" if bench.amp_dtype == "off" else bench.amp_dtype
    amp_dtype = tkp.resolve_amp(args, device)
    use_compile = {"auto": device.type == "cuda", "on": True, "off": False}[bench.compile]
    module = script.build_model(args).to(device)
    channels_last = {"auto": device.type == "cuda" and script.SCRIPT.conv_net, "on": True,
                     "off": False}[bench.channels_last]
    fmt = torch.channels_last if channels_last else torch.preserve_format
    module.to(memory_format=fmt)
    plan = script.build_plan(module, args)
    shape = script.SCRIPT.input_shape(args)
    classes = tkp.CIFAR_CLASSES.get(getattr(args, "dataset", ""), None) or args.num_classes
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch_train, *shape, generator=gen).to(device, memory_format=fmt),
             torch.randint(0, classes, (args.batch_train,), generator=gen).to(device))

    def trainer_for(kind):
        m = copy.deepcopy(module)
        parts = {}
        if kind == "stage1":
            parts = dict(regularizer=tkp.AuxRegularizer(m, plan, args.reg_type, args.alpha), beta=args.beta)
        elif kind == "stage2":
            masker = tkp.Masker(m, tkp.compute_masks(m, plan))
            masker.apply_()
            parts = dict(masker=masker)
        runner = torch.compile(m) if use_compile else m
        return tkp.build_trainer(runner, m, args=args, device=device, amp_dtype=amp_dtype, min_lr=0.0,
                                 total_steps=10**6, dist=tkp.Dist(), memory_format=fmt, **parts)

    kinds = ["dense", "stage1", "stage2"] if plan.targets else ["dense"]
    trainers = {k: trainer_for(k) for k in kinds}
    for k in kinds:
        timed_steps(trainers[k], batch, bench.warmup, device)
    rounds = {k: [] for k in kinds}
    for r in range(bench.rounds):
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order each round
            rounds[k].append(timed_steps(trainers[k], batch, bench.steps, device) / bench.steps)
    step = {k: statistics.median(v) for k, v in rounds.items()}

    # the TKP work alone, timed in isolation: it is small next to a step, so the end-to-end
    # ratios above carry the machine's noise while these do not
    extra = {}
    if plan.targets:
        t1, t2 = trainers["stage1"], trainers["stage2"]
        for p in t1.module.parameters():
            p.grad = torch.zeros_like(p)
        for p in t2.module.parameters():
            p.grad = torch.zeros_like(p)
        calls = 20
        for name, fn in (("regularizer", lambda: t1.regularizer.add_grad_(args.beta)),
                         ("masking", lambda: (t2.masker.mask_grads_(), t2.masker.apply_()))):
            fn()
            sync(device)
            tic = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            extra[name] = (time.perf_counter() - tic) / calls
    result = {
        "script": bench.script, "device": tkp.device_name(device), "torch": str(torch.__version__),
        "batch": args.batch_train, "input_shape": list(shape), "amp": tkp.amp_name(amp_dtype),
        "compile": use_compile, "channels_last": channels_last, "pattern": plan.pattern,
        "step_seconds": step, "step_seconds_rounds": rounds,
        "images_per_s": {k: args.batch_train / v for k, v in step.items()},
        "ratios": {f"{k}/dense": step[k] / step["dense"] for k in kinds if k != "dense"},
        "tkp_seconds_per_step": extra,
    }
    if extra:
        result["ratios"]["stage1/dense (dense + regularizer time)"] = 1 + extra["regularizer"] / step["dense"]
        result["ratios"]["stage2/dense (dense + masking time)"] = 1 + extra["masking"] / step["dense"]

    if not bench.skip_epoch:
        train_set, _ = script.build_data(argparse.Namespace(**{**vars(args), "dry_run": True}))
        n = bench.epoch_images or max(8 * args.batch_train, 512)
        side = train_set.images.shape[1]
        pixels = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        data = tkp.ImageArrayDataset(pixels, np.arange(n) % classes, train_set.transform)
        loaders = {"torch": tkp.make_loader(data, args.batch_train, train=True, num_workers=bench.num_workers,
                                            device=device, dist=tkp.Dist())}
        try:
            loaders["device"] = tkp.DeviceImageLoader(data, args.batch_train, train=True, device=device)
        except ValueError as e:
            result["device_loader"] = f"unavailable: {e}"
        result["loader_images_per_s"] = {k: loader_rate(v, device, n) for k, v in loaders.items()}
        epoch_kind = "device" if device.type == "cuda" and "device" in loaders else "torch"
        trainer = trainers["stage1" if "stage1" in trainers else "dense"]
        sync(device)
        tic = time.perf_counter()
        tkp.train_one_epoch(trainer, loaders[epoch_kind])
        sync(device)
        epoch = time.perf_counter() - tic
        compute = step["stage1" if "stage1" in step else "dense"] * len(loaders[epoch_kind])
        result.update(epoch_loader=epoch_kind, epoch_images=n, epoch_seconds=epoch,
                      epoch_images_per_s=n / epoch)
        result["ratios"]["epoch/compute"] = epoch / compute

    print(f"{bench.script} {plan.pattern} on {result['device']}, batch {args.batch_train}, amp {result['amp']}, "
          f"compile {'on' if use_compile else 'off'}, channels_last {'on' if channels_last else 'off'}, "
          f"torch {result['torch']}")
    for k in kinds:
        print(f"  {k:8s} step {step[k] * 1e3:9.2f} ms   {result['images_per_s'][k]:10,.0f} img/s")
    for k, v in extra.items():
        print(f"  {k:12s} alone {v * 1e3:8.3f} ms per step")
    for k, v in result.get("loader_images_per_s", {}).items():
        print(f"  loader {k:7s}            {v:10,.0f} img/s")
    if "epoch_seconds" in result:
        print(f"  epoch ({result['epoch_loader']} loader, {n} images) {result['epoch_images_per_s']:,.0f} img/s")
    for k, v in result["ratios"].items():
        print(f"  {k:42s} {v:.3f}")
    if bench.json:
        Path(bench.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
