"""Paper-ready scaling plots drawn by seaborn, readable in greyscale, for the report and for notebooks.

Every plot function draws into ``ax`` (a new figure's axes when None) and returns the axes. None
changes matplotlib's global state: no backend switch, no ``rcParams`` update; the paper style
applies only inside :func:`paper_style`, a context (the report draws its figures inside it; in a
notebook, wrap a call in ``with paper_style():`` to get the same look). The functions take plain
DataFrames, long form (one row per point, a column naming the series), as seaborn does: sizes
and methods are told apart by marker and dash pattern (``style``) as well as by colour (``hue``).
Writing files is the caller's business (:mod:`cmscale.analysis.render` writes PNG, PDF and the
CSV of each figure's data).
"""

from __future__ import annotations

from contextlib import contextmanager

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DASHES = ["", (4, 1.5), (4, 1.5, 1, 1.5), (1, 1), (5, 1), (3, 1, 1, 1)]  # seaborn dash specs ("": solid)
PAPER_RC = {"figure.dpi": 120, "savefig.dpi": 200, "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False}
BAND_COLUMNS = {"lo", "hi"}


@contextmanager
def paper_style():
    """The paper look (seaborn's ``paper`` context, ``ticks`` style, light grid) for what is
    created and drawn inside; rcParams are restored on exit."""
    with (
        sns.axes_style("ticks"),
        sns.plotting_context("paper", font_scale=1.1),
        mpl.rc_context({**PAPER_RC, "font.family": "sans-serif"}),
    ):
        yield


def _axes(ax, figsize: tuple[float, float]):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt  # only when the caller gave no axes: a figure of the current backend

    return plt.figure(figsize=figsize).subplots()


def _series_styles(names: list[str]) -> tuple[dict, dict, dict]:
    """hue palette, markers and dashes per series name, in order (a sequential palette)."""
    palette = sns.color_palette("viridis", n_colors=max(len(names), 1))
    return (
        dict(zip(names, palette)),
        {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(names)},
        {name: DASHES[i % len(DASHES)] for i, name in enumerate(names)},
    )


def _bands(ax, curves: pd.DataFrame, by: str, colors: dict | str, alpha: float) -> None:
    """Shaded bootstrap bands (columns lo, hi) of each series of ``curves``."""
    if not BAND_COLUMNS <= set(curves.columns):
        return
    for name, sub in curves.groupby(by, sort=False):
        color = colors[name] if isinstance(colors, dict) else colors
        ax.fill_between(sub["x"], sub["lo"], sub["hi"], color=color, alpha=alpha, linewidth=0)


def _legend(ax, fontsize: float) -> None:
    """One legend: seaborn's entries (hue and style) followed by every labelled matplotlib artist."""
    handles, labels = [], []
    if (old := ax.get_legend()) is not None:
        handles, labels = list(old.legend_handles), [t.get_text() for t in old.get_texts()]
    for handle, label in zip(*ax.get_legend_handles_labels()):
        if label not in labels:
            handles.append(handle)
            labels.append(label)
    if handles:
        ax.legend(handles, labels, fontsize=fontsize, frameon=False)


def size_label(size: str, params: float) -> str:
    return f"{size} ({params / 1e6:.2g}M)"


def fid_vs_compute(
    points: pd.DataFrame,
    curves: pd.DataFrame | None = None,
    frontier: pd.DataFrame | None = None,
    frontier_fit: pd.DataFrame | None = None,
    *,
    title: str = "",
    ax=None,
):
    """FID against training FLOPs per size, log-log.

    ``points``: columns size, params, train_flops, fid (one row per eval). ``curves``: the per-size
    laws, columns size, x, y[, lo, hi] (bootstrap band). ``frontier``: columns x, y (the lower
    envelope over runs). ``frontier_fit``: columns x, y[, lo, hi] (the law fitted to it).
    """
    ax = _axes(ax, (5.2, 3.8))
    sizes = points.sort_values("params").drop_duplicates("size")
    labels = {row.size: size_label(row.size, row.params) for row in sizes.itertuples()}
    order = list(labels.values())
    palette, markers, dashes = _series_styles(order)
    with paper_style():
        sns.scatterplot(
            data=points.assign(size=points["size"].map(labels)), x="train_flops", y="fid", hue="size", style="size",
            hue_order=order, style_order=order, palette=palette, markers=markers, s=36, edgecolor="black",
            linewidth=0.5, zorder=3, ax=ax,
        )
        if curves is not None and len(curves):
            curves = curves.assign(size=curves["size"].map(labels))
            sns.lineplot(
                data=curves, x="x", y="y", hue="size", style="size", hue_order=order, style_order=order,
                palette=palette, dashes=dashes, estimator=None, sort=True, linewidth=1.3, legend=False, ax=ax,
            )
            _bands(ax, curves, "size", palette, 0.15)
        if frontier is not None and len(frontier):
            ax.plot(frontier["x"], frontier["y"], color="black", linewidth=2.2, label="frontier", zorder=5)
        if frontier_fit is not None and len(frontier_fit):
            ax.plot(frontier_fit["x"], frontier_fit["y"], color="0.35", linewidth=1.2, linestyle="--",
                    label="frontier fit")
            _bands(ax, frontier_fit.assign(series="fit"), "series", "0.5", 0.2)
        log_axes(ax)
        ax.set(xlabel="training compute (FLOPs)", ylabel="FID", title=title)
        _legend(ax, 8)
    return ax


def optimal_size_vs_compute(
    optima: pd.DataFrame, envelope: pd.DataFrame | None = None, fits: pd.DataFrame | None = None, *,
    title: str = "", ax=None,
):
    """N_opt against compute by each approach. ``optima``: iso-FLOP rows (compute, n_opt,
    interior); ``envelope``: grid rows (compute, params); ``fits``: columns approach, x, y[, lo, hi]."""
    ax = _axes(ax, (4.8, 3.6))
    with paper_style():
        if envelope is not None and len(envelope):
            ax.step(envelope["compute"], envelope["params"], where="mid", color="0.55", linewidth=1.2,
                    label="envelope's run size")
        flags = np.where(optima["interior"], "iso-FLOP optimum", "at size-grid edge (excluded)")
        sns.scatterplot(
            data=optima.assign(optimum=flags), x="compute", y="n_opt", style="optimum", color="black",
            markers={"iso-FLOP optimum": "o", "at size-grid edge (excluded)": "X"}, s=40, ax=ax,
        )
        if fits is not None and len(fits):
            approaches = list(dict.fromkeys(fits["approach"]))
            sns.lineplot(
                data=fits.assign(approach=fits["approach"].map(lambda a: f"$N_{{opt}} = k C^a$ ({a})")),
                x="x", y="y", style="approach", color="0.1", dashes=[(4, 1.5), (1, 1), (4, 1.5, 1, 1.5)][
                    : len(approaches)], estimator=None, sort=True, ax=ax,
            )
            _bands(ax, fits, "approach", "0.5", 0.15)
        log_axes(ax)
        ax.set(xlabel="training compute (FLOPs)", ylabel="compute-optimal parameters", title=title)
        _legend(ax, 7)
    return ax


def teacher_student(pairs: pd.DataFrame, *, title: str = "", ax=None):
    """Teacher and student FID by size (top), and their ratio (bottom).

    ``pairs``: columns params, teacher_fid, student_fid, group (e.g. 'scd 2-step'). ``ax``: a pair
    of axes (top, bottom); returns that pair.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.figure(figsize=(5.0, 5.2)).subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top, bottom = ax
    groups = sorted(pairs["group"].unique())
    palette, markers, dashes = _series_styles(groups)
    means = pairs.groupby(["group", "params"], as_index=False)[["student_fid", "teacher_fid"]].mean()
    means["ratio"] = means["student_fid"] / means["teacher_fid"]
    teacher = pairs.groupby("params", as_index=False)["teacher_fid"].mean().sort_values("params")
    with paper_style():
        top.plot(teacher["params"], teacher["teacher_fid"], "-o", color="black", label="teacher", markersize=6)
        style = {"hue": "group", "style": "group", "hue_order": groups, "style_order": groups, "palette": palette,
                 "markers": markers, "dashes": dashes, "estimator": None, "sort": True}
        sns.lineplot(data=means, x="params", y="student_fid", ax=top, **style)
        sns.lineplot(data=means, x="params", y="ratio", legend=False, ax=bottom, **style)
        bottom.axhline(1.0, color="0.5", linewidth=0.8)
        log_axes(top)
        log_axes(bottom, y=False)
        top.set(ylabel="FID", title=title, xlabel="")
        bottom.set(ylabel="student / teacher", xlabel="parameters")
        _legend(top, 8)
    return ax


def fid_vs_sampling_compute(points: pd.DataFrame, *, title: str = "", ax=None):
    """FID against effective sampling compute (NFE x forward FLOPs per image), per method and size.

    ``points``: columns label (method and steps), size, sampling_flops_per_image, fid.
    """
    ax = _axes(ax, (5.2, 3.8))
    labels = sorted(points["label"].unique())
    palette, markers, dashes = _series_styles(labels)
    with paper_style():
        sns.lineplot(
            data=points, x="sampling_flops_per_image", y="fid", hue="label", style="label", hue_order=labels,
            style_order=labels, palette=palette, markers=markers, dashes=dashes, estimator=None, sort=True,
            markeredgecolor="black", markeredgewidth=0.4, ax=ax,
        )
        log_axes(ax)
        ax.set(xlabel="sampling compute per image (NFE x FLOPs)", ylabel="FID", title=title)
        _legend(ax, 8)
    return ax


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
