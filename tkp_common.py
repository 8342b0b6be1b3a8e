"""TKP shared engine: everything the per-model scripts have in common.

Top-K Pruning (TKP) keeps the K largest-magnitude taps of every convolution kernel (or
the N largest of every block of M consecutive weights of a Linear) and trains in two
stages: an auxiliary regularizer that pushes each kernel's energy into K taps, then a hard
mask and masked fine-tuning. The contract is SPEC.md; README.md is the user's manual.

Sections (search for "# ===="):
  1. Errors and command line
  2. Run setup: device, precision, seeds, processes
  3. Data
  4. Sparsity: targets, Top-K and N:M masks, mask enforcement
  5. Auxiliary regularizer
  6. Training and evaluation
  7. Checkpoints
  8. Reports: parameter and MAC counts, summary
  9. The two-stage driver

Nothing here reads global state or has side effects at import.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import pickle
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

CHECKPOINT_FORMAT = "tkp-checkpoint-1"


# ==== 1. Errors and command line =========================================================


class TKPError(Exception):
    """A problem the user can fix. Printed as one line; the process exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cli(main: Callable[[], object]) -> None:
    """Run a script's main(): user errors become one line on stderr and exit status 2."""
    try:
        main()
    except TKPError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory; use a smaller --batch-train/--batch-size (with "
              "--grad-accum to keep the effective batch) and --resume if an epoch was saved", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)  # run() has said where the last finished epoch is


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def nonneg_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def comma_list(text: str) -> list[str]:
    """argparse type: 'a,b,c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows defaults, except None and False (no value to show)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def base_parser(description: str) -> ArgumentParser:
    """The flags every script shares. Each script adds its model, data, batch and sparsity
    flags and sets its own defaults (the paper's table row) with set_defaults()."""
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("regularizer (stage 1)")
    g.add_argument("--reg-type", choices=["none", "l2", "exponential"], default="exponential",
                   help="auxiliary loss on the entries outside each group's top K")
    g.add_argument("--beta", type=nonneg_float, help="weight of the auxiliary loss")
    g.add_argument("--alpha", type=nonneg_float, help="decay rate of the exponential regularizer")
    g.add_argument("--aux-loss-freq", type=int_range(1), default=1,
                   help="compute the auxiliary loss on every N-th optimizer step only")

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs-stage1", type=int_range(0), help="epochs of regularized training")
    g.add_argument("--epochs-stage2", type=int_range(0), help="epochs of masked fine-tuning")
    g.add_argument("--lr", type=nonneg_float, help="peak learning rate (AdamW) of each stage")
    g.add_argument("--weight-decay", type=nonneg_float, help="AdamW weight decay")
    g.add_argument("--label-smooth", type=fraction, default=0.0,
                   help="label smoothing of the cross-entropy")
    g.add_argument("--grad-accum", type=int_range(1), default=1,
                   help="micro-batches per optimizer step (a shorter last group still steps)")
    g.add_argument("--clip-grad", type=positive_float, default=None,
                   help="clip the gradient norm to this value (default: no clipping)")
    g.add_argument("--bn-recal-batches", type=int_range(0), default=100,
                   help="training batches used to re-estimate BatchNorm statistics after masking")
    g.add_argument("--val-freq", type=int_range(1), default=1,
                   help="validate every N epochs (and always on each stage's last epoch)")

    g = p.add_argument_group("quantization-aware training (stage 3)")
    g.add_argument("--qat", action="store_true",
                   help="after stage 2, fine-tune with int8 fake quantization of every Conv2d and Linear "
                        "(weights per-channel symmetric, inputs per-tensor), masks kept; writes final_qat.pt")
    g.add_argument("--qat-epochs", type=int_range(1), default=3, help="epochs of quantization-aware training")
    g.add_argument("--qat-lr", type=positive_float, default=None, help="peak lr of QAT (default: 0.1 * --lr)")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    g.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16"], default="auto",
                   help="autocast precision; auto = bf16 on GPUs that support it, else fp16; "
                        "off on CPU unless given explicitly")
    g.add_argument("--no-amp", action="store_true", help="train in fp32")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model (default: on with CUDA, off on CPU)")
    g.add_argument("--no-compile", dest="compile", action="store_false", default=None, help="do not compile")
    g.add_argument("--seed", type=int_range(0, 2**31 - 1), default=0, help="seed of every random draw")
    g.add_argument("--num-workers", type=int_range(0), default=4, help="DataLoader worker processes")
    g.add_argument("--data-loader", choices=["auto", "device", "torch"], default="auto",
                   help="device: the whole data set on the GPU, augmented there in batches (CIFAR); "
                        "torch: a DataLoader with workers; auto: device on CUDA where possible")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="channels_last memory format (default: on with CUDA for the CNNs)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="keep the default memory format")
    g.add_argument("--progress-every", type=nonneg_float, default=30.0,
                   help="seconds between in-epoch progress lines (0: epoch lines only)")

    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default=None,
                   help="where args.json, log.jsonl, checkpoints and summary.json go "
                        "(default: runs/<script>-<time>, or the folder of --resume)")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue the run saved in CKPT (a checkpoint_last.pt)")
    g.add_argument("--eval", default=None, metavar="CKPT",
                   help="evaluate a final.pt on the validation set and print its summary")
    g.add_argument("--dry-run", action="store_true",
                   help="the whole two-stage pipeline on a few generated images, to check an install")
    return p


def add_topk_args(p: ArgumentParser) -> None:
    """Flags of the CNN scripts: the Top-K mask and the batch sizes."""
    g = p.add_argument_group("Top-K sparsity")
    g.add_argument("--topk", type=int_range(1, 9), default=1,
                   help="taps kept per kernel (kernels with at most this many taps stay dense)")
    g.add_argument("--exclude-layers", type=comma_list, default=[],
                   help="comma-separated Conv2d names or prefixes kept dense, e.g. conv1")
    g.add_argument("--dense-baseline", action="store_true",
                   help="same pipeline with no mask and no regularizer (the paper's baseline)")
    g = p.add_argument_group("batches")
    g.add_argument("--batch-train", type=int_range(1), help="training batch per process (per micro-step)")
    g.add_argument("--batch-val", type=int_range(1), help="validation batch per process")


# ==== 2. Run setup: device, precision, seeds, processes ==================================


@dataclass
class Dist:
    """Where this process stands in a torchrun job (world 1 when run plainly)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; start NCCL (CUDA) or gloo (CPU). Returns (dist, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise TKPError(f"--device {device_arg!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise TKPError(f"--device {device_arg}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TKPError("--device cuda was asked for but torch sees no GPU; use --device cpu")
        if dist.enabled or device.index is None:
            device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise TKPError(f"there is no {device}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    if dist.enabled and not torch_dist.is_initialized():
        if device.type == "cuda":
            torch_dist.init_process_group("nccl", device_id=device)
        else:
            torch_dist.init_process_group("gloo")
    return dist, device


@contextlib.contextmanager
def main_process_first(dist: Dist):
    """Rank 0 runs the block first (e.g. downloads a data set), then the others."""
    if dist.enabled and not dist.is_main:
        torch_dist.barrier()
    yield
    if dist.enabled and dist.is_main:
        torch_dist.barrier()


def resolve_amp(args, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. CPU autocast runs only when asked for."""
    if args.no_amp:
        return None
    if device.type == "cpu":
        return {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype]
    if args.amp_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype]


def amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def derive_seed(seed: int, *parts: int) -> int:
    """A seed for one phase of the run (e.g. stage 2, epoch 7), independent of the others."""
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**31 - 1)
    return value


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


# ==== 3. Data ============================================================================


class ImageArrayDataset(Dataset):
    """Images held as one uint8 array (N, H, W, 3), served as PIL images through `transform`."""

    def __init__(self, images: np.ndarray, labels, transform=None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def fake_images(n: int, size: int, num_classes: int, transform, seed: int = 0) -> ImageArrayDataset:
    """Random images of the right shape, for --dry-run."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return ImageArrayDataset(images, rng.integers(0, num_classes, size=n), transform)


def fake_splits(args, size: int, num_classes: int, train_transform, val_transform):
    """--dry-run data: one training and one validation batch of random images, through the
    script's real transforms."""
    return (fake_images(args.batch_train, size, num_classes, train_transform, seed=1),
            fake_images(args.batch_val, size, num_classes, val_transform, seed=2))


def _cifar_class(name: str):
    import torchvision.datasets as tvd
    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]


