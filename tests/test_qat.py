"""Quantization-aware training (stage 3, --qat): masks stay exact through fake
quantization, the int8 export reproduces the fake-quantized model, and runs end to end
(VGG-8 Top-1, ViT 2:4), learn, and resume."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import write_cifar
from test_vit import FAST as VIT_FAST
from test_vit import write_image_folder
from torch.utils.data import DataLoader, TensorDataset

import vgg8_optimized as vgg8
import vit_small
from tkp_lib import runs
from tkp_lib.qat import export_int8, freeze_qat, load_int8, prepare_qat, qat_layers, strip_qat
from tkp_lib.report import check_sparsity
from tkp_lib.runs import save_atomic
from tkp_lib.runtime import Dist
from tkp_lib.sparsity import Masker, compute_masks, topk_plan
from tkp_lib.train import build_trainer, train_one_epoch

QAT = ["--epochs-stage1", "1", "--epochs-stage2", "1", "--qat", "--qat-epochs", "2", "--batch-train", "16",
       "--batch-val", "16", "--num-workers", "0", "--bn-recal-batches", "2", "--progress-every", "0"]


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 4))


def batches(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=8)


def qat_trainer(model, plan):
    masks = compute_masks(model, plan)
    Masker(model, masks).apply_()
    assert prepare_qat(model) == ["0", "3", "7"]  # every Conv2d and Linear
    args = vgg8.get_args_parser().parse_args(["--lr", "1e-2"])
    masker = Masker(model, masks)
    t = build_trainer(model, model, args=args, device=torch.device("cpu"), amp_dtype=None, min_lr=0.0,
                          total_steps=100, dist=Dist(), masker=masker)

    def grads_masked(opt, *_):
        for p, m in zip(masker.params, masks.values()):
            assert (p.grad[~m] == 0).all()

    t.optimizer.register_step_pre_hook(grads_masked)
    return t, masks


def test_masks_exact_through_fake_quantization():
    torch.manual_seed(0)
    model = small_net()
    plan = topk_plan(model, 1)
    t, masks = qat_trainer(model, plan)
    for _ in range(4):
        train_one_epoch(t, batches())
        check_sparsity(model, plan, masks)
        for name in ("0", "3"):
            layer = model.get_submodule(name)
            quantized = layer.weight_fq(layer.weight.detach())
            assert (quantized[~masks[f"{name}.weight"]] == 0).all()  # zero before and after fake quantization
    freeze_qat(model)
    for layer in qat_layers(model).values():
        kept = layer.weight.detach().abs().flatten(1).max(1).values
        # symmetric per-channel scale from the largest kept weight; pruned zeros cannot move it
        torch.testing.assert_close(layer.weight_fq.scale, kept / 127)


def test_int8_export_reproduces_the_fake_quantized_model():
    torch.manual_seed(1)
    model = small_net()
    plan = topk_plan(model, 2)
    t, masks = qat_trainer(model, plan)
    train_one_epoch(t, batches())
    freeze_qat(model)
    model.eval()
    x = torch.randn(16, 3, 8, 8)
    expected = model(x)
    int8 = export_int8(model)
    model_before_strip = copy.deepcopy(model)
    weights = {n: m.weight.detach().clone() for n, m in qat_layers(model).items()}
    for name, q in int8.items():
        assert q["weight_int8"].dtype == torch.int8 and q["weight_int8"].abs().max() <= 127
        if f"{name}.weight" in masks:
            assert (q["weight_int8"][~masks[f"{name}.weight"]] == 0).all()
    strip_qat(model)
    fresh = small_net()
    fresh.load_state_dict(model.state_dict(), strict=True)  # plain layers again
    rebuilt = load_int8(fresh, int8).eval()
    for name, layer in qat_layers(rebuilt).items():  # the de-quantized weights, to the bit
        assert torch.equal(layer.weight, qat_layers(model_before_strip)[name].weight_fq(weights[name]))
    torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=1e-6)


def test_vgg8_qat_end_to_end(cifar10_root, tmp_path):
    out = tmp_path / "run"
    s = vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(out), "--topk", "1", *QAT])
    qat = torch.load(out / "final_qat.pt", weights_only=True)
    model = vgg8.VGG8(10)
    model.load_state_dict(qat["model"], strict=True)
    plan = topk_plan(model, 1)
    check_sparsity(model, plan, qat["masks"])
    assert set(qat["int8"]) == {"features.0", "features.3", "features.7", "features.10", "classifier.1",
                                "classifier.4"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["qat_top1"] == s["qat_top1"] is not None and summary["final_top1"] is not None
    assert summary["size_bytes_sparse_int8"] < summary["size_bytes_dense_fp32"] / 3.5  # int8, 1 of 9 taps
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1, 2, 3, 3]
    final = torch.load(out / "final.pt", weights_only=True)  # the float model of stage 2, unchanged
    vgg8.VGG8(10).load_state_dict(final["model"], strict=True)
    # --eval on final_qat.pt evaluates the int8 model (weights and input quantization)
    e = vgg8.main(["--eval", str(out / "final_qat.pt"), "--data-root", str(cifar10_root), "--num-workers", "0"])
    assert e["qat_top1"] == pytest.approx(s["qat_top1"]) and "final_top1" not in e


def test_vit_qat_keeps_2_4(tmp_path):
    data = write_image_folder(tmp_path / "imagenet")
    vit_small.main(["--data-path", str(data), "--output-dir", str(tmp_path / "run"), *VIT_FAST, "--qat",
                    "--qat-epochs", "1"])
    qat = torch.load(tmp_path / "run" / "final_qat.pt", weights_only=True)
    assert len(qat["int8"]) == 48 + 2  # the pruned Linears, the patch embedding and the head
    for name, q in qat["int8"].items():
        if name.startswith("blocks."):
            assert q["weight_int8"].reshape(-1, 4).count_nonzero(dim=1).max() <= 2, name


def test_qat_accuracy_stays_close_to_float(tmp_path):
    root = write_cifar(tmp_path / "data", "cifar10", n_train=320, n_test=200, learnable=True, noise=150)
    s = vgg8.main(["--data-root", str(root), "--output-dir", str(tmp_path / "r"), "--topk", "1", "--epochs-stage1", "3",
                   "--epochs-stage2", "3", "--qat", "--qat-epochs", "2", "--batch-train", "32", "--batch-val", "100",
                   "--num-workers", "0", "--lr", "3e-3", "--bn-recal-batches", "5", "--progress-every", "0"])
    assert s["final_top1"] >= 80.0
    assert s["qat_top1"] >= s["final_top1"] - 5.0


def test_qat_resume_is_exact(cifar10_root, tmp_path, monkeypatch):
    straight = vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(tmp_path / "a"), *QAT])
    real, calls = save_atomic, []

    def crash_in_stage_3(obj, path):
        real(obj, path)
        calls.append(obj.get("stage"))
        if obj.get("stage") == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_atomic", crash_in_stage_3)
    with pytest.raises(KeyboardInterrupt):
        vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(tmp_path / "b"), *QAT])
    monkeypatch.setattr(runs, "save_atomic", real)
    checkpoint = str(tmp_path / "b" / "checkpoint_last.pt")
    resumed = vgg8.main(["--data-root", str(cifar10_root), *QAT, "--resume", checkpoint])
    assert straight["qat_top1"] == resumed["qat_top1"]
    a = torch.load(tmp_path / "a" / "final_qat.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final_qat.pt", weights_only=True)
    for name in a["int8"]:
        assert torch.equal(a["int8"][name]["weight_int8"], b["int8"][name]["weight_int8"])
        assert torch.equal(a["int8"][name]["input_scale"], b["int8"][name]["input_scale"])


def test_qat_summary_keeps_the_float_figures(cifar10_root, tmp_path, capsys):
    """int8 rounding can make a kept weight 0: that is not pruning. summary.json after QAT has
    the float model's counts (from the masks) and the int8 model's figures under their own
    keys; one summary line is printed."""
    out = tmp_path / "q"
    s = vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(out), "--topk", "1", *QAT])
    printed = capsys.readouterr().out
    float_metrics = torch.load(out / "final.pt", weights_only=True)["metrics"]
    for key in ("params_nonzero", "macs_nonzero", "speedup_theoretical", "pruned_layer_density", "final_top1"):
        assert s[key] == float_metrics[key], key
    assert s["speedup_theoretical"] == pytest.approx(98.2e6 / 12.8e6, rel=0.01)  # VGG-8 Top-1: 7.69x
    assert {"qat_top1", "size_bytes_sparse_int8", "size_bytes_dense_fp32"} <= set(s)
    assert sum(line.startswith("vgg8 cifar10 top-1:") for line in printed.splitlines()) == 1
    # the int8 weights do have extra zeros: the counts above did not take them as pruning
    qat = torch.load(out / "final_qat.pt", weights_only=True)
    int8_zeros = sum(int((q["weight_int8"] == 0).sum()) for q in qat["int8"].values())
    masked_out = sum(int((~m).sum()) for m in qat["masks"].values())
    assert int8_zeros > masked_out
