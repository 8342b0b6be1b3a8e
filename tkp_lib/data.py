"""TKP data: images in, augmented batches out.

Owns: CIFAR (read from torchvision's pickled batches) and ImageFolder data sets (an unreadable
file is skipped with a warning and counted: `skipped_images`), the generated images of
--dry-run, the training and validation transforms of each recipe (in every data set made
here, timm's posterize answers 0 bits as Pillow < 13 did: `restore_posterize_zero_bits`), the
torch DataLoaders (seeded per epoch, sharded per process) and the device-resident loader that
augments CIFAR batches on the GPU.
May import: tkp_lib.runtime (errors, process info). Never the driver (tkp_common).
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from tkp_lib.runtime import Dist, TKPError


class ImageArrayDataset(Dataset):
    """Images held as one uint8 array (N, H, W, 3), served as PIL images through `transform`
    (timm's posterize in it answering 0 bits as Pillow < 13 did: restore_posterize_zero_bits)."""

    def __init__(self, images: np.ndarray, labels, transform=None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform
        restore_posterize_zero_bits(transform)

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


class _ArraysOnly(pickle.Unpickler):
    """An unpickler of plain containers and numpy arrays only: a CIFAR batch is data, so a
    planted file is refused instead of running code (torch's weights_only loader allows the
    same `_codecs.encode`, which Python 3's protocol-2 pickles use for bytes)."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")  # numpy 1 and 2
                 for name in ("_reconstruct", "scalar"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}; a CIFAR batch holds only arrays and lists")
        return super().find_class(module, name)


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
                    entry = _ArraysOnly(fh, encoding="latin1").load()
                entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
                x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = entry["labels"] if "labels" in entry else entry["fine_labels"]
            except Exception as e:
                raise TKPError(f"{folder / f} is not a readable {name} batch ({type(e).__name__}: "
                               f"{str(e)[:80]}); delete {folder} to download it again") from None
            if len(y) != len(x):
                raise TKPError(f"{folder / f} holds {len(x)} images but {len(y)} labels; "
                               f"delete {folder} to download it again")
            labels, classes = np.asarray(y), CIFAR_CLASSES[name]
            if len(labels) and (labels.dtype.kind not in "iu" or not 0 <= labels.min() <= labels.max() < classes):
                raise TKPError(f"{folder / f} holds labels outside 0..{classes - 1} (or not integers); "
                               f"delete {folder} to download it again")
            xs.append(x.transpose(0, 2, 3, 1))
            ys.append(labels.astype(np.int64))
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


def _make_skipping_image_folder():
    import multiprocessing

    import torchvision.datasets as tvd

    class SkippingImageFolder(tvd.ImageFolder):
        """An ImageFolder that serves an unreadable file (truncated, not an image, empty) as the
        next readable sample of the folder instead of raising, so that one bad file cannot end
        a long run. Each bad file is named once, in one line on stderr, by whichever process
        (main or DataLoader worker) meets it first; every substitution is counted. Both live in
        shared memory made here, in the main process, which DataLoader workers inherit, forked
        or spawned, started once or every epoch; `skipped_images` reads the count. Only loading
        fails over: an error in the transform still raises. timm's posterize in the transform
        answers 0 bits as Pillow < 13 did (restore_posterize_zero_bits)."""

        def __init__(self, root: str, transform=None):
            super().__init__(root, transform=transform)
            restore_posterize_zero_bits(transform)
            self.skip_count = multiprocessing.Value("q", 0)  # substitutions, summed over processes
            self.named = multiprocessing.Array("b", len(self.samples))  # 1: this file was named

        def name_bad_file(self, i: int, error: Exception) -> None:
            with self.named.get_lock():
                first, self.named[i] = not self.named[i], 1
            if first:
                reason = "not an image file Pillow can identify" if isinstance(error, UnidentifiedImageError) \
                    else (str(error).splitlines() or [""])[0][:160]
                print(f"warning: skipping unreadable image {self.samples[i][0]} ({type(error).__name__}: "
                      f"{reason}); serving the next readable one instead", file=sys.stderr, flush=True)

        def __getitem__(self, index: int):
            n = len(self.samples)
            for i in (j % n for j in range(index, index + n)):  # this file, then the ones after it
                try:
                    sample = self.loader(self.samples[i][0])
                except Exception as e:  # noqa: BLE001 - any failure to read or decode: a bad file
                    self.name_bad_file(i, e)
                    continue
                if i != index:
                    with self.skip_count.get_lock():
                        self.skip_count.value += 1
                target = self.samples[i][1]
                if self.transform is not None:
                    sample = self.transform(sample)
                if self.target_transform is not None:
                    target = self.target_transform(target)
                return sample, target
            raise TKPError(f"{self.root}: none of its {n} images can be read (see the warnings above)")

    SkippingImageFolder.__qualname__ = "SkippingImageFolder"  # pickled by name (spawned workers)
    return SkippingImageFolder


def _skipping_image_folder():
    """The class SkippingImageFolder, made on first use and kept: torchvision takes seconds to
    import, and a CIFAR run never needs it."""
    if "SkippingImageFolder" not in globals():
        globals()["SkippingImageFolder"] = _make_skipping_image_folder()
    return globals()["SkippingImageFolder"]


def __getattr__(name: str):
    """tkp_lib.data.SkippingImageFolder (PEP 562), for isinstance checks and for pickle."""
    if name == "SkippingImageFolder":
        return _skipping_image_folder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def skipped_images(data) -> int:
    """How many samples `data` (an image_folder, or a DataLoader, Subset or DeviceImageLoader
    over one) has served from another file because their own could not be read, counted in
    every process of this rank since the data set was made. Monotonic: an epoch's count is the
    difference of two readings. 0 for data sets that never skip (CIFAR arrays)."""
    while not hasattr(data, "skip_count") and hasattr(data, "dataset"):
        data = data.dataset  # DataLoader, Subset, DeviceImageLoader
    counter = getattr(data, "skip_count", None)
    return int(counter.value) if counter is not None else 0


def image_folder(root: Path, split: str, transform):
    """The SkippingImageFolder of `root/split` (one folder of images per class), with one-line
    errors for a missing folder, a flat folder (ImageNet's val/ as distributed) or no images."""
    folder = root / split
    if not folder.is_dir():
        raise TKPError(f"{folder} does not exist: --data-path must hold train/ and val/, "
                           f"each with one folder of images per class")
    if not any(p.is_dir() for p in folder.iterdir()):
        raise TKPError(f"{folder} holds no class folders: sort it into one folder per class (for "
                           f"ImageNet's flat val/, e.g. with the valprep.sh script from the "
                           f"PyTorch ImageNet example) and run again")
    try:
        return _skipping_image_folder()(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise TKPError(f"{folder}: {str(e).splitlines()[0]}") from None


CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def cifar32_transforms(dataset: str):
    """The from-scratch CIFAR recipe (DESIGN.md §5, VGG-8): RandomCrop(32, padding 4), flip,
    ColorJitter(brightness 0.2, contrast 0.2), the data set's mean/std; validation normalises."""
    import torchvision.transforms as T
    norm = T.Normalize(CIFAR_MEAN[dataset], CIFAR_STD[dataset])
    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                       T.ColorJitter(brightness=0.2, contrast=0.2), T.ToTensor(), norm])
    return train, T.Compose([T.ToTensor(), norm])


def upscaled_cifar_transforms(img_size: int):
    """The pretrained-CNN recipe for CIFAR (DESIGN.md §5): RandomResizedCrop(scale 0.2-1), flip,
    ColorJitter(0.2, 0.2, 0.2, 0.1), ImageNet mean/std; validation resizes to 256/224 of the
    crop size and center-crops."""
    import torchvision.transforms as T
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                       T.ColorJitter(0.2, 0.2, 0.2, 0.1), T.ToTensor(), norm])
    val = T.Compose([T.Resize(round(img_size * 256 / 224)), T.CenterCrop(img_size), T.ToTensor(), norm])
    return train, val