def load_cifar(root: str, name: str, download: bool = True):
    """CIFAR-10/100 as uint8 arrays: (train_x, train_y, test_x, test_y), x of shape (N, 32, 32, 3).

    Reads the python-version pickled batches that torchvision downloads (file names, URL and
    archive checksum come from torchvision's dataset classes). We read the batches ourselves
    instead of through torchvision.datasets.CIFAR10 because that class insists on the exact
    checksums of the official files, and our tests write small files in the same format."""
    cls = _cifar_class(name)
    folder = Path(root) / cls.base_folder
    train_files = [f for f, _ in cls.train_list]
    test_files = [f for f, _ in cls.test_list]
    if not all((folder / f).is_file() for f in train_files + test_files):
        layout = f"{folder}/{{{','.join(train_files + test_files)}}}"
        if not download:
            raise TKPError(f"{name} not found: expected {layout}")
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        except Exception as e:  # URLError, OSError, checksum RuntimeError: all mean "no data"
            raise TKPError(f"{name} is not in {root} and could not be downloaded "
                           f"({type(e).__name__}: {str(e)[:120]}); offline, fetch {cls.url} elsewhere "
                           f"and unpack it so that {layout} exist") from None

    def read(files):
        xs, ys = [], []
        for f in files:
            try:
                with open(folder / f, "rb") as fh:
                    entry = pickle.load(fh, encoding="latin1")
                entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
                x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = entry["labels"] if "labels" in entry else entry["fine_labels"]
            except Exception as e:
                raise TKPError(f"{folder / f} is not a readable {name} batch ({type(e).__name__}: "
                               f"{str(e)[:80]}); delete {folder} to download it again") from None
            if len(y) != len(x):
                raise TKPError(f"{folder / f} holds {len(x)} images but {len(y)} labels; "
                               f"delete {folder} to download it again")
            xs.append(x.transpose(0, 2, 3, 1))
            ys.append(np.asarray(y, dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    return train_x, train_y, test_x, test_y


CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def cifar_splits(args, train_transform, val_transform):
    """(train, test) of --dataset from --data-root (downloaded when missing), or generated
    32x32 images under --dry-run, each through the given transforms."""
    classes = CIFAR_CLASSES[args.dataset]
    if args.dry_run:
        return fake_splits(args, 32, classes, train_transform, val_transform)
    x_train, y_train, x_test, y_test = load_cifar(args.data_root, args.dataset)
    return ImageArrayDataset(x_train, y_train, train_transform), ImageArrayDataset(x_test, y_test, val_transform)


CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def cifar32_transforms(dataset: str):
    """The from-scratch CIFAR recipe (SPEC §5, VGG-8): RandomCrop(32, padding 4), flip,
    ColorJitter(brightness 0.2, contrast 0.2), the data set's mean/std; validation normalises."""
    import torchvision.transforms as T
    norm = T.Normalize(CIFAR_MEAN[dataset], CIFAR_STD[dataset])
    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                       T.ColorJitter(brightness=0.2, contrast=0.2), T.ToTensor(), norm])
    return train, T.Compose([T.ToTensor(), norm])


def upscaled_cifar_transforms(img_size: int):
    """The pretrained-CNN recipe for CIFAR (SPEC §5): RandomResizedCrop(scale 0.2-1), flip,
    ColorJitter(0.2, 0.2, 0.2, 0.1), ImageNet mean/std; validation resizes to 256/224 of the
    crop size and center-crops."""
    import torchvision.transforms as T
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                       T.ColorJitter(0.2, 0.2, 0.2, 0.1), T.ToTensor(), norm])
    val = T.Compose([T.Resize(round(img_size * 256 / 224)), T.CenterCrop(img_size), T.ToTensor(), norm])
    return train, val


