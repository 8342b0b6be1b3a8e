"""vit_small.py end to end on a tiny ImageFolder tree of PNGs (a small timm ViT at 32 px,
--no-pretrained): outputs, exact N:M on the targeted Linears only, the flag checks, local
pretrained weights through timm, and the data-layout errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from conftest import ROOT
from PIL import Image

import tkp_common as tkp
import vit_small
from tkp_lib.sparsity import AuxRegularizer, compute_masks

MODEL = "vit_tiny_patch16_224"
FAST = ["--model", MODEL, "--img-size", "32", "--no-pretrained", "--num-classes", "4",
        "--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-size", "8", "--num-workers", "0",
        "--progress-every", "0"]


def write_image_folder(root, classes=4, train_per_class=6, val_per_class=2, flat_val=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split if (split == "val" and flat_val) else root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{c}_{i}.png")
    return root


@pytest.fixture
def imagenet_root(tmp_path):
    return write_image_folder(tmp_path / "imagenet")


def run_vit(data, out, *extra):
    return vit_small.main(["--data-path", str(data), "--output-dir", str(out), *FAST, *extra])


def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_end_to_end_2_4(imagenet_root, tmp_path):
    out = tmp_path / "run"
    summary = run_vit(imagenet_root, out)
    for f in ("args.json", "log.jsonl", "checkpoint_last.pt", "final.pt", "summary.json"):
        assert (out / f).is_file(), f
    final = torch.load(out / "final.pt", weights_only=True)
    model = timm.create_model(MODEL, num_classes=4, img_size=32)
    model.load_state_dict(final["model"], strict=True)

    targeted = {n for n in linear_names(model) if n.startswith("blocks.")}
    assert len(targeted) == 4 * 12  # qkv, proj, fc1, fc2 in each of the 12 blocks
    assert {k.removesuffix(".weight") for k in final["masks"]} == targeted
    for name in targeted:
        w = model.get_submodule(name).weight
        blocks = w.reshape(-1, 4)
        assert blocks.count_nonzero(dim=1).max() <= 2, name
        assert final["masks"][name + ".weight"].reshape(-1, 4).sum(1).eq(2).all()
    for untouched in ("head", "patch_embed.proj"):
        w = model.get_submodule(untouched).weight
        assert w.count_nonzero() > 0.99 * w.numel()

    saved = json.loads((out / "summary.json").read_text())
    assert saved["sparsity"] == "2:4" and saved["pruned_layer_density"] == pytest.approx(0.5)
    assert saved["final_top5"] is not None and saved["final_top5"] >= saved["final_top1"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("val_top5" in r for r in log) and log[0]["train_aux"] > 0
    # cosine floor is 0.01 * lr for the ViT
    assert summary["speedup_theoretical"] > 1.0


def test_target_layers_qkv_prunes_only_qkv(imagenet_root, tmp_path):
    run_vit(imagenet_root, tmp_path / "r", "--target-layers", "qkv", "--epochs-stage1", "0", "--epochs-stage2", "0")
    final = torch.load(tmp_path / "r" / "final.pt", weights_only=True)
    assert final["masks"] and all(k.endswith("attn.qkv.weight") for k in final["masks"])
    assert len(final["masks"]) == 12


@pytest.mark.parametrize("pattern", ["1:4", "4:8"])
def test_other_nm_patterns(pattern):
    args = vit_small.get_args_parser().parse_args([*FAST, "--sparsity-type", pattern])
    model = vit_small.build_model(args)
    plan = vit_small.build_plan(model, args)
    n, m = map(int, pattern.split(":"))
    masks = compute_masks(model, plan)
    assert plan.pattern == pattern and len(masks) == 48
    for mask in masks.values():
        assert mask.reshape(-1, m).sum(1).eq(n).all()
    assert plan.num_groups == sum(model.get_submodule(t.name.removesuffix(".weight")).weight.numel() // m
                                  for t in plan.targets)


def test_nm_regularizer_on_the_vit_matches_a_hand_computation():
    args = vit_small.get_args_parser().parse_args(FAST)
    model = vit_small.build_model(args)
    plan = vit_small.build_plan(model, args)
    total, groups = 0.0, 0
    for t in plan.targets:
        s = model.get_submodule(t.name.removesuffix(".weight")).weight.detach().double().reshape(-1, 4) ** 2
        s = s.sort(dim=1, descending=True).values
        total += (s[:, 2] + np.exp(-2.0) * s[:, 3]).sum().item()  # ranks 2, 3 with alpha = 2
        groups += s.shape[0]
    value = AuxRegularizer(model, plan, "exponential", 2.0).add_grad_(0.0).item()
    assert value == pytest.approx(total / groups, rel=1e-5)


def test_pretrained_path_is_loaded_through_timm(tmp_path):
    source = timm.create_model(MODEL, num_classes=4, img_size=32)
    with torch.no_grad():
        source.blocks[3].attn.qkv.weight.fill_(0.0625)
        source.patch_embed.proj.weight.fill_(-0.25)
    torch.save(source.state_dict(), tmp_path / "vit_tiny.pth")
    args = vit_small.get_args_parser().parse_args(
        [*FAST, "--pretrained", "--pretrained-path", str(tmp_path / "vit_tiny.pth")])
    model = vit_small.build_model(args)
    assert (model.blocks[3].attn.qkv.weight == 0.0625).all()
    assert (model.patch_embed.proj.weight == -0.25).all()


def test_offline_pretrained_download_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf  # read at call time; the environment only at import
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    args = vit_small.get_args_parser().parse_args(["--model", MODEL, "--num-classes", "4", "--img-size", "32"])
    with pytest.raises(tkp.TKPError) as err:
        vit_small.build_model(args)
    assert "\n" not in str(err.value)
    assert "--pretrained-path" in str(err.value) and "--no-pretrained" in str(err.value)


@pytest.mark.parametrize("value,expected", [("3:2", "1 <= N < M"), ("abc", "expected 'N:M'"),
                                            ("2:4:8", "expected 'N:M'")])
def test_bad_sparsity_type_is_one_line(value, expected):
    r = subprocess.run([sys.executable, str(ROOT / "vit_small.py"), "--sparsity-type", value],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr


def test_indivisible_width_is_refused():
    args = vit_small.get_args_parser().parse_args([*FAST, "--sparsity-type", "2:5"])
    with pytest.raises(tkp.TKPError, match="divisible by 5"):
        vit_small.build_plan(vit_small.build_model(args), args)


def test_flat_val_folder_is_rejected_with_a_hint(tmp_path):
    root = write_image_folder(tmp_path / "flat", flat_val=True)
    with pytest.raises(tkp.TKPError, match="holds no class folders.*valprep"):
        run_vit(root, tmp_path / "out")


def test_missing_data_path_and_class_count(tmp_path, imagenet_root):
    with pytest.raises(tkp.TKPError, match="must hold train/ and val/"):
        run_vit(tmp_path / "nowhere", tmp_path / "o1")
    with pytest.raises(tkp.TKPError, match="--num-classes 4"):
        vit_small.main(["--data-path", str(imagenet_root), "--output-dir", str(tmp_path / "o2"),
                        *FAST, "--num-classes", "10"])


def test_checkpoint_dir_alias_and_dense_baseline(imagenet_root, tmp_path):
    vit_small.main(["--data-path", str(imagenet_root), "--checkpoint-dir", str(tmp_path / "ck"), *FAST,
                    "--sparsity-type", "dense", "--epochs-stage2", "0"])
    summary = json.loads((tmp_path / "ck" / "summary.json").read_text())
    assert summary["sparsity"] == "dense" and summary["pruned_layers"] == 0


def test_unreadable_images_are_skipped_and_counted_in_the_log(imagenet_root, tmp_path, capsys):
    from conftest import write_bad_images
    bad = write_bad_images(imagenet_root / "train" / "n00000001", prefix="zz")
    out = tmp_path / "run"
    run_vit(imagenet_root, out, "--epochs-stage1", "2")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["skipped_images"] for e in log] == [len(bad)] * 3  # every epoch meets each bad file once
    err = capsys.readouterr().err
    for path in bad:
        assert err.count(str(path)) == 1  # named once per run, not once per epoch


def test_dry_run_defaults_to_a_small_image_unless_one_is_named(monkeypatch):
    seen = []
    monkeypatch.setattr(vit_small.tkp, "run", lambda args, script: seen.append(args.img_size))
    vit_small.main(["--dry-run"])
    vit_small.main(["--dry-run", "--img-size", "224"])
    vit_small.main([])  # a real run keeps the default
    assert seen == [vit_small.DRY_RUN_IMG_SIZE, 224, 224]


def test_pretrained_files_timm_reads_its_own_ways_are_accepted(tmp_path):
    """The fit check judges what timm loaded, not the file's layout: an EMA copy beside the
    weights (timm takes the EMA) and a 'module.' prefix load and pass; the empty
    --checkpoint-dir (the reference's name of --output-dir) is refused as --output-dir is."""
    source = timm.create_model(MODEL, num_classes=4, img_size=32)
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    torch.save({"state_dict": source.state_dict(), "state_dict_ema": ema}, tmp_path / "ema.pth")
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pth")
    for name, expected in (("ema.pth", ema), ("ddp.pth", source.state_dict())):
        flags = [*FAST, "--pretrained", "--pretrained-path", str(tmp_path / name)]
        args = vit_small.get_args_parser().parse_args(flags)
        model = vit_small.build_model(args)
        assert torch.equal(model.blocks[0].mlp.fc1.weight, expected["blocks.0.mlp.fc1.weight"]), name
    with pytest.raises(SystemExit) as e:
        vit_small.get_args_parser().parse_args([*FAST, "--checkpoint-dir", ""])
    assert e.value.code == 2


@pytest.mark.parametrize("content, why", [("other", "does not fit --model"), ("nan", "is not finite")])
def test_pretrained_path_that_does_not_fit_the_model_is_one_line(tmp_path, content, why):
    """timm loads a file of another model leniently where the class count differs (a warning,
    the weights left at random init): refused in one line instead of training from scratch;
    so is a file of the model's own names holding NaN."""
    source = timm.create_model(MODEL, num_classes=4, img_size=32)
    state = {"conv1.weight": torch.zeros(3)} if content == "other" else \
        {k: torch.full_like(v, float("nan")) for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    args = vit_small.get_args_parser().parse_args([*FAST, "--pretrained", "--pretrained-path", str(tmp_path / "w.pth")])
    with pytest.raises(tkp.TKPError, match=why) as err:
        vit_small.build_model(args)
    assert "\n" not in str(err.value)