def _posterize_old_pillow(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with the answer Pillow < 13 gave for 0 bits kept: its lookup table
    was `i & ~(2 ** (8 - bits) - 1)`, which is 0 for every value, so an L or RGB image came
    back black (same mode and size). Pillow >= 13 raises ValueError instead."""
    from timm.data.auto_augment import posterize
    if bits_to_keep <= 0 and img.mode in ("L", "RGB"):
        return img.point([0] * (256 * len(img.getbands())))
    return posterize(img, bits_to_keep, **kwargs)


def restore_posterize_zero_bits(transform) -> int:
    """Give the posterize ops of timm's AutoAugment/RandAugment/AugMix inside `transform` the
    behaviour of the environment the recipes were made in (Pillow < 13), in place; returns how
    many ops carry it. timm's PosterizeIncreasing keeps 4 - 4 = 0 bits at magnitude 10, which
    rand-m9-mstd0.5-inc1 draws for about one image in 660: Pillow >= 13 then raises and the epoch
    dies. The policy is unchanged; only that call answers as older Pillow did (a black image).
    Nothing global is patched: other transforms, timm and Pillow are untouched. The data sets
    made here call it on their transform, so every recipe gets it."""
    if "timm" not in sys.modules:  # no timm op can be in the transform; importing timm is slow
        return 0
    from timm.data.auto_augment import AugmentOp, posterize
    found, todo = 0, [transform]
    while todo:
        t = todo.pop()
        if isinstance(t, (list, tuple)):
            todo.extend(t)
        elif isinstance(t, AugmentOp):
            if t.aug_fn is posterize:
                t.aug_fn = _posterize_old_pillow
            found += t.aug_fn is _posterize_old_pillow
        else:  # Compose.transforms, RandAugment.ops, AugMixAugment.ops, AutoAugment.policy
            todo.extend(v for v in (getattr(t, a, None) for a in ("transforms", "ops", "policy"))
                        if isinstance(v, (list, tuple)))
    return found


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
        # raises ValueError for unsupported transforms; Normalize's mean and std are put on the
        # device once here (a tensor built from host values per batch waits for the GPU to finish)
        self.steps = [(s[0], *(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in s[1:]))
                      if s[0] == "normalize" else s for s in _device_steps(dataset.transform)]
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


def _color_jitter(x: torch.Tensor, ranges, gen: torch.Generator) -> torch.Tensor:
    """ColorJitter on a float batch: per-image factors for brightness, contrast, saturation
    and hue (a range or None each), applied in a per-image random order, as torchvision draws them."""
    b, dev = len(x), x.device
    factors = [None if r is None else _uniform(b, r[0], r[1], gen, dev) for r in ranges]
    order = torch.rand(b, 4, generator=gen, device=dev).argsort(1)  # per-image random order
    if factors[3] is not None:  # the images that take their hue shift at each slot, read
        # back in one host sync for all four slots (a nonzero() per slot would wait four times)
        hue_slot = (order == 3).int().argmax(1)
        hue_at = hue_slot.argsort().split(torch.bincount(hue_slot, minlength=4).tolist())
    for slot in range(4):
        for op, factor in enumerate(factors):
            if factor is None:
                continue
            if op == 3:  # hue: only on the images whose turn it is
                idx = hue_at[slot]
                if len(idx):
                    x[idx] = _shift_hue(x[idx], factor[idx]).clamp(0, 1)
                continue
            # factor 1 leaves an image exactly as it is (x * 1 + m * 0 == x)
            fac = torch.where(order[:, slot] == op, factor, torch.ones_like(factor)).view(-1, 1, 1, 1)
            if op == 0:
                x = x * fac
            elif op == 1:
                x = x * fac + _gray(x).mean((1, 2, 3), keepdim=True) * (1 - fac)
            else:
                x = x * fac + _gray(x) * (1 - fac)
            x = x.clamp(0, 1)
    return x


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
            x = _color_jitter(x, step[1:], gen)
        elif name == "normalize":
            mean, std = (torch.as_tensor(v, device=dev).view(1, -1, 1, 1) for v in step[1:])
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
            train = DeviceImageLoader(train_set, args.batch_train, train=True, device=device, dist=dist, seed=args.seed)
            return (train,
                    DeviceImageLoader(val_set, args.batch_val, train=False, device=device, dist=dist),
                    DeviceImageLoader(train_set, args.batch_train, train=True, device=device, seed=args.seed))
        except (ValueError, AttributeError) as e:
            if args.data_loader == "device":
                raise TKPError(f"--data-loader device cannot serve this data set ({e}); use --data-loader "
                               f"torch") from None
    common = dict(num_workers=args.num_workers, device=device)
    return (make_loader(train_set, args.batch_train, train=True, dist=dist, seed=args.seed, **common),
            make_loader(val_set, args.batch_val, train=False, dist=dist, **common),
            make_loader(train_set, args.batch_train, train=True, num_workers=0, device=device,
                        dist=Dist(), seed=args.seed))
