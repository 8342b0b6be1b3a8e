"""benchmarks/inference_latency.py on the CPU (dense vs pruned, the arithmetic floor, the 2:4
deployment's skip line and its bookkeeping) and tkp_lib.figures on hand-written run folders."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write_cifar

import tkp_common as tkp
import vgg8_optimized as vgg8
import vit_small
from benchmarks import inference_latency as lat
from tkp_lib import figures
from tkp_lib.report import sparsity_report
from tkp_lib.runtime import plain
from tkp_lib.sparsity import Masker, compute_masks

QUICK = ["--devices", "cpu", "--threads", "1", "--batch-sizes", "1,2", "--warmup", "1", "--repeats", "2",
         "--min-repeat-ms", "0", "--no-compile"]
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "4", "--no-pretrained"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: with two, a busy 2-core machine makes OpenMP wait up to 100x longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_report(model, plan, masks, shape):
    return sparsity_report(model, plan, masks, shape, torch.device("cpu"))


# ---- inference latency -----------------------------------------------------------------------

def test_vgg8_top1_fresh_masks_end_to_end(tmp_path, capsys):
    out = tmp_path / "lat.json"
    result = lat.main(["--script", "vgg8", "--topk", "1", *QUICK, "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["script"] == "vgg8" and saved["pattern"] == "top-1"

    torch.manual_seed(0)  # the benchmark's model, built the same way
    args = vgg8.get_args_parser().parse_args(["--topk", "1"])
    model = vgg8.build_model(args)
    plan = vgg8.SCRIPT.build_plan(model, args)
    masks = compute_masks(model, plan)
    Masker(model, masks).apply_()
    expected = reference_report(model, plan, masks, (3, 32, 32))
    assert saved["theoretical"]["speedup_theoretical"] == pytest.approx(expected["speedup_theoretical"])
    assert saved["theoretical"]["macs_dense"] == expected["macs_dense"]

    rows = saved["latency"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(1, "eager"), (2, "eager")]
    for r in rows:
        assert r["dense"]["median_ms"] > 0 and r["pruned"]["median_ms"] > 0 and r["speedup_measured"] > 0
    assert [f["batch"] for f in saved["arithmetic_floor"]] == [1, 2]
    deployed = saved["deployed"][0]  # tkp_deploy's kernels (or dense where they are not faster)
    assert [d["batch"] for d in deployed["rows"]] == [1, 2] and deployed["pruned_layers"] == 4
    assert all(d["rel_error"] < 1e-4 and d["speedup"] > 0 for d in deployed["rows"])
    assert "deployed with tkp_deploy" in lat.format_report(result)
    floor = saved["arithmetic_floor"][0]["layers"]
    assert [x["layer"] for x in floor] == ["features.0", "features.3", "features.7", "features.10"]
    assert all(x["kxk_ms"] > 0 and x["1x1_ms"] > 0 and x["theoretical"] == 9 for x in floor)
    assert floor[1]["output_hw"] == [32, 32] and floor[3]["output_hw"] == [16, 16]
    assert saved["semi_structured"][0]["status"] == "not applicable"
    text = capsys.readouterr().out
    assert "theoretical speed-up 7.69x" in text and "measured speed-up near 1.0x is the expected" in text
    assert result["theoretical"] == saved["theoretical"] and saved["complete"] is True


def test_vit_2_4_reports_the_semi_structured_skip_on_cpu(tmp_path, capsys):
    out = tmp_path / "lat.json"
    lat.main(["--script", "vit", "--sparsity-type", "2:4", *TINY_VIT, *QUICK, "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["pattern"] == "2:4" and saved["arithmetic_floor"] == []
    (semi,) = saved["semi_structured"]
    assert semi["status"] == "skipped" and semi["reason"].startswith(lat.SKIP_2_4)
    assert "skipped: needs a CUDA GPU with compute capability >= 8.0" in capsys.readouterr().out

    torch.manual_seed(0)
    args = vit_small.get_args_parser().parse_args(TINY_VIT)
    model = vit_small.build_model(args)
    plan = vit_small.build_plan(model, args)
    masks = compute_masks(model, plan)
    Masker(model, masks).apply_()
    expected = reference_report(model, plan, masks, (3, 32, 32))
    assert saved["theoretical"]["speedup_theoretical"] == pytest.approx(expected["speedup_theoretical"])
    assert saved["theoretical"]["speedup_pruned_layers"] == pytest.approx(2.0)


def test_semi_structured_bookkeeping_with_a_stand_in_converter():
    """The per-layer decision, the checks and the report, run on the CPU with stand-ins for
    torch.sparse.to_sparse_semi_structured: an exact one, one that fails for some shapes and
    one that gives wrong weights."""
    bench = lat.build_fresh("vit", [*TINY_VIT, "--target-layers", "mlp"], seed=0)
    setup = lat.setup_device(bench, torch.device("cpu"), torch.float32, channels_last=False)
    timing = lat.Timing(warmup=0, repeats=1, min_repeat_s=0.0)

    def run(convert, margin=0.02):
        with torch.inference_mode():
            return lat.deploy_semi_structured(bench, setup, [1, 2], timing, seed=0, convert=convert, margin=margin)

    exact = run(lambda w: w.clone(), margin=-1.0)  # any correct sparse layer counts as faster
    assert exact["status"] == "done" and exact["dtype"] == "bf16" and exact["layers_total"] == 24
    assert exact["layers_sparse"] == 24 and all(r["rel_error"] == 0 and r["note"] == "sparse: faster"
                                                for r in exact["layers"])
    assert exact["model_matches"] and [m["batch"] for m in exact["model"]] == [1, 2]
    slow = run(lambda w: w.clone(), margin=1e9)  # nothing is 1e9 times as fast as itself (a noisy round is)
    assert slow["layers_sparse"] == 0 and slow["model"] == []
    assert all(r["note"] == "dense: sparse not faster" for r in slow["layers"])

    def fussy(w):
        if w.shape[0] > w.shape[1]:  # fc1 (768 x 192)
            raise RuntimeError("shape not supported")
        return w.clone()
    partial = run(fussy)
    fc1 = [r for r in partial["layers"] if r["layer"].endswith("fc1")]
    assert fc1 and all(not r["kept_sparse"] and "shape not supported" in r["note"] for r in fc1)

    wrong = run(lambda w: torch.zeros_like(w))
    assert wrong["layers_sparse"] == 0 and wrong["model_matches"]
    assert all(r["note"] == "dense: sparse output differs" for r in wrong["layers"])
    assert "2:4 deployment" in lat.format_report({**json.loads(json.dumps(plain({
        "script": "vit", "pattern": "2:4", "source": "s", "input_shape": [3, 32, 32],
        "versions": {"torch": torch.__version__}, "device_names": {}, "latency": [], "arithmetic_floor": [],
        "theoretical": {"speedup_theoretical": 2.0, "macs_dense": 2, "macs_nonzero": 1,
                        "speedup_pruned_layers": 2.0}}))), "semi_structured": [exact, partial]})


def test_semi_structured_layers_are_decided_per_batch_size(monkeypatch):
    """A sparse layer faster at the large batch may be slower at batch 1: each batch size gets
    its own decisions and its own deployed model (here a stand-in decision keeps a layer sparse
    at batch 2 alone), and a batch whose deployed model is the dense one is not timed."""
    decide = lat._decide_layer

    def at_batch_2_only(lin, name, shape, convert, setup, dtype, timing, margin):
        return decide(lin, name, shape, convert, setup, dtype, timing, -1.0 if shape[0] == 2 else 1e9)

    monkeypatch.setattr(lat, "_decide_layer", at_batch_2_only)
    bench = lat.build_fresh("vit", [*TINY_VIT, "--target-layers", "mlp"], seed=0)
    setup = lat.setup_device(bench, torch.device("cpu"), torch.float32, channels_last=False)
    with torch.inference_mode():
        result = lat.deploy_semi_structured(bench, setup, [1, 2], lat.Timing(0, 1, 0.0), seed=0,
                                            convert=lambda w: w.clone())
    assert result["decided_at_batch"] == 2 and result["layers_sparse"] == result["layers_total"] == 24
    assert [(x["batch"], x["layers_sparse"]) for x in result["smaller_batches"]] == [(1, 0)]
    assert [m["batch"] for m in result["model"]] == [2]
    text = "\n".join(lat._format_semi_structured(plain(result), "cpu"))
    assert "decided again at batch 1: 0 of 24 Linears kept sparse" in text


def test_compiled_paths_run(monkeypatch, capsys):
    """torch.compile's paths (dense/pruned weights swapped under one compiled graph, and the
    deployed model), with dynamo's eager backend standing in for inductor to keep it quick."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", dynamic=False))
    result = lat.main(["--script", "vgg8", "--devices", "cpu", "--threads", "1", "--batch-sizes", "1",
                       "--warmup", "0", "--repeats", "1", "--min-repeat-ms", "0", "--no-floor"])
    compiled = [r for r in result["latency"] if r["mode"] == "compile"]
    assert len(compiled) == 1 and "error" not in compiled[0]
    assert compiled[0]["compiled_vs_eager_rel_error"] < 1e-5  # the graph follows the swapped weights
    bench = lat.build_fresh("vit", [*TINY_VIT, "--target-layers", "proj"], seed=0)
    with torch.inference_mode():  # bf16, so the deployment reuses the compiled dense model
        setup = lat.setup_device(bench, torch.device("cpu"), torch.bfloat16, channels_last=False)
        deployed = lat.deploy_semi_structured(bench, setup, [2], lat.Timing(0, 1, 0.0), seed=0,
                                              compiled_dense=torch.compile(setup.model), compile_mode="default",
                                              convert=lambda w: w.clone(), margin=-1.0)
    assert [(m["mode"], "error" in m) for m in deployed["model"]] == [("eager", False), ("compile", False)]


