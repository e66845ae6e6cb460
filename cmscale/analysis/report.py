"""The sweep report: every figure, fit table and warning of a sweep in one HTML file and one Markdown file.

:func:`analyse_sweep` reads the store (``cmscale.results.query(sql, root=root, ingest=False)``),
runs the analysis and draws the figures; :func:`write_report` renders ``report.html`` (figures
embedded as base64 PNG, so the file stands alone) and ``report.md`` (figures beside it under
``figures/``, PNG and PDF). Each figure is shown with the exact SQL that produced its data.

Per consistency-model method and sampler step count (and for the teachers' Heun evals):

* per-size saturating fits ``FID = E + A C^-alpha`` in training FLOPs C, clustered bootstrap over runs;
* the compute-optimal frontier (lower envelope over sizes), a saturating law fitted to it, and the
  optimal size per budget with ``N_opt = k C^a`` (edge budgets flagged and excluded);
* the joint law ``FID = E + A N^-alpha + B D^-beta`` (N params, D training images) and its
  extrapolation check: refit without the largest budget, predict the held-out runs.

Then the teacher-student ratio table and figure, and FID against sampling compute.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cmscale.analysis import data as D
from cmscale.analysis.extrapolation import HoldoutResult, holdout_validation
from cmscale.analysis.fit import FitResult, fit_with_bootstrap, single_threaded_blas
from cmscale.analysis.frontier import OptimalSizeFit, envelope, fit_optimal_size, frontier_line
from cmscale.analysis.ratio import ratio_table, sweep_pairs

MIN_POINTS_SATURATING = 5  # 3 parameters; fewer points leave no degrees of freedom worth a CI
MIN_RUNS_BOOTSTRAP = 3


@dataclass
class FigureRecord:
    key: str
    title: str
    caption: str
    sql: list[str]
    paths: dict[str, Path]


@dataclass
class MethodAnalysis:
    """Everything fitted for one (method, metric)."""

    method: str
    metric: D.Metric
    sql: str
    points: pd.DataFrame
    size_fits: dict[str, FitResult] = field(default_factory=dict)
    frontier_fit: FitResult | None = None
    optima: pd.DataFrame | None = None
    n_opt_fit: OptimalSizeFit | None = None
    joint: FitResult | None = None
    holdout: HoldoutResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.method == D.TEACHER_METHOD:
            return "teacher (edm, Heun)"
        return f"{self.method}, {self.metric.sampler_steps}-step"


@dataclass
class SweepAnalysis:
    sweep: str
    root: Path
    runs: pd.DataFrame
    methods: list[MethodAnalysis]
    ratio_pairs: pd.DataFrame
    ratio: dict[str, dict]
    sampling: pd.DataFrame
    warnings: list[str]
    figures: list[FigureRecord]
    n_draws: int
    seconds: float = 0.0


def _fit_safely(notes: list[str], what: str, call):
    try:
        return call()
    except ValueError as error:
        notes.append(f"{what}: not fitted ({error})")
        return None


def _analyse_method(method: str, metric: D.Metric, sql: str, points: pd.DataFrame, n_draws: int,
                    seed: int) -> MethodAnalysis:
    result = MethodAnalysis(method, metric, sql, points)
    notes = result.notes
    for preset, sub in points.groupby("preset", sort=False):
        if len(sub) < MIN_POINTS_SATURATING or sub["run_id"].nunique() < MIN_RUNS_BOOTSTRAP:
            notes.append(f"size {preset}: {len(sub)} evals from {sub['run_id'].nunique()} runs; a saturating fit needs "
                         f">= {MIN_POINTS_SATURATING} evals from >= {MIN_RUNS_BOOTSTRAP} runs")
            continue
        fit = _fit_safely(notes, f"size {preset}", lambda sub=sub: fit_with_bootstrap(
            "saturating", [sub["train_flops"].to_numpy(float)], sub["fid"].to_numpy(float), sub["run_id"].to_numpy(),
            n_draws=n_draws, seed=seed))
        if fit is not None:
            result.size_fits[str(preset)] = fit
    frontier_points = frontier_table(points)
    computes = np.sort(points["train_flops"].unique().astype(float))
    env = envelope(frontier_points, computes)
    if len(env) >= MIN_POINTS_SATURATING:
        result.frontier_fit = _fit_safely(notes, "frontier law", lambda: fit_with_bootstrap(
            "saturating", [env["compute"].to_numpy()], env["y"].to_numpy(), None, n_draws=n_draws, seed=seed))
    budgets = np.sort(points["budget_flops"].dropna().unique().astype(float))
    result.optima, result.n_opt_fit = fit_optimal_size(frontier_points, budgets, n_draws=n_draws, seed=seed)
    if result.n_opt_fit is None:
        notes.append(f"N_opt = k C^a: not fitted ({int((~result.optima['edge']).sum())} budget(s) with an interior "
                     "optimum; need >= 2)")
    joint_ok = points["params"].nunique() >= 2 and len(points) >= 7 and points["run_id"].nunique() >= MIN_RUNS_BOOTSTRAP
    if joint_ok:
        result.joint = _fit_safely(notes, "joint law", lambda: fit_with_bootstrap(
            "joint", [points["params"].to_numpy(float),
                      points["images_seen"].to_numpy(float)], points["fid"].to_numpy(float),
            points["run_id"].to_numpy(), n_draws=n_draws, seed=seed))
        if points["budget_flops"].nunique() >= 3:
            result.holdout = _fit_safely(notes, "extrapolation check", lambda: holdout_validation(
                points, form="joint", x_cols=["params", "images_seen"], y_col="fid", by="budget_flops", k=1,
                group_col="run_id", n_draws=n_draws, seed=seed))
    else:
        notes.append("joint law: needs >= 2 sizes, >= 7 evals and >= 3 runs")
    return result


def frontier_table(points: pd.DataFrame) -> pd.DataFrame:
    """Eval rows -> frontier points: seeds of one (size, budget) share a curve; runs resample."""
    return pd.DataFrame({
        "size": points["preset"].astype(str), "params": points["params"].astype(float),
        "compute": points["train_flops"].astype(float), "y": points["fid"].astype(float),
        "curve": points["budget_flops"].map(lambda b: f"{b:.6g}"), "run": points["run_id"].astype(str),
    })


def _band_frame(fit: FitResult, x: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"x": x, "y": fit.predict(x)})
    if fit.bootstrap is not None:
        frame["lo"], frame["hi"] = fit.bootstrap.band(x)
    return frame


def _figures_for_method(result: MethodAnalysis, fig_dir: Path) -> list[FigureRecord]:
    from cmscale.analysis import plots

    points = result.points
    stem = f"{result.method}_{result.metric.name}" if result.method != D.TEACHER_METHOD else "teacher"
    curves = {}
    for preset, fit in result.size_fits.items():
        sub = points[points["preset"] == preset]
        curves[preset] = _band_frame(fit, plots.log_grid(sub["train_flops"].min(), sub["train_flops"].max()))
    frontier = frontier_line(frontier_table(points))
    frontier_fit = None
    if result.frontier_fit is not None:
        frontier_fit = _band_frame(result.frontier_fit, plots.log_grid(points["train_flops"].min(),
                                                                       points["train_flops"].max()))
    shown = points.rename(columns={"preset": "size"})
    figure = plots.fid_vs_compute(shown, f"{result.title}: FID vs training compute", curves, frontier, frontier_fit)
    records = [FigureRecord(f"{stem}_compute", f"{result.title}: FID vs training compute",
                            "Points: evals per size (marker/line style per size). Lines: per-size saturating fits with "
                            "95% "
                            "bootstrap bands (runs resampled). Thick black: the lower envelope; dashed grey: the "
                            "saturating law "
                            "fitted to the envelope.", [result.sql], plots.save_figure(figure, fig_dir,
                                                                                       f"{stem}_compute"))]
    if result.optima is not None and len(result.optima):
        fit_frame = None
        if result.n_opt_fit is not None:
            grid = plots.log_grid(result.optima["compute"].min(), result.optima["compute"].max())
            lo, hi = result.n_opt_fit.band(grid)
            fit_frame = pd.DataFrame({"x": grid, "y": result.n_opt_fit.predict(grid), "lo": lo, "hi": hi})
        figure = plots.optimal_size_vs_compute(result.optima, fit_frame, f"{result.title}: compute-optimal size")
        records.append(FigureRecord(f"{stem}_nopt", f"{result.title}: N_opt vs C",
                                    "Optimal size per budget from the envelope (parabola in log N through the best "
                                    "size and its "
                                    "neighbours); crosses: optimum at the grid edge, excluded from the fit N_opt = k "
                                    "C^a.",
                                    [result.sql], plots.save_figure(figure, fig_dir, f"{stem}_nopt")))
    return records


def analyse_sweep(root: Path | str, sweep: str, fig_dir: Path, *, n_draws: int = 1000, seed: int = 0) -> SweepAnalysis:
    """Read the sweep from the store, fit everything and draw the figures into ``fig_dir``."""
    with single_threaded_blas():  # tiny linear algebra throughout: BLAS threads only add overhead
        return _analyse_sweep(root, sweep, fig_dir, n_draws=n_draws, seed=seed)


def _analyse_sweep(root: Path | str, sweep: str, fig_dir: Path, *, n_draws: int, seed: int) -> SweepAnalysis:
    started = time.time()
    root = Path(root)
    runs = D.run_query(D.runs_sql(sweep), root)
    if runs.empty:
        raise ValueError(f"sweep {sweep!r} has no runs in {root / 'cmscale.duckdb'}; check the name "
                         f"(cmscale sweep status) and ingest it (cmscale results ingest --root {root})")
    warnings: list[str] = []
    for row in runs[runs["status"] != "done"].itertuples():
        reason = f": {row.reason}" if isinstance(row.reason, str) and row.reason else ""
        warnings.append(f"run {row.run_id} ({row.method} {row.preset}, budget {row.budget_flops:.3g}) is "
                        f"{row.status}{reason}; "
                        "excluded from the fits")
    finals = D.run_query(D.final_evals_sql(sweep), root)
    methods: list[MethodAnalysis] = []
    figures: list[FigureRecord] = []
    for method in D.sweep_methods(runs):
        if method == D.TEACHER_METHOD:
            metric_names = ["fid_1step"]  # teachers: the metric means their own Heun eval
        else:
            steps = sorted(int(s) for s in finals.loc[finals["method"] == method, "sampler_steps"].unique())
            metric_names = [f"fid_{s}step" for s in steps]
        for name in metric_names:
            metric = D.parse_metric(name)
            sql = D.points_sql(sweep, method, metric)
            points, note = D.pick_extractor(D.run_query(sql, root))
            if note:
                warnings.append(f"{method} {name}: {note}")
            if points.empty:
                continue
            result = _analyse_method(method, metric, sql, points, n_draws, seed)
            methods.append(result)
            figures.extend(_figures_for_method(result, fig_dir))
    for result in methods:
        for preset, fit in result.size_fits.items():
            if fit.status != "converged":
                bound = f" (at bound: {', '.join(fit.at_bound)})" if fit.at_bound else ""
                warnings.append(f"{result.title}, size {preset}: fit status {fit.status}" + bound)
        for label, fit in (("frontier law", result.frontier_fit), ("joint law", result.joint)):
            if fit is not None and fit.status != "converged":
                bound = f" (at bound: {', '.join(fit.at_bound)})" if fit.at_bound else ""
                warnings.append(f"{result.title}, {label}: fit status {fit.status}" + bound)
        if result.n_opt_fit is not None and result.n_opt_fit.n_points < 3:
            warnings.append(f"{result.title}: N_opt = k C^a rests on {result.n_opt_fit.n_points} interior budgets (a "
                            "line through "
                            "two points); its CI reflects only how often resampling moves them")
        if result.optima is not None:
            for row in result.optima[result.optima["edge"]].itertuples():
                warnings.append(f"{result.title}: optimum at budget {row.compute:.3g} FLOPs is at the grid edge "
                                f"({row.reason}); excluded from N_opt = k C^a")

    from cmscale.analysis import plots

    pair_sql = D.ratio_pairs_sql(sweep)
    pair_rows, note = D.pick_extractor(D.run_query(pair_sql, root))
    if note:
        warnings.append(f"teacher-student pairs: {note}")
    pairs = sweep_pairs(pair_rows)
    ratio = ratio_table(pairs) if len(pairs) else {}
    if pairs.empty and (runs["method"] != D.TEACHER_METHOD).any():
        warnings.append("no teacher-student ratio: no finished student run has a finished edm teacher run of the same "
                        "preset and seed in this sweep (teachers given as checkpoints are not in the store)")
    if len(pairs):
        figure = plots.teacher_student(pairs, "teacher vs student FID")
        figures.append(FigureRecord("teacher_student", "Teacher vs student FID by size",
                                    "Top: teacher (Heun) and student FID per size, each student run paired with the "
                                    "teacher of "
                                    "the same preset and seed, at the student's largest budget. Bottom: the ratio.",
                                    [pair_sql], plots.save_figure(figure, fig_dir, "teacher_student")))
    sampling = _sampling_points(finals)
    if len(sampling):
        figure = plots.fid_vs_sampling_compute(sampling, "FID vs sampling compute")
        figures.append(FigureRecord("sampling", "FID vs sampling compute",
                                    "Final evals of each method's largest-budget runs: FID against NFE x forward FLOPs "
                                    "per image.",
                                    [D.final_evals_sql(sweep)], plots.save_figure(figure, fig_dir, "sampling")))
    return SweepAnalysis(sweep, root, runs, methods, pairs, ratio, sampling, warnings, figures, n_draws,
                         time.time() - started)


def _sampling_points(finals: pd.DataFrame) -> pd.DataFrame:
    finals, _ = D.pick_extractor(finals)
    if finals.empty:
        return finals
    rows = finals.dropna(subset=["sampling_flops_per_image", "fid"]).copy()
    rows = rows[rows["budget_flops"] == rows.groupby(["method", "preset"])["budget_flops"].transform("max")]
    rows = rows.groupby(["method", "preset", "params", "sampler_steps"], as_index=False)[["sampling_flops_per_image",
                                                                                          "fid"]].mean()
    rows["label"] = np.where(rows["method"] == D.TEACHER_METHOD,
                             "edm Heun " + rows["sampler_steps"].astype(str) + " steps",
                             rows["method"] + " " + rows["sampler_steps"].astype(str) + "-step")
    return rows.rename(columns={"preset": "size"})


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _with_ci(value, ci) -> str:
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return _num(value)
    return f"{_num(value)} [{_num(ci[0])}, {_num(ci[1])}]"


def _fit_row(label: str, fit: FitResult) -> list[str]:
    names = ("E", "A", "B", "alpha", "beta")
    return [label, *[_with_ci(fit.params[n], fit.ci.get(n)) if n in fit.params else "" for n in names],
            fit.status + (f" ({', '.join(fit.at_bound)})" if fit.at_bound else ""), str(fit.n_points)]


FIT_HEADER = ["fit", "E", "A", "B", "alpha", "beta", "status", "n"]


def _tables(analysis: SweepAnalysis) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for every table of the report."""
    tables = []
    for result in analysis.methods:
        rows = [_fit_row(f"size {p} ({result.points.loc[result.points['preset'] == p, 'params'].iloc[0] / 1e6:.3g}M)",
                         f)
                for p, f in result.size_fits.items()]
        if result.frontier_fit is not None:
            rows.append(_fit_row("frontier (envelope)", result.frontier_fit))
        if result.joint is not None:
            joint = result.joint
            rows.append(_fit_row("joint E + A N^-alpha + B D^-beta", joint))
        note = "; ".join(result.notes)
        if result.joint is not None and result.joint.derived:
            d = result.joint.derived
            note = ("joint law: N_opt ∝ C^a with a = beta/(alpha+beta) = "
                    f"{_with_ci(d['a'], result.joint.ci.get('a'))}. " + note)
        tables.append((f"{result.title}: fits (95% bootstrap CIs, runs resampled, {analysis.n_draws} draws)",
                       FIT_HEADER, rows, note))
        if result.optima is not None and len(result.optima):
            rows = [[_num(r.compute), _num(r.n_opt), _num(r.n_opt_grid), _num(r.y_opt), str(r.n_sizes),
                     "edge" if r.edge else "", r.reason]
                    for r in result.optima.itertuples()]
            note = ""
            if result.n_opt_fit is not None:
                f = result.n_opt_fit
                note = (f"N_opt = k C^a: a = {_with_ci(f.a, f.ci.get('a'))}, k = {_with_ci(f.k, f.ci.get('k'))} "
                        f"({f.n_points} budgets; {f.n_draws_used}/{f.n_draws} bootstrap draws had >= 2 interior "
                        "optima)")
                if f.ols:
                    note += f"; OLS (HC3) a CI [{_num(f.ols['ci']['a'][0])}, {_num(f.ols['ci']['a'][1])}]"
            tables.append((f"{result.title}: compute-optimal size per budget",
                           ["budget C", "N_opt", "best grid size", "FID at optimum", "sizes reaching C", "flag",
                            "reason"], rows, note))
        if result.holdout is not None:
            h = result.holdout
            rows = [[r.run_id, r.preset, _num(r.budget_flops), _num(r.fid), _num(r.pred), f"{r.log_error:+.3f}",
                     f"[{_num(r.ci_lo)}, {_num(r.ci_hi)}]", "yes" if r.inside_ci else "no",
                     f"[{_num(r.pi_lo)}, {_num(r.pi_hi)}]", "yes" if r.inside_pi else "no"]
                    for r in h.points.itertuples()]
            tables.append((f"{result.title}: extrapolation (joint law fitted without budget {_num(h.held_values[0])})",
                           ["run", "size", "budget", "FID", "predicted", "log error", "curve CI", "in CI",
                            "prediction interval", "in PI"],
                           rows, f"mean |log error| {h.mean_abs_log_error:.3f}, RMS {h.rms_log_error:.3f}; fit status "
                                 f"{h.fit.status}"))
    if analysis.ratio:
        rows = [[group, str(r["n_points"]), _with_ci(r["mean_ratio"], r["ci"]), _with_ci(r["gap"], r["gap_ci"]),
                 _with_ci(r["slope"], r["slope_ci"]), _num(r["slope_p"], 3)] for group, r in analysis.ratio.items()]
        tables.append(("Teacher-student FID ratio r = FID_student / FID_teacher",
                       ["group", "pairs", "mean ratio [95% CI]", "absolute gap [95% CI]",
                        "slope of log r on log N [95% CI]", "p (slope = 0)"],
                       rows, "Pairs: student run and teacher of the same preset and seed; each student's largest "
                             "budget. "
                       "OLS of log r on log params (statsmodels)."))
    return tables


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;color:#111;\
line-height:1.4}
h1{border-bottom:2px solid #333}h2{margin-top:2em;border-bottom:1px solid #aaa}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}td,th{border:1px solid #999;padding:3px 7px;\
text-align:right}
th{background:#e8e8e8}td:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%;width:760px;\
border:1px solid #ddd}
pre{background:#f4f4f4;border:1px solid #ccc;padding:8px;overflow-x:auto;font-size:0.8em}
.warn{background:#fff3cd;border:1px solid #b38f00;padding:6px 12px}.note{color:#444;font-size:0.9em}"""


def write_report(root: Path | str, sweep: str, out_dir: Path | str, *, n_draws: int = 1000, seed: int = 0) -> dict[str,
                                                                                                                   Path]:
    """Analyse ``sweep`` from the store under ``root`` and write ``out_dir/report.html`` (standalone)
    and ``out_dir/report.md`` (figures in ``out_dir/figures``). Returns {"html": path, "md": path}."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    analysis = analyse_sweep(root, sweep, fig_dir, n_draws=n_draws, seed=seed)
    tables = _tables(analysis)
    counts = analysis.runs["status"].value_counts().to_dict()
    summary = (f"{len(analysis.runs)} runs ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); "
               f"methods {', '.join(sorted(analysis.runs['method'].unique()))}; sizes "
               f"{', '.join(analysis.runs.sort_values('params')['preset'].drop_duplicates())}. Store: "
               f"{Path(root) / 'cmscale.duckdb'}. "
               f"Analysis took {analysis.seconds:.1f} s with {n_draws} bootstrap draws per fit (seed {seed}).")
    compute_note = ("Training compute is the student's own counted FLOPs (forward, backward, JVP and teacher forwards "
                    "per "
                    "step); the teacher's pretraining compute is not included in a student's C.")

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cmscale report: {html.escape(sweep)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>cmscale report: {html.escape(sweep)}</h1>",
             f"<p>{html.escape(summary)}</p><p class='note'>{html.escape(compute_note)}</p>"]
    md = [f"# cmscale report: {sweep}", "", summary, "", compute_note, ""]
    parts.append("<h2>Warnings</h2>")
    md += ["## Warnings", ""]
    if analysis.warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in analysis.warnings)
        parts.append("<div class='warn'><ul>" + items + "</ul></div>")
        md += [f"- {w}" for w in analysis.warnings] + [""]
    else:
        parts.append("<p>None: every run finished, every fit converged inside its bounds, no optimum at the grid "
                     "edge.</p>")
        md += ["None.", ""]
    parts.append("<h2>Figures</h2>")
    md += ["## Figures", ""]
    for record in analysis.figures:
        png = base64.b64encode(record.paths["png"].read_bytes()).decode()
        parts.append(f"<figure><h3>{html.escape(record.title)}</h3><img alt='{html.escape(record.title)}' "
                     f"src='data:image/png;base64,{png}'><figcaption "
                     f"class='note'>{html.escape(record.caption)}</figcaption>")
        parts += [f"<details open><summary>SQL behind this figure</summary><pre>{html.escape(sql)}</pre></details>"
                  for sql in record.sql]
        parts.append("</figure>")
        rel_png = record.paths["png"].relative_to(out_dir)
        rel_pdf = record.paths["pdf"].relative_to(out_dir)
        md += [f"### {record.title}", "", f"![{record.title}]({rel_png}) ([PDF]({rel_pdf}))", "", record.caption, "",
               "SQL behind this figure:", ""]
        md += [f"```sql\n{sql}\n```\n" for sql in record.sql]
    parts.append("<h2>Tables</h2>")
    md += ["## Tables", ""]
    for title, header, rows, note in tables:
        note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
        parts.append(f"<h3>{html.escape(title)}</h3>" + _html_table(header, rows) + note_html)
        md += [f"### {title}", "", _md_table(header, rows), ""] + ([note, ""] if note else [])
    ratio_json = json.dumps(analysis.ratio, indent=1, default=float)
    parts.append(f"<h2>Ratio statistics (JSON)</h2><pre>{html.escape(ratio_json)}</pre>")
    parts.append(f"<h2>Runs</h2><details><summary>SQL</summary><pre>{html.escape(D.runs_sql(sweep))}</pre></details>")
    run_rows = [[r.run_id, r.method, r.preset, _num(float(r.params)), _num(r.budget_flops), str(r.seed), r.status]
                for r in analysis.runs.itertuples()]
    parts.append(_html_table(["run", "method", "size", "params", "budget", "seed", "status"], run_rows))
    parts.append("</body></html>")
    md += ["## Runs", "", f"```sql\n{D.runs_sql(sweep)}\n```", "",
           _md_table(["run", "method", "size", "params", "budget", "seed", "status"], run_rows), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"html": out_dir / "report.html", "md": out_dir / "report.md"}
    paths["html"].write_text("\n".join(parts))
    paths["md"].write_text("\n".join(md))
    return paths
