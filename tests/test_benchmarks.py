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
