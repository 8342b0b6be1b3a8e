"""Figures of a TKP run: which kernel taps the Top-K masks kept, and the training curves.

    python -m tkp_lib.figures runs/vgg8-20250101-120000        # writes the PNGs into that folder

From a run folder (the --output-dir of any script) it draws

  tap_frequencies.png   Top-K runs: one small heatmap per pruned conv layer, the fraction of
                        the layer's kernels that keep each tap position (summary.json's
                        "tap_frequencies"), on one colour scale;
  training_curves.png   loss and cross-entropy, the auxiliary loss (stage 1, log scale), train
                        and validation accuracy, and the learning rate per epoch
                        (log.jsonl), the masking step marked between the two stages.

`draw(run_dir)` is what a training script calls at the end of a run. matplotlib is
optional (pip install matplotlib): without it draw() returns [] and says so once per
process. It renders with matplotlib's Agg canvas directly (no display, no change to
pyplot's global backend), takes about a second, and never raises for a missing or
malformed file: it skips that figure and says why. The command line is strict: a
malformed run folder, or no matplotlib, is a one-line error and exit status 2.
May import: the standard library, and matplotlib when it is installed (reads files only).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Callable

TAPS_PNG = "tap_frequencies.png"
CURVES_PNG = "training_curves.png"
MISSING_MATPLOTLIB = "matplotlib is not installed, so no figures were drawn (pip install matplotlib)"


class FigureError(ValueError):
    """A run folder that cannot be drawn (missing or malformed files)."""


# ---- reading a run folder ----------------------------------------------------------------

def read_summary(run_dir: Path) -> dict | None:
    """summary.json, or None if the run has not written it yet."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FigureError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(summary, dict):
        raise FigureError(f"{path} holds a {type(summary).__name__}, not an object")
    taps = summary.get("tap_frequencies", {})
    if not isinstance(taps, dict) or not all(_is_grid(g) for g in taps.values()):
        raise FigureError(f"{path}: tap_frequencies must map each layer to a kh x kw grid of numbers")
    return summary


def _is_grid(grid) -> bool:
    return (isinstance(grid, list) and grid and all(isinstance(row, list) and row for row in grid)
            and len({len(row) for row in grid}) == 1
            and all(isinstance(v, (int, float)) for row in grid for v in row))


def read_log(run_dir: Path) -> list[dict] | None:
    """log.jsonl's epochs (each with an int `stage` and `epoch`), or None if there is none."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return None
    epochs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise FigureError(f"{path} line {i} is not JSON ({e})") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("stage"), int)
                and isinstance(entry.get("epoch"), int)):
            raise FigureError(f"{path} line {i} lacks an integer 'stage' and 'epoch'")
        epochs.append(entry)
    return epochs


# ---- matplotlib, when it is there ----------------------------------------------------------

@functools.cache
def _matplotlib():
    """(Figure, FigureCanvasAgg, MaxNLocator), or None without matplotlib. Cached: one import
    attempt per process."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    return Figure, FigureCanvasAgg, MaxNLocator


@functools.cache
def _say_missing(log: Callable[[str], None]) -> None:
    log(f"tkp_lib.figures: {MISSING_MATPLOTLIB}")


def _save(fig, canvas_cls, path: Path) -> Path:
    canvas_cls(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)  # a reader never sees half a PNG
    return path


def _title(summary: dict | None, run_dir: Path) -> str:
    if not summary:
        return run_dir.name
    return " ".join(str(summary[k]) for k in ("model", "dataset", "sparsity") if summary.get(k))


# ---- the figures ---------------------------------------------------------------------------

def draw_tap_frequencies(taps: dict, title: str, path: Path, mpl) -> Path:
    """One heatmap per layer, in a grid, on a shared colour scale from 0."""
    Figure, Canvas, _ = mpl
    names = list(taps)
    cols = min(len(names), 6 if len(names) <= 24 else 8)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(1.9 * cols + 1.2, 1.9 * rows + 0.9), layout="constrained")
    top = max(max(v for row in g for v in row) for g in taps.values()) or 1.0
    axes = fig.subplots(rows, cols, squeeze=False)
    annotate = len(names) <= 24
    image = None
    for ax, name in zip(axes.flat, names):
        grid = taps[name]
        image = ax.imshow(grid, vmin=0.0, vmax=top, cmap="viridis")
        ax.set_title(name if len(name) <= 22 else "..." + name[-19:], fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if annotate and len(grid) * len(grid[0]) <= 25:
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * top else "white")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of kernels keeping the tap")
    fig.suptitle(f"{title}: kept taps per layer" + (" (%)" if annotate else ""), fontsize=10)
    return _save(fig, Canvas, path)