class DeviceImageLoader:
    """A whole image-array data set held as uint8 on the device, served in batches drawn by a
    device-side permutation and augmented there, batched, by the same transforms as the
    dataset's torchvision pipeline (read from it, so the parameter ranges cannot drift):
    RandomCrop with zero padding, RandomResizedCrop (bilinear, via roi_align), Resize +
    CenterCrop, horizontal flip, ColorJitter (per-image factors and per-image random order,
    as torchvision draws them), ToTensor and Normalize. No worker processes, no host copies.

    Training batches follow a permutation shared by all ranks (`set_epoch`), padded so that
    every rank gets the same number of batches; validation shards are disjoint."""

    def __init__(self, dataset: ImageArrayDataset, batch_size: int, *, train: bool, device: torch.device,
                 dist: Dist = Dist(), seed: int = 0):
        self.steps = _device_steps(dataset.transform)  # raises ValueError for unsupported transforms
        self.images = torch.from_numpy(dataset.images).to(device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(dataset.labels).to(device)
        self.batch_size, self.train, self.device, self.dist = batch_size, train, device, dist
        self.order_gen = torch.Generator(device=device).manual_seed(seed)
        self.draw_gen = torch.Generator(device=device).manual_seed(seed)
        self.dataset = dataset

    def set_epoch(self, seed: int, rank_seed: int | None = None) -> None:
        self.order_gen.manual_seed(seed)
        self.draw_gen.manual_seed(seed if rank_seed is None else rank_seed)

    def _indices(self) -> torch.Tensor:
        n, world, rank = len(self.labels), self.dist.world, self.dist.rank
        if not self.train:
            return torch.arange(rank, n, world, device=self.device)
        order = torch.randperm(n, generator=self.order_gen, device=self.device)
        if world > 1:  # pad by repeating the permutation, as DistributedSampler does
            padded = math.ceil(n / world) * world
            order = order.repeat(math.ceil(padded / n))[:padded][rank::world]
        return order

    def __len__(self) -> int:
        n, world = len(self.labels), self.dist.world
        per_rank = math.ceil(n / world) if self.train else len(range(self.dist.rank, n, world))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        for idx in self._indices().split(self.batch_size):
            yield augment_batch(self.images[idx], self.steps, self.draw_gen), self.labels[idx]


def _device_steps(transform) -> list[tuple]:
    """torchvision transforms -> (name, parameters) steps for augment_batch."""
    import torchvision.transforms as T
    steps = []
    for t in getattr(transform, "transforms", [transform]):
        bilinear = getattr(t, "interpolation", T.InterpolationMode.BILINEAR) == T.InterpolationMode.BILINEAR
        if not bilinear:
            raise ValueError(f"{type(t).__name__}: only bilinear interpolation")
        if isinstance(t, T.RandomCrop):
            pads = [t.padding] if isinstance(t.padding, int) or t.padding is None else list(t.padding)
            if t.padding_mode != "constant" or t.pad_if_needed or len(set(pads)) != 1:
                raise ValueError("RandomCrop: only the same constant padding on every side")
            if not isinstance(t.fill, (int, float)):
                raise ValueError("RandomCrop: only a single fill value")
            steps.append(("random_crop", t.size, pads[0] or 0, t.fill))
        elif isinstance(t, T.RandomResizedCrop):
            steps.append(("random_resized_crop", t.size, t.scale, t.ratio))
        elif isinstance(t, T.Resize):
            if not isinstance(t.size, int) and len(t.size) != 1:
                raise ValueError("Resize: only a single size (the shorter side) of square images")
            steps.append(("resize", t.size if isinstance(t.size, int) else t.size[0]))
        elif isinstance(t, T.CenterCrop):
            steps.append(("center_crop", t.size))
        elif isinstance(t, T.RandomHorizontalFlip):
            steps.append(("flip", t.p))
        elif isinstance(t, T.ColorJitter):
            steps.append(("color_jitter", t.brightness, t.contrast, t.saturation, t.hue))
        elif isinstance(t, T.ToTensor):
            steps.append(("to_float",))
        elif isinstance(t, T.Normalize):
            steps.append(("normalize", tuple(t.mean), tuple(t.std)))
        else:
            raise ValueError(f"{type(t).__name__} has no batched device version")
    if ("to_float",) not in steps:
        raise ValueError("the pipeline has no ToTensor")
    return steps


def _uniform(n: int, lo: float, hi: float, gen, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.functional import rgb_to_grayscale  # batched on tensors
    return rgb_to_grayscale(x)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV, hue += shift (per image, in turns), -> RGB."""
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    h = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: maxc - maxc * sat * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], dim=1)


def _crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crop-and-resize of one box (x1, y1, x2, y2, in pixels) per image."""
    from torchvision.ops import roi_align
    index = torch.arange(len(x), device=x.device, dtype=x.dtype)[:, None]
    return roi_align(x, torch.cat([index, boxes], 1), output_size=size, spatial_scale=1.0,
                     sampling_ratio=1, aligned=True)


def augment_batch(images: torch.Tensor, steps: list[tuple], gen: torch.Generator) -> torch.Tensor:
    """Apply `_device_steps` to a uint8 batch (B, 3, H, W); returns float32 (B, 3, h, w)."""
    x, dev, b = images.float() / 255.0, images.device, len(images)
    for step in steps:
        name = step[0]
        if name == "random_crop":
            (h, w), pad, fill = step[1], step[2], step[3]
            if pad:
                x = F.pad(x, (pad, pad, pad, pad), value=float(fill) / 255.0 if fill else 0.0)
            top = (torch.rand(b, generator=gen, device=dev) * (x.shape[2] - h + 1)).long()
            left = (torch.rand(b, generator=gen, device=dev) * (x.shape[3] - w + 1)).long()
            rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            x = x[torch.arange(b, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                  rows, cols]
        elif name == "random_resized_crop":
            size, (smin, smax), (rmin, rmax) = step[1], step[2], step[3]
            height, width = x.shape[2], x.shape[3]
            area = height * width
            # torchvision's sampling: 10 tries of (area fraction, log-uniform aspect ratio),
            # the first that fits wins; else a central crop clamped to the ratio range
            target = area * (smin + (smax - smin) * torch.rand(b, 10, generator=gen, device=dev))
            aspect = torch.exp(math.log(rmin) + (math.log(rmax) - math.log(rmin))
                               * torch.rand(b, 10, generator=gen, device=dev))
            cw = torch.sqrt(target * aspect).round()
            ch = torch.sqrt(target / aspect).round()
            ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
            first = ok.float().argmax(1)
            pick = lambda t: t.gather(1, first[:, None]).squeeze(1)  # noqa: E731
            cw, ch, found = pick(cw), pick(ch), ok.any(1)
            in_ratio = width / height
            fw = width if in_ratio <= rmax else round(height * rmax)
            fh = height if in_ratio >= rmin else round(width / rmin)
            cw = torch.where(found, cw, torch.full_like(cw, fw))
            ch = torch.where(found, ch, torch.full_like(ch, fh))
            top = torch.where(found, (torch.rand(b, generator=gen, device=dev) * (height - ch + 1)).floor(),
                              ((height - ch) / 2).floor())
            left = torch.where(found, (torch.rand(b, generator=gen, device=dev) * (width - cw + 1)).floor(),
                               ((width - cw) / 2).floor())
            size = size[0] if isinstance(size, (tuple, list)) else size
            x = _crop_resize(x, torch.stack([left, top, left + cw, top + ch], 1), size)
        elif name == "resize":
            x = F.interpolate(x, size=(step[1], step[1]), mode="bilinear", align_corners=False, antialias=True)
        elif name == "center_crop":
            h, w = step[1]
            top, left = round((x.shape[2] - h) / 2.0), round((x.shape[3] - w) / 2.0)
            x = x[:, :, top:top + h, left:left + w]
        elif name == "flip":
            flip = torch.rand(b, generator=gen, device=dev) < step[1]
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        elif name == "color_jitter":
            ranges = step[1:]
            factors = [None if r is None else _uniform(b, r[0], r[1], gen, dev) for r in ranges]
            order = torch.rand(b, 4, generator=gen, device=dev).argsort(1)  # per-image random order
            for slot in range(4):
                for op, factor in enumerate(factors):
                    if factor is None:
                        continue
                    chosen = order[:, slot] == op
                    if op == 3:  # hue: only on the images whose turn it is
                        idx = chosen.nonzero().squeeze(1)
                        if len(idx):
                            x[idx] = _shift_hue(x[idx], factor[idx]).clamp(0, 1)
                        continue
                    # factor 1 leaves an image exactly as it is (x * 1 + m * 0 == x)
                    fac = torch.where(chosen, factor, torch.ones_like(factor)).view(-1, 1, 1, 1)
                    if op == 0:
                        x = x * fac
                    elif op == 1:
                        x = x * fac + _gray(x).mean((1, 2, 3), keepdim=True) * (1 - fac)
                    else:
                        x = x * fac + _gray(x) * (1 - fac)
                    x = x.clamp(0, 1)
        elif name == "normalize":
            mean = torch.tensor(step[1], device=dev).view(1, 3, 1, 1)
            std = torch.tensor(step[2], device=dev).view(1, 3, 1, 1)
            x = (x - mean) / std
    return x.contiguous()


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int,
                device: torch.device, dist: Dist, seed: int = 0) -> DataLoader:
    """A DataLoader for one split. Training data is shuffled by a seeded generator (reseeded
    each epoch by the driver) and sharded across processes by DistributedSampler; validation
    data is split into disjoint shards without padding, so every image counts exactly once."""
    sampler = None
    if dist.enabled:
        if train:
            sampler = DistributedSampler(dataset, dist.world, dist.rank, shuffle=True, seed=seed)
        else:
            dataset = Subset(dataset, range(dist.rank, len(dataset), dist.world))
    workers = dict(num_workers=num_workers)
    if num_workers > 0:
        # Workers are started afresh each epoch (not persistent): their seeds then come from
        # the per-epoch seed, which makes a resumed run draw the same augmentations.
        workers.update(prefetch_factor=4)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None,
                      sampler=sampler, generator=torch.Generator().manual_seed(seed),
                      pin_memory=device.type == "cuda", drop_last=False, **workers)


def set_loader_epoch(loader: DataLoader, seed: int, rank_seed: int | None = None) -> None:
    """Fix the next pass over `loader`: the shuffle order to `seed` (shared by all ranks, as
    DistributedSampler needs) and the worker seeds to `rank_seed` (one per rank, so ranks
    draw different augmentations)."""
    if isinstance(loader, DeviceImageLoader):
        loader.set_epoch(seed, rank_seed)
        return
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(seed)
    loader.generator.manual_seed(seed if rank_seed is None else rank_seed)


def make_loaders(args, train_set, val_set, device: torch.device, dist: Dist):
    """(train, validation, BN-recalibration) loaders: the device-resident ones where
    --data-loader asks for them (auto: on CUDA, for image-array data sets whose transforms
    have device versions), else torch DataLoaders. The recalibration loader is the same on
    every rank, so every rank estimates the same BatchNorm statistics."""
    kind = args.data_loader
    if kind == "auto":
        kind = "device" if device.type == "cuda" and isinstance(train_set, ImageArrayDataset) else "torch"
    if kind == "device":
        try:
            return (DeviceImageLoader(train_set, args.batch_train, train=True, device=device, dist=dist, seed=args.seed),
                    DeviceImageLoader(val_set, args.batch_val, train=False, device=device, dist=dist),
                    DeviceImageLoader(train_set, args.batch_train, train=True, device=device, seed=args.seed))
        except (ValueError, AttributeError) as e:
            if args.data_loader == "device":
                raise TKPError(f"--data-loader device cannot serve this data set ({e}); use --data-loader torch") from None
    common = dict(num_workers=args.num_workers, device=device)
    return (make_loader(train_set, args.batch_train, train=True, dist=dist, seed=args.seed, **common),
            make_loader(val_set, args.batch_val, train=False, dist=dist, **common),
            make_loader(train_set, args.batch_train, train=True, num_workers=0, device=device,
                        dist=Dist(), seed=args.seed))


# ==== 4. Sparsity: targets, Top-K and N:M masks, mask enforcement ========================


@dataclass(frozen=True)
class Target:
    """One masked weight: its groups are `weight.reshape(-1, group)` (a conv kernel's taps,
    or M consecutive inputs of a Linear row); each keeps its `keep` largest |w|."""
    name: str
    group: int
    keep: int


@dataclass
class Plan:
    """What gets pruned. `num_groups` normalises L_aux (SPEC §2)."""
    pattern: str                      # "top-1", "2:4", "dense"
    targets: list[Target] = field(default_factory=list)
    num_groups: int = 0
    skipped: list[str] = field(default_factory=list)  # targeted but left dense, with the reason


def _matches(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def topk_plan(model: nn.Module, topk: int, exclude: list[str] = (), dense: bool = False) -> Plan:
    """Top-K over every Conv2d kernel (SPEC §1). Kernels with kh*kw <= topk stay dense but still
    count towards num_groups, as in the reference; layers in `exclude` are neither."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = [p for p in exclude if not any(_matches(n, [p]) for n in convs)]
    if unknown:
        raise TKPError(f"--exclude-layers: no Conv2d named {', '.join(unknown)}; "
                       f"Conv2d layers are: {', '.join(list(convs)[:12])}{' ...' if len(convs) > 12 else ''}")
    if dense:
        return Plan("dense")
    plan = Plan(f"top-{topk}")
    for name, conv in convs.items():
        if _matches(name, list(exclude)):
            plan.skipped.append(f"{name} (--exclude-layers)")
            continue
        kh, kw = conv.kernel_size
        plan.num_groups += conv.weight.shape[0] * conv.weight.shape[1]
        if kh * kw > topk:
            plan.targets.append(Target(f"{name}.weight", kh * kw, topk))
    return plan


def nm_plan(model: nn.Module, n: int, m: int, module_names: list[str]) -> Plan:
    """N:M over the input dimension of the named Linear modules (SPEC §1). A Linear whose
    input width is not a multiple of M is skipped and reported, never padded."""
    plan = Plan(f"{n}:{m}")
    modules = dict(model.named_modules())
    for name in module_names:
        linear = modules[name]
        if not isinstance(linear, nn.Linear):
            raise TKPError(f"{name} is a {type(linear).__name__}, not a Linear; it cannot be N:M pruned")
        out_f, in_f = linear.weight.shape
        if in_f % m:
            plan.skipped.append(f"{name} (input width {in_f} is not a multiple of {m})")
            continue
        plan.num_groups += out_f * in_f // m
        plan.targets.append(Target(f"{name}.weight", m, n))
    return plan


def group_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, 0 = largest. Ties go to the lower index (a stable
    sort), so the same values give the same ranks on every device and every run."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))


def compute_masks(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask}, True = kept: the `keep` largest |w| of every group."""
    params = dict(model.named_parameters())
    masks = {}
    with torch.no_grad():
        for t in plan.targets:
            w = params[t.name]
            keep = group_ranks(w.detach().reshape(-1, t.group).abs()) < t.keep
            masks[t.name] = keep.reshape(w.shape)
    return masks


class Masker:
    """Enforces masks that live beside the model (not in its state_dict).

    `mask_grads_()` runs after backward (and unscaling), `apply_()` after every optimizer
    step, including steps that a GradScaler skips. Both write exact zeros (`masked_fill_`:
    an inf or NaN in a pruned slot becomes 0 too, which a multiply by 0 would not do)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [n for n in masks if n not in params]
        if missing:
            raise TKPError(f"masks name parameters this model does not have: {missing[:3]}")
        self.masks = masks
        self.params = [params[n] for n in masks]
        self.pruned = [~m.to(p.device) for p, m in zip(self.params, masks.values())]

    @torch.no_grad()
    def apply_(self) -> None:
        for p, pruned in zip(self.params, self.pruned):
            p.masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for p, pruned in zip(self.params, self.pruned):
            if p.grad is not None:
                p.grad.masked_fill_(pruned, 0.0)


def broadcast_masks(masks: dict[str, torch.Tensor], dist: Dist, device: torch.device) -> dict:
    """Make every rank hold rank 0's masks (a no-op in a single process)."""
    if not dist.enabled:
        return masks
    out = {}
    for name, mask in masks.items():
        buf = mask.to(device=device, dtype=torch.uint8)
        torch_dist.broadcast(buf, src=0)
        out[name] = buf.bool()
    return out


# ==== 5. Auxiliary regularizer ===========================================================


def aux_coefficients(reg_type: str, group: int, keep: int, alpha: float) -> torch.Tensor:
    """c[r] for ranks r = 0..group-1: 0 for the kept ranks, then 1 (l2) or exp(-alpha*(r-K))."""
    r = torch.arange(group, dtype=torch.float64)
    if reg_type == "l2":
        c = torch.ones(group, dtype=torch.float64)
    elif reg_type == "exponential":
        c = torch.exp(-alpha * (r - keep))
    else:
        raise ValueError(reg_type)
    c[:keep] = 0
    return c.float()


class AuxRegularizer:
    """L_aux = (1/num_groups) * sum_groups sum_r c[r] * s_r, s = squared weights sorted
    descending (SPEC §2).

    Because sorting only permutes entries, dL_aux/dw = 2 * c[rank(w)] * w / num_groups: the
    same gradient autograd gives through torch.sort. We compute the ranks of all layers'
    groups of one shape in one sort, and add beta times that gradient to `.grad` directly,
    once per optimizer step, so the forward/backward pass carries no regularizer at all."""

    def __init__(self, model: nn.Module, plan: Plan, reg_type: str, alpha: float):
        params = dict(model.named_parameters())
        self.num_groups = plan.num_groups
        self.buckets = []  # (params, group, coefficients) per distinct (group, keep)
        shapes = sorted({(t.group, t.keep) for t in plan.targets})
        for group, keep in shapes:
            ps = [params[t.name] for t in plan.targets if (t.group, t.keep) == (group, keep)]
            coef = aux_coefficients(reg_type, group, keep, alpha).to(ps[0].device)
            self.buckets.append((ps, group, coef))

    @torch.no_grad()
    def add_grad_(self, beta: float) -> torch.Tensor:
        """Add beta * dL_aux/dw to every target's .grad; return L_aux (a 0-dim tensor)."""
        total = None
        for ps, group, coef in self.buckets:
            w = torch.cat([p.reshape(-1, group) for p in ps])
            c = coef[group_ranks(w.abs())]                       # c[rank] at each entry
            cw = c * w
            value = (cw * w).sum()
            total = value if total is None else total + value
            if beta:
                pieces = torch.split(cw, [p.numel() // group for p in ps])
                grads = []
                for p, piece in zip(ps, pieces):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
                torch._foreach_add_(grads, [x.view(p.shape) for x, p in zip(pieces, ps)],
                                    alpha=2.0 * beta / self.num_groups)
        if total is None:
            return torch.zeros(())
        return total / self.num_groups


# ==== 6. Training and evaluation =========================================================


@dataclass
class Trainer:
    """The objects one stage trains with. `model` is what runs forward (maybe compiled or
    DDP-wrapped); `module` is the plain model whose parameters and state_dict we own."""
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    criterion: nn.Module
    masker: Masker | None = None
    regularizer: AuxRegularizer | None = None
    beta: float = 0.0
    aux_every: int = 1
    grad_accum: int = 1
    clip_grad: float | None = None
    dist: Dist = field(default_factory=Dist)
    memory_format: torch.memory_format = torch.preserve_format
    step: int = 0  # optimizer steps taken in this stage

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)


def build_trainer(model, module, *, args, device, amp_dtype, min_lr, total_steps, dist, lr=None,
                  masker=None, regularizer=None, beta=0.0, memory_format=torch.preserve_format) -> Trainer:
    """A fresh AdamW, per-step cosine schedule (lr -> min_lr) and grad scaler for one stage."""
    params = [p for p in module.parameters() if p.requires_grad]
    # the fused kernel: one pass over all parameters (CPU and CUDA), and it works with the
    # fp16 scaler's skipped steps
    optimizer = torch.optim.AdamW(params, lr=args.lr if lr is None else lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))
    # T_max = total_steps: the last step runs at a small positive lr, never at min_lr = 0
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Trainer(model, module, optimizer, scheduler, scaler, device, amp_dtype,
                   nn.CrossEntropyLoss(label_smoothing=args.label_smooth), masker, regularizer,
                   beta=beta, aux_every=args.aux_loss_freq,
                   grad_accum=args.grad_accum, clip_grad=args.clip_grad, dist=dist, memory_format=memory_format)


def optimizer_step(t: Trainer) -> torch.Tensor | None:
    """One update, in a fixed order: unscale -> add regularizer gradient -> mask gradients ->
    clip -> step -> update scaler -> re-apply masks. Masking before clipping makes the clip
    norm that of the update actually applied. Returns L_aux when computed."""
    t.scaler.unscale_(t.optimizer)
    aux = None
    if t.regularizer is not None and t.step % t.aux_every == 0:
        aux = t.regularizer.add_grad_(t.beta)
    if t.masker is not None:
        t.masker.mask_grads_()
    if t.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(t.module.parameters(), t.clip_grad)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.masker is not None:
        t.masker.apply_()
    with warnings.catch_warnings():  # a first step skipped by the fp16 scaler is expected
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    return aux


def _to_device(batch, device, memory_format):
    x, y = batch
    return (x.to(device, non_blocking=True, memory_format=memory_format),
            y.to(device, non_blocking=True))


def _check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise TKPError(f"the training loss became {value} at {where}; nothing of this epoch was saved "
                       f"(checkpoint_last.pt holds the last good one); start a new run with a lower "
                       f"--lr, --clip-grad 1.0 or --amp-dtype bf16")


def train_one_epoch(t: Trainer, loader, *, progress: Callable[[str], None] | None = None, progress_every: float = 0,
                    label: str = "") -> dict:
    """One pass over `loader`. Every `grad_accum` micro-batches make one optimizer step; a
    shorter group at the end of the epoch steps too, its loss averaged over its own size."""
    t.model.train()
    n_batches = len(loader)
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # sum of ce * n, correct
    count = 0
    aux_sum, aux_count = torch.zeros((), device=t.device), 0
    lr_first = t.optimizer.param_groups[0]["lr"]
    start = last_print = time.perf_counter()
    for i, batch in enumerate(loader):
        x, y = _to_device(batch, t.device, t.memory_format)
        group_start = i - i % t.grad_accum
        group_size = min(t.grad_accum, n_batches - group_start)
        last_in_group = i - group_start == group_size - 1
        sync = contextlib.nullcontext() if last_in_group or not t.dist.enabled else t.model.no_sync()
        with sync:
            with t.autocast():
                out = t.model(x)
                ce = t.criterion(out, y)
            t.scaler.scale(ce / group_size).backward()
        with torch.no_grad():
            sums[0] += ce.detach().double() * len(y)
            sums[1] += (out.argmax(1) == y).sum()
        count += len(y)
        if last_in_group:
            aux = optimizer_step(t)
            if aux is not None:
                aux_sum += aux
                aux_count += 1
        now = time.perf_counter()
        if progress and progress_every and now - last_print >= progress_every and i + 1 < n_batches:
            last_print = now
            ce_mean = sums[0].item() / count
            _check_finite(ce_mean, label)
            rate = count / (now - start) * t.dist.world
            eta = (now - start) / (i + 1) * (n_batches - i - 1)
            progress(f"  {label} {i + 1}/{n_batches} ce {ce_mean:.4f} "
                     f"{rate:,.0f} img/s, epoch ETA {format_duration(eta)}")
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    seconds = time.perf_counter() - start
    totals = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=t.device)])
    ce_sum, correct, count = all_reduce_sum(totals, t.dist).tolist()
    ce_mean = ce_sum / max(count, 1)
    aux_mean = (aux_sum / aux_count).item() if aux_count else 0.0
    _check_finite(ce_mean + t.beta * aux_mean, label)
    return {"lr": lr_first, "train_loss": ce_mean + t.beta * aux_mean, "train_ce": ce_mean,
            "train_aux": aux_mean, "train_acc": 100.0 * correct / max(count, 1),
            "epoch_seconds": seconds, "images_per_s": count / seconds if seconds > 0 else 0.0}


