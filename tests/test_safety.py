"""What protects a user's machine and runs: pretrained files never run code, one run per
output folder, a finished run is not overwritten, SIGTERM stops like Ctrl-C, a full disk and a
damaged final.pt are one line, and a run that diverged (but stayed finite) says so."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
import torchvision.models as tvm
from conftest import ROOT, write_cifar

import clip_vit
import googlenet_optimized as googlenet
import tkp_common as tkp
import vgg8_optimized as vgg8
import vit_small
from tkp_lib import report, runs, runtime


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


def test_a_planted_cifar_batch_is_refused_not_run(tmp_path):
    """CIFAR's batches are pickles: they are read with an unpickler that builds arrays and
    lists only, so a planted data_batch_1 is one line and runs nothing."""
    import pickle

    root = write_cifar(tmp_path / "data", "cifar10", n_train=20, n_test=10)
    folder = root / "cifar-10-batches-py"
    from tkp_lib.data import load_cifar
    assert load_cifar(str(root), "cifar10", download=False)[0].shape == (20, 32, 32, 3)  # the real format reads
    marker = tmp_path / "PWNED"
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({"data": Payload(marker), "labels": [0]}, fh, protocol=2)
    with pytest.raises(tkp.TKPError, match=r"data_batch_1 is not a readable cifar10 batch .*(posix|os)\.mkdir"):
        load_cifar(str(root), "cifar10", download=False)
    assert not marker.exists()



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
    assert torch.equal(runtime.download_weights(weights)["w"], torch.ones(3))
    assert calls == [(weights.url, digest)] and cache.is_file()
    assert torch.equal(runtime.download_weights(weights)["w"], torch.ones(3))  # cached: no download
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


# ---- 3. one run per output folder; a finished run is not overwritten ----------------------

TINY = ["--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-train", "20", "--batch-val", "20",
        "--num-workers", "0", "--bn-recal-batches", "1", "--progress-every", "0", "--topk", "2"]


def vgg8_run(data, out, *extra):
    return vgg8.main(["--data-root", str(data), "--output-dir", str(out), *TINY, *extra])


def test_a_second_run_into_a_folder_in_use_ends_in_one_line(cifar10_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = runs.lock_folder(out)  # what the first run holds while it trains
    try:
        with pytest.raises(tkp.TKPError, match=f"{out} is in use by another run .process {os.getpid()} on "):
            vgg8_run(cifar10_root, out)
        assert sorted(p.name for p in out.iterdir()) == [".tkp.lock"]  # nothing of the first run touched
    finally:
        runs.unlock_folder(lock, out)
    vgg8_run(cifar10_root, out)
    assert not (out / ".tkp.lock").exists()  # released and removed when the run ends
    runs.unlock_folder(runs.lock_folder(out), out)


def test_resume_into_the_folder_of_a_live_run_is_refused(cifar10_root, tmp_path, crash_after_first_save):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        vgg8_run(cifar10_root, out)
    lock = runs.lock_folder(out)
    try:
        with pytest.raises(tkp.TKPError, match="is in use by another run"):
            vgg8.main(["--resume", str(out / "checkpoint_last.pt")])
    finally:
        runs.unlock_folder(lock, out)


@pytest.fixture
def crash_after_first_save(monkeypatch):
    real = runs.save_atomic

    def save(obj, path):
        real(obj, path)
        monkeypatch.setattr(runs, "save_atomic", real)
        raise Crash()

    monkeypatch.setattr(runs, "save_atomic", save)


class Crash(Exception):
    pass


def test_a_finished_run_is_refused_and_replaced_only_with_overwrite(cifar10_root, tmp_path):
    out = tmp_path / "run"
    vgg8_run(cifar10_root, out)
    (out / "checkpoint_last.pt").unlink()  # kept: final.pt, summary.json, log.jsonl, args.json
    (out / "training_curves.png").write_bytes(b"the earlier run's figure")
    (out / "notes.txt").write_text("mine")
    before = (out / "final.pt").read_bytes()
    with pytest.raises(tkp.TKPError, match=r"holds a finished run \(final.pt, summary.json\); .* --overwrite"):
        vgg8_run(cifar10_root, out, "--epochs-stage1", "0")
    assert (out / "final.pt").read_bytes() == before
    vgg8_run(cifar10_root, out, "--epochs-stage1", "0", "--overwrite")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in log] == [(2, 1)]  # the earlier run's stage 1 is gone
    assert json.loads((out / "summary.json").read_text())["epochs_stage1"] == 0
    assert not (out / "training_curves.png").exists() and (out / "notes.txt").read_text() == "mine"


def test_overwrite_is_not_inherited_by_a_resume_nor_allowed_with_one(cifar10_root, tmp_path, crash_after_first_save):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        vgg8_run(cifar10_root, out, "--overwrite")
    ckpt = str(out / "checkpoint_last.pt")
    with pytest.raises(tkp.TKPError, match="--overwrite would delete .*checkpoint_last.pt, which --resume continues"):
        vgg8.main(["--resume", ckpt, "--overwrite"])
    assert vgg8.main(["--resume", ckpt])["final_top1"] is not None


def test_temporary_files_of_an_interrupted_save_go_at_the_next_start(cifar10_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".checkpoint_last.pt.k3j2h1.tmp", ".final.pt.a8b7c6.tmp", ".log.jsonl.tmp"]
    for name in stale + [".mine.tmp"]:
        (out / name).write_bytes(b"x" * 100)
    vgg8_run(cifar10_root, out)
    assert "removed 3 temporary file(s) of an interrupted save" in capsys.readouterr().out
    assert not [name for name in stale if (out / name).exists()] and (out / ".mine.tmp").exists()


def test_a_run_under_torchrun_into_a_folder_in_use_ends_in_one_line(cifar10_root, tmp_path):
    """Only rank 0 takes the lock; the other ranks wait for its verdict and end quietly."""
    out = tmp_path / "run"
    out.mkdir()
    lock = runs.lock_folder(out)
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "vgg8_optimized.py", "--data-root", str(cifar10_root), "--output-dir", str(out),
                            "--device", "cpu", *TINY], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        runs.unlock_folder(lock, out)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "is in use by another run" in ours[0], r.stderr
    assert "vgg8_optimized.py\", line" not in r.stderr  # no traceback from any rank


# ---- 4. SIGTERM stops a run as Ctrl-C does ----------------------------------------------

# Runs vgg8_optimized.py's command line with a SIGTERM sent at a chosen moment: WHEN=step:N
# to the whole process group (as a cluster does: DataLoader workers too) before optimizer step
# N, WHEN=data to the process itself while the data set is being built.
CHILD = """
import os, signal, sys
import tkp_common as tkp, vgg8_optimized as vgg8
from tkp_lib import train as tkp_train
when, real_step, steps = os.environ["WHEN"], tkp_train.optimizer_step, [0]