def test_the_real_converter_on_a_cpu_is_reported_per_layer(monkeypatch):
    """The default path (backend probe, torch.sparse.to_sparse_semi_structured) taken on a
    CPU, as if it were supported: every layer stays dense with the library's reason."""
    from torch.sparse import SparseSemiStructuredTensor
    backend, problems = lat.pick_backend(torch.device("cpu"), torch.bfloat16)
    assert backend is None and len(problems) == 2 and SparseSemiStructuredTensor._FORCE_CUTLASS is False
    monkeypatch.setattr(lat, "semi_structured_unsupported", lambda device, pattern: None)
    monkeypatch.setattr(lat, "pick_backend", lambda device, dtype: ("cutlass", []))
    bench = lat.build_fresh("vit", [*TINY_VIT, "--target-layers", "proj"], seed=0)
    setup = lat.setup_device(bench, torch.device("cpu"), torch.float32, channels_last=False)
    with torch.inference_mode():
        result = lat.deploy_semi_structured(bench, setup, [1], lat.Timing(0, 1, 0.0), seed=0, compile_mode="default")
    assert result["status"] == "done" and result["layers_sparse"] == 0 and result["model"] == []
    assert all("Only CUDA tensors" in r["note"] for r in result["layers"])
    assert SparseSemiStructuredTensor._FORCE_CUTLASS is False