def all_reduce_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        x = x.clone()
        torch_dist.all_reduce(x)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None, dist: Dist = Dist(),
             topk: tuple[int, ...] = (1,), memory_format=torch.preserve_format) -> dict:
    """Top-k accuracies (percent) and mean cross-entropy over the whole loader, summed across
    processes (each holds a disjoint shard)."""
    model.eval()
    sums = torch.zeros(2 + len(topk), dtype=torch.float64, device=device)  # loss, n, correct@k
    for batch in loader:
        x, y = _to_device(batch, device, memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        out = out.float()
        pred = out.topk(min(max(topk), out.shape[1]), dim=1).indices
        hits = pred == y[:, None]
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                             torch.tensor(len(y), dtype=torch.float64, device=device)]
                            + [hits[:, :k].any(1).sum().double() for k in topk])
    sums = all_reduce_sum(sums, dist).tolist()
    n = max(sums[1], 1)
    result = {"loss": sums[0] / n, "images": int(sums[1])}
    for k, c in zip(topk, sums[2:]):
        result[f"top{k}"] = 100.0 * c / n
    return result


@torch.no_grad()
def recalibrate_bn(module: nn.Module, loader, batches: int, device: torch.device, amp_dtype=None,
                   memory_format=torch.preserve_format) -> int:
    """Reset BatchNorm running statistics and re-estimate them as a cumulative average over
    `batches` training batches (no gradients, dropout off). Returns the batches used."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches == 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    module.eval()
    for bn in bns:
        bn.train()
    used = 0
    for batch in loader:
        if used == batches:
            break
        x, _ = _to_device(batch, device, memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            module(x)
        used += 1
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    module.eval()
    return used


def plain(obj):
    """`obj` as plain Python values only (str for anything else), so that files holding it
    load with torch.load(weights_only=True)."""
    return json.loads(json.dumps(obj, default=str))


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ==== 7. Checkpoints =====================================================================


def to_device(obj, device):
    """`obj` with every tensor detached and moved to `device` (dicts, lists and tuples
    walked through)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def to_cpu(obj):
    """`obj` on the CPU, so saved files open on machines without the GPU they came from."""
    return to_device(obj, "cpu")


