"""Models users bring deploy: dry-run final.pt files of the MobileNetV2-style and ConvNeXt
scripts in tests/user_models/, and of a small model written here (5x5 stem, GELU, SiLU,
Hardswish, a groups=2 conv, nn.Identity, mean pooling), go through `tkp_deploy.py`, load in a
fresh process that imports no training code and match the trained (masked) model; both
benchmarks run on them; a model with an operation deploy.pt cannot hold is refused before
any timing, in one line naming the module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tkp_common as tkp
import tkp_deploy as D
from tkp_lib import deploy_layers, topk_conv

ROOT = Path(__file__).resolve().parents[1]
USER_MODELS = ROOT / "tests" / "user_models"
FAST = ["--threads", "1", "--batch-sizes", "1", "--repeats", "1", "--verify-batch", "4"]

SCRIPT = '''"""A test model script (see tests/test_deploy_user_models.py)."""
import sys
import torch
import torch.nn as nn
import torch.nn.functional as F
if {root!r} not in sys.path:
    sys.path.insert(0, {root!r})
import tkp_common as tkp


def get_args_parser():
    return tkp.cnn_parser("a test model", dataset="cifar10", pretrain_help="a dense checkpoint",
                          batch_train=128, batch_val=256, epochs_stage1=100, epochs_stage2=100, lr=1e-3,
                          weight_decay=1e-4, beta=3000.0, alpha=3.0)


class Odd(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16), nn.GELU())
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.act, self.skip = nn.SiLU(), {skip}
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.Hardswish())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.act(self.grouped(x)) + self.skip(x)
        return self.head(self.down(x).mean((2, 3)))


def build_model(args):
    return tkp.start_from_pretrain_path(Net(tkp.CIFAR_CLASSES[args.dataset]), args)


SCRIPT = tkp.cnn_script({name!r}, build_model)


def main(argv=None):
    return tkp.run(get_args_parser().parse_args(argv), SCRIPT)


if __name__ == "__main__":
    tkp.cli(main)
'''


@pytest.fixture(scope="module")
def finals(tmp_path_factory):
    """{name: (final.pt, script)}: dry runs of the two user-model scripts, the mixed model
    and the model with an operation deploy.pt cannot hold, two at a time."""
    base = tmp_path_factory.mktemp("user_models")
    scripts = {"mobilenetv2": USER_MODELS / "mobilenetv2_cifar.py", "convnext": USER_MODELS / "convnext_cifar.py"}
    for name, skip in (("mixed", "nn.Identity()"), ("odd", "Odd()")):
        scripts[name] = base / f"{name}_cifar.py"
        scripts[name].write_text(SCRIPT.format(root=str(ROOT), skip=skip, name=f"{name}_cifar"))
    names, out = list(scripts), {}
    for i in range(0, len(names), 2):
        procs = {n: subprocess.Popen([sys.executable, str(scripts[n]), "--dry-run", "--output-dir", str(base / n)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}) for n in names[i:i + 2]}
        for n, proc in procs.items():
            log, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{n} dry run failed:\n{log[-3000:]}"
            out[n] = (base / n / "final.pt", scripts[n])
    return out


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("name, held", [
    ("mobilenetv2", {"Conv2d", "ReLU6", "Linear"}),
    ("convnext", {"LayerNorm", "GELU", "Linear"}),  # its convs: all pruned, on kernels where faster
    ("mixed", {"Conv2d", "GELU", "SiLU", "Hardswish", "Linear"}),
])
def test_user_models_deploy_and_load_in_a_fresh_process(finals, name, held, tmp_path, one_thread, capsys):
    final, script = finals[name]
    out = tmp_path / "deploy.pt"
    report = D.main([str(final), "--output", str(out), "--script", str(script), *FAST])
    assert report["check"]["ok"] and report["check"]["top1_identical"]
    records = report["layers"]
    grouped = [r for r in records if r["groups"] > 1]
    assert grouped
    for r in grouped:  # pruned depthwise convs: the depthwise kernel where faster; other grouped convs dense
        if r["groups"] == r["in_channels"] == r["out_channels"] and r["k"] < r["kernel_size"][0] * r["kernel_size"][1]:
            assert r["deploy"] == "depthwise" or r["why"] == "not faster than dense here", r
        else:
            assert r["deploy"] == "dense" and r["why"] in (deploy_layers.GROUPED, "dense"), r
    on = {k: sum(r["deploy"] == k for r in records) for k in ("topk", "tapgroup", "depthwise")}
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"wrote {out}"))
    dense = len(records) - sum(on.values())
    assert f"({sum(on.values())} of {len(records)} convolutions on kernels: {on['topk']} Top-K, " \
           f"{on['tapgroup']} tap-group, {on['depthwise']} depthwise, {dense} kept dense" in line
    if any(r["why"] == deploy_layers.GROUPED for r in records):
        assert f"{sum(r['why'] == deploy_layers.GROUPED for r in records)} {deploy_layers.GROUPED}" in line

    spec = torch.load(out, weights_only=True)
    assert held <= {m["type"] for m in spec["modules"].values()}
    assert "BatchNorm2d" not in {m["type"] for m in spec["modules"].values()}  # folded
    trained = tkp.load_trained(str(final), str(script), "final.pt")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = trained.model(x)
    torch.save({"x": x, "ref": ref}, tmp_path / "io.pt")
    check = (
        "import sys, torch, tkp_deploy; "
        f"m = tkp_deploy.load({str(out)!r}); io = torch.load({str(tmp_path / 'io.pt')!r}); "
        "y = m(io['x']); ref = io['ref']; "
        "assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), 'outputs differ'; "
        "assert torch.equal(y.argmax(1), ref.argmax(1)); "
        "training = [k for k in sys.modules if k == 'tkp_common' or k.endswith('_cifar') or k in "
        "('tkp_lib.train', 'tkp_lib.data', 'tkp_lib.sparsity', 'tkp_lib.qat', 'tkp_lib.report')]; "
        "assert not training, training; print('ok')")
    assert run_python(check).split()[-1] == "ok"


@pytest.mark.parametrize("name", ["mobilenetv2", "convnext"])
def test_both_benchmarks_run_on_user_models(finals, name, tmp_path, one_thread):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import deploy_latency
        import inference_latency
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    final, script = finals[name]
    if topk_conv.kernel_available():
        result = deploy_latency.main(["--checkpoint", str(final), "--script", str(script), "--threads", "1",
                                      "--batch-sizes", "1", "--repeats", "1", "--min-round-ms", "0.5", "--no-compile"])
        run, = result["runs"]
        assert run["check"]["ok"] and "convolutions on kernels" in run["summary"]
        assert all(row["kept"] in ("topk", "dense") for row in run["layers"]) and 1 in run["whole"]
    out = tmp_path / "lat.json"
    inference_latency.main(["--checkpoint", str(final), "--script", str(script), "--devices", "cpu", "--threads", "1",
                            "--batch-sizes", "1", "--warmup", "1", "--repeats", "2", "--min-repeat-ms", "0",
                            "--no-compile", "--json", str(out)])
    saved = json.loads(out.read_text())
    deployed, = saved["deployed"]
    assert "rows" in deployed, deployed  # not "failed"
    assert deployed["rows"][0]["rel_error"] < 1e-4 and "convolutions on kernels" in deployed["summary"]
    floor = saved["arithmetic_floor"][0]["layers"]
    depthwise = [x for x in floor if x["groups"] > 1]
    assert depthwise and all(x["floor_op"] == "depthwise 1x1 (per-channel scale)" for x in depthwise)
    assert all(x["floor_op"] == "1x1 conv" for x in floor if x["groups"] == 1)
    assert all(x["floor_speedup"] > 0 for x in floor)


def test_an_operation_deploy_pt_cannot_hold_ends_before_the_timing(finals, tmp_path):
    final, script = finals["odd"]
    out = tmp_path / "deploy.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "tkp_deploy.py"), str(final), "--output", str(out), "--script",
                           str(script), *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and not out.exists()
    assert "timed" not in proc.stdout and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tkp_deploy: deploy.pt cannot hold the function torch.cumsum "
                                               "(in the model's skip (Odd))"), proc.stderr
    assert "tkp_lib/deploy_ops.py" in err[0]