def step(t):
    steps[0] += 1
    if when == f"step:{steps[0]}":
        os.killpg(os.getpgrp(), signal.SIGTERM)
    return real_step(t)

def build_data(args, build=vgg8.SCRIPT.build_data):
    if when == "data":
        os.kill(os.getpid(), signal.SIGTERM)
    return build(args)

tkp_train.optimizer_step, vgg8.SCRIPT.build_data = step, build_data
tkp.cli(vgg8.main)
"""


def terminated_run(tmp_path, when, *args):
    (tmp_path / "child.py").write_text(CHILD)
    return subprocess.run([sys.executable, str(tmp_path / "child.py"), *args], capture_output=True, text=True,
                          timeout=300, start_new_session=True,  # its own process group, away from pytest's
                          env={**os.environ, "WHEN": when, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def test_sigterm_keeps_the_last_checkpoint_and_says_how_to_continue(cifar10_root, tmp_path):
    out = tmp_path / "run"
    # 60 images in batches of 20: step 5 is the middle of stage 1's second epoch
    r = terminated_run(tmp_path, "step:5", "--data-root", str(cifar10_root), "--output-dir", str(out), *TINY,
                       "--epochs-stage1", "2", "--epochs-stage2", "0", "--num-workers", "1")
    assert r.returncode == 143, r.stderr
    assert r.stderr == ""  # no traceback, from the run or its DataLoader worker
    assert r.stdout.splitlines()[-1] == f"terminated (SIGTERM): continue with --resume {out / 'checkpoint_last.pt'}"
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (1, 1)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "checkpoint_last.pt", "log.jsonl"]
    vgg8.main(["--resume", str(out / "checkpoint_last.pt"), "--num-workers", "0"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in log] == [(1, 1), (1, 2)]


def test_sigterm_before_the_first_epoch_leaves_no_folder(cifar10_root, tmp_path):
    out = tmp_path / "run"
    r = terminated_run(tmp_path, "data", "--data-root", str(cifar10_root), "--output-dir", str(out), *TINY)
    assert r.returncode == 143 and r.stderr == ""
    assert r.stdout.splitlines()[-1] == "terminated (SIGTERM) before the first epoch finished: nothing was saved"
    assert not out.exists()


def test_the_sigterm_handler_lives_as_long_as_the_run(cifar10_root, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    real = runs.save_atomic

    def save(obj, path):
        seen.append(signal.getsignal(signal.SIGTERM))
        real(obj, path)

    runs.save_atomic = save
    try:
        vgg8_run(cifar10_root, tmp_path / "run", "--epochs-stage1", "0")
    finally:
        runs.save_atomic = real
    assert seen and all(h is not before and callable(h) for h in seen)
    assert signal.getsignal(signal.SIGTERM) is before


# ---- 5. a full disk, and a damaged final.pt, are one line --------------------------------

ZIP_WRITER = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def disk_full(kind):
    """What torch.save raises when the disk fills: through a Python file, an OSError ENOSPC and
    torch's zip-writer RuntimeError raised while handling it; writing a path, that RuntimeError."""
    if kind == "oserror":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if kind == "zip-writer":
        raise RuntimeError(ZIP_WRITER)
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError(ZIP_WRITER)  # noqa: B904 (chained by context, as torch raises it)


