"""The sweep report as figures and text: ``report.html`` (standalone), ``report.md`` and ``report.json``.

The numbers come from :func:`cmscale.analysis.report.analyse_sweep` and
:func:`cmscale.analysis.report.findings`; this module only turns them into figures (PNG, PDF, and
a CSV of each figure's points and fitted curves with their bands, beside it) and into text. The
page leads with its findings: a summary table per method and sampler steps (per-size compute
exponent, frontier exponent, N_opt ∝ C^a by iso-FLOP profiles, the envelope and the joint law, or
why not, student/teacher ratio and its slope) with one sentence per method. Warnings follow,
grouped by kind with counts and their details collapsed; then the figures (each with its SQL,
collapsed), the fit tables and the runs. HTML and Markdown come from the jinja2 templates in
``cmscale/analysis/templates``.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cmscale.analysis import data as D
from cmscale.analysis import plots
from cmscale.analysis.pipeline import MethodAnalysis, joint_n_opt_curve
from cmscale.analysis.report import (
    SweepAnalysis,
    analyse_sweep,
    choice_param,
    ema_section,
    finding,
    findings,
    joint_n_opt_text,
    ladder_finding,
    n_opt_text,
    num,
    with_ci,
)
from cmscale.analysis.selection import LawChoice
from cmscale.rundir import DB_FILE

SUMMARY_ID = "summary"
FIGURE_FORMATS = ("png", "pdf")


@dataclass
class FigureRecord:
    key: str
    title: str
    caption: str
    sql: list[str]
    paths: dict[str, Path]  # png, pdf and csv (the figure's data)


# --------------------------------------------------------------------------------------------
# Figures: each drawn from the analysis, saved with the CSV of what it shows
# --------------------------------------------------------------------------------------------


def _layer(frame: pd.DataFrame, layer: str, x: str, y: str, series=None, **extra: str) -> pd.DataFrame:
    """One layer of a figure's data in long form: layer, series, x, y[, lo, hi] and ``extra`` columns."""
    out = pd.DataFrame({"layer": layer, "series": frame[series] if series in frame else series,
                        "x": frame[x], "y": frame[y]})
    for column in ("lo", "hi"):
        if column in frame:
            out[column] = frame[column]
    for name, column in extra.items():
        out[name] = frame[column]
    return out


def _save(figure, out_dir: Path, stem: str, layers: list[pd.DataFrame]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in FIGURE_FORMATS}
    with plots.paper_style():
        for path in paths.values():
            figure.savefig(path, bbox_inches="tight")
    paths["csv"] = out_dir / f"{stem}.csv"
    pd.concat([layer for layer in layers if len(layer)], ignore_index=True).to_csv(paths["csv"], index=False)
    return paths


def _figure(figsize: tuple[float, float], **subplots):
    """A figure outside pyplot (no backend involved) in the paper style, and its axes."""
    from matplotlib.figure import Figure

    with plots.paper_style():
        figure = Figure(figsize=figsize)
        return figure, figure.subplots(**subplots)


def _band_frame(choice: LawChoice, x) -> pd.DataFrame:
    frame = pd.DataFrame({"x": x, "y": choice.kept.predict(x)})
    if choice.kept.bootstrap is not None:
        frame["lo"], frame["hi"] = choice.kept.bootstrap.band(x)
    return frame


def _joint_curve_frame(result: MethodAnalysis, compute, level: float = 0.95) -> pd.DataFrame | None:
    """The joint law's N_opt(C) with a bootstrap band, where its exponent is reported."""
    choice, exponent = result.joint, result.joint_n_opt
    if choice is None or exponent is None or exponent.a is None:
        return None
    frame = pd.DataFrame({"x": compute, "y": joint_n_opt_curve(choice.params, exponent.kappa, compute)})
    bootstrap = choice.kept.bootstrap
    if bootstrap is not None and bootstrap.n_draws:
        curves = np.array(
            [joint_n_opt_curve({choice.names.get(k, k): v for k, v in draw.items()}, exponent.kappa, compute)
             for draw in bootstrap.param_dicts()]
        )
        tail = 100 * (1 - level) / 2
        frame["lo"], frame["hi"] = np.nanpercentile(curves, [tail, 100 - tail], axis=0)
    return frame


