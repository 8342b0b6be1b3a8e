"""vgg8_optimized.py end to end on tiny CIFAR-format data: outputs, exact sparsity,
resume equivalence, learning, and one-line errors on bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write_cifar

import tkp_common as tkp
import vgg8_optimized as vgg8
from tkp_lib import runs
from tkp_lib.runs import save_atomic

FAST = ["--epochs-stage1", "2", "--epochs-stage2", "2", "--batch-train", "16", "--batch-val", "16",
        "--num-workers", "0", "--bn-recal-batches", "2", "--progress-every", "0"]
SUMMARY_FIELDS = {"model", "dataset", "sparsity", "init_top1", "stage1_top1", "post_mask_top1",
                  "final_top1", "best_top1", "params_total", "params_nonzero", "pruned_layer_density",
                  "macs_dense", "macs_nonzero", "speedup_theoretical", "wall_time_s"}


def run_vgg8(data_root, out, *extra):
    return vgg8.main(["--data-root", str(data_root), "--output-dir", str(out), *FAST, *extra])


def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "vgg8_optimized.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_end_to_end_outputs_and_exact_topk(cifar10_root, tmp_path):
    out = tmp_path / "run"
    summary = run_vgg8(cifar10_root, out, "--topk", "2")
    for name in ("args.json", "log.jsonl", "checkpoint_last.pt", "final.pt", "summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*tmp"))

    final = torch.load(out / "final.pt", weights_only=True)
    assert set(final) == {"model", "masks", "args", "metrics"}
    model = vgg8.VGG8(10)
    model.load_state_dict(final["model"], strict=True)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and len(final["masks"]) == 4
    for conv in convs:
        nonzero_per_kernel = conv.weight.reshape(-1, 9).count_nonzero(dim=1)
        assert nonzero_per_kernel.max() <= 2
    for name, mask in final["masks"].items():
        assert mask.dtype == torch.bool and (final["model"][name][~mask] == 0).all()

    saved = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(saved)
    assert saved["sparsity"] == "top-2" and saved["dataset"] == "cifar10"
    assert saved["params_nonzero"] < saved["params_total"]
    assert saved["speedup_theoretical"] == pytest.approx(saved["macs_dense"] / saved["macs_nonzero"])
    assert summary["final_top1"] == saved["final_top1"]

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in log:
        assert {"lr", "train_loss", "train_ce", "train_aux", "train_acc", "val_top1",
                "epoch_seconds", "images_per_s"} <= set(r)
        assert r["lr"] > 0
    assert log[0]["train_aux"] > 0 and log[2]["train_aux"] == 0  # no regularizer in stage 2
    info = json.loads((out / "args.json").read_text())
    assert info["args"]["topk"] == 2 and info["versions"]["torch"] == torch.__version__


def test_vgg8_mac_count_by_hand(cifar10_root, tmp_path):
    """Top-1 on VGG-8: every conv keeps 1 of 9 taps, the Linears stay dense."""
    convs = [32 * 32 * 64 * 3 * 9, 32 * 32 * 64 * 64 * 9, 16 * 16 * 128 * 64 * 9, 16 * 16 * 128 * 128 * 9]
    linears = 128 * 8 * 8 * 256 + 256 * 10
    s = run_vgg8(cifar10_root, tmp_path / "run", "--topk", "1", "--epochs-stage1", "0", "--epochs-stage2", "0")
    assert s["macs_dense"] == sum(convs) + linears
    # a Linear weight is used once per image: its non-zero MACs are its non-zero weights
    # (N(0, 0.01) init can draw an exact 0.0 or two among 2M weights)
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=True)["model"]
    linears_nz = sum(int(final[f"classifier.{i}.weight"].count_nonzero()) for i in (1, 4))
    assert s["macs_nonzero"] == sum(convs) // 9 + linears_nz
    assert s["speedup_theoretical"] == pytest.approx((sum(convs) + linears) / (sum(convs) / 9 + linears), rel=1e-5)


def test_cifar100_and_dense_baseline(cifar100_root, tmp_path):
    s = run_vgg8(cifar100_root, tmp_path / "run", "--dataset", "cifar100", "--dense-baseline",
                 "--epochs-stage1", "1", "--epochs-stage2", "1")
    assert s["sparsity"] == "dense" and s["pruned_layers"] == 0
    assert s["params_nonzero"] > 0.999 * s["params_total"]  # only the odd exact 0.0
    assert s["speedup_theoretical"] == pytest.approx(1.0, abs=1e-4)
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    vgg8.VGG8(100).load_state_dict(final["model"], strict=True)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after_save,workers", [(1, 0), (2, 0), (3, 0), (4, 2)])
def test_resume_gives_the_same_result_as_a_straight_run(cifar10_root, tmp_path, monkeypatch,
                                                         crash_after_save, workers):
    """Saves: stage 1 epoch 1, stage 1 epoch 2, post-mask, stage 2 epoch 1, stage 2 epoch 2,
    final. Crash after one of them, resume, and compare with an uninterrupted run."""
    workers = ["--num-workers", str(workers)]
    straight = run_vgg8(cifar10_root, tmp_path / "a", "--topk", "1", *workers)

    real_save, calls = runs.save_atomic, {"n": 0}

    def crashing_save(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == crash_after_save:
            raise Crash()

    monkeypatch.setattr(runs, "save_atomic", crashing_save)
    with pytest.raises(Crash):
        run_vgg8(cifar10_root, tmp_path / "b", "--topk", "1", *workers)
    monkeypatch.setattr(runs, "save_atomic", real_save)
    # --output-dir defaults to the folder of --resume
    resumed = vgg8.main(["--data-root", str(cifar10_root), *FAST, "--topk", "1", *workers,
                         "--resume", str(tmp_path / "b" / "checkpoint_last.pt")])

    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["masks"]:
        assert torch.equal(a["masks"][key], b["masks"][key]), key
    for field in ("stage1_top1", "post_mask_top1", "final_top1", "best_top1"):
        assert straight[field] == resumed[field], field
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    timing = {"epoch_seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in log_a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in log_b]


def test_learns_in_both_stages(tmp_path):
    root = write_cifar(tmp_path / "data", "cifar10", n_train=320, n_test=200, learnable=True, noise=150)
    common = ["--data-root", str(root), "--epochs-stage1", "3", "--epochs-stage2", "3", "--batch-train", "32",
              "--batch-val", "100", "--num-workers", "0", "--lr", "3e-3", "--bn-recal-batches", "5",
              "--progress-every", "0"]
    dense = vgg8.main([*common, "--output-dir", str(tmp_path / "dense"), "--dense-baseline"])
    top1 = vgg8.main([*common, "--output-dir", str(tmp_path / "top1"), "--topk", "1"])
    assert dense["final_top1"] >= 90.0  # chance is 10%
    assert top1["stage1_top1"] >= 60.0
    assert top1["final_top1"] >= dense["final_top1"] - 10.0
    assert top1["final_top1"] >= top1["post_mask_top1"]
    assert top1["pruned_layer_density"] == pytest.approx(1 / 9, rel=1e-3)


def test_dry_run_cli(tmp_path):
    r = run_cli("--dry-run", "--output-dir", str(tmp_path / "dry"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dry" / "summary.json").is_file()
    assert "theoretical speed-up" in r.stdout
    final = json.loads((tmp_path / "dry" / "summary.json").read_text())["final_top1"]
    e = vgg8.main(["--dry-run", "--eval", str(tmp_path / "dry" / "final.pt")])  # the run's generated data
    assert e["final_top1"] == final and e["val_images"] == 2


@pytest.mark.parametrize("flags,expected", [
    (["--topk", "0"], "--topk: must be >= 1"),
    (["--topk", "10"], "--topk 10 keeps every tap of the largest kernel (9 taps); choose 1..9"),
    (["--lr", "-1"], "--lr: must be a finite number"),
    (["--exclude-layers", "nope", "--dry-run"], "no Conv2d named nope"),
    (["--eval", "", "--dry-run"], "--eval: expected a path, got an empty string"),
    (["--beta", "1e300", "--dry-run"], "--beta: expected a number in 0..1e+30 or 'auto'"),
    (["--beta", "auto", "--beta-ratio", "1e300", "--dry-run"], "--beta-ratio: must be at most 1e6"),
    (["--dry-run", "--resume", "runs/a/checkpoint_last.pt", "--eval", "runs/a/final.pt"], "pass one of them"),
])
def test_bad_flags_give_one_line(flags, expected, tmp_path):
    r = run_cli(*flags, "--output-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert expected in r.stderr


def test_missing_data_offline_gives_one_line(tmp_path):
    # a proxy nobody listens on makes the download fail at once, as it does offline
    dead = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}
    r = run_cli("--data-root", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "x"), env_extra=dead)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cifar-10-batches-py" in r.stderr and "data_batch_1" in r.stderr


def test_malformed_cifar_batch_gives_one_line(cifar10_root, tmp_path):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(tkp.TKPError, match="data_batch_3 is not a readable cifar10 batch"):
        run_vgg8(cifar10_root, tmp_path / "x")


@pytest.mark.parametrize("labels, batch", [([10], "data_batch_2"), ([-1], "test_batch"), ([0.5], "data_batch_1")])
def test_cifar_labels_outside_the_classes_give_one_line(tmp_path, labels, batch):
    """A batch whose labels are not integers in 0..classes-1 (a label 10, -1 or 0.5) is refused
    when it is read, naming the file, instead of crashing in the loss or training on
    truncated labels."""
    import pickle

    from conftest import write_cifar

    from tkp_lib.data import load_cifar
    write_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    path = tmp_path / "cifar-10-batches-py" / batch
    entry = pickle.loads(path.read_bytes())
    entry["labels"][:1] = labels
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(tkp.TKPError, match=f"{batch} holds labels outside 0..9"):
        load_cifar(str(tmp_path), "cifar10", download=False)


def test_corrupt_resume_file_gives_one_line(tmp_path):
    bad = tmp_path / "checkpoint_last.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    r = run_cli("--dry-run", "--resume", str(bad), "--output-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot read --resume checkpoint" in r.stderr


def test_resume_with_other_science_flags_is_refused(cifar10_root, tmp_path):
    run_vgg8(cifar10_root, tmp_path / "a", "--topk", "1", "--epochs-stage2", "0")
    with pytest.raises(tkp.TKPError, match="--topk 1"):
        run_vgg8(cifar10_root, tmp_path / "a", "--topk", "2", "--resume", str(tmp_path / "a" / "checkpoint_last.pt"))


def test_existing_run_is_never_overwritten(cifar10_root, tmp_path):
    run_vgg8(cifar10_root, tmp_path / "a", "--epochs-stage1", "1", "--epochs-stage2", "0")
    before = (tmp_path / "a" / "checkpoint_last.pt").read_bytes()
    with pytest.raises(tkp.TKPError, match="already holds a run"):
        run_vgg8(cifar10_root, tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint_last.pt").read_bytes() == before


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(cifar10_root, tmp_path):
    out = tmp_path / "a"
    run_vgg8(cifar10_root, out, "--epochs-stage1", "1", "--epochs-stage2", "0")
    before = (out / "checkpoint_last.pt").read_bytes()
    with pytest.raises(tkp.TKPError, match="became nan|became inf"):
        # a learning rate this large sends the weights, and then the loss, to inf/nan
        vgg8.main(["--data-root", str(cifar10_root), *FAST, "--epochs-stage1", "1", "--epochs-stage2", "1",
                   "--lr", "1e30", "--output-dir", str(tmp_path / "b")])
    assert (out / "checkpoint_last.pt").read_bytes() == before
    assert not (tmp_path / "b" / "checkpoint_last.pt").exists() or \
        torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)["stage"] == 1


def test_eval_prints_the_summary_of_a_final_checkpoint(cifar10_root, tmp_path, capsys):
    s = run_vgg8(cifar10_root, tmp_path / "a", "--topk", "1", "--epochs-stage1", "1", "--epochs-stage2", "1")
    capsys.readouterr()
    e = vgg8.main(["--eval", str(tmp_path / "a" / "final.pt"), "--data-root", str(cifar10_root),
                   "--num-workers", "0", "--batch-val", "16"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["final_top1"] == pytest.approx(s["final_top1"]) == pytest.approx(e["final_top1"])
    assert printed["macs_nonzero"] == s["macs_nonzero"] and printed["sparsity"] == "top-1"


def test_pretrain_path_loads_a_dense_checkpoint(cifar10_root, tmp_path):
    """--pretrain-path takes a state_dict, also one saved from a compiled model (the reference's)."""
    model = vgg8.VGG8(10)
    with torch.no_grad():
        model.features[0].weight.fill_(0.125)
    torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, tmp_path / "dense.pt")
    args = vgg8.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "dense.pt")])
    loaded = vgg8.build_model(args)
    assert torch.equal(loaded.features[0].weight, model.features[0].weight)
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    args = vgg8.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "wrong.pt")])
    with pytest.raises(tkp.TKPError, match="does not fit this model"):
        vgg8.build_model(args)


def test_resume_re_zeroes_pruned_weights(cifar10_root, tmp_path, monkeypatch):
    """A stage-2 checkpoint whose pruned weights were touched (by hand, a bug, another tool)
    comes back exactly sparse: masks are re-applied on resume, not only via gradients."""
    real, calls = save_atomic, {"n": 0}

    def crash_after_post_mask(obj, path):
        real(obj, path)
        calls["n"] += 1
        if calls["n"] == 3:  # stage 1 epochs 1-2, then the post-mask checkpoint
            raise Crash()

    monkeypatch.setattr(runs, "save_atomic", crash_after_post_mask)
    with pytest.raises(Crash):
        run_vgg8(cifar10_root, tmp_path / "a", "--topk", "1")
    monkeypatch.setattr(runs, "save_atomic", real)
    path = tmp_path / "a" / "checkpoint_last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["stage"] == 2
    for name, mask in ckpt["masks"].items():
        ckpt["model"][name][~mask] = 1.0  # revive every pruned weight
    torch.save(ckpt, path)
    vgg8.main(["--data-root", str(cifar10_root), *FAST, "--topk", "1", "--resume", str(path)])
    final = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    for name, mask in final["masks"].items():
        assert (final["model"][name][~mask] == 0).all(), name
