"""Shared test helpers: tiny data sets written in the real on-disk formats."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def class_images(n: int, num_classes: int, size: int = 32, learnable: bool = False, seed: int = 0,
                 noise: float = 20.0):
    """uint8 images (n, size, size, 3) and labels. With `learnable`, each class is a smooth
    random template plus noise, so a small network can tell the classes apart."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    if not learnable:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels
    coarse = np.random.default_rng(1234).uniform(0, 255, (num_classes, 4, 4, 3))
    templates = coarse.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    images = templates[labels] + rng.normal(0, noise, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 60, n_test: int = 20,
                learnable: bool = False, seed: int = 0, noise: float = 20.0) -> Path:
    """Write a small CIFAR-10/100 in torchvision's python-version layout (pickled batches)."""
    classes = 10 if name == "cifar10" else 100
    x_train, y_train = class_images(n_train, classes, learnable=learnable, seed=seed, noise=noise)
    x_test, y_test = class_images(n_test, classes, learnable=learnable, seed=seed + 1, noise=noise)
    folder = Path(root) / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def dump(fname, x, y):
        entry = {"batch_label": fname, "data": x.transpose(0, 3, 1, 2).reshape(len(x), -1),
                 label_key: [int(v) for v in y], "filenames": [f"{i}.png" for i in range(len(x))]}
        if name == "cifar100":
            entry["coarse_labels"] = [int(v) // 5 for v in y]
        with open(folder / fname, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)

    if name == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
            dump(f"data_batch_{i + 1}", x_train[part], y_train[part])
        dump("test_batch", x_test, y_test)
        meta = {"label_names": [f"class{i}" for i in range(10)]}
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump(meta, fh, protocol=2)
    else:
        dump("train", x_train, y_train)
        dump("test", x_test, y_test)
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh, protocol=2)
    return Path(root)


@pytest.fixture
def cifar10_root(tmp_path):
    return write_cifar(tmp_path / "data", "cifar10", n_train=60, n_test=20)


@pytest.fixture
def cifar100_root(tmp_path):
    return write_cifar(tmp_path / "data", "cifar100", n_train=120, n_test=40)


@pytest.fixture
def plain_cpu_kernels():
    """oneDNN sets up CPU kernels for every new layer shape (20 s for DenseNet-121's first
    step): for a few steps of a network with many shapes the plain kernels are faster."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before


# ---- image files in the formats real ImageFolder trees hold -----------------------------

# (mode, (width, height), format, extension): what ImageNet-like trees hold, including its
# CMYK JPEGs and PNG data behind a .JPEG name; 1-pixel and extreme aspect ratios
REAL_FORMAT_IMAGES = [
    ("RGB", (48, 40), "JPEG", ".JPEG"), ("L", (33, 57), "JPEG", ".jpg"), ("CMYK", (64, 48), "JPEG", ".JPEG"),
    ("RGB", (1, 1), "JPEG", ".jpg"), ("RGB", (1, 1), "PNG", ".png"), ("L", (1, 1), "PNG", ".png"),
    ("RGBA", (40, 30), "PNG", ".png"), ("P", (50, 20), "PNG", ".png"), ("LA", (24, 36), "PNG", ".png"),
    ("1", (17, 9), "PNG", ".png"), ("RGB", (300, 2), "PNG", ".png"), ("RGB", (3, 200), "JPEG", ".jpeg"),
    ("RGB", (45, 52), "PNG", ".JPEG"), ("RGB", (96, 64), "JPEG", ".JPEG"),
]
LARGE_IMAGES = [("RGB", (4000, 3000), "JPEG", ".JPEG"), ("L", (2600, 1800), "PNG", ".png")]


def make_image(mode: str, size, seed: int = 0):
    """A PIL image of `mode` and (width, height) `size`: noise when small, a smooth pattern
    when large (compresses fast)."""
    from PIL import Image
    w, h = size
    if w * h > 1_000_000:
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 7 % 256)], -1).astype(np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode[:-1])
        img.putalpha(Image.fromarray(pixels[..., 0]))
        return img
    return rgb.convert(mode)


def write_images(folder: Path, specs, prefix: str = "img", seed: int = 0) -> list:
    """Write one file per (mode, size, format, extension) spec into `folder`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (mode, size, fmt, ext) in enumerate(specs):
        path = folder / f"{prefix}_{k:02d}_{mode}_{size[0]}x{size[1]}{ext}"
        make_image(mode, size, seed + k).save(path, format=fmt)
        paths.append(path)
    return paths


def write_bad_images(folder: Path, prefix: str = "img") -> list:
    """A truncated JPEG, a text file and a zero-byte file, all named as JPEGs; returns the paths."""
    import io
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    make_image("RGB", (64, 48), seed=99).save(buf, format="JPEG")
    bad = {"truncated": buf.getvalue()[: len(buf.getvalue()) // 2],
           "not_an_image": b"<html><body>404 Not Found</body></html>\n", "empty": b""}
    paths = []
    for name, data in bad.items():
        path = folder / f"{prefix}_{name}.JPEG"
        path.write_bytes(data)
        paths.append(path)
    return paths