def _compute_figure(result: MethodAnalysis, fig_dir: Path, stem: str) -> FigureRecord:
    points = result.points.rename(columns={"preset": "size"})
    curves = []
    for preset, choice in result.size_fits.items():
        if choice.kept is not None:
            flops = points.loc[points["size"] == preset, "train_flops"]
            curves.append(_band_frame(choice, plots.log_grid(flops.min(), flops.max())).assign(size=preset))
    curves = pd.concat(curves, ignore_index=True) if curves else None
    frontier = None if result.envelope is None else result.envelope.rename(columns={"compute": "x"})
    frontier_fit = None
    if result.frontier is not None and result.frontier.kept is not None:
        frontier_fit = _band_frame(result.frontier, plots.log_grid(points["train_flops"].min(),
                                                                   points["train_flops"].max()))
    title = f"{result.title}: FID vs training compute"
    figure, ax = _figure((5.2, 3.8))
    plots.fid_vs_compute(points, curves, frontier, frontier_fit, title=title, ax=ax)
    layers = [_layer(points, "eval", "train_flops", "fid", "size", run="run_id", params="params")]
    if curves is not None:
        layers.append(_layer(curves, "size law", "x", "y", "size"))
    if frontier is not None:
        layers.append(_layer(frontier, "envelope", "x", "y", "size", run="run"))
    if frontier_fit is not None:
        layers.append(_layer(frontier_fit, "frontier law", "x", "y", result.frontier.kept_law))
    return FigureRecord(
        f"{stem}_compute",
        title,
        "Points: evals per size (marker/line style per size). Lines: per-size laws with 95% bootstrap bands "
        "(runs resampled). Thick black: the lower envelope over runs on a common compute grid (each run "
        "interpolated within its own range); dashed grey: the law fitted to the envelope.",
        [result.sql],
        _save(figure, fig_dir, f"{stem}_compute", layers),
    )


def _n_opt_figure(result: MethodAnalysis, fig_dir: Path, stem: str) -> FigureRecord:
    optimal = result.optimal
    grid = plots.log_grid(optimal.optima["compute"].min(), optimal.optima["compute"].max())
    fits = []
    for name, fit in (("iso-FLOP", optimal.isoflop), ("envelope", optimal.envelope_fit)):
        if fit.a is not None:
            lo, hi = fit.band(grid)
            fits.append(pd.DataFrame({"approach": name, "x": grid, "y": fit.predict(grid), "lo": lo, "hi": hi}))
    joint_curve = _joint_curve_frame(result, grid)
    if joint_curve is not None:
        fits.append(joint_curve.assign(approach="joint law"))
    fits = pd.concat(fits, ignore_index=True) if fits else None
    figure, ax = _figure((4.8, 3.6))
    plots.optimal_size_vs_compute(optimal.optima, optimal.envelope, fits, title=f"{result.title}: compute-optimal size",
                                  ax=ax)
    layers = [
        _layer(optimal.optima, "iso-FLOP optimum", "compute", "n_opt", interior="interior"),
        _layer(optimal.envelope, "envelope's run size", "compute", "params", "size"),
    ]
    if fits is not None:
        layers.append(_layer(fits, "N_opt = k C^a", "x", "y", "approach"))
    return FigureRecord(
        f"{stem}_nopt",
        f"{result.title}: N_opt vs C",
        "Circles: iso-FLOP optima (parabola in log N through the best size and its neighbours); "
        "crosses: optimum at the size grid's edge, excluded. Steps: size of the envelope's run. "
        "Lines: N_opt = k C^a where >= 3 budgets are interior, and the joint law's N_opt(C) where "
        "its exponent is reported (bands: 95% bootstrap).",
        [result.sql],
        _save(figure, fig_dir, f"{stem}_nopt", layers),
    )


