"""Multi-process training on CPU (gloo, 2 processes through torchrun): outputs written once,
masks identical on every rank, the DESIGN.md §4 invariants, validation over the whole set exactly
once, and a resume on another world size."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, write_cifar
from test_vit import write_image_folder

import vgg8_optimized as vgg8
from tkp_lib.report import check_sparsity
from tkp_lib.runtime import Dist
from tkp_lib.sparsity import broadcast_masks, compute_masks, topk_plan

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(script, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*TORCHRUN, str(script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _broadcast_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # every rank holds different weights
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    masks = broadcast_masks(compute_masks(model, topk_plan(model, 2)),
                                Dist(rank, world, rank), torch.device("cpu"))
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in masks.items()})
    if rank == 0:
        results.put(gathered)
    dist.destroy_process_group()


def test_masks_are_identical_on_every_rank():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_broadcast_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    gathered = results.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert gathered[0] == gathered[1]


def test_two_process_vgg8(tmp_path):
    data = write_cifar(tmp_path / "data", "cifar10", n_train=48, n_test=21)  # 21: odd, split 11 + 10
    out = tmp_path / "run"
    r = torchrun(ROOT / "vgg8_optimized.py", "--device", "cpu", "--data-root", str(data), "--output-dir", str(out),
                 "--epochs-stage1", "2", "--epochs-stage2", "1", "--batch-train", "8", "--batch-val", "4",
                 "--num-workers", "0", "--bn-recal-batches", "2", "--grad-accum", "2", "--topk", "1",
                 "--progress-every", "0", "--qat", "--qat-epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("stage 1 epoch 1/2") == 1  # only rank 0 prints
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in log] == [(1, 1), (1, 2), (2, 1), (3, 1)]  # written once
    qat = torch.load(out / "final_qat.pt", weights_only=True)
    for name, mask in qat["masks"].items():
        assert (qat["int8"][name.removesuffix(".weight")]["weight_int8"][~mask] == 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_images"] == 21
    assert log[0]["train_aux"] > 0
    final = torch.load(out / "final.pt", weights_only=True)
    model = vgg8.VGG8(10)
    model.load_state_dict(final["model"], strict=True)
    plan = topk_plan(model, 1)
    check_sparsity(model, plan, final["masks"])
    assert not list(out.glob(".*tmp"))


def test_two_process_crash_mid_stage_then_resume_in_one_process(tmp_path):
    """A 2-process run dies in the middle of stage 1 and goes on in one process: twice the
    steps per epoch now, and the cosine must continue by the fraction of the stage done."""
    data = write_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=10)
    out = tmp_path / "run"
    crashing = tmp_path / "crash_after_two_saves.py"
    crashing.write_text(textwrap.dedent("""
        import tkp_common as tkp, vgg8_optimized as vgg8
        from tkp_lib import runs, runtime
        real, calls = runs.save_atomic, []
        def save(obj, path):
            real(obj, path)
            calls.append(path)
            if len(calls) == 2:
                raise SystemExit(3)   # rank 0 dies after stage 1 epoch 2 (of 4) was saved
        runs.save_atomic = save
        tkp.cli(vgg8.main)
    """))
    common = ["--device", "cpu", "--data-root", str(data), "--epochs-stage1", "4", "--epochs-stage2", "1",
              "--batch-train", "8", "--batch-val", "8", "--num-workers", "0", "--bn-recal-batches", "2",
              "--progress-every", "0"]
    r = torchrun(crashing, *common, "--output-dir", str(out))
    assert r.returncode != 0
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (1, 2)
    summary = vgg8.main(["--resume", str(out / "checkpoint_last.pt")])  # world size 1 now; flags from the checkpoint
    assert summary["world_size"] == 1 and summary["final_top1"] is not None
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in log] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1)]
    for e in log[:4]:  # each epoch starts where the cosine over the stage puts it, before and after
        expected = 1e-3 * (1 + math.cos(math.pi * (e["epoch"] - 1) / 4)) / 2
        assert e["lr"] == pytest.approx(expected, rel=1e-6), e


def test_two_process_vit(tmp_path):
    data = write_image_folder(tmp_path / "imagenet", classes=4, train_per_class=4, val_per_class=3)
    out = tmp_path / "run"
    r = torchrun(ROOT / "vit_small.py", "--device", "cpu", "--data-path", str(data), "--output-dir", str(out),
                 "--model", "vit_tiny_patch16_224", "--img-size", "32", "--no-pretrained", "--num-classes", "4",
                 "--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-size", "4", "--num-workers", "0",
                 "--progress-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_images"] == 12 and summary["sparsity"] == "2:4"
    final = torch.load(out / "final.pt", weights_only=True)
    for name, mask in final["masks"].items():
        w = final["model"][name]
        assert (w[~mask] == 0).all() and w.reshape(-1, 4).count_nonzero(dim=1).max() <= 2
