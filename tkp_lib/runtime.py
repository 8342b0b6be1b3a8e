"""TKP runtime: what every run needs around the method.

Owns: user errors (TKPError) and the one-line exit of `cli`, the command-line types and the
flags every script shares, process setup (torchrun, device, precision, seeds, SIGTERM), and
reading files (checkpoints, weights: never as code). A run's folder and its writes: runs.
May import: torch and the standard library only; every other tkp_lib module may import it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import random
import re
import signal
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

# ==== Errors and command line ============================================================


class TKPError(Exception):
    """A problem the user can fix. Printed as one line; the process exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message. It also records which flags the command line
    gave explicitly (`args.explicit_flags`): a resumed run takes every other setting from
    its checkpoint, and compares only these."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if not getattr(self, "_probe", False):
            parsed.explicit_flags = sorted(self._given(args))
        return parsed, rest

    def _given(self, args) -> set[str]:
        """The destinations the command line set: parse again with every default suppressed."""
        probe = copy.deepcopy(self)
        probe._probe = True
        probe._defaults = {}
        for action in probe._actions:
            action.default = argparse.SUPPRESS
        return set(vars(probe.parse_known_args(args)[0]))


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
    except Terminated:
        sys.exit(143)  # 128 + SIGTERM, as if the signal had ended it; run() has said how to continue
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