@pytest.mark.parametrize("kind", ["oserror", "zip-writer", "both"])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_file(kind, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    runs.save_atomic({"epoch": 1}, path)

    def save(obj, fh):
        fh.write(b"x" * 1000)  # part of the file was written
        disk_full(kind)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(tkp.TKPError) as err:
        runs.save_atomic({"epoch": 2}, path)
    assert str(err.value).startswith(f"cannot write checkpoint_last.pt in {tmp_path}: no space left on device")
    assert "the previous checkpoint_last.pt is intact" in str(err.value) and "\n" not in str(err.value)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]  # no temporary file left


def test_a_full_disk_during_a_run_ends_in_one_line(cifar10_root, tmp_path, monkeypatch):
    out, real, calls = tmp_path / "run", torch.save, []

    def save(obj, fh):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of stage 1's second epoch
            disk_full("both")
        real(obj, fh)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(tkp.TKPError, match=f"cannot write checkpoint_last.pt in {out}: no space left on device; "
                                           f"the previous checkpoint_last.pt is intact; free some space, then "
                                           f"continue with --resume {out / 'checkpoint_last.pt'}"):
        vgg8_run(cifar10_root, out, "--epochs-stage1", "2")
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_while_writing_json_is_one_line(tmp_path, monkeypatch):
    def write_text(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runtime.Path, "write_text", write_text)
    with pytest.raises(tkp.TKPError, match=f"cannot write summary.json in {tmp_path}: no space left on device"):
        runs.Output(tmp_path, runtime.Dist()).write_json("summary.json", {})