def clean_state_dict(state: dict) -> dict:
    """Strip the '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes some tools save,
    in either nesting order."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
    state = dict(state)
    for prefix in ("_orig_mod.", "module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write
    never leaves a half-written file under `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a saved run is for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_file(path: str, what: str) -> dict:
    """torch.load(weights_only=True) with a one-line error for missing or unreadable files."""
    if not Path(path).is_file():
        raise TKPError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TKPError(f"cannot read {what} {path}: it is corrupt, truncated or not a torch file "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise TKPError(f"{what} {path} holds a {type(obj).__name__}, not a dict")
    return obj


def read_state_dict(path: str, what: str = "weights file") -> dict:
    """A model state_dict from a file: a raw state_dict, or a dict with 'model' /
    'state_dict' (our final.pt and checkpoints, timm and most training scripts)."""
    obj = load_file(path, what)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TKPError(f"{what} {path} does not hold a model state_dict")
    return clean_state_dict(obj)


def load_weights(module: nn.Module, state: dict, path: str, replaceable: tuple[str, ...] = ()) -> list[str]:
    """Load `state` strictly, except that entries under the `replaceable` prefixes (a
    classifier) whose shapes differ from the model's are left as initialised: ImageNet weights
    load into a 100-class model, and weights that already have 100 classes load whole.
    A mismatch elsewhere is one line that says what differs. Returns the skipped keys."""
    own = module.state_dict()
    skipped = [k for k in own if _matches(k, list(replaceable)) and k in state and state[k].shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    missing, unexpected = [], []
    if not bad_shape:
        # torch's own key check: it accepts old files without BatchNorm's num_batches_tracked
        result = module.load_state_dict(state, strict=False)
        missing = sorted(set(result.missing_keys) - set(skipped))
        unexpected = sorted(result.unexpected_keys)
    if missing or unexpected or bad_shape:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", bad_shape)) if keys)
        raise TKPError(f"{path} does not fit this model ({detail})")
    return skipped


def pretrained_state(path: str | None, weights) -> tuple[dict, str]:
    """(state_dict, where it came from): the local file `path` (--pretrain-path), else the
    torchvision weights enum `weights`, downloaded or read from torch.hub's cache."""
    if path:
        return read_state_dict(path, "--pretrain-path"), path
    return download_weights(weights), str(weights)