def beta_value(text: str) -> float | str:
    """argparse type of --beta: a finite float >= 0, or 'auto' (chosen when stage 1 starts)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = nonneg_float(text)
    except argparse.ArgumentTypeError:
        value = None
    if value is None or value > BETA_MAX:
        raise argparse.ArgumentTypeError(f"expected a number in 0..{BETA_MAX:g} or 'auto', got {text!r}")
    return value


BETA_MAX = 1e30  # beta * dL_aux/dw is added to float32 gradients (at most about 3.4e38)


def beta_ratio(text: str) -> float:
    """argparse type of --beta-ratio: a float in (0, 1e6] (--beta auto's beta must stay a float32)."""
    value = positive_float(text)
    if value > 1e6:
        raise argparse.ArgumentTypeError(f"must be at most 1e6, got {text!r}")
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


def nm_pattern(text: str) -> str:
    """argparse type of --sparsity-type: 'dense' or 'N:M' with 1 <= N < M."""
    if text == "dense":
        return text
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'N:M' (e.g. 2:4) or 'dense', got {text!r}") from None
    if not 1 <= n < m:
        raise argparse.ArgumentTypeError(f"N:M needs 1 <= N < M, got {text}")
    return f"{n}:{m}"


def path_arg(text: str) -> str:
    """argparse type: a path, not an empty string (which would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def int_list(lo: int = 1) -> Callable[[str], list[int]]:
    """argparse type: comma-separated integers >= lo, e.g. '1,32' (duplicates dropped)."""

    def parse(text: str) -> list[int]:
        try:
            values = list(dict.fromkeys(int(v) for v in comma_list(text)))
        except ValueError:
            values = []
        if not values or min(values) < lo:
            raise argparse.ArgumentTypeError(f"expected integers >= {lo} like 1,32, got {text!r}")
        return values

    return parse


def comma_list(text: str) -> list[str]:
    """argparse type: 'a,b,c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows defaults, except None and False (no value to show)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def default_workers() -> int:
    """4 DataLoader workers, or as many as this process may use cores if that is fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores)


def base_parser(description: str) -> ArgumentParser:
    """The flags every script shares. Each script adds its model, data, batch and sparsity
    flags and sets its own defaults (the paper's table row) with set_defaults()."""
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("regularizer (stage 1)")
    g.add_argument("--reg-type", choices=["none", "l2", "exponential"], default="exponential",
                   help="auxiliary loss on the entries outside each group's top K")
    g.add_argument("--beta", type=beta_value,
                   help="weight of the auxiliary loss, or 'auto': the weight that puts beta * L_aux at "
                        "--beta-ratio times the cross-entropy when stage 1 starts (README, 'Choosing --beta')")
    g.add_argument("--beta-ratio", type=beta_ratio, default=5.0,
                   help="with --beta auto: the starting ratio of beta * L_aux to the cross-entropy")
    p.set_defaults(beta_auto=None)  # what --beta auto measured and chose (set by the run)
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
    g.add_argument("--val-freq", type=int_range(1), default=5,
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
    g.add_argument("--seed", type=int_range(0, 2**31 - 1), default=42, help="seed of every random draw")
    g.add_argument("--num-workers", type=int_range(0), default=default_workers(),
                   help="DataLoader worker processes (default: 4, or the machine's cores if fewer)")
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
    g.add_argument("--output-dir", default=None, type=path_arg,
                   help="where args.json, log.jsonl, checkpoints and summary.json go "
                        "(default: runs/<script>-<time>, or the folder of --resume)")
    g.add_argument("--resume", default=None, metavar="CKPT", type=path_arg,
                   help="continue the run saved in CKPT (a checkpoint_last.pt)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output-dir that holds another run: its args.json, log.jsonl, "
                        "checkpoint_last.pt, final.pt, final_qat.pt, summary.json and figures are removed "
                        "first (other files stay)")
    g.add_argument("--eval", default=None, metavar="CKPT", type=path_arg,
                   help="evaluate a final.pt on the validation set and print its summary (with "
                        "--dry-run: on the dry run's generated images)")
    g.add_argument("--dry-run", action="store_true",
                   help="the whole two-stage pipeline on a few generated images, to check an install")
    return p


def add_topk_args(p: ArgumentParser) -> None:
    """Flags of the CNN scripts: the Top-K mask and the batch sizes."""
    g = p.add_argument_group("Top-K sparsity")
    g.add_argument("--topk", type=int_range(1), default=1,
                   help="taps kept per kernel, 1..9 for 3x3 networks, up to the largest kernel's taps minus "
                        "one (kernels with at most this many taps stay dense)")
    g.add_argument("--exclude-layers", type=comma_list, default=[],
                   help="comma-separated Conv2d names or prefixes kept dense, e.g. conv1")
    g.add_argument("--tap-group", type=int_range(1), default=1,
                   help="G consecutive output channels share their kept tap positions for each input channel "
                        "(1: every kernel chooses its own, the paper's TKP; e.g. 32 for dense-GEMM-speed deployment)")
    g.add_argument("--dense-baseline", action="store_true",
                   help="same pipeline with no mask and no regularizer (the paper's baseline)")
    g = p.add_argument_group("batches")
    g.add_argument("--batch-train", type=int_range(1), help="training batch per process (per micro-step)")
    g.add_argument("--batch-val", type=int_range(1), help="validation batch per process")


# ==== Processes, device, precision, seeds ================================================


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's preemption, `kill`), raised where the run is, as Ctrl-C raises
    KeyboardInterrupt: whatever stops a run on Ctrl-C stops it on SIGTERM."""


@contextlib.contextmanager
def sigterm_stops():
    """For the life of the block, SIGTERM raises Terminated in the main thread (the previous
    handler is restored after): the step in flight is dropped, the last checkpoint kept. A
    second SIGTERM is ignored while the run stops. An error that follows a SIGTERM (a
    DataLoader worker or another process of the job, killed by the same signal) is raised as
    Terminated. Outside the main thread, where Python sets no handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Exception as e:
        if received:
            raise Terminated() from e
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def resolve_amp(args, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. CPU autocast runs only when asked for."""
    if args.no_amp:
        return None
    if device.type == "cpu":
        return {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype]
    if args.amp_dtype == "auto":
        return torch.bfloat16 if gpu_has_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype]


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (Ampere, compute capability 8.0, and newer).
    torch.cuda.is_bf16_supported() alone also counts emulation, which pre-Ampere GPUs (V100,
    T4) offer for some ops but cuDNN's convolutions do not."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before the argument existed
        return torch.cuda.get_device_capability(device) >= (8, 0) and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The run's autocast context: `amp_dtype` (bf16/fp16) on `device`, or off for fp32."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


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


def versions(device: torch.device | str | None = None) -> dict:
    """Python, torch, torchvision and timm versions; with a CUDA `device` (or where CUDA is
    already in use: its current device) also CUDA, cuDNN and the GPU's compute capability.
    A CPU run does not start CUDA for it."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    device = None if device is None else torch.device(device)
    gpu = device if device is not None and device.type == "cuda" else None
    if gpu is not None or (device is None and torch.cuda.is_available() and torch.cuda.is_initialized()):
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),  # what GPU figures depend on
                   gpu_capability=".".join(map(str, torch.cuda.get_device_capability(gpu))))
    return out


def all_reduce_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        x = x.clone()
        torch_dist.all_reduce(x)
    return x


def plain(obj):
    """`obj` as plain Python values only (str for anything else), so that files holding it
    load with torch.load(weights_only=True)."""
    return json.loads(json.dumps(obj, default=str))


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ==== Files: checkpoints, weights, run outputs ===========================================


def matches_prefix(name: str, prefixes) -> bool:
    """Whether `name` is one of `prefixes` or lies under one ('features' matches 'features.0')."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


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
    bad = next((k for k, v in obj.items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad is not None:  # else the first epoch would end as a non-finite loss, blamed on --lr
        raise TKPError(f"{what} {path}: its {bad} is not finite (NaN or inf); pass a good weights file")
    return clean_state_dict(obj)


def load_weights(module: nn.Module, state: dict, path: str, replaceable: tuple[str, ...] = ()) -> list[str]:
    """Load `state` strictly, except that entries under the `replaceable` prefixes (a
    classifier) whose shapes differ from the model's are left as initialised: ImageNet weights
    load into a 100-class model, and weights that already have 100 classes load whole.
    A mismatch elsewhere is one line that says what differs. Returns the skipped keys."""
    own = module.state_dict()
    skipped = [k for k in own if matches_prefix(k, replaceable) and k in state and state[k].shape != own[k].shape]
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


# torchvision's file names carry the first digits of their SHA-256: googlenet-1378be20.pth
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def download_weights(weights) -> dict:
    """The state_dict of a torchvision weights enum, from torch.hub's cache (downloaded there
    first when missing; offline, one line naming the alternatives). We read the file ourselves,
    with weights_only=True, and check it against the SHA-256 prefix its name carries: torch.hub
    checks the hash only while downloading and unpickles a cached file with code
    (weights_only=False), so a file planted in the cache would run."""
    name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    expected = HASH_IN_NAME.search(name)
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(cached), expected and expected.group(1), progress=True)
        except Exception as e:
            detail = (str(e).splitlines() or [""])[0][:100]
            raise TKPError(f"could not download the pretrained weights {weights} ({type(e).__name__}: {detail}); "
                           f"offline, pass --pretrain-path FILE (a copy of {weights.url}; a copy at {cached} "
                           f"is found too) or train from scratch with --no-pretrain") from None
    if expected and not file_sha256(cached).startswith(expected.group(1)):
        raise TKPError(f"{cached} is not {weights.url}: its SHA-256 does not start with {expected.group(1)}; "
                       f"delete it to download it again, or pass --pretrain-path FILE")
    return read_state_dict(str(cached), "cached weights file")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every torch.load reads tensors and plain values only, whatever the
    caller asks for (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD): for libraries that load
    pretrained files themselves (timm, open_clip), whose older versions pass weights_only=False."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


