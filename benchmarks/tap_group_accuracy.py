"""The accuracy price of tap groups: VGG-8 Top-K trained with --tap-group G for several G and
seeds, everything else equal, and the final top-1 of each.

    python benchmarks/tap_group_accuracy.py --data-root ./data                       # real CIFAR-10
    python benchmarks/tap_group_accuracy.py --data-root /tmp/synth --synthetic 1000 --epochs 2  # no CIFAR
    python benchmarks/tap_group_accuracy.py --groups 1,8,16,32,64 --seeds 0,1,2 \\
        --epochs 30 --json tap_groups.json -- --batch-train 256

Each run is `vgg8_optimized.py` itself (in this process), with --tap-group G, --seed S,
--epochs-stage1 E and --epochs-stage2 E, and the flags after `--`; its folder is
OUT/g{G}-s{S}. A finished run is read back instead of trained again, so an interrupted
sweep continues where it stopped. The table gives, per G, the mean and the per-seed final
top-1, the post-mask top-1 and the theoretical speed-up. Measured numbers: RESULTS.md
("Tap groups: the accuracy price").
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/tap_group_accuracy.py`
    sys.path.insert(0, str(ROOT))

import tkp_common as tkp  # noqa: E402
import vgg8_optimized as vgg8  # noqa: E402
from tkp_lib.runtime import HelpFormatter, int_list, versions  # noqa: E402


def get_args_parser() -> tkp.ArgumentParser:
    p = tkp.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data-root", default="./data", help="CIFAR-10 folder (as vgg8_optimized.py takes it)")
    p.add_argument("--groups", type=int_list(0), default=[1, 8, 16, 32, 64], help="values of --tap-group")
    p.add_argument("--seeds", type=int_list(0), default=[0, 1, 2], help="values of --seed")
    p.add_argument("--topk", type=tkp.int_range(1, 8), default=1, help="--topk of every run")
    p.add_argument("--epochs", type=tkp.int_range(1), default=100, help="epochs of each stage")
    p.add_argument("--output-dir", default="runs/tap-groups", help="one folder per run below it")
    p.add_argument("--synthetic", type=tkp.int_range(5), default=None, metavar="N",
                   help="train on N generated CIFAR-format images (written to --data-root if it has no "
                        "CIFAR-10) instead of CIFAR-10: a stand-in where the data set cannot be had")
    p.add_argument("--json", default=None, metavar="PATH", help="write the table's numbers here")
    p.add_argument("script_args", nargs="*", help="flags for vgg8_optimized.py, after --")
    return p


def write_synthetic_cifar(root: Path, n_train: int, n_test: int = 1000, seed: int = 0,
                          contrast: float = 0.35, noise: float = 50.0) -> None:
    """A CIFAR-10-format stand-in for machines without the data set: per class a random
    8x8 colour pattern, upsampled to 32x32, drawn at `contrast` around grey, shifted by up to
    4 pixels and buried in Gaussian noise (std `noise`), written as CIFAR's pickled batches."""
    import pickle

    import numpy as np
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(seed)
    patterns = torch.from_numpy(rng.uniform(-1, 1, (10, 3, 8, 8))).float()
    templates = F.interpolate(patterns, size=32, mode="bilinear", align_corners=False).numpy()
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def draw(n):
        labels = rng.integers(0, 10, n)
        shifts = rng.integers(-4, 5, (n, 2))
        images = np.stack([np.roll(templates[c], tuple(s), axis=(1, 2)) for c, s in zip(labels, shifts)])
        images = 128 + contrast * 127 * images + rng.normal(0, noise, images.shape)
        return np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1), labels

    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        x, y = draw(n)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": x, "labels": [int(v) for v in y]}, fh)


def run_one(args, group: int, seed: int) -> dict:
    """The summary of one run: trained now, or read from its folder if it finished before."""
    folder = Path(args.output_dir) / f"g{group}-s{seed}"
    if (folder / "summary.json").is_file() and (folder / "final.pt").is_file():
        return json.loads((folder / "summary.json").read_text())
    flags = ["--data-root", args.data_root, "--topk", str(args.topk), "--tap-group", str(group),
             "--seed", str(seed), "--epochs-stage1", str(args.epochs), "--epochs-stage2", str(args.epochs),
             "--output-dir", str(folder), *args.script_args]
    if (folder / "checkpoint_last.pt").is_file():
        flags = ["--resume", str(folder / "checkpoint_last.pt")]
    with contextlib.redirect_stdout(io.StringIO()):  # one line per run below instead
        return vgg8.main(flags)


def summarize(runs: dict) -> list[dict]:
    rows = []
    for group, by_seed in runs.items():
        finals = [s["final_top1"] for s in by_seed.values()]
        rows.append({"tap_group": group, "final_top1_mean": statistics.mean(finals),
                     "final_top1_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "final_top1": finals, "post_mask_top1": [s["post_mask_top1"] for s in by_seed.values()],
                     "speedup_theoretical": next(iter(by_seed.values()))["speedup_theoretical"]})
    return rows


def format_table(rows: list[dict], seeds: list[int]) -> str:
    lines = [f"| G | final top-1, mean ± std | per seed ({', '.join(map(str, seeds))}) | post-mask | theory |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tap_group']} | {r['final_top1_mean']:.2f} ± {r['final_top1_std']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['final_top1'])} | "
                     f"{', '.join(f'{v:.2f}' for v in r['post_mask_top1'])} | {r['speedup_theoretical']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.synthetic and not (Path(args.data_root) / "cifar-10-batches-py").is_dir():
        write_synthetic_cifar(Path(args.data_root), args.synthetic)
    runs = {}
    for group in args.groups:
        runs[group] = {}
        for seed in args.seeds:
            s = run_one(args, group, seed)
            runs[group][seed] = s
            print(f"G={group} seed {seed}: post-mask {s['post_mask_top1']:.2f}%, final {s['final_top1']:.2f}% "
                  f"({s['wall_time_s']:.0f} s)", flush=True)
    rows = summarize(runs)
    result = {"benchmark": "tap_group_accuracy", "topk": args.topk, "epochs_per_stage": args.epochs,
              "seeds": args.seeds, "data_root": args.data_root, "script_args": args.script_args,
              "data": f"synthetic CIFAR-format, {args.synthetic} training images" if args.synthetic else "CIFAR-10",
              "device": next(iter(next(iter(runs.values())).values()))["device"],
              "versions": versions(), "rows": rows}
    print(format_table(rows, args.seeds))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    tkp.cli(main)
