"""What a user meets around a run: resume with --resume alone, on another world size, memory
layout or machine precision; defaults; dry-run and failed-run folders; dense-baseline wording."""

import json
import math
import tempfile

import pytest
import torch

import tkp_common as tkp
import vgg8_optimized as vgg8
from tkp_lib import runs, runtime
from tkp_lib.runtime import resolve_amp
from tkp_lib.sparsity import topk_plan

FAST = ["--epochs-stage1", "2", "--epochs-stage2", "2", "--batch-train", "16", "--batch-val", "16",
        "--num-workers", "0", "--bn-recal-batches", "2", "--progress-every", "0"]


class Crash(Exception):
    pass


def crash_after(monkeypatch, n, exc=Crash):
    """Make the n-th checkpoint save raise `exc` just after the file is written."""
    real, calls = runs.save_atomic, {"n": 0}

    def save(obj, path):
        real(obj, path)
        calls["n"] += 1
        if calls["n"] == n:
            raise exc()

    monkeypatch.setattr(runs, "save_atomic", save)
    return lambda: monkeypatch.setattr(runs, "save_atomic", real)


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_ctrl_c_then_exactly_the_printed_command_continues(cifar10_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    restore = crash_after(monkeypatch, 2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(out), "--topk", "2", "--seed", "7", *FAST])
    restore()
    printed = capsys.readouterr().out
    command = printed.split("interrupted: continue with ")[1].split()
    assert command == ["--resume", str(out / "checkpoint_last.pt")]
    summary = vgg8.main(command)  # data root, Top-2, seed and epochs all come from the checkpoint
    assert summary["sparsity"] == "top-2" and summary["epochs_stage2"] == 2
    assert [(e["stage"], e["epoch"]) for e in read_log(out)] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    saved = json.loads((out / "args.json").read_text())["args"]
    assert saved["seed"] == 7 and saved["data_root"] == str(cifar10_root)


def test_resume_refuses_only_flags_given_with_other_values(cifar10_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    restore = crash_after(monkeypatch, 1)
    with pytest.raises(Crash):
        vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(out), "--topk", "2", *FAST])
    restore()
    ckpt = str(out / "checkpoint_last.pt")
    with pytest.raises(tkp.TKPError, match="--topk 2 .now 1."):
        vgg8.main(["--resume", ckpt, "--topk", "1"])
    # the same value, and operational flags, may be given
    summary = vgg8.main(["--resume", ckpt, "--topk", "2", "--batch-val", "8", "--num-workers", "0"])
    assert summary["sparsity"] == "top-2"


def test_resume_mid_stage_with_other_steps_per_epoch_continues_the_cosine(cifar10_root, tmp_path, monkeypatch):
    """A checkpoint written with twice the steps per epoch (half the processes) resumes
    mid-stage: the remaining epochs follow the cosine by the fraction of the stage done."""
    out = tmp_path / "run"
    flags = ["--data-root", str(cifar10_root), *FAST, "--epochs-stage1", "4", "--epochs-stage2", "1"]
    restore = crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        vgg8.main([*flags, "--output-dir", str(out)])
    restore()
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (1, 2)
    ckpt["scheduler"]["T_max"] *= 2  # what the same run on half the processes saves
    ckpt["scheduler"]["last_epoch"] *= 2
    ckpt["step"] *= 2
    torch.save(ckpt, out / "checkpoint_last.pt")
    vgg8.main(["--resume", str(out / "checkpoint_last.pt")])
    log = read_log(out)
    for e in log[:4]:
        expected = 1e-3 * (1 + math.cos(math.pi * (e["epoch"] - 1) / 4)) / 2
        assert e["lr"] == pytest.approx(expected, rel=1e-6), e


def test_resume_with_another_memory_layout_matches_the_straight_run(cifar10_root, tmp_path, monkeypatch):
    """channels_last on, then off after the resume: AdamW's moments follow their parameters'
    layout (the fused kernel walks storage in order). Compared at the end of stage 1: a fresh
    Adam in stage 2 amplifies the float noise of another conv algorithm (its first steps
    are about lr * sign(gradient)). Measured: 7e-6 with the fix, 0.10 without."""
    flags = ["--data-root", str(cifar10_root), *FAST, "--channels-last", "--topk", "1", "--epochs-stage2", "0"]
    vgg8.main([*flags, "--output-dir", str(tmp_path / "a")])
    restore = crash_after(monkeypatch, 1)
    with pytest.raises(Crash):
        vgg8.main([*flags, "--output-dir", str(tmp_path / "b")])
    restore()
    vgg8.main(["--resume", str(tmp_path / "b" / "checkpoint_last.pt"), "--no-channels-last"])
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-4, worst


def test_auto_precision_asks_for_hardware_bf16(monkeypatch):
    args = vgg8.get_args_parser().parse_args([])
    cuda = torch.device("cuda")
    # a V100/T4: bf16 only through emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp(args, cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere or newer
    assert resolve_amp(args, cuda) == torch.bfloat16
    args = vgg8.get_args_parser().parse_args(["--amp-dtype", "bf16"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_amp(args, cuda) == torch.bfloat16  # asked for explicitly: the user's choice


def test_gpu_checkpoint_resumes_on_cpu_with_the_precision_it_names(cifar10_root, tmp_path, monkeypatch):
    """A checkpoint of --amp-dtype auto on a bf16 GPU, resumed on a CPU (where auto is fp32):
    the error names --amp-dtype bf16, and with it the run continues."""
    out = tmp_path / "run"
    restore = crash_after(monkeypatch, 1)
    with pytest.raises(Crash):
        vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(out), *FAST])
    restore()
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["args"]["amp_dtype"] == "auto" and ckpt["amp"] == "off"
    ckpt["amp"] = "bf16"  # what --amp-dtype auto resolved to on the GPU
    torch.save(ckpt, out / "checkpoint_last.pt")
    with pytest.raises(tkp.TKPError, match="pass --amp-dtype bf16"):
        vgg8.main(["--resume", str(out / "checkpoint_last.pt")])
    summary = vgg8.main(["--resume", str(out / "checkpoint_last.pt"), "--amp-dtype", "bf16"])
    assert summary["amp"] == "bf16" and summary["final_top1"] is not None