def draw_figures(analysis: SweepAnalysis, fig_dir: Path | str) -> list[FigureRecord]:
    """Every figure of the report into ``fig_dir``: PNG, PDF and the CSV of its data."""
    fig_dir = Path(fig_dir)
    records = []
    for result in analysis.methods:
        stem = "teacher" if D.is_teacher(result.method) else f"{result.method}_{result.metric.name}"
        records.append(_compute_figure(result, fig_dir, stem))
        if result.optimal is not None and len(result.optimal.optima):
            records.append(_n_opt_figure(result, fig_dir, stem))
    pairs = analysis.ratio_pairs
    if len(pairs):
        figure, axes = _figure((5.0, 5.2), nrows=2, ncols=1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        plots.teacher_student(pairs, title="teacher vs student FID", ax=axes)
        layers = [
            _layer(pairs, "teacher", "params", "teacher_fid", "teacher_run_id"),
            _layer(pairs, "student", "params", "student_fid", "group", run="run_id"),
            _layer(pairs.assign(ratio=pairs["student_fid"] / pairs["teacher_fid"]), "ratio", "params", "ratio",
                   "group", run="run_id"),
        ]
        records.append(FigureRecord(
            "teacher_student",
            "Teacher vs student FID by size",
            "Top: teacher (Heun) and student FID per size, each student run paired with the teacher of "
            "the same preset and seed, at the student's largest budget. Bottom: the ratio.",
            [analysis.sql["ratio_pairs"]],
            _save(figure, fig_dir, "teacher_student", layers),
        ))
    sampling = analysis.sampling
    if len(sampling):
        figure, ax = _figure((5.2, 3.8))
        plots.fid_vs_sampling_compute(sampling, title="FID vs sampling compute", ax=ax)
        records.append(FigureRecord(
            "sampling",
            "FID vs sampling compute",
            "Final evals of each method's largest-budget runs: FID against NFE x forward FLOPs per image.",
            [analysis.sql["final_evals"]],
            _save(figure, fig_dir, "sampling",
                  [_layer(sampling, "final eval", "sampling_flops_per_image", "fid", "label", size="size")]),
        ))
    return records


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

SUMMARY_HEADER = [
    "method",
    "per-size compute exponent alpha [95% CI]",
    "frontier exponent",
    "N_opt ∝ C^a: iso-FLOP; envelope; joint law",
    "student/teacher FID ratio; slope on log N",
    "what the study shows",
]
LADDER_N_OPT = "- (one teacher per size, each to a fixed budget: a size ladder, not a compute sweep)"
FIT_HEADER = ["fit", "law kept (AIC)", "E", "A", "B", "alpha", "beta", "status", "n", "CI note"]
OPTIMA_HEADER = ["budget C", "N_opt", "best grid size", "FID there", "sizes reaching C", "flag", "reason"]
HOLDOUT_HEADER = ["run", "size", "budget", "step", "train FLOPs", "FID", "predicted", "log error", "curve CI", "in CI",
                  "prediction interval", "in PI"]
RATIO_HEADER = ["group", "pairs", "mean ratio [95% CI]", "absolute gap [95% CI]", "slope of log r on log N [95% CI]",
                "p (slope = 0)"]
RUN_HEADER = ["run", "method", "size", "params", "budget", "seed", "status"]


def summary_rows(analysis: SweepAnalysis) -> list[list[str]]:
    rows = []
    for result in analysis.methods:
        if result.ladder is not None:
            rows.append([result.title, "-", "-", LADDER_N_OPT, "-", ladder_finding(result.ladder)])
            continue
        per_size = "; ".join(f"{p}: {choice_param(c, 'alpha')}" for p, c in result.size_fits.items()) or "not fitted"
        optimal = result.optimal
        n_opt = (
            "-"
            if optimal is None
            else f"{n_opt_text(optimal.isoflop)}; envelope: {n_opt_text(optimal.envelope_fit)}; "
            f"joint law: {joint_n_opt_text(result.joint_n_opt)}"
        )
        ratio = analysis.ratio.get(result.ratio_group)
        ratio_text = (
            "-" if not ratio
            else f"{with_ci('r', ratio['mean_ratio'], ratio['ci'])}; slope "
            f"{with_ci('slope', ratio['slope'], ratio['slope_ci'])}"
        )
        rows.append([result.title, per_size, choice_param(result.frontier, "alpha"), n_opt, ratio_text,
                     finding(result, ratio)])
    return rows


def _fit_row(label: str, choice: LawChoice) -> list[str]:
    names = ("E", "A", "B", "alpha", "beta")
    requested = (
        {"E"}
        | set(choice.kept.params if choice.kept else ())
        | ({"A", "B", "alpha", "beta"} if choice.form == "joint" else {"A", "alpha"})
    )
    cells = [choice_param(choice, n) if n in requested else "" for n in names]
    status = choice.kept.status if choice.kept else "none identified"
    ci = choice.ci_note or ("" if choice.kept is None or choice.kept.bootstrap else "no CI")
    return [label, choice.kept_law or "-", *cells, status, str(choice.kept.n_points if choice.kept else "-"), ci]


def _method_tables(result: MethodAnalysis, n_draws: int) -> list[dict]:
    if result.ladder is not None:
        rows = [[r.preset, num(r.params), str(int(r.step)), num(r.train_flops), num(r.fid)]
                for r in result.ladder.itertuples()]
        return [_table(f"{result.title}: FID by size", ["size", "params", "iterations", "training FLOPs", "FID"],
                       rows, ladder_finding(result.ladder))]
    rows = [_fit_row(f"size {p} ({result.params_of(p) / 1e6:.3g}M)", c) for p, c in result.size_fits.items()]
    notes = []
    if result.frontier is not None:
        rows.append(_fit_row("frontier (envelope over runs)", result.frontier))
    if result.joint is not None:
        rows.append(_fit_row("joint E + A N^-alpha + B D^-beta", result.joint))
        joint = result.joint_n_opt
        notes.append(
            "joint law (each run's final eval): N_opt ∝ C^a with a = beta/(alpha+beta): " + joint_n_opt_text(joint)
            + ("" if joint.flops_per_image_exponent is None
               else f" (training FLOPs per image ∝ N^{joint.flops_per_image_exponent:.3g} across the runs).")
        )
    tables = [_table(
        f"{result.title}: fits (95% bootstrap CIs, runs resampled, {n_draws} draws)", FIT_HEADER, rows,
        " ".join(notes) + " Nested laws are chosen by AIC among those with every parameter inside its bounds; "
        "[unbounded]: the CI spans more than 3 decades, reaches 0 or an exponent bound.",
    )]
    optimal = result.optimal
    if optimal is not None and len(optimal.optima):
        rows = [[num(r.compute), num(r.n_opt), num(r.n_best), num(r.y_best), str(r.n_sizes),
                 "interior" if r.interior else "edge", r.reason] for r in optimal.optima.itertuples()]
        tables.append(_table(
            f"{result.title}: compute-optimal size per budget (iso-FLOP profiles)", OPTIMA_HEADER, rows,
            f"iso-FLOP: {n_opt_text(optimal.isoflop)}. Envelope: {n_opt_text(optimal.envelope_fit)}. "
            f"Bootstrap over {optimal.n_runs} runs.",
        ))
    if result.holdout is not None:
        h = result.holdout
        rows = [
            [r.run_id, r.preset, num(r.budget_flops), str(int(r.step)), num(r.train_flops), num(r.fid), num(r.pred),
             f"{r.log_error:+.3f}", f"[{num(r.ci_lo)}, {num(r.ci_hi)}]", "yes" if r.inside_ci else "no",
             f"[{num(r.pi_lo)}, {num(r.pi_hi)}]", "yes" if r.inside_pi else "no"]
            for r in h.points.sort_values(["params", "step"]).itertuples()
        ]
        tables.append(_table(
            f"{result.title}: extrapolation (joint law fitted without budget {num(h.held_values[0])}; "
            "one row per held-out run, at its final eval)", HOLDOUT_HEADER, rows,
            f"mean |log error| {h.mean_abs_log_error:.3f}, RMS {h.rms_log_error:.3f}; fit status {h.fit.status}",
        ))
    return tables


def _table(title: str, header: list[str], rows: list[list[str]], note: str = "") -> dict:
    return {"title": title, "header": header, "rows": rows, "note": note}


EMA_HEADER = ["run", "method", "size", "sampler steps", "EMA (ema_sigma_rel)", "step", "final FID"]


def tables(analysis: SweepAnalysis) -> list[dict]:
    """Every table below the summary: title, header, rows (text) and note."""
    out = [table for result in analysis.methods for table in _method_tables(result, analysis.n_draws)]
    if analysis.ratio:
        rows = [
            [group, str(r["n_points"]), with_ci("r", r["mean_ratio"], r["ci"]), with_ci("gap", r["gap"], r["gap_ci"]),
             with_ci("slope", r["slope"], r["slope_ci"]), num(r["slope_p"], 3)]
            for group, r in analysis.ratio.items()
        ]
        out.append(_table(
            "Teacher-student FID ratio r = FID_student / FID_teacher", RATIO_HEADER, rows,
            "Pairs: student run and teacher of the same preset and seed; each student's largest budget. "
            "OLS of log r on log params (statsmodels).",
        ))
    section = ema_section(analysis)
    if section is not None:
        rows = [
            [t["run_id"], t["method"], t["preset"], str(t["sampler_steps"]),
             D.ema_text(t["ema_sigma_rel"], t["posthoc"]), f"{t['step']:,}", num(t["fid"])]
            for t in section["taken"]
        ]
        out.append(_table("EMA taken per run", EMA_HEADER, rows, section["description"] + "."))
    return out


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _templates():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("cmscale.analysis", "templates"),
        autoescape=select_autoescape(["html.j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md_cell"] = _md_cell
    return env


def page_context(analysis: SweepAnalysis, figures: list[FigureRecord], out_dir: Path) -> dict:
    """Everything the templates show, as text."""
    runs = analysis.runs
    counts = runs["status"].value_counts().to_dict()
    warnings: dict[str, list[str]] = defaultdict(list)
    for warning in analysis.warnings:
        warnings[warning.kind].append(warning.text)
    return {
        "sweep": analysis.sweep,
        "summary_id": SUMMARY_ID,
        "facts": (
            f"{len(runs)} runs ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); sizes "
            f"{', '.join(runs.sort_values('params')['preset'].drop_duplicates())}. "
            f"Store: {Path(analysis.root) / DB_FILE}. {analysis.n_draws} bootstrap draws per fit (runs resampled, "
            f"seed {analysis.seed}); analysis took {analysis.seconds:.1f} s. {analysis.ema.description}. "
            f"{D.GUIDANCE_DESCRIPTION}"
        ),
        "compute_note": (
            "Training compute is the student's own counted FLOPs (forward, backward, JVP and teacher forwards per "
            "step); the teacher's pretraining compute is not included in a student's C."
        ),
        "summary": _table("Summary", SUMMARY_HEADER, summary_rows(analysis)),
        "n_warnings": len(analysis.warnings),
        "warning_groups": sorted(warnings.items(), key=lambda item: -len(item[1])),
        "figures": [
            {
                "title": r.title,
                "caption": r.caption,
                "sql": r.sql,
                "png_base64": base64.b64encode(r.paths["png"].read_bytes()).decode(),
                **{ext: str(r.paths[ext].relative_to(out_dir)) for ext in ("png", "pdf", "csv")},
            }
            for r in figures
        ],
        "tables": tables(analysis),
        "runs_sql": D.runs_sql(analysis.sweep),
        "runs": _table("Runs", RUN_HEADER, [
            [r.run_id, r.method, r.preset, num(float(r.params)), num(r.budget_flops), str(r.seed), r.status]
            for r in runs.itertuples()
        ]),
    }


def write_report(
    root: Path | str, sweep: str, out_dir: Path | str, *, n_draws: int = 1000, seed: int = 0,
    ema: D.EmaChoice | None = None,
) -> dict[str, Path]:
    """Analyse ``sweep`` from the store under ``root`` and write ``out_dir/report.html`` (standalone),
    ``out_dir/report.md`` (figures and their CSVs in ``out_dir/figures``) and ``out_dir/report.json``
    (:func:`cmscale.analysis.report.findings`). Returns {"html": path, "md": path, "json": path}.
    ``ema``: which EMA of each run (:class:`cmscale.analysis.data.EmaChoice`; default the run's own)."""
    out_dir = Path(out_dir)
    analysis = analyse_sweep(root, sweep, n_draws=n_draws, seed=seed, ema=ema)
    return write_pages(analysis, out_dir)


def write_pages(analysis: SweepAnalysis, out_dir: Path) -> dict[str, Path]:
    """The figures, ``report.html``, ``report.md`` and ``report.json`` of an analysis into ``out_dir``."""
    figures = draw_figures(analysis, out_dir / "figures")
    context = page_context(analysis, figures, out_dir)
    env = _templates()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"html": out_dir / "report.html", "md": out_dir / "report.md", "json": out_dir / "report.json"}
    paths["html"].write_text(env.get_template("report.html.j2").render(context))
    paths["md"].write_text(env.get_template("report.md.j2").render(context))
    paths["json"].write_text(json.dumps(findings(analysis), indent=1))
    return paths