def test_cpu_and_old_gpus_are_refused_before_any_conversion():
    cpu = torch.device("cpu")
    assert lat.semi_structured_unsupported(cpu, "2:4").startswith(lat.SKIP_2_4)
    assert lat.semi_structured_unsupported(cpu, "top-1").startswith("not applicable")
    assert lat.semi_structured_unsupported(cpu, "4:8").startswith("not applicable")
    assert lat.semi_structured_unsupported(cpu, "dense").startswith("not applicable")


def test_a_trained_final_checkpoint_is_rebuilt_and_timed(tmp_path):
    data = write_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=16)
    run = tmp_path / "run"
    vgg8.main(["--data-root", str(data), "--output-dir", str(run), "--epochs-stage1", "1", "--epochs-stage2", "1",
               "--batch-train", "16", "--batch-val", "16", "--num-workers", "0", "--bn-recal-batches", "1",
               "--progress-every", "0", "--topk", "2"])
    final = run / "final.pt"
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "lat.json"
    lat.main(["--checkpoint", str(final), *QUICK, "--batch-sizes", "2", "--no-floor", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["script"] == "vgg8" and saved["pattern"] == "top-2" and "checkpoint" in saved["source"]
    assert saved["theoretical"]["speedup_theoretical"] == pytest.approx(summary["speedup_theoretical"])

    bench = lat.load_checkpoint(str(final), None)
    ckpt = torch.load(final, weights_only=True)
    for name, mask in ckpt["masks"].items():
        assert torch.equal(bench.pruned[name], ckpt["model"][name])
        assert torch.equal(bench.dense[name][mask], ckpt["model"][name][mask])
        assert (bench.dense[name][~mask] != 0).all()  # the dense model has no zeros where pruned
    with pytest.raises(tkp.TKPError, match="come from the checkpoint"):
        lat.main(["--checkpoint", str(final), "--topk", "1"])
    with pytest.raises(tkp.TKPError, match="does not fit"):
        lat.load_checkpoint(str(final), "resnet56")


def test_cli_needs_a_model(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference_latency.py")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "--checkpoint" in result.stderr and "Traceback" not in result.stderr


# ---- figures --------------------------------------------------------------------------------

def write_run(folder, taps=True):
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"model": "vgg8", "dataset": "cifar10", "sparsity": "top-1", "post_mask_top1": 41.0,
               "epochs_stage1": 3}
    if taps:
        summary["tap_frequencies"] = {"features.0": [[0.1, 0.2, 0.0], [0.1, 0.3, 0.1], [0.0, 0.1, 0.1]],
                                      "features.3": [[0.0, 0.5, 0.0], [0.2, 0.1, 0.1], [0.0, 0.1, 0.0]]}
    (folder / "summary.json").write_text(json.dumps(summary))
    log = [{"stage": s, "epoch": e, "lr": 1e-3 / e, "train_loss": 3.0 - e / 2, "train_ce": 2.5 - e / 2,
            "train_aux": 1e-3 / e if s == 1 else 0.0, "train_acc": 20.0 * e, "val_top1": 30.0 + e if e != 2 else None,
            "val_loss": 2.0, "epoch_seconds": 1.0, "images_per_s": 10.0} for s in (1, 2) for e in (1, 2, 3)]
    (folder / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    return folder


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make `import matplotlib` fail, whether or not it is installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    figures._matplotlib.cache_clear()
    figures._say_missing.cache_clear()
    yield
    figures._matplotlib.cache_clear()
    figures._say_missing.cache_clear()


def test_figures_are_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    figures._matplotlib.cache_clear()
    run = write_run(tmp_path / "run")
    paths = figures.draw(run)
    assert sorted(p.name for p in paths) == [figures.TAPS_PNG, figures.CURVES_PNG]
    for path in paths:
        assert path.parent == run and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    assert not list(run.glob(".*.tmp"))
    dense = write_run(tmp_path / "dense", taps=False)  # no Top-K masks: the curves only
    assert [p.name for p in figures.draw(dense)] == [figures.CURVES_PNG]


def test_without_matplotlib_draw_returns_nothing_and_says_so_once(tmp_path, no_matplotlib):
    run = write_run(tmp_path / "run")
    lines = []
    assert figures.draw(run, log=lines.append) == []
    assert figures.draw(run, log=lines.append) == []
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]
    assert not list(run.glob("*.png"))
    with pytest.raises(figures.FigureError, match="matplotlib"):
        figures.main([str(run)])


def test_a_malformed_run_folder_is_an_error_only_on_the_command_line(tmp_path):
    bad = write_run(tmp_path / "bad")
    (bad / "log.jsonl").write_text('{"stage": 1, "epoch": 1}\nnot json\n')
    lines = []
    drawn = figures.draw(bad, log=lines.append)  # the summary still draws when matplotlib is there
    assert all(p.name == figures.TAPS_PNG for p in drawn)
    assert any("line 2 is not JSON" in line for line in lines)
    with pytest.raises(figures.FigureError, match="line 2 is not JSON"):
        figures.main([str(bad)])
    assert figures.draw(tmp_path / "missing", log=lines.append) == []
    result = subprocess.run([sys.executable, "-m", "tkp_lib.figures", str(tmp_path / "missing")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_a_figure_that_fails_to_draw_is_logged_not_raised(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    figures._matplotlib.cache_clear()
    run = write_run(tmp_path / "run")
    monkeypatch.setattr(figures, "draw_tap_frequencies", lambda *args: 1 / 0)
    lines = []
    assert [p.name for p in figures.draw(run, log=lines.append)] == [figures.CURVES_PNG]
    assert lines == ["tkp_lib.figures: could not draw tap_frequencies.png: ZeroDivisionError: division by zero"]
    with pytest.raises(figures.FigureError, match="ZeroDivisionError"):
        figures.main([str(run)])
