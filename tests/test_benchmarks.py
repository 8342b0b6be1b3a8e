"""The training-throughput benchmark runs on the CPU through the engine's real code path."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import train_throughput  # noqa: E402


def test_train_throughput_on_cpu(tmp_path):
    out = tmp_path / "tp.json"
    r = train_throughput.main(["--script", "vgg8", "--batch", "4", "--steps", "1", "--rounds", "2", "--warmup", "1",
                               "--num-workers", "0", "--epoch-images", "8", "--json", str(out), "--device", "cpu"])
    saved = json.loads(out.read_text())
    assert saved["pattern"] == "top-1" and saved["batch"] == 4
    assert set(saved["images_per_s"]) == {"dense", "stage1", "stage2"}
    assert all(v > 0 for v in saved["images_per_s"].values())
    assert {"stage1/dense", "stage2/dense", "epoch/compute"} <= set(saved["ratios"])
    assert saved["tkp_seconds_per_step"]["regularizer"] > 0
    assert set(saved["loader_images_per_s"]) == {"torch", "device"}
    assert r["epoch_images"] == 8


def test_tap_group_sweep_trains_reads_back_and_tabulates(tmp_path):
    import tap_group_accuracy
    from conftest import write_cifar
    root = write_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=20)
    argv = ["--data-root", str(root), "--groups", "1,8", "--seeds", "0", "--epochs", "1",
            "--output-dir", str(tmp_path / "sweep"), "--json", str(tmp_path / "t.json"), "--",
            "--batch-train", "20", "--batch-val", "20", "--num-workers", "0", "--progress-every", "0"]
    r = tap_group_accuracy.main(argv)
    assert [row["tap_group"] for row in r["rows"]] == [1, 8]
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["final_top1"] == r["rows"][1]["final_top1"]
    summary = json.loads((tmp_path / "sweep" / "g8-s0" / "summary.json").read_text())
    assert summary["sparsity"] == "top-1-g8"
    again = tap_group_accuracy.main(argv)  # finished runs are read back, not trained again
    assert again["rows"] == r["rows"]


def test_tap_group_cuda_benchmark_runs_on_cpu(tmp_path):
    """The GPU benchmark of tap groups against cuDNN, run on the CPU: same code path, outputs
    checked against the dense convolution."""
    import tap_group_cuda
    r = tap_group_cuda.main(["--device", "cpu", "--dtype", "fp32", "--batch", "1", "--repeats", "1",
                             "--no-compile", "--json", str(tmp_path / "g.json")])
    assert len(r["layers"]) == 4 and all(row["rel_error"] < 1e-5 for row in r["layers"])
    assert all(row["speedup"] > 0 for row in r["layers"])
