"""One run's folder and files: the folder claimed and locked for the run (a second run, or a
finished run not overwritten without --overwrite), cleaned up after a failure; atomic saves
(a full disk is one line, the previous file intact); the console and files of the main
process (Output); and a final.pt read back checked before anything is built from it.
May import: tkp_lib.runtime, tkp_lib.report. Never the driver (tkp_common).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from tkp_lib.report import check_sparsity
from tkp_lib.runtime import Dist, TKPError, clean_state_dict
from tkp_lib.sparsity import Plan

LOCK_FILE = ".tkp.lock"  # in a run's folder while it runs


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write
    never leaves a half-written file under `path`. A full disk is one line (TKPError)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a saved run is for sharing
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, Exception):
            raise_if_disk_full(e, path)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file and a rename; a full disk is one line."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise_if_disk_full(e, path)
        raise


def raise_if_disk_full(e: BaseException, path: Path) -> None:
    """A TKPError naming the folder when writing `path` failed for want of space: an OSError
    ENOSPC/EDQUOT in `e` or the exceptions it was raised from (torch's zip writer reports it as
    RuntimeError "[enforce fail at inline_container.cc...]" raised while handling it), or that
    RuntimeError alone (torch writing to a path itself, when the disk is full). The file that
    was there before is left as it was."""
    cause, reason = e, None
    while cause is not None and reason is None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    if reason is None and isinstance(e, RuntimeError) and "inline_container" in str(e):
        reason = f"no space left on device (torch's writer failed: {str(e).splitlines()[0][:80]})"
    if reason is not None:
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        checkpoint = path.parent / "checkpoint_last.pt"
        then = f"continue with --resume {checkpoint}" if checkpoint.exists() else "run again"
        raise TKPError(f"cannot write {path.name} in {path.parent}: {reason}{kept}; free some space, "
                       f"then {then}") from None


def lock_folder(folder: Path):
    """Lock `folder` for one run: an exclusive flock on folder/.tkp.lock, held until
    unlock_folder(). The OS drops it when the process ends, however it ends, so a killed run
    leaves no stale lock. Another process that asks gets one line naming the folder and the
    holder. Returns the lock (an open file), or None where the platform or the file system has
    no flock (Windows, some network file systems): the run then goes on unlocked."""
    try:
        import fcntl
    except ImportError:
        return None
    path = folder / LOCK_FILE
    while True:
        fh = open(path, "a+")  # "a+": opening does not erase the holder's line
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise TKPError(f"{folder} is in use by another run{f' ({holder})' if holder else ''}; wait for it "
                           f"to end, or choose another --output-dir") from None
        except OSError as e:  # e.g. a network file system without locks
            fh.close()
            print(f"warning: cannot lock {folder} ({e.strerror}); another run into it would not be stopped",
                  file=sys.stderr, flush=True)
            return None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        fh.close()  # the run that held it removed the file as it ended: lock the new one
    fh.seek(0)
    fh.truncate()
    fh.write(f"process {os.getpid()} on {platform.node()}\n")
    fh.flush()
    return fh


def unlock_folder(lock, folder: Path) -> None:
    """Release lock_folder()'s lock and remove its file."""
    if lock is not None:
        with contextlib.suppress(OSError):
            os.unlink(Path(folder) / LOCK_FILE)
        lock.close()