@pytest.fixture(scope="module")
def final_pt(tmp_path_factory):
    """(data root, a vgg8 final.pt) to damage in copies."""
    root = tmp_path_factory.mktemp("final")
    data = write_cifar(root / "data", "cifar10", n_train=60, n_test=20)
    vgg8_run(data, root / "run", "--epochs-stage1", "0")
    return data, root / "run" / "final.pt"


def nan_weight(ckpt):
    ckpt["model"]["features.0.weight"][0, 0, 0, 0] = float("nan")


def float_masks(ckpt):
    ckpt["masks"] = {k: v.float() for k, v in ckpt["masks"].items()}


def short_mask(ckpt):
    ckpt["masks"]["features.0.weight"] = ckpt["masks"]["features.0.weight"][:1]


def revived_weight(ckpt):
    w, keep = ckpt["model"]["features.3.weight"], ckpt["masks"]["features.3.weight"]
    w[~keep] = 0.5  # the mask says pruned, the weight is not zero


DAMAGES = {
    "nan weights": (nan_weight, "is damaged: its weight features.0.weight is not a finite tensor"),
    "no masks": (lambda c: c.pop("masks"), "is not a TKP final.pt .it lacks masks."),
    "float masks": (float_masks, "is damaged: its mask features.0.weight is not a bool tensor"),
    "short mask": (short_mask, "is damaged: its mask features.0.weight is not a bool tensor of that weight's shape"),
    "args a list": (lambda c: c.update(args=[1, 2]), "is damaged: its args is a list, not a dict"),
    "topk a string": (lambda c: c["args"].update(topk="2"), "its args give --topk the value '2', which"),
    "unknown dataset": (lambda c: c["args"].update(dataset="cifar1000"), "give --dataset the value 'cifar1000'"),
    "revived weight": (revived_weight, "is damaged: features.3.weight: a pruned weight is non-zero$"),
    "negative variance": (lambda c: c["model"]["features.1.running_var"].fill_(-1.0),
                          "is damaged: its features.1.running_var .a BatchNorm variance. is negative"),
}


