"""The training-throughput benchmark runs on the CPU through the engine's real code path."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import train_throughput  # noqa: E402


def test_train_throughput_on_cpu(tmp_path):
    out = tmp_path / "tp.json"
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    r = train_throughput.main(["--script", "vgg8", "--batch", "4", "--steps", "1", "--rounds", "2", "--warmup", "1",
                               "--num-workers", "0", "--epoch-images", "8", "--json", str(out), "--device", "cpu",
                               "--threads", str(other)])
    assert torch.get_num_threads() == threads  # main() puts back what setup() set as training does
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


def test_tap_group_cuda_benchmark_runs_on_cpu(tmp_path, monkeypatch):
    """The GPU benchmark of tap groups against cuDNN, run on the CPU: same code path, outputs
    checked against the dense convolution, the JSON complete; it never asks for the CPU
    kernel (whose build would take a minute of a GPU step's time limit), and compiles each
    layer for its own static shapes."""
    import tap_group_cuda

    from tkp_lib import kernels

    def no_build(*args, **kwargs):
        raise AssertionError("tap_group_cuda asked for a native kernel")

    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(kernels, "native", no_build)
    monkeypatch.setattr(torch, "compile", fake_compile)
    r = tap_group_cuda.main(["--device", "cpu", "--dtype", "fp32", "--batch", "1", "--repeats", "1",
                             "--json", str(tmp_path / "g.json")])
    assert len(r["layers"]) == 4 and all(row["rel_error"] < 1e-5 for row in r["layers"])
    assert all(row["speedup"] > 0 for row in r["layers"])
    assert compiled == [{"dynamic": False}] * 4
    assert json.loads((tmp_path / "g.json").read_text())["layers"] == json.loads(json.dumps(r["layers"]))


def gpu_check_steps(part: str) -> list[tuple[int, list[str]]]:
    """(time limit, python command line) of each step of one part of benchmarks/gpu_check.sh,
    its variables filled in."""
    import re
    import shlex
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    body = re.search(rf"^  {part}\)\n(.*?)^    ;;", text, re.S | re.M).group(1)
    steps = []
    for line in body.splitlines():
        words = shlex.split(line.replace("$L", "benchmarks/inference_latency.py"))
        if words[:1] == ["step"]:
            assert words[3] == "python", line
            steps.append((int(words[2]), words[4:]))
    return steps


def test_gpu_check_steps_use_flags_their_scripts_take():
    """Every step of the prepared GPU run (a lent GPU has 15 minutes, start included) names
    flags its target's own parser takes, including the model flags the benchmarks pass on;
    train and latency each take at most 300 s of step limits, extra 330 s, and the sums are
    those the script's header states."""
    import tkp_common as tkp
    from benchmarks import inference_latency, tap_group_cuda
    header = re.search(r"\(train (\d+) s, latency (\d+) s, extra (\d+) s\)",
                       (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("\n# ", " "))
    assert header, "gpu_check.sh's header no longer states its parts' limits"
    for (part, most), stated in zip((("train", 300), ("latency", 300), ("extra", 330)), header.groups()):
        steps = gpu_check_steps(part)
        assert len(steps) >= 3 and sum(limit for limit, _ in steps) == int(stated) <= most, part
        for _, (target, *argv) in steps:
            if target == "benchmarks/inference_latency.py":
                args, extra = inference_latency.get_args_parser().parse_known_args(argv)
                tkp.import_script(args.script).get_args_parser().parse_args(extra)
            elif target == "benchmarks/train_throughput.py":
                args = train_throughput.get_args_parser().parse_args(argv)
                tkp.import_script(args.script).get_args_parser().parse_args(args.script_args)
            elif target == "benchmarks/tap_group_cuda.py":
                tap_group_cuda.get_args_parser().parse_args(argv)
            else:
                tkp.import_script(target).get_args_parser().parse_args(argv)


def test_versions_start_no_gpu_for_cpu_runs_and_name_the_measured_one(monkeypatch):
    """versions() adds CUDA, cuDNN and the compute capability for the GPU a run uses, asking that
    GPU; for a CPU run on a GPU machine it does not start CUDA (stand-ins for torch.cuda here)."""
    import torch

    from tkp_lib.runtime import versions
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    assert "gpu_capability" not in versions("cpu") and "gpu_capability" not in versions() and asked == []
    v = versions(torch.device("cuda", 1))
    assert v["gpu_capability"] == "9.0" and v["cudnn"] == 91000 and asked == [torch.device("cuda", 1)]


def test_deploy_latency_refuses_bad_values_in_one_line(tmp_path):
    """Counts below 1, empty or zero shapes and a --json folder end in one line (exit 2)
    before anything is built or timed."""
    import deploy_latency
    parser = deploy_latency.get_args_parser()
    for argv in (["--topk", "0"], ["--tap-group", "0"], ["--repeats", "0"], ["--shapes", "0@32"],
                 ["--shapes", "64@0"], ["--shapes", "64"], ["--shapes", ","]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2, argv
    assert parser.parse_args(["--shapes", "64@32,8@4"]).shapes == [(64, 32), (8, 4)]
    proc = subprocess.run([sys.executable, "benchmarks/deploy_latency.py", "--shapes", "8@4", "--json", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("deploy_latency: --json"), proc.stderr