def download_weights(weights) -> dict:
    """The state_dict of a torchvision weights enum, through torch.hub's cache (no network
    when the file is already there); offline, one line naming the alternatives."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        raise TKPError(f"could not download the pretrained weights {weights} ({type(e).__name__}); "
                       f"offline, pass --pretrain-path FILE (a copy of {weights.url}; a copy at {cached} "
                       f"is found too) or train from scratch with --no-pretrain") from None


# ==== 8. Reports: parameter and MAC counts, summary =======================================


@torch.no_grad()
def layer_macs(module: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> tuple[dict, int]:
    """Dense multiply-accumulates of one image through `module`, counted by
    torch.utils.flop_counter (MACs = FLOPs / 2). Returns ({leaf module name: MACs}, total),
    the total including work that no leaf owns (e.g. attention's q@k and attn@v)."""
    from torch.utils.flop_counter import FlopCounterMode
    shadow = copy.deepcopy(module).to("meta").eval()  # shapes only: no arithmetic is done
    with FlopCounterMode(display=False) as counter:
        shadow(torch.zeros(1, *input_shape, device="meta"))
    counts = counter.get_flop_counts()
    root = type(module).__name__ + "."
    per_layer = {}
    for name, sub in module.named_modules():
        if name and not any(True for _ in sub.children()) and (root + name) in counts:
            per_layer[name] = sum(counts[root + name].values()) // 2
    return per_layer, counter.get_total_flops() // 2


def sparsity_report(module: nn.Module, plan: Plan, masks: dict, input_shape, device) -> dict:
    """Parameter and MAC counts, dense and non-zero, and the theoretical speed-up
    (dense MACs / MACs of non-zero weights: the paper's Speed-Up column)."""
    # frozen parameters (GoogLeNet's auxiliary heads: training-only, not in the loss, never
    # run at inference) are not counted
    params = {n: p for n, p in module.named_parameters() if p.requires_grad or n in masks}
    total = sum(p.numel() for p in params.values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in params.values())
    pruned_numel = sum(params[n].numel() for n in masks)
    pruned_nonzero = sum(int(torch.count_nonzero(params[n])) for n in masks)
    per_layer, macs_dense = layer_macs(module, input_shape, device)
    uncounted = [n for n in masks if n.removesuffix(".weight") not in per_layer]
    if uncounted:  # the speed-up would silently read too low
        raise RuntimeError(f"the MAC counter saw no work for pruned layers {uncounted[:3]} (a TKP bug)")
    macs_nonzero = macs_dense
    modules = dict(module.named_modules())
    layers = []
    for name, macs in per_layer.items():
        weight = getattr(modules[name], "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        density = int(torch.count_nonzero(weight)) / weight.numel()
        nz = round(macs * density)
        macs_nonzero -= macs - nz
        if f"{name}.weight" in masks:
            layers.append({"layer": name, "shape": list(weight.shape), "density": density,
                           "macs_dense": macs, "macs_nonzero": nz})
    pruned_dense = sum(layer["macs_dense"] for layer in layers)
    pruned_nonzero_macs = sum(layer["macs_nonzero"] for layer in layers)
    return {
        "params_total": total, "params_nonzero": nonzero,
        "speedup_pruned_layers": pruned_dense / pruned_nonzero_macs if pruned_nonzero_macs else 1.0,
        "pruned_layers": len(masks), "pruned_layer_density": pruned_nonzero / pruned_numel if pruned_numel else 1.0,
        "macs_dense": macs_dense, "macs_nonzero": macs_nonzero,
        "speedup_theoretical": macs_dense / macs_nonzero if macs_nonzero else float("inf"),
        "layers": layers,
    }


def check_sparsity(module: nn.Module, plan: Plan, masks: dict) -> None:
    """Raise if any pruned entry is non-zero or any group holds more than `keep` non-zeros."""
    params = dict(module.named_parameters())
    for t in plan.targets:
        w = params[t.name].detach()
        if (w[~masks[t.name].to(w.device)] != 0).any():
            raise RuntimeError(f"{t.name}: a pruned weight is non-zero (a TKP bug; please report it)")
        if (w.reshape(-1, t.group).count_nonzero(dim=1) > t.keep).any():
            raise RuntimeError(f"{t.name}: a group has more than {t.keep} non-zeros (a TKP bug)")


def tap_frequencies(masks: dict, plan: Plan) -> dict:
    """For Top-K kernels: the fraction of kernels of each layer that keep each tap position,
    as a kh x kw grid (row-major) — which of the positions survive."""
    out = {}
    for t in plan.targets:
        mask = masks[t.name]
        if mask.dim() == 4:
            kh, kw = mask.shape[2:]
            freq = mask.reshape(-1, kh * kw).float().mean(0).reshape(kh, kw)
            out[t.name.removesuffix(".weight")] = [[round(v, 4) for v in row] for row in freq.tolist()]
    return out


# ==== 9. Quantization-aware training ======================================================
# After stage 2 (--qat), every trained Conv2d and Linear (the pruned ones and the rest)
# trains with fake quantization: int8 weights, per output channel and symmetric (so a pruned
# zero stays exactly zero and zeros never stretch the scale), and int8 inputs, per tensor
# (affine, 0..255, as PyTorch quantizes activations). The fake-quant modules are PyTorch's own (torch.ao.quantization's
# FakeQuantize with min/max observers). The layers keep their names and Parameters (their
# class is swapped for a subclass), so masks, optimizer and checkpoints need no translation.


class _FakeQuantLayer:
    """Mixin for a Conv2d/Linear whose input and weight pass through FakeQuantize modules.
    Observers run in training mode only (and never once the layer is frozen)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for fq in (self.input_fq, self.weight_fq):
            fq.enable_observer(mode and not bool(self.qat_frozen))
        return self


class QATConv2d(_FakeQuantLayer, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.input_fq(x), self.weight_fq(self.weight), self.bias)


class QATLinear(_FakeQuantLayer, nn.Linear):
    def forward(self, x):
        return F.linear(self.input_fq(x), self.weight_fq(self.weight), self.bias)


def prepare_qat(module: nn.Module) -> list[str]:
    """Give every trained Conv2d and Linear fake-quantized inputs and weights. Returns the
    layer names."""
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver)
    names = []
    for name, layer in list(module.named_modules()):
        if (type(layer) not in (nn.Conv2d, nn.Linear) or not layer.weight.requires_grad
                or isinstance(layer, _FakeQuantLayer)):
            continue
        device = layer.weight.device
        # averaging_constant=1: each step's weight scale comes from that step's weights
        layer.add_module("weight_fq", FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver,
                                                   averaging_constant=1.0, quant_min=-127, quant_max=127,
                                                   dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                   ch_axis=0).to(device))
        layer.add_module("input_fq", FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                                  dtype=torch.quint8, qscheme=torch.per_tensor_affine).to(device))
        layer.register_buffer("qat_frozen", torch.zeros((), dtype=torch.bool, device=device))
        with torch.no_grad():
            layer.weight_fq(layer.weight)  # sizes its per-channel buffers, so checkpoints load
        layer.__class__ = QATConv2d if isinstance(layer, nn.Conv2d) else QATLinear
        layer.train(layer.training)
        names.append(name)
    return names


def qat_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, _FakeQuantLayer)}


@torch.no_grad()
def freeze_qat(module: nn.Module) -> None:
    """Fix every scale: weight scales from the final weights, input scales as observed."""
    for layer in qat_layers(module).values():
        layer.weight_fq.enable_observer(True)
        layer.weight_fq(layer.weight)
        layer.qat_frozen.fill_(True)
        layer.weight_fq.disable_observer()
        layer.input_fq.disable_observer()


def strip_qat(module: nn.Module) -> None:
    """Back to plain Conv2d/Linear layers (the same Parameters)."""
    for layer in qat_layers(module).values():
        del layer.weight_fq, layer.input_fq, layer.qat_frozen
        layer.__class__ = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear


@torch.no_grad()
def export_int8(module: nn.Module) -> dict:
    """{layer: int8 weight, per-channel scales, input scale and zero point} of a frozen model.
    int8 * scale (per output channel) reproduces the fake-quantized weight exactly."""
    out = {}
    for name, layer in qat_layers(module).items():
        scale = layer.weight_fq.scale.detach().float()
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        # w * (1/scale), rounded half to even: what the fake-quant kernel computes
        q = torch.clamp(torch.round(layer.weight.detach().float() * (1.0 / scale.view(shape))), -127, 127)
        q = q.to(torch.int8)
        out[name] = {"weight_int8": q.cpu(), "weight_scale": scale.cpu(),
                     "input_scale": layer.input_fq.scale.detach().float().cpu(),
                     "input_zero_point": layer.input_fq.zero_point.detach().cpu()}
    return out


@torch.no_grad()
def load_int8(module: nn.Module, int8: dict) -> nn.Module:
    """A frozen fake-quant model from export_int8's output: weights de-quantized, input
    scales set. Its outputs are those of the model that was exported."""
    prepare_qat(module)
    layers = qat_layers(module)
    for name, q in int8.items():
        layer = layers[name]
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.copy_(q["weight_int8"].float() * q["weight_scale"].view(shape))
        layer.input_fq.scale.resize_(q["input_scale"].shape).copy_(q["input_scale"])
        layer.input_fq.zero_point.resize_(q["input_zero_point"].shape).copy_(q["input_zero_point"])
    freeze_qat(module)
    return module


def int8_size_bytes(module: nn.Module, int8: dict, masks: dict) -> int:
    """Bytes of the pruned int8 model: a quantized weight as 1 byte per value (per kept value
    plus a 1-bit mask where pruned), 4 bytes per output-channel scale, 8 for its input's scale
    and zero point; every other parameter (biases, norms, embeddings) as fp32."""
    total = 0
    for name, p in module.named_parameters():
        if not p.requires_grad:  # frozen, training-only parameters (GoogLeNet's auxiliary heads)
            continue
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in int8:
            values = int(masks[name].sum()) + math.ceil(p.numel() / 8) if name in masks else p.numel()
            total += values + 4 * p.shape[0] + 8
        else:
            total += 4 * p.numel()
    return total


# ==== 10. The two-stage driver ===========================================================

# Flags that change the science of a run: a resumed run must use the same values.
OPERATIONAL_FLAGS = {"output_dir", "resume", "eval", "num_workers", "data_loader", "compile", "device", "channels_last",
                     "progress_every", "batch_val", "val_freq", "data_root", "data_path",
                     "checkpoint_dir", "pretrain_path", "pretrained_path"}


@dataclass
class Script:
    """What a model script tells the driver."""
    name: str                                   # e.g. "vgg8"
    build_model: Callable                       # args -> nn.Module (weights loaded)
    build_data: Callable                        # args -> (train_set, val_set)
    build_plan: Callable                        # (module, args) -> Plan
    input_shape: Callable                       # args -> (C, H, W)
    dataset_name: Callable                      # args -> e.g. "cifar10"
    pretrained: Callable = lambda args: False   # args -> bool: starts from trained weights
    min_lr_ratio: float = 0.0                   # cosine floor as a fraction of --lr
    topk_metrics: tuple[int, ...] = (1,)        # (1,) or (1, 5)
    conv_net: bool = True                       # channels_last by default on CUDA


class Output:
    """Console lines and files of the main process; silent on other ranks."""

    def __init__(self, folder: Path | None, dist: Dist):
        self.folder, self.dist = folder, dist

    def print(self, line: str) -> None:
        if self.dist.is_main:
            print(line, flush=True)

    def write_json(self, name: str, obj) -> None:
        if self.dist.is_main:
            tmp = self.folder / f".{name}.tmp"
            tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
            os.replace(tmp, self.folder / name)

    def write_log(self, history: list[dict]) -> None:
        if self.dist.is_main:
            tmp = self.folder / ".log.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
            os.replace(tmp, self.folder / "log.jsonl")

    def save(self, obj, name: str) -> None:
        if self.dist.is_main:
            save_atomic(obj, self.folder / name)


def _prepare_output_dir(args, script: Script, dist: Dist) -> Path:
    """Resolve --output-dir and create it; never adopt a folder that holds another run."""
    if args.output_dir is None:
        if args.resume:
            args.output_dir = str(Path(args.resume).parent)
        elif args.dry_run:
            args.output_dir = tempfile.mkdtemp(prefix=f"tkp-dry-run-{script.name}-")
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            args.output_dir = str(Path("runs") / f"{script.name}-{stamp}")
    folder = Path(args.output_dir)
    existing = folder / "checkpoint_last.pt"
    if existing.exists() and not (args.resume and existing.resolve() == Path(args.resume).resolve()):
        raise TKPError(f"{folder} already holds a run; continue it with --resume {existing} "
                       f"or choose another --output-dir")
    if dist.is_main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TKPError(f"cannot create --output-dir {folder}: {e.strerror}") from None
    return folder


def _apply_dry_run(args) -> None:
    """--dry-run: a one-step epoch per stage on a few generated images (every batch of the
    same size: on CPU each new shape costs kernel set-up time)."""
    args.epochs_stage1 = args.epochs_stage2 = 1
    args.batch_train = args.batch_val = 2
    args.bn_recal_batches = min(args.bn_recal_batches, 2)
    args.num_workers = 0


def _load_resume(args, amp: str) -> dict:
    """Read --resume and check that it continues this run: a TKP checkpoint, made with the
    same science flags and the same precision."""
    ckpt = load_file(args.resume, "--resume checkpoint")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TKPError(f"{args.resume} is not a TKP checkpoint_last.pt (to start from weights, use "
                       f"the script's pretrained-weights flag)")
    saved, current = ckpt["args"], plain(vars(args))
    diffs = [k for k, v in saved.items() if k not in OPERATIONAL_FLAGS and k in current and current[k] != v]
    if diffs:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {current[k]!r})" for k in diffs[:3])
        raise TKPError(f"the checkpoint was made with {shown}; resume with the same flags, "
                       f"or start a new run in another --output-dir")
    if ckpt["amp"] != amp:
        raise TKPError(f"the checkpoint was trained with amp {ckpt['amp']} and this machine resolves "
                       f"amp {amp}; pass --amp-dtype {ckpt['amp']}" if ckpt["amp"] != "off" else
                       "the checkpoint was trained in fp32; pass --no-amp")
    return ckpt


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def run(args, script: Script) -> dict:
    """Run the two-stage pipeline of SPEC §3 (or --eval) for one script. Returns the summary."""
    if args.eval:
        return evaluate_checkpoint(args, script)
    dist, device = init_distributed(args.device)
    if args.dry_run:
        _apply_dry_run(args)
    # oneDNN sets up CPU kernels per layer shape (20 s for DenseNet-121's first step), which
    # would dominate a few-step dry run; the plain CPU kernels start at once. One thread: at
    # batch 2 more threads only wait on each other, badly so when other jobs share the cores
    onednn, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    if args.dry_run and device.type == "cpu":
        torch.backends.mkldnn.enabled = False
        torch.set_num_threads(1)
    try:
        return _run(args, script, dist, device)
    finally:
        torch.backends.mkldnn.enabled = onednn
        torch.set_num_threads(threads)
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _run(args, script: Script, dist: Dist, device: torch.device) -> dict:
    amp_dtype = resolve_amp(args, device)
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    wall_start = time.time()
    resume = _load_resume(args, amp_name(amp_dtype)) if args.resume else None
    wall_before = resume["wall_time_s"] if resume else 0.0
    folder = _prepare_output_dir(args, script, dist)
    out = Output(folder, dist)

    seed_all(derive_seed(args.seed, 0))
    with main_process_first(dist):  # rank 0 downloads weights and data; the others then read them
        module = script.build_model(args).to(device)
        train_set, val_set = script.build_data(args)
    plan = script.build_plan(module, args)
    regularize = args.reg_type != "none" and bool(plan.targets)
    if len(train_set) == 0 or len(val_set) == 0:
        raise TKPError("the training or validation set is empty; check the data folder")
    train_loader, val_loader, recal_loader = make_loaders(args, train_set, val_set, device, dist)
    loader_kind = "device" if isinstance(train_loader, DeviceImageLoader) else f"torch ({args.num_workers} workers)"
    channels_last = (device.type == "cuda" and script.conv_net) if args.channels_last is None else args.channels_last
    fmt = torch.channels_last if channels_last else torch.preserve_format
    module.to(memory_format=fmt)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)

    def wrap(module: nn.Module, compile: bool = use_compile) -> nn.Module:
        model = module
        if dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(model) if compile else model

    model = wrap(module)

    info = {"args": plain(vars(args)), "script": script.name, "versions": versions(),
            "device": device_name(device), "world_size": dist.world, "amp": amp_name(amp_dtype),
            "compile": use_compile, "channels_last": channels_last, "data_loader": loader_kind,
            "pattern": plan.pattern, "pruned_layers": len(plan.targets),
            "skipped_layers": plan.skipped, "aux_num_groups": plan.num_groups}
    out.write_json("args.json", info)
    out.print(f"{script.name}: {plan.pattern}, {len(plan.targets)} pruned layers, "
              f"{len(train_set)} train / {len(val_set)} val images, {info['device']}"
              f"{f' x {dist.world} processes' if dist.enabled else ''}, amp {info['amp']}, "
              f"compile {'on' if use_compile else 'off'}, data {loader_kind}, output {folder}")
    for line in plan.skipped:
        out.print(f"  kept dense: {line}")

    stage, epoch, masks, history = 1, 0, {}, []
    metrics = {"init_top1": None, "stage1_top1": None, "post_mask_top1": None,
               "final_top1": None, "best_top1": None, "val_images": None}
    if resume is not None:
        if resume["stage"] == 3:
            prepare_qat(module)
            model = wrap(module, compile=False)
        load_weights(module, clean_state_dict(resume["model"]), args.resume)
        stage, epoch, history, metrics = resume["stage"], resume["epoch"], resume["history"], resume["metrics"]
        masks = {k: v.to(device) for k, v in resume["masks"].items()}
        if stage >= 2 and set(masks) != {t.name for t in plan.targets}:
            raise TKPError(f"the masks in {args.resume} do not match this model's pruned layers")
        out.write_log(history)
        out.print(f"resumed from {args.resume}: stage {stage}, {epoch} epochs of it done")
    elif script.pretrained(args):
        ev = evaluate(model, val_loader, device, amp_dtype, dist, script.topk_metrics, fmt)
        metrics.update({f"init_top{k}": ev[f"top{k}"] for k in script.topk_metrics})
        out.print(f"initial evaluation: top-1 {ev['top1']:.2f}%")

    epochs = {1: args.epochs_stage1, 2: args.epochs_stage2, 3: args.qat_epochs if args.qat else 0}
    epochs_left = sum(epochs.values()) - sum(epochs[s] for s in range(1, stage)) - epoch
    durations = []

    def checkpoint(trainer: Trainer, stage: int, epoch: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": to_cpu(module.state_dict()), "masks": to_cpu(masks),
                "optimizer": to_cpu(trainer.optimizer.state_dict()), "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict(), "stage": stage, "epoch": epoch, "step": trainer.step,
                "amp": amp_name(amp_dtype), "history": plain(history), "metrics": plain(metrics),
                "args": plain(vars(args)), "rng": _rng_state(device),
                "wall_time_s": wall_before + time.time() - wall_start}

    def make_trainer(stage: int, lr: float | None = None, min_lr: float | None = None, **parts) -> Trainer:
        lr = args.lr if lr is None else lr
        trainer = build_trainer(model, module, args=args, device=device, amp_dtype=amp_dtype, lr=lr,
                                min_lr=script.min_lr_ratio * lr if min_lr is None else min_lr, dist=dist,
                                total_steps=steps_per_epoch * epochs[stage], memory_format=fmt, **parts)
        if resume is not None:
            trainer.optimizer.load_state_dict(resume["optimizer"])
            trainer.scheduler.load_state_dict(resume["scheduler"])
            trainer.scaler.load_state_dict(resume["scaler"])
            trainer.step = resume["step"]
            _restore_rng(resume["rng"], device)
        return trainer

    def train_stage(stage: int, first_epoch: int, trainer: Trainer) -> None:
        nonlocal epochs_left
        for ep in range(first_epoch, epochs[stage]):
            # every epoch's randomness follows from (seed, stage, epoch, rank): a resumed run
            # draws what the uninterrupted run would have drawn
            seed = derive_seed(args.seed, stage, ep)
            rank_seed = derive_seed(seed, dist.rank)
            seed_all(rank_seed)
            set_loader_epoch(train_loader, seed, rank_seed)
            label = f"stage {stage} epoch {ep + 1}/{epochs[stage]}"
            tic = time.perf_counter()
            stats = train_one_epoch(trainer, train_loader, progress=out.print,
                                    progress_every=args.progress_every, label=label)
            val = None
            if (ep + 1) % args.val_freq == 0 or ep + 1 == epochs[stage]:
                val = evaluate(model, val_loader, device, amp_dtype, dist, script.topk_metrics, fmt)
                metrics["val_images"] = val["images"]  # every validation image, once, over all ranks
                if stage == 2:
                    metrics["best_top1"] = max(metrics["best_top1"] or 0.0, val["top1"])
                if ep + 1 == epochs[stage]:
                    name = {1: "stage1", 2: "final", 3: "qat_train"}[stage]
                    metrics.update({f"{name}_top{k}": val[f"top{k}"] for k in script.topk_metrics})
            history.append({"stage": stage, "epoch": ep + 1, **stats, "val_loss": val and val["loss"],
                            **{f"val_top{k}": val and val[f"top{k}"] for k in script.topk_metrics}})
            durations.append(time.perf_counter() - tic)
            epochs_left -= 1
            # the checkpoint first, then the log: a logged epoch is always a saved epoch
            out.save(checkpoint(trainer, stage, ep + 1), "checkpoint_last.pt")
            out.write_log(history)
            eta = sum(durations) / len(durations) * epochs_left
            val_text = (" ".join(f"val@{k} {val[f'top{k}']:.2f}%" for k in script.topk_metrics)
                        if val else "val -")
            out.print(f"{label} | loss {stats['train_loss']:.4f} ce {stats['train_ce']:.4f} "
                      f"aux {stats['train_aux']:.3e} | train {stats['train_acc']:.2f}% | {val_text} | "
                      f"lr {stats['lr']:.2e} | {stats['images_per_s']:,.0f} img/s | "
                      f"{durations[-1]:.1f}s | ETA {format_duration(eta)}")

    try:
        # ---- stage 1: CE + beta * L_aux
        if stage == 1:
            regularizer = AuxRegularizer(module, plan, args.reg_type, args.alpha) if regularize else None
            trainer = make_trainer(1, regularizer=regularizer, beta=args.beta if regularize else 0.0)
            train_stage(1, epoch, trainer)
            if epochs[1] == 0:
                metrics["stage1_top1"] = metrics["init_top1"]

            # ---- mask, BN recalibration, post-mask evaluation
            masks = broadcast_masks(compute_masks(module, plan), dist, device)
            Masker(module, masks).apply_()
            seed_all(derive_seed(args.seed, 3))
            set_loader_epoch(recal_loader, derive_seed(args.seed, 3))
            used = recalibrate_bn(module, recal_loader, args.bn_recal_batches, device, amp_dtype, fmt)
            ev = evaluate(model, val_loader, device, amp_dtype, dist, script.topk_metrics, fmt)
            metrics["post_mask_top1"] = metrics["best_top1"] = ev["top1"]
            metrics["val_images"] = ev["images"]
            out.print(f"masked {len(masks)} layers ({plan.pattern}); BatchNorm recalibrated on {used} "
                      f"batches; post-mask top-1 {ev['top1']:.2f}%")
            stage, epoch, resume = 2, 0, None

        # ---- stage 2: masked fine-tuning with a fresh optimizer, schedule and scaler
        masker = Masker(module, masks)
        masker.apply_()  # also re-zeroes the weights after a resume
        if stage == 2:
            trainer = make_trainer(2, masker=masker)
            if resume is None and epoch == 0:  # the post-mask state is a checkpoint of its own
                out.save(checkpoint(trainer, 2, 0), "checkpoint_last.pt")
            train_stage(2, epoch, trainer)
            if epochs[2] == 0:
                metrics["final_top1"] = metrics["post_mask_top1"]
            summary = _write_reports(out, script, args, module, plan, masks, metrics, info, epochs,
                                     wall_before + time.time() - wall_start, device)
            stage, epoch, resume = 3, 0, None
        if not args.qat:
            return summary

        # ---- stage 3: quantization-aware training, masks enforced; eager, because dynamo does
        # not trace torch.ao's FakeQuantize (a graph break at every quantized layer)
        if not qat_layers(module):
            prepare_qat(module)
            model = wrap(module, compile=False)
        trainer = make_trainer(3, lr=args.qat_lr or 0.1 * args.lr, min_lr=0.0, masker=Masker(module, masks))
        train_stage(3, epoch, trainer)
    except KeyboardInterrupt:
        saved = folder / "checkpoint_last.pt"
        out.print(f"interrupted: continue with --resume {saved}" if saved.exists() else
                  "interrupted before the first epoch finished: nothing was saved")
        raise

    freeze_qat(module)
    int8 = export_int8(module)
    with torch.no_grad():  # the weights become their de-quantized values: exactly the int8 model
        for name, q in int8.items():
            weight = module.get_submodule(name).weight
            shape = (-1,) + (1,) * (weight.dim() - 1)
            weight.copy_((q["weight_int8"].float() * q["weight_scale"].view(shape)).to(weight.device))
    check_sparsity(module, plan, masks)
    # in fp32: bf16/fp16 autocast would round the de-quantized weights and inputs again
    ev = evaluate(model, val_loader, device, None, dist, script.topk_metrics, fmt)
    strip_qat(module)  # final_qat.pt's "model" loads into the plain model
    metrics.update({f"qat_top{k}": ev[f"top{k}"] for k in script.topk_metrics})
    metrics.update(size_bytes_dense_fp32=4 * sum(p.numel() for p in module.parameters() if p.requires_grad),
                   size_bytes_sparse_int8=int8_size_bytes(module, int8, masks))
    out.save({"model": to_cpu(module.state_dict()), "int8": int8, "masks": to_cpu(masks),
              "args": plain(vars(args)), "metrics": plain(metrics)}, "final_qat.pt")
    out.print(f"QAT: top-1 {ev['top1']:.2f}% with int8 weights and inputs (float {metrics['final_top1']:.2f}%); "
              f"{metrics['size_bytes_sparse_int8'] / 2**20:.2f} MiB sparse int8 vs "
              f"{metrics['size_bytes_dense_fp32'] / 2**20:.2f} MiB dense fp32")
    return _write_reports(out, script, args, module, plan, masks, metrics, info, epochs,
                          wall_before + time.time() - wall_start, device, write_final=False)


def _write_reports(out: Output, script: Script, args, module, plan, masks, metrics, info, epochs,
                   wall_time, device, write_final: bool = True) -> dict:
    """Check the sparsity, count, and write final.pt (the float model) and summary.json."""
    check_sparsity(module, plan, masks)
    report = sparsity_report(module, plan, masks, script.input_shape(args), device)
    summary = {"model": script.name, "dataset": script.dataset_name(args), "sparsity": plan.pattern,
               **metrics, **{k: v for k, v in report.items() if k != "layers"}, "sparsity_exact": True,
               "epochs_stage1": epochs[1], "epochs_stage2": epochs[2], "epochs_qat": epochs[3],
               "device": info["device"], "amp": info["amp"], "compile": info["compile"],
               "world_size": info["world_size"], "torch": str(torch.__version__), "wall_time_s": wall_time,
               "layers": report["layers"], "tap_frequencies": tap_frequencies(masks, plan)}
    if write_final:
        out.save({"model": to_cpu(module.state_dict()), "masks": to_cpu(masks), "args": plain(vars(args)),
                  "metrics": plain({k: v for k, v in summary.items() if k not in ("layers", "tap_frequencies")})},
                 "final.pt")
    out.write_json("summary.json", summary)
    out.print(format_summary(summary))
    if out.dist.is_main:
        import tkp_figures  # PNG figures when matplotlib is installed; otherwise one line says so
        tkp_figures.draw(out.folder, log=out.print)
    return summary


def format_summary(s: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.2f}%"
    return (f"{s['model']} {s['dataset']} {s['sparsity']}: init {pct(s.get('init_top1'))}, "
            f"stage 1 {pct(s.get('stage1_top1'))}, post-mask {pct(s.get('post_mask_top1'))}, "
            f"final {pct(s.get('final_top1'))} (best {pct(s.get('best_top1'))}) | "
            f"params {s['params_nonzero']:,}/{s['params_total']:,} non-zero | "
            f"MACs {s['macs_nonzero'] / 1e6:,.1f}M/{s['macs_dense'] / 1e6:,.1f}M | "
            f"theoretical speed-up {s['speedup_theoretical']:.2f}x")


def evaluate_checkpoint(args, script: Script) -> dict:
    """--eval CKPT: rebuild the model from a final.pt (or a final_qat.pt, evaluated with its
    int8 weights and input quantization, in fp32), evaluate it, print its summary."""
    ckpt = load_file(args.eval, "--eval checkpoint")
    if not {"model", "masks", "args"} <= set(ckpt):
        raise TKPError(f"{args.eval} is not a TKP final.pt (it lacks model/masks/args)")
    dist, device = init_distributed(args.device)
    try:
        return _evaluate_checkpoint(args, script, ckpt, dist, device)
    finally:
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _evaluate_checkpoint(args, script: Script, ckpt: dict, dist: Dist, device: torch.device) -> dict:
    saved = argparse.Namespace(**{**vars(args), **{k: v for k, v in ckpt["args"].items()
                                                   if k not in OPERATIONAL_FLAGS}})
    saved.eval, saved.dry_run = args.eval, False  # scripts load no pretrained weights under --eval
    module = script.build_model(saved).to(device)
    load_weights(module, clean_state_dict(ckpt["model"]), args.eval)
    plan = script.build_plan(module, saved)
    masks = {k: v.to(device) for k, v in ckpt["masks"].items()}
    check_sparsity(module, plan, masks)
    _, val_set = script.build_data(saved)
    loader = make_loader(val_set, args.batch_val, train=False, num_workers=args.num_workers,
                         device=device, dist=dist)
    report = sparsity_report(module, plan, masks, script.input_shape(saved), device)
    quantized = "int8" in ckpt
    if quantized:
        load_int8(module, {k: to_device(v, device) for k, v in ckpt["int8"].items()})
    # the precision the checkpoint was trained with (fp32 for the int8 model: bf16/fp16
    # would round its de-quantized weights again)
    amp_dtype = None if quantized else resolve_amp(saved, device)
    ev = evaluate(module, loader, device, amp_dtype, dist, script.topk_metrics)
    name = "qat" if quantized else "final"
    summary = {"model": script.name, "dataset": script.dataset_name(saved), "sparsity": plan.pattern,
               **{f"{name}_top{k}": ev[f"top{k}"] for k in script.topk_metrics},
               "val_images": ev["images"], **{k: v for k, v in report.items() if k != "layers"},
               "sparsity_exact": True}
    if dist.is_main:
        print(json.dumps(summary, indent=2))
    return summary