class Output:
    """Console lines and files of the main process; silent on other ranks."""

    def __init__(self, folder: Path | None, dist: Dist):
        self.folder, self.dist = folder, dist

    def print(self, line: str) -> None:
        if self.dist.is_main:
            print(line, flush=True)

    def write_json(self, name: str, obj) -> None:
        if self.dist.is_main:
            write_text_atomic(self.folder / name, json.dumps(obj, indent=2, default=str) + "\n")

    def write_log(self, history: list[dict]) -> None:
        if self.dist.is_main:
            write_text_atomic(self.folder / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def save(self, obj, name: str) -> None:
        if self.dist.is_main:
            save_atomic(obj, self.folder / name)


# What a run writes into its folder: --overwrite removes these (and only these) of an earlier
# run; the temporary files of their interrupted saves (".checkpoint_last.pt.*.tmp") go at the
# next start. A folder holding one of FINISHED_FILES holds a finished run.
RUN_FILES = ("args.json", "log.jsonl", "checkpoint_last.pt", "final.pt", "final_qat.pt", "summary.json",
             "tap_frequencies.png", "training_curves.png")
FINISHED_FILES = ("final.pt", "final_qat.pt", "summary.json")


def prepare_output_dir(args, name: str, dist: Dist):
    """Resolve --output-dir, create it and lock it for the run (rank 0; every process stops if
    that fails); never adopt a folder that holds another run, unless --overwrite.
    Returns the folder, whether this call created it, and the lock."""
    temporary = False
    if args.output_dir is None:
        if args.resume:
            args.output_dir = str(Path(args.resume).parent)
        elif args.dry_run:
            args.output_dir, temporary = tempfile.mkdtemp(prefix=f"tkp-dry-run-{name}-"), True
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            args.output_dir = str(Path("runs") / f"{name}-{stamp}")
    folder = Path(args.output_dir)
    created = temporary or not folder.exists()
    lock, error = None, None
    if dist.is_main:
        try:
            lock = claim_folder(folder, args)
        except TKPError as e:
            error = str(e)
    if dist.enabled:  # the other processes wait for rank 0's verdict
        verdict = [error]
        torch_dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        if dist.is_main:
            raise TKPError(error)
        raise SystemExit(2)  # rank 0 says why, in one line
    return folder, created, lock


def claim_folder(folder: Path, args):
    """Rank 0: create and lock `folder`; refuse another run's folder (a run in progress, a
    checkpoint that is not the one resumed, a finished run), or clear it with --overwrite;
    remove the temporary files of an interrupted save. Returns the lock."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TKPError(f"cannot create --output-dir {folder}: {e.strerror}") from None
    lock = lock_folder(folder)
    try:
        existing = folder / "checkpoint_last.pt"
        resumed_here = bool(args.resume) and existing.exists() and existing.resolve() == Path(args.resume).resolve()
        finished = [name for name in FINISHED_FILES if (folder / name).exists()]
        if resumed_here and args.overwrite:
            raise TKPError(f"--overwrite would delete {existing}, which --resume continues; leave --overwrite out")
        if existing.exists() and not resumed_here and not args.overwrite:
            raise TKPError(f"{folder} already holds a run; continue it with --resume {existing}, start it over "
                           f"with --overwrite, or choose another --output-dir")
        if finished and not resumed_here and not args.overwrite:
            raise TKPError(f"{folder} holds a finished run ({', '.join(finished)}); choose another --output-dir, "
                           f"or pass --overwrite to replace it")
        stale = [p for name in RUN_FILES for p in folder.glob(f".{name}.*tmp")]
        old = [folder / name for name in RUN_FILES if args.overwrite and (folder / name).exists()]
        for path in stale + old:
            path.unlink()
    except BaseException:
        unlock_folder(lock, folder)
        raise
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save from {folder}", flush=True)
    if old:
        print(f"--overwrite: removed the earlier run's {', '.join(p.name for p in old)} from {folder}", flush=True)
    return lock


def clean_up(folder: Path, created: bool, temporary: bool, failed: bool, lock, out: Output) -> None:
    """After a run: remove a --dry-run's temporary folder; after a failure with no checkpoint
    saved, remove the files the run wrote first (args.json, log.jsonl) and the folder if this
    run created it and nothing else is in it. Releases the folder's lock."""
    if out.dist.is_main and folder.is_dir():
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
            out.print(f"dry run: removed {folder} (pass --output-dir to keep the outputs)")
        elif failed and not (folder / "checkpoint_last.pt").exists():
            for name in ("args.json", "log.jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
    unlock_folder(lock, folder)
    if out.dist.is_main and failed and created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing else is in it


def check_final(ckpt: dict, path: str, parser: argparse.ArgumentParser | None = None, finite: bool = True,
                ignore: set[str] = frozenset()) -> None:
    """Refuse a damaged final.pt (or final_qat.pt) before anything is built from it, in one line
    that blames the file: model, masks or args that are not dicts, weights that are not
    tensors (not finite ones, with `finite`: a checkpoint of QAT holds observers' infinite
    starting values), masks that are not bool tensors of their weight's shape, and (given the
    script's parser) args the script's command line could not have produced (but the flags in
    `ignore`, which describe the machine rather than the run)."""
    missing = sorted({"model", "masks", "args"} - set(ckpt))
    if missing:
        raise TKPError(f"{path} is not a TKP final.pt (it lacks {'/'.join(missing)})")
    for part in ("model", "masks", "args"):
        if not isinstance(ckpt[part], dict) or not all(isinstance(k, str) for k in ckpt[part]):
            raise TKPError(f"{path} is damaged: its {part} is a {type(ckpt[part]).__name__}, not a dict by name")
    state = ckpt["model"]
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or (finite and value.is_floating_point() and not value.isfinite().all()):
            raise TKPError(f"{path} is damaged: its weight {name} is not a finite tensor")
        if name.endswith("running_var") and value.is_floating_point() and (value < 0).any():
            raise TKPError(f"{path} is damaged: its {name} (a BatchNorm variance) is negative")
    state = clean_state_dict(state)
    for name, mask in ckpt["masks"].items():
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and name in state
                and mask.shape == state[name].shape):
            raise TKPError(f"{path} is damaged: its mask {name} is not a bool tensor of that weight's shape")
    if parser is not None:
        check_saved_args(ckpt["args"], parser, path, ignore)


def check_saved_args(saved: dict, parser: argparse.ArgumentParser, path: str, ignore: set[str] = frozenset()) -> None:
    """Every science flag of a final.pt must hold a value that one of the parser's actions for
    it produces (its type and choices): a damaged value would fail deep in model building."""
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, []).append(action)
    for key, value in saved.items():
        if key in actions and key not in ignore and not any(_produces(a, value) for a in actions[key]):
            raise TKPError(f"{path} is damaged: its args give --{key.replace('_', '-')} the value {value!r}, "
                           f"which the script's command line cannot produce")


def _produces(action: argparse.Action, value) -> bool:
    """Whether the command line can give `action.dest` the value `value` through `action`."""
    if type(value) is type(action.default) and value == action.default:
        return True
    if action.nargs == 0:  # store_true, store_false, store_const
        return type(value) is type(action.const) and value == action.const
    if isinstance(value, bool) or not isinstance(value, (str, int, float, list)):
        return False
    if action.choices is not None and value not in action.choices:
        return False
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        return (action.type or str)(text) == value
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False


def check_file_masks(module: nn.Module, plan: Plan, masks: dict, path: str, model_name: str) -> None:
    """A final.pt's masks against the model rebuilt from it: one per pruned layer, and every
    pruned weight zero (a violation is the file's fault here, not the training's)."""
    if set(masks) != {t.name for t in plan.targets}:
        raise TKPError(f"{path}: its masks do not match the pruned layers of its {model_name} model")
    try:
        check_sparsity(module, plan, masks)
    except RuntimeError as e:
        raise TKPError(f"{path} is damaged: {str(e).split(' (a TKP bug')[0]}") from None
