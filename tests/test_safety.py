"""What protects a user's machine and runs: pretrained files never run code, one run per
output folder, a finished run is not overwritten, SIGTERM stops like Ctrl-C, a full disk and a
damaged final.pt are one line, and a run that diverged (but stayed finite) says so."""

import hashlib
import os
import types

import pytest
import timm
import torch
import torchvision.models as tvm

import clip_vit
import googlenet_optimized as googlenet
import tkp_common as tkp
import tkp_runtime
import vit_small


class Payload:
    """A pickle that creates `marker` when it is unpickled with code (weights_only=False)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.conv.weight": Payload(marker)}, path)
    return path


# ---- 2. pretrained weights never run code ------------------------------------------------


def hub_copy(tmp_path, monkeypatch, name="googlenet-1378be20.pth"):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    return tmp_path / "torch" / "hub" / "checkpoints" / name


def test_a_file_planted_in_the_hub_cache_runs_no_code(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    plant(hub_copy(tmp_path, monkeypatch), marker)
    with pytest.raises(tkp.TKPError) as err:
        googlenet.build_model(googlenet.get_args_parser().parse_args([]))
    assert not marker.exists(), "the cached file was unpickled with code"
    assert "\n" not in str(err.value) and "googlenet-1378be20.pth" in str(err.value)


def test_a_cached_file_whose_hash_differs_from_its_name_is_refused(tmp_path, monkeypatch):
    state = tvm.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    torch.save(state, hub_copy(tmp_path, monkeypatch))  # loadable weights, but not torchvision's file
    with pytest.raises(tkp.TKPError, match="SHA-256 does not start with 1378be20; delete it"):
        googlenet.build_model(googlenet.get_args_parser().parse_args([]))


def test_weights_are_downloaded_with_their_hash_then_read_without_code(tmp_path, monkeypatch):
    blob = tmp_path / "blob.pth"
    torch.save({"w": torch.ones(3)}, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    weights = types.SimpleNamespace(url=f"https://download.example/models/tiny-{digest}.pth")
    cache = hub_copy(tmp_path, monkeypatch, f"tiny-{digest}.pth")
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        os.replace(blob, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert torch.equal(tkp_runtime.download_weights(weights)["w"], torch.ones(3))
    assert calls == [(weights.url, digest)] and cache.is_file()
    assert torch.equal(tkp_runtime.download_weights(weights)["w"], torch.ones(3))  # cached: no download
    assert len(calls) == 1


def test_timm_loads_a_local_file_without_code(tmp_path, monkeypatch):
    """timm 1.0.x before weights_only=True became its default unpickled local files with code;
    the guard makes torch.load read tensors only, whatever timm asks for."""
    import timm.models._builder as builder
    monkeypatch.setattr(builder, "load_state_dict",
                        lambda path, *a, **k: torch.load(path, map_location="cpu", weights_only=False))
    marker = tmp_path / "ran"
    plant(tmp_path / "vit.pth", marker)
    args = vit_small.get_args_parser().parse_args(["--model", "vit_tiny_patch16_224", "--num-classes", "4",
                                                   "--img-size", "32", "--pretrained-path", str(tmp_path / "vit.pth")])
    with pytest.raises(tkp.TKPError, match="could not load pretrained weights"):
        vit_small.build_model(args)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the guard ends with the load


def test_open_clip_loads_a_local_file_without_code(tmp_path, monkeypatch):
    import open_clip.factory as factory
    monkeypatch.setattr(factory, "load_state_dict",
                        lambda path, *a, **k: torch.load(path, map_location="cpu", weights_only=False))
    marker = tmp_path / "ran"
    plant(tmp_path / "clip.pt", marker)
    args = clip_vit.get_args_parser().parse_args(["--model", "ViT-S-32", "--pretrained-path",
                                                  str(tmp_path / "clip.pt"), "--data-path", str(tmp_path)])
    with pytest.raises(tkp.TKPError, match="could not load pretrained weights"):
        clip_vit.create_clip(args, clip_vit.model_config(args))
    assert not marker.exists()
