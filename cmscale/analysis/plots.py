"""Paper-ready scaling plots with seaborn/matplotlib, readable in greyscale.

Each function takes plain DataFrames (and fitted curves as arrays) and returns a matplotlib
Figure; :func:`save_figure` writes PNG and PDF. Sizes are told apart by marker and line style as
well as by a sequential palette, so the plots survive greyscale printing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]


def paper_style() -> None:
    sns.set_theme(context="paper", style="ticks", font_scale=1.1)
    plt.rcParams.update(
        {"figure.dpi": 120, "savefig.dpi": 200, "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False}
    )


def _size_styles(sizes: list[str]) -> dict[str, dict]:
    palette = sns.color_palette("viridis", n_colors=max(len(sizes), 1))
    return {
        size: {"color": palette[i], "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}
        for i, size in enumerate(sizes)
    }


def save_figure(figure: plt.Figure, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("png", "pdf")}
    for path in paths.values():
        figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return paths


def fid_vs_compute(
    points: pd.DataFrame,
    title: str,
    curves: dict[str, pd.DataFrame] | None = None,
    frontier: pd.DataFrame | None = None,
    frontier_fit: pd.DataFrame | None = None,
) -> plt.Figure:
    """FID against training FLOPs per size, log-log.

    ``points``: columns size, params, train_flops, fid. ``curves``: size -> DataFrame(x, y[, lo, hi])
    of fitted curves with bootstrap bands. ``frontier``: DataFrame(x, y) of the lower envelope.
    ``frontier_fit``: DataFrame(x, y, lo, hi) of a law fitted to the frontier.
    """
    paper_style()
    sizes = list(points.sort_values("params")["size"].drop_duplicates())
    styles = _size_styles(sizes)
    figure, axis = plt.subplots(figsize=(5.2, 3.8))
    for size in sizes:
        style = styles[size]
        subset = points[points["size"] == size].sort_values("train_flops")
        params = int(subset["params"].iloc[0])
        axis.plot(
            subset["train_flops"],
            subset["fid"],
            marker=style["marker"],
            color=style["color"],
            linestyle="none",
            markersize=6,
            markeredgecolor="black",
            markeredgewidth=0.5,
            label=f"{size} ({params / 1e6:.2g}M)",
        )
        if curves and size in curves:
            curve = curves[size]
            axis.plot(curve["x"], curve["y"], color=style["color"], linestyle=style["linestyle"], linewidth=1.3)
            if {"lo", "hi"} <= set(curve.columns):
                axis.fill_between(curve["x"], curve["lo"], curve["hi"], color=style["color"], alpha=0.15, linewidth=0)
    if frontier is not None and len(frontier):
        axis.plot(frontier["x"], frontier["y"], color="black", linewidth=2.2, linestyle="-", label="frontier", zorder=5)
    if frontier_fit is not None and len(frontier_fit):
        axis.plot(
            frontier_fit["x"], frontier_fit["y"], color="0.35", linewidth=1.2, linestyle="--", label="frontier fit"
        )
        if {"lo", "hi"} <= set(frontier_fit.columns):
            axis.fill_between(
                frontier_fit["x"], frontier_fit["lo"], frontier_fit["hi"], color="0.5", alpha=0.2, linewidth=0
            )
    log_axes(axis)
    axis.set_xlabel("training compute (FLOPs)")
    axis.set_ylabel("FID")
    axis.set_title(title)
    axis.legend(fontsize=8, loc="best")
    return figure


def optimal_size_vs_compute(
    optima: pd.DataFrame, envelope: pd.DataFrame | None, fits: dict[str, pd.DataFrame], title: str
) -> plt.Figure:
    """N_opt against compute by each approach. ``optima``: iso-FLOP rows (compute, n_opt,
    interior); ``envelope``: grid rows (compute, params); ``fits``: approach -> DataFrame(x, y[, lo, hi])."""
    paper_style()
    figure, axis = plt.subplots(figsize=(4.8, 3.6))
    if envelope is not None and len(envelope):
        axis.step(
            envelope["compute"],
            envelope["params"],
            where="mid",
            color="0.55",
            linewidth=1.2,
            label="envelope's run size",
        )
    inner, edge = optima[optima["interior"]], optima[~optima["interior"]]
    axis.plot(inner["compute"], inner["n_opt"], "o", color="black", label="iso-FLOP optimum")
    if len(edge):
        axis.plot(edge["compute"], edge["n_opt"], "x", color="0.35", markersize=8, label="at size-grid edge (excluded)")
    for (name, fit), style in zip(fits.items(), ("--", ":", "-.")):
        axis.plot(fit["x"], fit["y"], style, color="0.1", label=f"$N_{{opt}} = k C^a$ ({name})")
        if {"lo", "hi"} <= set(fit.columns):
            axis.fill_between(fit["x"], fit["lo"], fit["hi"], color="0.5", alpha=0.15, linewidth=0)
    log_axes(axis)
    axis.set_xlabel("training compute (FLOPs)")
    axis.set_ylabel("compute-optimal parameters")
    axis.set_title(title)
    axis.legend(fontsize=7)
    return figure


def teacher_student(pairs: pd.DataFrame, title: str) -> plt.Figure:
    """Teacher and student FID by size, with a ratio panel.

    ``pairs``: columns params, teacher_fid, student_fid, group (e.g. 'scd 2-step').
    """
    paper_style()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.0, 5.2), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    groups = sorted(pairs["group"].unique())
    styles = _size_styles(groups)
    teacher = pairs.groupby("params", as_index=False)["teacher_fid"].mean().sort_values("params")
    top.plot(teacher["params"], teacher["teacher_fid"], "-o", color="black", label="teacher", markersize=6)
    for group in groups:
        subset = (
            pairs[pairs["group"] == group]
            .groupby("params", as_index=False)[["student_fid", "teacher_fid"]]
            .mean()
            .sort_values("params")
        )
        style = styles[group]
        top.plot(
            subset["params"],
            subset["student_fid"],
            marker=style["marker"],
            linestyle=style["linestyle"],
            color=style["color"],
            label=group,
        )
        bottom.plot(
            subset["params"],
            subset["student_fid"] / subset["teacher_fid"],
            marker=style["marker"],
            linestyle=style["linestyle"],
            color=style["color"],
        )
    bottom.axhline(1.0, color="0.5", linewidth=0.8)
    log_axes(top)
    log_axes(bottom, y=False)
    top.set_ylabel("FID")
    bottom.set_ylabel("student / teacher")
    bottom.set_xlabel("parameters")
    top.set_title(title)
    top.legend(fontsize=8)
    return figure


def fid_vs_sampling_compute(points: pd.DataFrame, title: str) -> plt.Figure:
    """FID against effective sampling compute (NFE x forward FLOPs per image), per method and size.

    ``points``: columns label (method and steps), size, sampling_flops_per_image, fid.
    """
    paper_style()
    figure, axis = plt.subplots(figsize=(5.2, 3.8))
    labels = sorted(points["label"].unique())
    styles = _size_styles(labels)
    for label in labels:
        subset = points[points["label"] == label].sort_values("sampling_flops_per_image")
        style = styles[label]
        axis.plot(
            subset["sampling_flops_per_image"],
            subset["fid"],
            marker=style["marker"],
            linestyle=style["linestyle"],
            color=style["color"],
            label=label,
            markeredgecolor="black",
            markeredgewidth=0.4,
        )
    log_axes(axis)
    axis.set_xlabel("sampling compute per image (NFE x FLOPs)")
    axis.set_ylabel("FID")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return figure


def log_axes(axis, x: bool = True, y: bool = True, max_labels: int = 6) -> None:
    """Log scale with legible ticks: labels only at a few round values (powers of ten, or 1-2-5
    steps when the range is under two decades), never on every minor tick, so labels cannot overlap."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    def label(value, _pos=None) -> str:
        exponent = int(np.floor(np.log10(value)))
        mantissa = value / 10.0**exponent
        if abs(mantissa - 1) < 1e-6:
            return f"$10^{{{exponent}}}$"
        return f"${mantissa:g}\\times10^{{{exponent}}}$" if exponent not in (-1, 0, 1, 2) else f"{value:g}"

    for enabled, which in ((x, "x"), (y, "y")):
        if not enabled:
            continue
        getattr(axis, f"set_{which}scale")("log")
        lo, hi = getattr(axis, f"get_{which}lim")()
        decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
        # the coarsest mantissa set that puts at least 3 labels on the axis
        for steps in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
            ticks = [m * 10.0**e for e in decades for m in steps if lo <= m * 10.0**e <= hi]
            if len(ticks) >= 3:
                break
        stride = max(1, int(np.ceil(len(ticks) / max_labels)))
        ticks = ticks[::stride] or [np.sqrt(lo * hi)]
        target = getattr(axis, f"{which}axis")
        target.set_major_locator(FixedLocator(ticks))
        target.set_major_formatter(FuncFormatter(label))
        target.set_minor_formatter(NullFormatter())


def log_grid(low: float, high: float, num: int = 64) -> np.ndarray:
    return np.logspace(np.log10(low), np.log10(high), num)
