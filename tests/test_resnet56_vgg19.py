"""resnet56_optimized.py and vgg19_optimized.py (copies of vgg8_optimized.py with their own
model section) end to end on tiny CIFAR-format data: outputs, exact Top-1 sparsity, final.pt
loading strictly into each script's model, dense MACs and parameters against a hand count
and the published figures, the theoretical speed-up against the paper's, --pretrain-path,
and --dry-run from the command line."""

import copy
import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, write_cifar

import resnet56_optimized as resnet56
import tkp_common as tkp
import vgg19_optimized as vgg19

# 8 training images = 2 steps of 4 per epoch, 4 test images = 1 batch: every batch has the
# same shape (on CPU each new shape costs kernel set-up time)
FAST = ["--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-train", "4", "--batch-val", "4",
        "--num-workers", "0", "--bn-recal-batches", "2", "--progress-every", "0", "--topk", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tests' training on one CPU thread: on a busy 2-core machine, OpenMP's
    spinning worker threads made the tiny-batch runs 3-5x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- hand counts: (output side, input channels, output channels) of every 3x3 conv -------

def resnet56_convs():
    """Stem, then 3 stages x 9 blocks x 2 convs; the first conv of stages 2 and 3 has stride 2."""
    convs = [(32, 3, 16)]
    for side, c_in, c_out in ((32, 16, 16), (16, 16, 32), (8, 32, 64)):
        convs += [(side, c_in, c_out)] + [(side, c_out, c_out)] * 17
    return convs


def vgg19_convs():
    """Configuration E at 32x32: 2 convs at 32, 2 at 16, 4 at 8, 4 at 4, 4 at 2."""
    return ([(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256)] + [(8, 256, 256)] * 3
            + [(4, 256, 512)] + [(4, 512, 512)] * 3 + [(2, 512, 512)] * 4)


def hand_count(convs, fc_in, classes):
    """(conv MACs, Linear MACs, parameters): no conv has a bias, each is followed by a BN."""
    conv_macs = sum(side * side * c_out * c_in * 9 for side, c_in, c_out in convs)
    params = sum(c_out * c_in * 9 + 2 * c_out for _, c_in, c_out in convs)
    return conv_macs, fc_in * classes, params + fc_in * classes + classes


# paper_speedup: the paper's Top-1 rows. published_macs/params: ResNet-56 0.85M parameters (He
# et al. 2016) and 1.25e8 MACs (Li et al. 2017, "Pruning filters"); VGG-19 20.04M parameters
# (network slimming) and ~398M MACs; all for 10 classes (a 100-class head adds 0.2% at most).
MODELS = {
    "resnet56": dict(script=resnet56, cls=resnet56.ResNet56, dataset="cifar10", convs=resnet56_convs(),
                     fc="linear", fc_in=64, paper_speedup=8.83,
                     published_macs=125e6, published_params=0.85e6),
    "vgg19": dict(script=vgg19, cls=vgg19.VGG19, dataset="cifar100", convs=vgg19_convs(),
                  fc="classifier.1", fc_in=512, paper_speedup=8.90,
                  published_macs=398e6, published_params=20.04e6),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_end_to_end_top1_macs_and_speedup(name, tmp_path, record_property):
    cfg = MODELS[name]
    classes = tkp.CIFAR_CLASSES[cfg["dataset"]]
    root = write_cifar(tmp_path / "data", cfg["dataset"], n_train=8, n_test=4)
    out = tmp_path / "run"
    s = cfg["script"].main(["--data-root", str(root), "--output-dir", str(out), *FAST])  # default --dataset

    # outputs, and final.pt: safe to load, strict into the script's model, exactly Top-1
    for f in ("args.json", "log.jsonl", "checkpoint_last.pt", "final.pt", "summary.json"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "summary.json").read_text())
    assert (saved["model"], saved["dataset"], saved["sparsity"]) == (name, cfg["dataset"], "top-1")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == [(1, 1), (2, 1)]
    assert log[0]["train_aux"] > 0 and log[1]["train_aux"] == 0
    final = torch.load(out / "final.pt", weights_only=True)
    model = cfg["cls"](classes)
    model.load_state_dict(final["model"], strict=True)
    convs = [mod for mod in model.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == len(cfg["convs"]) == len(final["masks"]) == s["pruned_layers"]
    for conv in convs:
        assert conv.kernel_size == (3, 3)  # option A / configuration E: no 1x1 conv stays dense
        assert conv.weight.reshape(-1, 9).count_nonzero(dim=1).max() <= 1
    for key, mask in final["masks"].items():
        assert mask.dtype == torch.bool and (final["model"][key][~mask] == 0).all()
        assert (mask.reshape(-1, 9).sum(1) == 1).all()

    # dense MACs (torch.utils.flop_counter) and parameters: the hand count exactly, the
    # published figures within 2%
    conv_macs, fc_macs, params = hand_count(cfg["convs"], cfg["fc_in"], classes)
    assert s["macs_dense"] == saved["macs_dense"] == conv_macs + fc_macs
    assert s["params_total"] == params == sum(p.numel() for p in model.parameters())
    assert abs(s["macs_dense"] / cfg["published_macs"] - 1) < 0.02
    assert abs(s["params_total"] / cfg["published_params"] - 1) < 0.02

    # Top-1: each conv keeps 1 of 9 taps; the Linear stays dense (a Linear weight is used once
    # per image, so its non-zero MACs are its non-zero weights)
    fc_nonzero = int(final["model"][cfg["fc"] + ".weight"].count_nonzero())
    assert s["macs_nonzero"] == conv_macs // 9 + fc_nonzero
    speedup, paper = s["speedup_theoretical"], cfg["paper_speedup"]
    assert speedup == pytest.approx(s["macs_dense"] / s["macs_nonzero"])
    record_property(f"{name}_speedup_top1", round(speedup, 3))
    print(f"{name}: {s['macs_dense'] / 1e6:.2f}M dense MACs, {s['params_total'] / 1e6:.3f}M params, "
          f"Top-1 theoretical speed-up {speedup:.3f}x (paper {paper}x)")
    # With a fraction f of the dense MACs left unpruned, Top-1 gives 9 / (1 + 8f): 9x is the
    # ceiling, and only dense work pulls the ratio below it. We count conv + Linear MACs only
    # (f = 0.0005% for ResNet-56, 0.013% for VGG-19: the Linear); a count that also includes
    # BN/ReLU/pooling or unpruned 1x1 shortcut convs has a larger f and a lower ratio. So we
    # expect at or above the paper's figure (0.02 for its rounding), and at most 0.2 above it:
    # 0.2 below ours means f ~ 0.3% (the paper's 8.83x/8.90x mean f = 0.24%/0.14%); a wider
    # gap would mean the paper's count of the model differs from ours by more than that.
    assert paper - 0.02 <= speedup <= 9.0
    assert speedup - paper < 0.2


def test_pretrain_path_loads_dense_checkpoints(tmp_path):
    """A dense ResNet-56 in akamaster/pytorch_resnet_cifar10's file layout ('state_dict',
    'module.' keys) and a plain VGG-19 state_dict load; --no-pretrain ignores them; the other
    model's weights are refused with one line."""
    r56 = resnet56.ResNet56(10)
    v19 = vgg19.VGG19(100)
    with torch.no_grad():
        r56.layer3[8].conv2.weight.fill_(0.25)
        v19.features[0].weight.fill_(0.125)
    torch.save({"epoch": 200, "best_prec1": 93.39,
                "state_dict": {"module." + k: v for k, v in r56.state_dict().items()}}, tmp_path / "r56.th")
    torch.save(v19.state_dict(), tmp_path / "v19.pt")

    args = resnet56.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "r56.th")])
    assert tkp.loads_pretrain_path(args)
    assert torch.equal(resnet56.build_model(args).layer3[8].conv2.weight, r56.layer3[8].conv2.weight)
    args = vgg19.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "v19.pt")])
    assert torch.equal(vgg19.build_model(args).features[0].weight, v19.features[0].weight)
    args = vgg19.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "v19.pt"), "--no-pretrain"])
    assert not tkp.loads_pretrain_path(args)
    assert not torch.equal(vgg19.build_model(args).features[0].weight, v19.features[0].weight)

    args = resnet56.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "v19.pt")])
    with pytest.raises(tkp.TKPError, match="does not fit this model"):
        resnet56.build_model(args)
    # CIFAR-10 weights do not fit the default CIFAR-100 VGG-19 (the head differs)
    torch.save(vgg19.VGG19(10).state_dict(), tmp_path / "v19_c10.pt")
    args = vgg19.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "v19_c10.pt")])
    with pytest.raises(tkp.TKPError, match="wrong shape: classifier.1"):
        vgg19.build_model(args)


