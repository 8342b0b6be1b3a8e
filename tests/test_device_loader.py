"""The device-resident image loader: it reads the augmentation parameters from the
torchvision pipeline and reproduces its ranges and statistics, batched; it covers every
image once per epoch, shards across ranks, and trains end to end (here on the CPU)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T

import vgg8_optimized as vgg8
from tkp_lib.data import DeviceImageLoader, ImageArrayDataset, upscaled_cifar_transforms
from tkp_lib.runtime import Dist

CPU = torch.device("cpu")


def images(n=256, seed=0, smooth=False):
    rng = np.random.default_rng(seed)
    if smooth:  # natural-image-like: coarse structure, little pixel noise
        coarse = rng.uniform(0, 255, (n, 4, 4, 3))
        x = coarse.repeat(8, 1).repeat(8, 2) + rng.normal(0, 8, (n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def both_paths(transform, x, repeats=4):
    """All images through the device loader and through torchvision (PIL), `repeats` times."""
    data = ImageArrayDataset(np.concatenate([x] * repeats), np.zeros(len(x) * repeats, dtype=np.int64), transform)
    loader = DeviceImageLoader(data, 256, train=True, device=CPU, seed=1)
    torch.manual_seed(1)
    device = torch.cat([b for b, _ in loader])
    reference = torch.stack([data[i][0] for i in range(len(data))])
    return device, reference


@pytest.mark.parametrize("name,ops", [
    ("crop", [T.RandomCrop(32, padding=4)]),
    ("flip", [T.RandomHorizontalFlip()]),
    ("brightness", [T.ColorJitter(brightness=0.2)]),
    ("contrast", [T.ColorJitter(contrast=0.2)]),
    ("saturation", [T.ColorJitter(saturation=0.2)]),
    ("hue", [T.ColorJitter(hue=0.1)]),
    ("vgg8 recipe", [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2)]),
    ("224 recipe", [T.RandomResizedCrop(64, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                    T.ColorJitter(0.2, 0.2, 0.2, 0.1)]),
])
def test_statistics_match_torchvision(name, ops):
    x = images(smooth=True)
    device, reference = both_paths(T.Compose(ops + [T.ToTensor()]), x)
    assert device.shape == reference.shape
    # per-channel mean and spread, and the spread of per-image means (what the random
    # factors move), within a few standard errors / quantisation steps
    assert torch.allclose(device.mean((0, 2, 3)), reference.mean((0, 2, 3)), atol=0.01), name
    assert torch.allclose(device.std((0, 2, 3)), reference.std((0, 2, 3)), rtol=0.04), name
    assert device.mean((1, 2, 3)).std().item() == pytest.approx(reference.mean((1, 2, 3)).std().item(), rel=0.1)


def test_random_crop_offsets_cover_the_padding_range():
    x = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    x[0, 0, 0] = 255  # one bright pixel: where it lands gives the crop offset
    data = ImageArrayDataset(np.repeat(x, 4000, 0), np.zeros(4000, dtype=np.int64),
                                 T.Compose([T.RandomCrop(32, padding=4), T.ToTensor()]))
    batch = torch.cat([b for b, _ in DeviceImageLoader(data, 1000, train=True, device=CPU)])
    where = batch[:, 0].flatten(1).argmax(1)
    rows, cols = where // 32, where % 32
    seen = batch[:, 0].flatten(1).max(1).values == 1
    # the pixel at (0, 0) moves to (4 - top, 4 - left) for offsets 0..8; visible when offset <= 4
    assert set(rows[seen].tolist()) == set(range(5)) and set(cols[seen].tolist()) == set(range(5))
    assert seen.float().mean().item() == pytest.approx((5 / 9) ** 2, abs=0.03)


def test_jitter_factors_stay_in_their_ranges():
    gray = np.full((2000, 32, 32, 3), 128, dtype=np.uint8)
    data = ImageArrayDataset(gray, np.zeros(2000, dtype=np.int64),
                                 T.Compose([T.ColorJitter(brightness=0.2), T.ToTensor()]))
    out = torch.cat([b for b, _ in DeviceImageLoader(data, 500, train=True, device=CPU)])
    factor = out[:, 0, 0, 0] / (128 / 255)
    assert factor.min() >= 0.8 - 1e-5 and factor.max() <= 1.2 + 1e-5
    assert factor.min() < 0.82 and factor.max() > 1.18  # the whole range is used
    assert factor.mean().item() == pytest.approx(1.0, abs=0.01)


def test_validation_pipelines_match_torchvision():
    x = images(64, smooth=True)
    for tf in (T.Compose([T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))]),
               upscaled_cifar_transforms(64)[1]):
        data = ImageArrayDataset(x, np.zeros(64, dtype=np.int64), tf)
        device = next(iter(DeviceImageLoader(data, 64, train=False, device=CPU)))[0]
        reference = torch.stack([data[i][0] for i in range(64)])
        assert (device - reference).abs().mean() < 0.02 and (device - reference).abs().max() < 0.1


def test_epoch_covers_every_image_once_and_shards_evenly():
    x = images(50)
    labels = np.arange(50)
    data = ImageArrayDataset(x, labels, T.ToTensor())
    loader = DeviceImageLoader(data, 8, train=True, device=CPU, seed=3)
    loader.set_epoch(7)
    first = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == list(range(50)) and len(loader) == 7
    loader.set_epoch(7)
    assert torch.equal(first, torch.cat([y for _, y in loader]))  # the epoch seed fixes the order
    ranks = [DeviceImageLoader(data, 8, train=True, device=CPU, dist=Dist(r, 3, r)) for r in range(3)]
    for r in ranks:
        r.set_epoch(7)
    shards = [torch.cat([y for _, y in r]) for r in ranks]
    assert {len(s) for s in shards} == {17} and len({len(r) for r in ranks}) == 1  # padded like DistributedSampler
    assert set(torch.cat(shards).tolist()) == set(range(50))
    tiny = ImageArrayDataset(x[:4], labels[:4], T.ToTensor())  # more ranks than images
    many = [list(DeviceImageLoader(tiny, 8, train=True, device=CPU, dist=Dist(r, 16, r))) for r in range(16)]
    assert all(len(batches) == 1 and len(batches[0][1]) == 1 for batches in many)
    val = [torch.cat([y for _, y in DeviceImageLoader(data, 8, train=False, device=CPU, dist=Dist(r, 3, r))])
           for r in range(3)]
    assert sorted(torch.cat(val).tolist()) == list(range(50))  # validation: every image exactly once


def test_batches_are_drawn_from_device_values_alone(monkeypatch):
    """No tensor is made from host values while batches are drawn (on a GPU each such copy
    waits for all queued work, so the host could never run ahead): the recipe with every step
    (crop, flip, the four jitters with hue, Normalize) runs with torch.tensor refused and
    torch.as_tensor refused for anything but a tensor already on the device, and its images
    are those drawn without the refusal."""
    train = upscaled_cifar_transforms(32)[0]
    data = ImageArrayDataset(images(64, smooth=True), np.zeros(64, dtype=np.int64), train)

    def draw():
        loader = DeviceImageLoader(data, 16, train=True, device=CPU, seed=2)
        loader.set_epoch(5)
        return loader, iter(loader)

    expected = torch.cat([b for b, _ in draw()[1]])
    loader, batches = draw()  # built (its Normalize tensors made) before the refusal
    as_tensor = torch.as_tensor

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor made from host values per batch")

    def device_tensors_only(v, *args, **kwargs):
        if not isinstance(v, torch.Tensor):
            refuse()
        return as_tensor(v, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", device_tensors_only)
    got = torch.cat([b for b, _ in batches])
    monkeypatch.undo()
    assert torch.equal(got, expected) and len(got) == 64


def test_color_jitter_applies_each_images_ops_in_its_own_order():
    """The batched ColorJitter against the same draws applied one image at a time, op by op in
    that image's own order (hue at whichever of the four slots the image drew it)."""
    from tkp_lib import data
    x = torch.from_numpy(images(64, smooth=True)).permute(0, 3, 1, 2).float() / 255
    ranges = ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.2, 0.2))
    got = data._color_jitter(x.clone(), ranges, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the draws in the order _color_jitter makes them
    factors = [data._uniform(64, lo, hi, gen, CPU) for lo, hi in ranges]
    order = torch.rand(64, 4, generator=gen).argsort(1)
    assert len({tuple(o) for o in order.tolist()}) > 10  # many orders, hue at every slot
    for i in range(64):
        y = x[i:i + 1]
        for op in order[i].tolist():
            f = factors[op][i:i + 1]
            if op == 3:
                y = data._shift_hue(y, f)
            else:
                toward = 0 if op == 0 else data._gray(y).mean() if op == 1 else data._gray(y)
                y = y * f.view(-1, 1, 1, 1) + toward * (1 - f.view(-1, 1, 1, 1))
            y = y.clamp(0, 1)
        assert torch.allclose(got[i:i + 1], y, atol=1e-6), i


def test_unsupported_transform_is_refused():
    data = ImageArrayDataset(images(4), np.zeros(4, dtype=np.int64), T.Compose([T.RandomRotation(10), T.ToTensor()]))
    with pytest.raises(ValueError, match="RandomRotation"):
        DeviceImageLoader(data, 2, train=True, device=CPU)


def test_vgg8_trains_with_the_device_loader(cifar10_root, tmp_path):
    s = vgg8.main(["--data-root", str(cifar10_root), "--output-dir", str(tmp_path / "r"), "--data-loader", "device",
                   "--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-train", "16", "--batch-val", "16",
                   "--bn-recal-batches", "2", "--progress-every", "0"])
    assert s["final_top1"] is not None and s["val_images"] == 20