def damaged_copy(source, change, path):
    """`path`: a copy of the checkpoint `source` with `change` applied to what it holds."""
    ckpt = torch.load(source, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_final_pt_is_one_line_that_blames_the_file(damage, final_pt, tmp_path):
    data, good = final_pt
    change, message = DAMAGES[damage]
    path = damaged_copy(good, change, tmp_path / "final.pt")
    with pytest.raises(tkp.TKPError, match=message) as err:
        vgg8.main(["--eval", str(path), "--data-root", str(data), "--num-workers", "0"])
    assert str(err.value).startswith(str(path)) and "TKP bug" not in str(err.value)
    with pytest.raises(tkp.TKPError, match=message):
        tkp.load_trained(str(path))


def test_the_undamaged_final_pt_evaluates_and_loads(final_pt):
    data, good = final_pt
    assert vgg8.main(["--eval", str(good), "--data-root", str(data), "--num-workers", "0"])["sparsity"] == "top-2"
    assert tkp.load_trained(str(good)).script.name == "vgg8"


RESUME_DAMAGES = {
    "topk negative": (lambda c: c["args"].update(topk=-5), "its args give --topk the value -5"),
    "lr nan": (lambda c: c["args"].update(lr=float("nan")), "its args give --lr the value nan"),
    "no rng": (lambda c: c.pop("rng"), "is damaged: its rng is missing"),
    "rng garbage": (lambda c: c.update(rng={"torch": torch.zeros(3), "python": []}), "is damaged: its rng is"),
    "history None": (lambda c: c.update(history=None), "is damaged: its history is missing"),
    "stage 7": (lambda c: c.update(stage=7), "is damaged: its stage is missing"),
    "stage a string": (lambda c: c.update(stage="2"), "is damaged: its stage is missing"),
    "optimizer None": (lambda c: c.update(optimizer=None), "is damaged: its optimizer is missing"),
    "nan weights": (nan_weight, "is damaged: its weight features.0.weight is not a finite tensor"),
}


@pytest.mark.parametrize("damage", RESUME_DAMAGES)
def test_a_damaged_checkpoint_is_one_line_that_blames_the_file(damage, final_pt, tmp_path):
    """--resume reads a checkpoint_last.pt as it reads a final.pt (args through the script's
    parser) and checks the parts a checkpoint adds (stage, epoch, step, optimizer, schedule,
    scaler, history, metrics, RNG states): a damaged one is one line naming the file."""
    data, good = final_pt
    change, message = RESUME_DAMAGES[damage]
    path = damaged_copy(good.with_name("checkpoint_last.pt"), change, tmp_path / "checkpoint_last.pt")
    with pytest.raises(tkp.TKPError, match=message) as err:
        vgg8.main(["--resume", str(path), "--data-root", str(data), "--num-workers", "0"])
    assert str(err.value).startswith(str(path)) and "TKP bug" not in str(err.value)


def test_a_pretrain_path_with_nan_weights_is_one_line(final_pt, tmp_path):
    """--pretrain-path (read_state_dict) refuses weights that are not finite, naming the tensor,
    instead of a first epoch whose non-finite loss would be blamed on --lr."""
    from tkp_lib.runtime import read_state_dict
    _, good = final_pt
    path = damaged_copy(good, nan_weight, tmp_path / "f.pt")
    with pytest.raises(tkp.TKPError, match="--pretrain-path .*: its features.0.weight is not finite"):
        read_state_dict(str(path), "--pretrain-path")
    assert "features.0.weight" in read_state_dict(str(good), "--pretrain-path")


# ---- 6. a run that diverged but stayed finite says so ------------------------------------


def test_a_diverged_run_warns_and_records_it(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", "cifar10", n_train=60, n_test=100)  # 10 validation images per class
    out = tmp_path / "run"
    summary = vgg8_run(data, out, "--lr", "1e4", "--batch-val", "50")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert any(line.startswith("warning: stage 1: the training loss ended at") and "training diverged" in line
               for line in printed), printed
    assert any(line.startswith("warning: stage 2: validation top-1") and "is at chance (10.00% for 10 classes, "
               "on 100 images)" in line for line in printed), printed
    saved = json.loads((out / "summary.json").read_text())
    assert saved["warnings"] == summary["warnings"] == [line.removeprefix("warning: ") for line in printed]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [len(e["warnings"]) for e in log] == [2, 1]  # in each stage's last epoch record


def test_a_small_run_is_not_flagged(cifar10_root, tmp_path):
    """20 validation images of 10 classes at chance are noise, not a finding."""
    assert vgg8_run(cifar10_root, tmp_path / "run")["warnings"] == []


@pytest.mark.parametrize("first,last,top1,images,classes,expected", [
    (2.3, 1e13, 50.0, 10000, 10, ["diverged"]),       # --lr 1e4: finite, and far above its start
    (0.05, 0.6, 70.0, 50000, 1000, []),                 # 12x a small start, still far better than a guess
    (2.3, 2.0, 10.0, 10000, 10, ["at chance"]),
    (2.3, 2.0, 12.0, 10000, 10, []),                    # 2 points above chance on 10,000 images: learned
    (2.3, 2.0, 10.0, 50, 10, []),                       # 5 images per class: too few to tell
    (6.9, 6.9, 0.1, 50000, 1000, ["at chance"]),
])
def test_divergence_thresholds(first, last, top1, images, classes, expected):
    epochs = [{"train_ce_first_batch": first, "train_ce": last}]
    warnings = report.stage_warnings(2, epochs, {"top1": top1, "images": images, "classes": classes})
    assert [w for w in ("diverged", "at chance") if any(w in line for line in warnings)] == expected
