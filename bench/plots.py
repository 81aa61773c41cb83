"""PNG plots of the bench results in bench/results/: one figure per bench and preset, drawn from its JSON.

  kernels-<preset>.png      per job: forward+backward time and peak memory against vocabulary size,
                            one line per method (spin-fast backends and peers)
  train_step-<preset>.png   tokens/s and peak memory of one SPIN optimizer step per method
  iteration-<preset>.png    seconds and peak memory per stage of the whole-iteration profile

Run: python -m bench.plots [RESULTS_DIR] (python -m bench draws them after the benches).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection
from pathlib import Path

from bench import common


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(report: dict, path: Path) -> Path | None:
    plt = _pyplot()
    results = [r for r in report["results"] if "median_ms" in r]
    if not results:  # a bench stopped before its first figure, or every method missing
        return None
    jobs = sorted({r["job"] for r in results})
    methods = sorted({r["method"] for r in results})
    fig, axes = plt.subplots(len(jobs), 2, figsize=(11, 4 * len(jobs)), squeeze=False)
    for row, job in enumerate(jobs):
        for col, (key, label) in enumerate((("median_ms", "forward + backward, ms"),
                                            ("peak_extra_mib", "peak extra memory, MiB"))):
            ax = axes[row][col]
            for color, method in enumerate(methods):  # one color per method in every panel
                points = sorted((r["vocab"], r[key]) for r in results if r["job"] == job and r["method"] == method)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{color}",
                            label=method)
            ax.set(xlabel="vocabulary size", ylabel=label, title=f"{job}: {label.split(',')[0]}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.suptitle(f"kernels, {_preset(report)}, {report['machine']['device']}, {report['shape']['tokens']} tokens")
    return _save(fig, path)


def plot_train_step(report: dict, path: Path) -> Path | None:
    plt = _pyplot()
    results = [r for r in report["results"] if "tokens_per_s" in r]
    if not results:
        return None
    methods = [r["method"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(methods, [r["tokens_per_s"] for r in results])
    axes[0].set(ylabel="training tokens / s", title="one SPIN optimizer step: throughput")
    axes[1].bar(methods, [r["peak_extra_mib"] for r in results])
    axes[1].set(ylabel="MiB", title="peak memory the step adds")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"train step, {_preset(report)}, {report['machine']['device']}")
    return _save(fig, path)


def plot_iteration(report: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = report["rows"]
    labels = [r["stage"] + ("\n(once per run)" if r["share"] is None else "") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    seconds = [r["seconds"] for r in rows]
    spread = [[s - r.get("min", s) for s, r in zip(seconds, rows)],  # older reports have no min and max
              [r.get("max", s) - s for s, r in zip(seconds, rows)]]
    axes[0].bar(labels, seconds, yerr=spread, capsize=3,
                color=["C7" if r["share"] is None else "C0" for r in rows])
    axes[0].set(ylabel="seconds", title="wall time per stage (steady state: median, min-max)")
    axes[1].bar(labels, [r["peak_extra_mib"] or 0.0 for r in rows])
    axes[1].set(ylabel="MiB", title="peak memory a stage adds (training process)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"one SPIN iteration, {_preset(report)}, engine {report['engine']}, "
                 f"{report['machine']['device']}")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


PLOTTERS = {"kernels": plot_kernels, "train_step": plot_train_step, "iteration": plot_iteration}


def _preset(report: dict) -> str:
    """The preset, and the shape options that replaced its own (python -m bench.NAME --tokens ...)."""
    custom = report.get("custom")
    preset = report["preset"]  # the iteration profile's holds the whole preset
    name = preset["name"] if isinstance(preset, dict) else preset
    partial = " (partial: the bench stopped before its end)" if "partial" in report else ""
    return f"{name} preset" + (f" with {' '.join(custom)}" if custom else "") + partial


def plot_all(results_dir: Path | None = None, benches: Collection[str] | None = None) -> list[Path]:
    """A PNG beside every bench JSON (of `benches`, default all) that has a plotter and figures to draw; returns
    the files written."""
    results_dir = Path(results_dir or common.RESULTS_DIR)
    written = []
    for source in sorted(results_dir.glob("*.json")):
        try:  # a file cut short, or another program's JSON: named, not json's "line 1 column 12" alone
            report = json.loads(source.read_text())
            if benches is not None and report.get("bench") not in benches:
                continue
            plotter = PLOTTERS.get(report.get("bench"))
            path = plotter(report, source.with_suffix(".png")) if plotter is not None else None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{source}: not a bench report as this version writes them ({error!r})") from error
        if path is not None:
            written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="PNG plots of the bench JSONs in a results folder.")
    parser.add_argument("results_dir", nargs="?", type=Path, help=f"default: {common.RESULTS_DIR}")
    folder = parser.parse_args().results_dir
    if folder is not None and not folder.is_dir():
        parser.error(f"{folder}: no such folder")
    for written in plot_all(folder):
        print(f"written: {written}")
