"""googlenet_optimized.py and densenet_optimized.py: end to end on tiny CIFAR-100-format data
(small --img-size, --no-pretrain), exact Top-K on 3x3 and 7x7 kernels, 1x1 untouched, local
pretrained weights really loaded, and the offline error path."""

import json
import re

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from conftest import write_cifar

import densenet_optimized as densenet
import googlenet_optimized as googlenet
import tkp_common as tkp

SCRIPTS = {"googlenet": googlenet, "densenet": densenet}
pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")
FAST = ["--img-size", "32", "--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-train", "20",
        "--batch-val", "20", "--num-workers", "0", "--bn-recal-batches", "2", "--progress-every", "0"]


@pytest.fixture
def cifar100_root(tmp_path):
    return write_cifar(tmp_path / "data", "cifar100", n_train=40, n_test=20)


@pytest.mark.parametrize("name", SCRIPTS)
def test_end_to_end_exact_topk_and_strict_final(name, cifar100_root, tmp_path):
    script, out = SCRIPTS[name], tmp_path / "run"
    summary = script.main(["--data-root", str(cifar100_root), "--output-dir", str(out), "--no-pretrain",
                           "--topk", "2", *FAST])
    for f in ("args.json", "log.jsonl", "checkpoint_last.pt", "final.pt", "summary.json"):
        assert (out / f).is_file(), f
    final = torch.load(out / "final.pt", weights_only=True)
    args = script.get_args_parser().parse_args(["--no-pretrain"])
    model = script.build_model(args)
    model.load_state_dict(final["model"], strict=True)

    stems, pruned, one_by_one = 0, 0, 0
    for mod_name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        kh, kw = conv.kernel_size
        taps = conv.weight.reshape(-1, kh * kw)
        if kh * kw > 2:
            assert taps.count_nonzero(dim=1).max() <= 2, mod_name
            assert f"{mod_name}.weight" in final["masks"]
            pruned += 1
            stems += kh == 7
        else:
            assert f"{mod_name}.weight" not in final["masks"]
            assert taps.count_nonzero() > 0.99 * taps.numel(), mod_name  # 1x1: never pruned
            one_by_one += 1
    assert stems == 1 and pruned > 10 and one_by_one > 10
    # counts leave out frozen training-only parameters (GoogLeNet's auxiliary heads)
    assert summary["params_total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["dataset"] == "cifar100" and saved["sparsity"] == "top-2"
    assert summary["speedup_theoretical"] > 1.2


def test_exclude_layers_keeps_the_stem_dense(cifar100_root, tmp_path):
    s = googlenet.main(["--data-root", str(cifar100_root), "--output-dir", str(tmp_path / "r"), "--no-pretrain",
                        "--exclude-layers", "conv1", *FAST, "--epochs-stage1", "0", "--epochs-stage2", "0"])
    final = torch.load(tmp_path / "r" / "final.pt", weights_only=True)
    assert "conv1.conv.weight" not in final["masks"]
    assert final["model"]["conv1.conv.weight"].count_nonzero() > 0.99 * final["model"]["conv1.conv.weight"].numel()
    assert s["pruned_layers"] == len(final["masks"]) > 0


def test_googlenet_heads_transform_input_and_local_weights(tmp_path):
    # a file shaped like torchvision's ImageNet weights, with values we can recognise
    imagenet = tvm.googlenet(weights=None, aux_logits=True, init_weights=False)
    with torch.no_grad():
        imagenet.conv1.conv.weight.fill_(0.25)
        imagenet.inception5b.branch1.conv.weight.fill_(-0.5)
    torch.save(imagenet.state_dict(), tmp_path / "googlenet-imagenet.pth")
    args = googlenet.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "googlenet-imagenet.pth")])
    model = googlenet.build_model(args)
    assert (model.conv1.conv.weight == 0.25).all() and (model.inception5b.branch1.conv.weight == -0.5).all()
    assert model.fc.out_features == model.aux1.fc2.out_features == model.aux2.fc2.out_features == 100
    assert model.transform_input and not model.aux_logits
    assert not any(p.requires_grad for p in model.aux1.parameters())
    model.train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 100)  # plain logits, aux heads out of the loss

    # a file that already has 100-class heads (e.g. our own dense run) loads whole
    torch.save({"model": model.state_dict()}, tmp_path / "googlenet-c100.pt")
    args = googlenet.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "googlenet-c100.pt")])
    again = googlenet.build_model(args)
    assert torch.equal(again.fc.weight, model.fc.weight)

    scratch = googlenet.build_model(googlenet.get_args_parser().parse_args(["--no-pretrain"]))
    assert not scratch.transform_input


def test_densenet_local_weights_with_torchvision_key_names(tmp_path):
    imagenet = tvm.densenet121(weights=None)
    with torch.no_grad():
        imagenet.features.conv0.weight.fill_(0.125)
        imagenet.features.denseblock1.denselayer1.norm1.weight.fill_(3.0)
    # torchvision's published file spells "norm1" as "norm.1" (and "conv2" as "conv.2") and,
    # being older than BatchNorm's num_batches_tracked, has no such entries
    state = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
             for k, v in imagenet.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    assert "features.denseblock4.denselayer16.conv.2.weight" in state
    torch.save(state, tmp_path / "densenet121-imagenet.pth")
    args = densenet.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "densenet121-imagenet.pth")])
    model = densenet.build_model(args)
    assert (model.features.conv0.weight == 0.125).all()
    assert (model.features.denseblock1.denselayer1.norm1.weight == 3.0).all()
    assert model.classifier.out_features == 100


@pytest.mark.parametrize("name", SCRIPTS)
def test_offline_download_failure_is_one_line(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nobody listens: fails at once, like offline
    monkeypatch.setenv("no_proxy", "")
    args = SCRIPTS[name].get_args_parser().parse_args([])
    with pytest.raises(tkp.TKPError) as err:
        SCRIPTS[name].build_model(args)
    message = str(err.value)
    assert "\n" not in message
    assert "--pretrain-path" in message and "--no-pretrain" in message and "empty-hub" in message


def test_wrong_local_weights_file_is_one_line(tmp_path):
    torch.save({"conv1.conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    args = googlenet.get_args_parser().parse_args(["--pretrain-path", str(tmp_path / "bad.pth")])
    with pytest.raises(tkp.TKPError, match="does not fit this model"):
        googlenet.build_model(args)
