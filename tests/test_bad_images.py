"""A bad file in the middle of an ImageNet epoch (issue 12, point 8): a truncated JPEG, a text
file and an empty file named as JPEGs are skipped: the data set serves the next readable
sample instead, names each file once on stderr and counts the substitutions
(tkp_data.skipped_images), on the main-process and the DataLoader-worker paths, through
vit_small's real transforms and tkp_data.make_loader. CMYK and PNG-in-JPEG files simply load."""

import re

import numpy as np
import pytest
import torch
from conftest import write_bad_images, write_images

import vit_small
from tkp_lib import data as tkp_data
from tkp_lib.runtime import Dist, TKPError

ARGS = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "2", "--no-pretrained"]
WARNING = re.compile(r"^warning: skipping unreadable image (\S+) \(")


def good_specs(c):
    """Four readable files per class, each of its own width (so a served sample names its file),
    among them a CMYK JPEG and PNG data behind a .JPEG name."""
    return [("RGB", (20 + 10 * c, 30), "JPEG", ".JPEG"), ("CMYK", (21 + 10 * c, 30), "JPEG", ".JPEG"),
            ("RGB", (22 + 10 * c, 30), "PNG", ".JPEG"), ("L", (23 + 10 * c, 30), "PNG", ".png")]


@pytest.fixture
def tree(tmp_path):
    """train/: two classes of four good files (a_*, c_*); in class 0, sorted between them,
    three bad ones (b_*). val/: one file per class."""
    root = tmp_path / "imagenet"
    for c in range(2):
        write_images(root / "train" / f"n{c:08d}", good_specs(c)[:2], prefix="a")
        write_images(root / "train" / f"n{c:08d}", good_specs(c)[2:], prefix="c")
        write_images(root / "val" / f"n{c:08d}", [("RGB", (30, 30), "PNG", ".png")])
    bad = write_bad_images(root / "train" / "n00000000", prefix="b")
    return root, bad


def served_widths(loader):
    """Widths of the files served in one pass (the transform is wrapped to return them too)."""
    widths = []
    for (x, width), _ in loader:
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and x.isfinite().all()
        widths += width.tolist()
    return sorted(widths)


class WithWidth:
    """The real transform, plus the width of the source image (picklable, for workers)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), img.size[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_named_once_and_counted(tree, workers, capfd):
    root, bad = tree
    train, _ = vit_small.build_data(vit_small.get_args_parser().parse_args([*ARGS, "--data-path", str(root)]))
    assert isinstance(train, tkp_data.SkippingImageFolder) and len(train) == 8 + 3
    train.transform = WithWidth(train.transform)  # vit_small's RandAugment recipe, at 32 px
    loader = tkp_data.make_loader(train, 4, train=True, num_workers=workers, device=torch.device("cpu"),
                                  dist=Dist(), seed=0)
    good = [20, 21, 22, 23, 30, 31, 32, 33]
    for epoch in range(2):  # workers are started afresh each epoch
        tkp_data.set_loader_epoch(loader, epoch)
        before = tkp_data.skipped_images(loader)
        widths = served_widths(loader)
        assert tkp_data.skipped_images(loader) - before == 3
        # every good file once, and the three bad ones (b_*, after a_* and before c_* in class 0)
        # each replaced by the next readable file: class 0's first c_* file, 22 px wide
        assert widths == sorted(good + [22, 22, 22])
    assert tkp_data.skipped_images(loader) == tkp_data.skipped_images(train) == 6
    warned = [WARNING.match(line) for line in capfd.readouterr().err.splitlines()]
    assert sorted(m.group(1) for m in warned if m) == sorted(str(p) for p in bad)  # each once, over 2 epochs


def test_all_unreadable_is_one_error_naming_the_folder(tmp_path):
    write_bad_images(tmp_path / "train" / "n0")
    data = tkp_data.image_folder(tmp_path, "train", None)
    with pytest.raises(TKPError, match=re.escape(str(tmp_path / "train")) + ": none of its 3 images"):
        data[1]


def test_transform_errors_still_raise(tree):
    root, _ = tree

    def broken(img):
        raise ValueError("a bug in the transform")
    data = tkp_data.image_folder(root, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        data[0]
    assert tkp_data.skipped_images(data) == 0


def test_skipped_images_of_other_data_is_zero(tree):
    arrays = tkp_data.ImageArrayDataset(np.zeros((2, 8, 8, 3), np.uint8), [0, 1])
    assert tkp_data.skipped_images(arrays) == 0
    loader = tkp_data.make_loader(arrays, 2, train=False, num_workers=0, device=torch.device("cpu"), dist=Dist())
    assert tkp_data.skipped_images(loader) == 0
    # a validation shard (Subset) of an image folder reads the folder's count
    root, _ = tree
    folder = tkp_data.image_folder(root, "train", WithWidth(lambda img: torch.zeros(3, 4, 4)))
    shard = tkp_data.make_loader(folder, 2, train=False, num_workers=0, device=torch.device("cpu"),
                                 dist=Dist(rank=0, world=2), seed=0)
    list(shard)
    assert tkp_data.skipped_images(shard) == 2  # indices 0, 2, 4, ...: two of the b_* files