def test_resnet56_option_a_shortcut():
    """3 stages of 9 blocks; the two downsampling shortcuts subsample and zero-pad the channels
    like akamaster's lambda (so its checkpoints compute the same function), have no
    parameters, and — unlike a lambda — survive deepcopy and pickling."""
    model = resnet56.ResNet56(10)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [9, 9, 9]
    pads = [b.shortcut for b in model.modules() if isinstance(b, resnet56.BasicBlock)
            if isinstance(b.shortcut, resnet56.ZeroPadShortcut)]
    assert len(pads) == 2 and not any(list(p.parameters()) for p in pads)
    x = torch.randn(2, 16, 32, 32)
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 32 // 4, 32 // 4))  # planes // 4 each side
    assert torch.equal(pads[0](x), expected)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    model.eval()
    clone.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clone(x), model(x)) and model(x).shape == (2, 10)


def test_defaults_are_the_vgg8_row():
    for script, dataset in ((resnet56, "cifar10"), (vgg19, "cifar100")):
        a = script.get_args_parser().parse_args([])
        assert (a.dataset, a.batch_train, a.batch_val) == (dataset, 128, 256)
        assert (a.epochs_stage1, a.epochs_stage2) == (100, 100)
        assert (a.lr, a.weight_decay, a.beta, a.alpha, a.topk) == (1e-3, 1e-4, 3000.0, 3.0, 1)
        assert a.pretrain_path is None and not a.no_pretrain


def test_dry_run_cli_both_scripts(tmp_path):
    """Both scripts' --dry-run from the command line, side by side (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / f"{name}_optimized.py"), "--dry-run",
                                     "--output-dir", str(tmp_path / name)], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in MODELS}
    results = {name: p.communicate(timeout=300) + (p.returncode,) for name, p in procs.items()}
    elapsed = time.perf_counter() - started
    for name, (stdout, stderr, code) in results.items():
        assert code == 0, stderr
        assert "theoretical speed-up" in stdout
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["model"] == name and summary["sparsity"] == "top-1"
        assert summary["wall_time_s"] < 60  # the pipeline itself, without Python/torch start-up
    assert elapsed < 120
