"""`discflow stats --plot`: the statistics as one PNG a department head would rather look at.

Four panels: jobs per period (exports and imports stacked), transfer syntaxes on imported media
(horizontal bars: long syntax names stay readable, unlike pie labels), job wall time mean and p95
per kind and policy, and where that time goes (mean seconds per stage, stacked).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestration.statistics import KINDS, STAGE_ORDER

KIND_COLOURS = {"export": "#1f77b4", "import": "#ff7f0e"}
STAGE_COLOURS = {"scan": "#8c8c8c", "transcode": "#2ca02c", "media": "#1f77b4", "store": "#ff7f0e"}
LABELLED_PERIODS = 12
"""Up to this many bars carry their counts; beyond it the axis says enough."""
MAX_SYNTAXES = 8
"""More bars than this are summed as "other": a long tail of rare syntaxes says nothing at a glance."""


def plot_statistics(stats: dict[str, list[dict[str, Any]]], path: Path, by: str = "month") -> Path:
    """Write the four-panel figure to ``path`` (PNG) and return it."""
    # A bare Figure on the Agg canvas, not pyplot: no display needed, no global figure state to leak.
    figure = Figure(figsize=(15, 10), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    figure.suptitle("discflow: disc exports and imports", fontsize=16, fontweight="bold")
    _plot_periods(axes[0][0], stats["periods"], by)
    _plot_syntaxes(axes[0][1], stats["syntaxes"])
    _plot_job_times(axes[1][0], stats["stage_times"])
    _plot_stage_times(axes[1][1], stats["stage_times"])
    figure.savefig(path, dpi=100, format="png")
    return path


def _plot_periods(axes: Axes, periods: list[dict[str, Any]], by: str) -> None:
    axes.set_title(f"Jobs per {by}")
    if not periods:
        return _no_data(axes, "no jobs")
    labels = [row["period"] for row in periods]
    bottom = [0] * len(periods)
    tallest = max(sum(row[kind]["jobs"] for kind in KINDS) for row in periods) or 1
    for kind in KINDS:
        counts = [row[kind]["jobs"] for row in periods]
        bars = axes.bar(labels, counts, bottom=bottom, label=f"{kind}s", color=KIND_COLOURS[kind])
        if len(periods) <= LABELLED_PERIODS:  # narrower bars cannot hold their numbers
            axes.bar_label(bars, labels=_fitting(counts, tallest, str), label_type="center", color="white",
                           fontweight="bold")
        bottom = [b + c for b, c in zip(bottom, counts)]
    if len(periods) <= LABELLED_PERIODS:
        _annotate_instances(axes, periods, bottom)
    axes.set_ylabel("jobs")
    axes.set_ylim(0, max(bottom + [1]) * 1.15)
    axes.legend(loc="upper left", ncols=2)
    if len(periods) > 6:  # slanted, anchored at their right end so each label sits under its bar
        axes.tick_params(axis="x", rotation=45)
        for label in axes.get_xticklabels():
            label.set_horizontalalignment("right")
    axes.grid(axis="y", alpha=0.3)


def _annotate_instances(axes: Axes, periods: list[dict[str, Any]], tops: list[int]) -> None:
    """Instances above each bar: the workload, not only the job count."""
    for x, row in enumerate(periods):
        instances = sum(row[kind]["instances"] for kind in KINDS)
        axes.annotate(f"{instances:,} images", (x, tops[x]), ha="center", va="bottom", fontsize=8, color="#444444")


def _plot_syntaxes(axes: Axes, syntaxes: list[dict[str, Any]]) -> None:
    axes.set_title("Transfer syntaxes on imported media (instances)")
    if not syntaxes:
        return _no_data(axes, "no finished import jobs")
    shown = syntaxes[:MAX_SYNTAXES]
    rest = syntaxes[MAX_SYNTAXES:]
    names = [_syntax_label(row) for row in shown] + (["other"] if rest else [])
    counts = [row["instances"] for row in shown] + ([sum(r["instances"] for r in rest)] if rest else [])
    percents = [row["percent"] for row in shown] + ([round(sum(r["percent"] for r in rest), 2)] if rest else [])
    positions = range(len(names))
    bars = axes.barh(positions, counts, color="#9467bd")
    axes.set_yticks(list(positions), names)
    axes.invert_yaxis()  # most frequent on top
    axes.bar_label(bars, labels=[f"{c:,} ({p:.1f} %)" for c, p in zip(counts, percents)], padding=3)
    axes.set_xlim(0, max(counts) * 1.3)
    axes.set_xlabel("instances")
    axes.grid(axis="x", alpha=0.3)


def _plot_job_times(axes: Axes, rows: list[dict[str, Any]]) -> None:
    # Horizontal, in the same order as the stage panel beside it: policy names never collide.
    axes.set_title("Job wall time per kind and policy (succeeded jobs)")
    if not rows:
        return _no_data(axes, "no succeeded jobs")
    labels = [f"{row['kind']} {row['policy']}\n(n={row['jobs']})" for row in rows]
    y = range(len(rows))
    height = 0.4
    colours = [KIND_COLOURS.get(r["kind"], "#777777") for r in rows]
    means = axes.barh([i - height / 2 for i in y], [r["mean_seconds"] for r in rows], height, label="mean",
                      color=colours)
    p95s = axes.barh([i + height / 2 for i in y], [r["p95_seconds"] for r in rows], height, label="p95",
                     color=colours, alpha=0.45, hatch="//")
    for bars in (means, p95s):
        axes.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    axes.set_yticks(list(y), labels)
    axes.invert_yaxis()
    axes.set_xlabel("seconds")
    axes.set_xlim(0, (max(r["p95_seconds"] for r in rows) or 1) * 1.12)  # room for the value labels
    _legend_below(axes)
    axes.grid(axis="x", alpha=0.3)


def _plot_stage_times(axes: Axes, rows: list[dict[str, Any]]) -> None:
    axes.set_title("Mean seconds per stage (stage wall time)")
    if not rows:
        return _no_data(axes, "no succeeded jobs")
    labels = [f"{row['kind']}\n{row['policy']}" for row in rows]
    left = [0.0] * len(rows)
    stages = [s for s in STAGE_ORDER if any(s in row["stages"] for row in rows)]
    longest = max(sum(stage["mean_seconds"] for stage in row["stages"].values()) for row in rows) or 1.0
    for stage in stages:
        means = [row["stages"].get(stage, {}).get("mean_seconds", 0.0) for row in rows]
        bars = axes.barh(labels, means, left=left, label=stage, color=STAGE_COLOURS.get(stage))
        axes.bar_label(bars, labels=_fitting(means, longest, "{:.1f}".format), label_type="center", fontsize=8,
                       color="white")
        left = [a + b for a, b in zip(left, means)]
    axes.invert_yaxis()  # same order as the panel beside it, top to bottom
    axes.set_xlim(0, longest * 1.05)
    axes.set_xlabel("seconds")
    _legend_below(axes)
    axes.grid(axis="x", alpha=0.3)


def _legend_below(axes: Axes) -> None:
    """Under the axis, in one row: inside, it would cover the longest bar whatever the corner."""
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=4, frameon=False)


def _fitting(values: list[float], largest: float, text) -> list[str]:
    """Segment labels only where the segment is tall enough to hold one (no overprinted digits)."""
    return [text(value) if value and value >= 0.06 * largest else "" for value in values]


def _syntax_label(row: dict[str, Any]) -> str:
    """Syntax names run to 90 characters; the long JPEG ones differ only after the first comma, so
    those keep their first clause and the UID instead. Two lines of 30 at most."""
    name = row["name"]
    if len(name) > 44 and "," in name:
        name = f"{name.split(',')[0]} ({row['uid']})"
    return textwrap.fill(name, width=30, max_lines=2, placeholder=" …")


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes,
              fontsize=12, color="#777777")
    axes.set_xticks([])
    axes.set_yticks([])