def draw_training_curves(log: list[dict], summary: dict | None, title: str, path: Path, mpl) -> Path:
    """Loss/CE, auxiliary loss, accuracy and learning rate against the epoch of the run
    (stage 2's epochs follow stage 1's), the masking step marked between the stages."""
    Figure, Canvas, MaxNLocator = mpl
    stage1 = max((e["epoch"] for e in log if e["stage"] == 1), default=0)
    if summary and isinstance(summary.get("epochs_stage1"), int):
        stage1 = summary["epochs_stage1"]
    stage2 = max((e["epoch"] for e in log if e["stage"] == 2), default=0)
    if summary and isinstance(summary.get("epochs_stage2"), int):
        stage2 = summary["epochs_stage2"]
    offset = {1: 0, 2: stage1, 3: stage1 + stage2}  # stage 3: quantization-aware training
    x = [e["epoch"] + offset.get(e["stage"], 0) for e in log]
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    (ax_loss, ax_aux), (ax_acc, ax_lr) = fig.subplots(2, 2)

    def series(ax, key, label, positive=False, **style):
        """One line per stage (not joined across the masking step), in one colour."""
        drawn = False
        for stage in (1, 2):
            points = [(xi, e[key]) for xi, e in zip(x, log) if e["stage"] == stage
                      and isinstance(e.get(key), (int, float)) and math.isfinite(e[key])
                      and (e[key] > 0 or not positive)]
            if points:
                (line,) = ax.plot(*zip(*points), label=None if drawn else label,
                                  marker="o" if len(x) <= 30 else None, markersize=3, **style)
                style["color"] = line.get_color()
                drawn = True
        return drawn

    series(ax_loss, "train_loss", "train loss (CE + beta aux)")
    series(ax_loss, "train_ce", "train CE")
    series(ax_loss, "val_loss", "val loss", linestyle="--")
    ax_loss.set_title("loss")
    if series(ax_aux, "train_aux", "train aux", positive=True):
        ax_aux.set_yscale("log")
    else:
        ax_aux.text(0.5, 0.5, "no auxiliary loss", ha="center", va="center", transform=ax_aux.transAxes)
    ax_aux.set_title("auxiliary loss (stage 1)")
    series(ax_acc, "train_acc", "train")
    series(ax_acc, "val_top1", "val top-1")
    series(ax_acc, "val_top5", "val top-5")
    post = summary.get("post_mask_top1") if summary else None
    if isinstance(post, (int, float)) and stage1:
        ax_acc.plot([stage1 + 0.5], [post], marker="*", markersize=10, linestyle="none", label="post-mask")
    ax_acc.set_title("accuracy (%)")
    series(ax_lr, "lr", "lr")
    ax_lr.set_title("learning rate (epoch start)")
    both = any(e["stage"] == 1 for e in log) and any(e["stage"] == 2 for e in log)
    for ax in (ax_loss, ax_aux, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.set_xlim(min(x) - 0.5, max(x) + 0.5)  # one epoch axis for all four panels
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if both:
            ax.axvline(stage1 + 0.5, color="grey", linestyle=":", linewidth=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if both:
        ax_loss.text(stage1 + 0.5, 1.0, " mask", transform=ax_loss.get_xaxis_transform(), fontsize=7,
                     va="top", color="grey")
    fig.suptitle(f"{title}: training", fontsize=10)
    return _save(fig, Canvas, path)


# ---- entry points --------------------------------------------------------------------------

def draw(run_dir, strict: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Draw the figures of the run in `run_dir` into that folder and return their paths.

    Without matplotlib: returns [] and logs one line per process. With `strict` (the command
    line), a missing folder, a malformed summary.json/log.jsonl, no matplotlib or a failure to
    draw raises FigureError; otherwise each problem is logged and that figure skipped."""
    run_dir = Path(run_dir)
    problems, summary, epochs = [], None, None
    if not run_dir.is_dir():
        problems.append(f"{run_dir} is not a folder")
    else:
        try:
            summary = read_summary(run_dir)
        except FigureError as e:
            problems.append(str(e))
        try:
            epochs = read_log(run_dir)
        except FigureError as e:
            problems.append(str(e))
        if not problems and summary is None and epochs is None:
            problems.append(f"{run_dir} holds neither summary.json nor log.jsonl (is it a TKP run folder?)")
    if strict and problems:
        raise FigureError("; ".join(problems))
    for p in problems:
        log(f"tkp_lib.figures: skipped: {p}")
    mpl = _matplotlib()
    if mpl is None:
        if strict:
            raise FigureError(MISSING_MATPLOTLIB)
        _say_missing(log)
        return []
    jobs, title = [], _title(summary, run_dir)
    if summary and summary.get("tap_frequencies"):
        taps = summary["tap_frequencies"]
        jobs.append((TAPS_PNG, lambda: draw_tap_frequencies(taps, title, run_dir / TAPS_PNG, mpl)))
    if epochs:
        jobs.append((CURVES_PNG, lambda: draw_training_curves(epochs, summary, title, run_dir / CURVES_PNG, mpl)))
    paths = []
    for name, job in jobs:
        try:
            paths.append(job())
        except Exception as e:  # noqa: BLE001 - a figure must never end the run that asked for it
            if strict:
                raise FigureError(f"could not draw {name}: {type(e).__name__}: {e}") from e
            log(f"tkp_lib.figures: could not draw {name}: {type(e).__name__}: {e}")
    return paths


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description="Draw the figures of TKP run folders (needs matplotlib)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a script's --output-dir")
    args = p.parse_args(argv)
    paths = []
    for run_dir in args.run_dirs:
        drawn = draw(run_dir, strict=True)
        for path in drawn:
            print(f"wrote {path}")
        if not drawn:
            print(f"{run_dir}: nothing to draw (a dense or N:M run before its first epoch?)")
        paths += drawn
    return paths


if __name__ == "__main__":
    try:
        main()
    except FigureError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