def test_documented_defaults(monkeypatch):
    args = vgg8.get_args_parser().parse_args([])
    assert (args.seed, args.val_freq) == (42, 5)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert vgg8.get_args_parser().parse_args([]).num_workers == 2
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert vgg8.get_args_parser().parse_args([]).num_workers == 4


def test_validation_every_val_freq_epochs_and_on_each_stages_last(cifar10_root, tmp_path):
    out = tmp_path / "run"
    vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(out), *FAST,
               "--epochs-stage1", "3", "--epochs-stage2", "1", "--val-freq", "2"])
    validated = [(e["stage"], e["epoch"]) for e in read_log(out) if e["val_top1"] is not None]
    assert validated == [(1, 2), (1, 3), (2, 1)]


def test_failed_run_leaves_no_folder(tmp_path):
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (tmp_path / "data" / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    out = tmp_path / "runs" / "new"
    with pytest.raises(tkp.TKPError, match="not a readable cifar10 batch"):
        vgg8.main(["--data-root", str(tmp_path / "data"), "--output-dir", str(out), *FAST])
    assert not out.exists()
    # a folder that was there before is left alone
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(tkp.TKPError):
        vgg8.main(["--data-root", str(tmp_path / "data"), "--output-dir", str(out), *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "notes.txt"] or \
        sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_dry_run_removes_its_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    vgg8.main(["--dry-run"])
    assert not list(tmp_path.glob("tkp-dry-run-*"))
    vgg8.main(["--dry-run", "--output-dir", str(tmp_path / "kept")])
    assert (tmp_path / "kept" / "summary.json").is_file()


def test_dense_baseline_speaks_of_no_mask(cifar10_root, tmp_path, capsys):
    s = vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(tmp_path / "d"), "--dense-baseline", *FAST])
    printed = capsys.readouterr().out
    assert "mask" not in printed.replace("--dense-baseline", "")
    assert s["post_mask_top1"] is None and s["between_stages_top1"] is not None
    stage2 = [e["val_top1"] for e in read_log(tmp_path / "d") if e["stage"] == 2 and e["val_top1"] is not None]
    assert s["best_top1"] == max(stage2)


def test_topk_range_follows_the_largest_kernel():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 7), torch.nn.Conv2d(4, 4, 3))
    assert topk_plan(model, 48).pattern == "top-48"
    with pytest.raises(tkp.TKPError, match="choose 1..48"):
        topk_plan(model, 49)
    three = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    assert topk_plan(three, 9).targets == []  # 9 of 9 taps: dense, as documented
    with pytest.raises(tkp.TKPError, match="choose 1..9"):
        topk_plan(three, 10)


def test_stage_1_prints_the_starting_ratio_of_beta_aux_to_ce(cifar10_root, tmp_path, capsys):
    s = vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(tmp_path / "r"), *FAST])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("stage 1 starts at"))
    start = s["aux_start"]
    assert start["beta_aux"] > 0 and start["ce"] > 0
    assert f"ratio {start['beta_aux'] / start['ce']:.2g}" in line


def test_backend_settings_hold_for_the_run_and_are_put_back(tmp_path, monkeypatch):
    """run() trains with cuDNN's autotuning on CUDA, and a CPU dry run with the plain kernels on
    one thread; both are process-wide, and run() is also called in-process: they are put back
    afterwards, after a failure too. (The CUDA flag can be set without a GPU.)"""
    onednn, threads, autotune = torch.backends.mkldnn.enabled, torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with tkp.backend_settings(torch.device("cuda"), dry_run=False):
            assert torch.backends.cudnn.benchmark is True
            assert torch.backends.mkldnn.enabled == onednn and torch.get_num_threads() == threads
        assert torch.backends.cudnn.benchmark is False
        torch.backends.mkldnn.enabled = True
        with pytest.raises(RuntimeError, match="stop"), tkp.backend_settings(torch.device("cpu"), dry_run=True):
            assert not torch.backends.mkldnn.enabled and torch.get_num_threads() == 1
            assert torch.backends.cudnn.benchmark is False
            raise RuntimeError("stop")
        assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads
        # and the training itself runs under them
        seen = []
        monkeypatch.setattr(tkp, "_run", lambda *a: seen.append((torch.backends.mkldnn.enabled,
                                                                  torch.get_num_threads())) or {})
        vgg8.main(["--dry-run", "--output-dir", str(tmp_path / "dry")])
        assert seen == [(False, 1)]
        assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads
    finally:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.benchmark = onednn, autotune
        torch.set_num_threads(threads)


def test_a_dry_run_makes_each_stage_one_epoch_or_none():
    """--dry-run: a stage of epochs becomes one, a stage of none (CLIP's --one-shot) stays none,
    and a parser without epoch defaults (a user's script on tkp.base_parser) gets one each."""
    import argparse
    for given, expected in (((100, 100), (1, 1)), ((0, 2), (0, 1)), ((None, None), (1, 1))):
        args = argparse.Namespace(epochs_stage1=given[0], epochs_stage2=given[1], batch_train=64, batch_val=64,
                                  bn_recal_batches=50, num_workers=4)
        tkp._apply_dry_run(args)
        assert (args.epochs_stage1, args.epochs_stage2) == expected
