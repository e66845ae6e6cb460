"""The sweep report: findings first, then every figure, fit table and warning of a sweep.

:func:`analyse_sweep` reads the store (``cmscale.results.read_query(sql, root=root)``),
runs the analysis and draws the figures; :func:`write_report` (in :mod:`cmscale.analysis.render`)
writes ``report.html`` (standalone), ``report.md`` and ``report.json`` (every summary number).

Per consistency-model method and sampler step count (and for the teachers' Heun evals):

* per-size laws ``FID = E + A C^-alpha`` in training FLOPs C (or the nested pure law when E is not
  identified; :func:`cmscale.analysis.selection.select_law`), bootstrap over runs;
* the lower envelope over runs on a common compute grid, a law fitted to it (bootstrap over runs,
  each draw rebuilding the envelope), and the compute-optimal size by iso-FLOP profiles and by
  the envelope, with ``N_opt = k C^a`` where >= 3 budgets have an interior optimum;
* the joint law ``FID = E + A N^-alpha + B D^-beta`` (or the nested law kept) on each run's final
  eval (a run trained to D images, as the iso-FLOP profiles read runs trained to C: a longer run's
  mid-run eval is not a run of D images when its schedule depends on its length), the exponent
  ``N_opt ∝ C^a`` it implies (Chinchilla's approach 3), and its extrapolation check: refit
  without the largest budget, predict the held-out runs.

Then the teacher-student ratio table and figure, and FID against sampling compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cmscale.analysis import data as D
from cmscale.analysis.extrapolation import HoldoutResult, holdout_validation
from cmscale.analysis.fit import single_threaded_blas
from cmscale.analysis.frontier import ComputeOptimal, compute_grid, compute_optimal, frontier_law
from cmscale.analysis.ratio import ratio_table, sweep_pairs
from cmscale.analysis.selection import LawChoice, select_law

MIN_POINTS_PER_SIZE = 4  # the saturating law has 3 parameters (the pure one 2): leave a degree of freedom
MIN_RUNS_CI = 3
MIN_JOINT_RUNS = 7  # the joint law has up to 5 parameters: leave degrees of freedom
# The joint law gives N_opt ∝ C^(beta / (alpha + beta)) when training FLOPs ∝ N D, i.e. FLOPs per
# training image ∝ N (Hoffmann et al. 2022). The runs' own FLOP counts must bear that out: the
# exponent gamma of N in FLOPs per image, fitted over the runs, within this of 1 (the demo's
# UNets: 1.005-1.008). Otherwise a = beta / (alpha + gamma beta), which this report does not assume.
FLOPS_PER_IMAGE_EXPONENT_TOL = 0.05


@dataclass
class FigureRecord:
    key: str
    title: str
    caption: str
    sql: list[str]
    paths: dict[str, Path]


@dataclass
class Warning_:
    """One warning: ``kind`` groups them in the report."""

    kind: str
    text: str


@dataclass
class JointExponent:
    """N_opt ∝ C^a implied by the joint law (a = beta / (alpha + beta)); ``a`` is None with the
    reason, ``ci`` is None when there is no CI (``ci_reason`` says why)."""

    a: float | None
    ci: tuple[float, float] | None
    reason: str
    ci_reason: str
    flops_per_image_exponent: float | None
    kappa: float  # median training FLOPs per image per parameter: C = kappa N D, for N_opt(C)

    def to_json(self) -> dict:
        return {
            "a": self.a,
            "ci": list(self.ci) if self.ci else None,
            "reason": self.reason or None,
            "ci_reason": self.ci_reason or None,
            "flops_per_image_exponent": self.flops_per_image_exponent,
        }


def final_evals(points: pd.DataFrame) -> pd.DataFrame:
    """Each run's last eval: the run trained to its own budget."""
    return points[points["step"] == points.groupby("run_id")["step"].transform("max")]


def flops_per_image_exponent(finals: pd.DataFrame) -> float | None:
    """gamma in (training FLOPs per image) ∝ N^gamma, by log-log least squares over runs; None
    with fewer than 2 sizes."""
    if finals["params"].nunique() < 2:
        return None
    log_n = np.log(finals["params"].to_numpy(float))
    log_per_image = np.log(finals["train_flops"].to_numpy(float) / finals["images_seen"].to_numpy(float))
    return float(np.polyfit(log_n, log_per_image, 1)[0])


def joint_exponent(choice: LawChoice, finals: pd.DataFrame) -> JointExponent:
    """The compute-optimal size's exponent a from the joint law kept, or why it is not identified."""
    gamma = flops_per_image_exponent(finals)
    kappa = float(np.median(finals["train_flops"] / (finals["images_seen"] * finals["params"])))
    if not choice.derived:
        reason = choice.derived_reason or f"not identifiable from these runs: {choice.reason}"
        return JointExponent(None, None, reason, "", gamma, kappa)
    if gamma is None or abs(gamma - 1) > FLOPS_PER_IMAGE_EXPONENT_TOL:
        return JointExponent(
            None,
            None,
            f"not identifiable from these runs: a = beta/(alpha+beta) needs training FLOPs ∝ N D, but FLOPs "
            f"per image grow as N^{gamma:.3g} across these runs",
            "",
            gamma,
            kappa,
        )
    ci = choice.derived_ci.get("a")
    ci_reason = "" if ci else (choice.ci_note or "no bootstrap draws")
    return JointExponent(choice.derived["a"], ci, "", ci_reason, gamma, kappa)


def joint_n_opt_curve(params: dict[str, float], flops_per_image_per_param: float, compute: np.ndarray) -> np.ndarray:
    """N_opt(C) that minimises ``A N^-alpha + B D^-beta`` at C = kappa N D (E does not move it):
    N_opt = [(alpha A / (beta B)) (C / kappa)^beta]^(1 / (alpha + beta))."""
    alpha, beta = params["alpha"], params["beta"]
    ratio = alpha * params["A"] / (beta * params["B"])
    return (ratio * (np.asarray(compute, float) / flops_per_image_per_param) ** beta) ** (1.0 / (alpha + beta))


def _joint_curve_frame(result: MethodAnalysis, compute: np.ndarray, level: float = 0.95) -> pd.DataFrame | None:
    """The joint law's N_opt(C) with a bootstrap band, where its exponent is reported."""
    choice, exponent = result.joint, result.joint_n_opt
    if choice is None or exponent is None or exponent.a is None:
        return None
    kappa = exponent.kappa
    frame = pd.DataFrame({"x": compute, "y": joint_n_opt_curve(choice.params, kappa, compute)})
    bootstrap = choice.kept.bootstrap
    if bootstrap is not None and bootstrap.n_draws:
        curves = np.array(
            [joint_n_opt_curve({choice.names.get(k, k): v for k, v in draw.items()}, kappa, compute)
             for draw in bootstrap.param_dicts()]
        )
        tail = 100 * (1 - level) / 2
        frame["lo"], frame["hi"] = np.nanpercentile(curves, [tail, 100 - tail], axis=0)
    return frame


@dataclass
class MethodAnalysis:
    """Everything fitted for one (method, metric)."""

    method: str
    metric: D.Metric
    sql: str
    points: pd.DataFrame
    size_fits: dict[str, LawChoice] = field(default_factory=dict)
    frontier: LawChoice | None = None
    envelope: pd.DataFrame | None = None
    optimal: ComputeOptimal | None = None
    joint: LawChoice | None = None
    joint_n_opt: JointExponent | None = None
    holdout: HoldoutResult | None = None
    ladder: pd.DataFrame | None = None  # teachers, one run per size: each size's final eval
    notes: list[Warning_] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.method == D.TEACHER_METHOD:
            return "teacher (edm, Heun)"
        return f"{self.method}, {self.metric.sampler_steps}-step"

    @property
    def ratio_group(self) -> str:
        return f"{self.method} {self.metric.sampler_steps}-step"

    def params_of(self, preset: str) -> float:
        return float(self.points.loc[self.points["preset"] == preset, "params"].iloc[0])


@dataclass
class SweepAnalysis:
    sweep: str
    root: Path
    runs: pd.DataFrame
    methods: list[MethodAnalysis]
    ratio_pairs: pd.DataFrame
    ratio: dict[str, dict]
    sampling: pd.DataFrame
    warnings: list[Warning_]
    figures: list[FigureRecord]
    n_draws: int
    seconds: float = 0.0


def _fit_safely(notes: list[Warning_], what: str, call):
    try:
        return call()
    except ValueError as error:
        notes.append(Warning_("not fitted", f"{what}: not fitted ({error})"))
        return None


def _law_notes(notes: list[Warning_], what: str, choice: LawChoice | None) -> None:
    if choice is None:
        return
    if choice.kept is None:
        notes.append(Warning_("no law identified", f"{what}: {choice.reason}"))
    elif choice.degenerate:
        notes.append(Warning_("degenerate fit: nested law kept", f"{what}: {choice.reason}"))
    if choice.ci_note:
        notes.append(Warning_("estimate without CI (< 3 runs)", f"{what}: {choice.ci_note}"))


def _fit_joint(result: MethodAnalysis, n_draws: int, seed: int) -> None:
    """The joint law on each run's final eval, the N_opt exponent it implies, and its extrapolation check."""
    notes = result.notes
    finals = final_evals(result.points)
    if finals["params"].nunique() >= 2 and len(finals) >= MIN_JOINT_RUNS:
        result.joint = _fit_safely(
            notes,
            "joint law",
            lambda: select_law(
                "joint",
                [finals["params"].to_numpy(float), finals["images_seen"].to_numpy(float)],
                finals["fid"].to_numpy(float),
                finals["run_id"].to_numpy(),
                n_draws=n_draws,
                seed=seed,
            ),
        )
        _law_notes(notes, "joint law", result.joint)
        if result.joint is not None:
            result.joint_n_opt = joint_exponent(result.joint, finals)
        if finals["budget_flops"].nunique() >= 3 and len(finals) >= MIN_RUNS_CI + 1:
            result.holdout = _fit_safely(
                notes,
                "extrapolation check",
                lambda: holdout_validation(
                    finals,
                    form="joint",
                    x_cols=["params", "images_seen"],
                    y_col="fid",
                    by="budget_flops",
                    k=1,
                    group_col="run_id",
                    n_draws=n_draws,
                    seed=seed,
                ),
            )
    else:
        notes.append(
            Warning_(
                "not fitted",
                f"joint law: fitted to runs trained to their budgets (final evals); needs >= 2 sizes and "
                f">= {MIN_JOINT_RUNS} runs, has {finals['params'].nunique()} size(s) and {len(finals)} run(s)",
            )
        )


def _analyse_method(
    method: str, metric: D.Metric, sql: str, points: pd.DataFrame, n_draws: int, seed: int
) -> MethodAnalysis:
    result = MethodAnalysis(method, metric, sql, points)
    if method == D.TEACHER_METHOD and points.groupby("preset")["run_id"].nunique().max() == 1:
        # One teacher per size, each trained to one fixed budget: a size ladder, not a compute sweep,
        # so there are no per-size laws, iso-FLOP profiles or N_opt to fit, only FID by size.
        result.ladder = size_ladder(points)
        return result
    notes = result.notes
    for preset, sub in points.groupby("preset", sort=False):
        if len(sub) < MIN_POINTS_PER_SIZE:
            notes.append(
                Warning_(
                    "not fitted", f"size {preset}: {len(sub)} evals; a per-size law needs >= {MIN_POINTS_PER_SIZE}"
                )
            )
            continue
        choice = _fit_safely(
            notes,
            f"size {preset}",
            lambda sub=sub: select_law(
                "saturating",
                [sub["train_flops"].to_numpy(float)],
                sub["fid"].to_numpy(float),
                sub["run_id"].to_numpy(),
                n_draws=n_draws,
                seed=seed,
                variables={"A": "C"},
            ),
        )
        _law_notes(notes, f"size {preset}", choice)
        if choice is not None:
            result.size_fits[str(preset)] = choice
    frontier_points = D.frontier_points(points)
    grid = compute_grid(frontier_points)
    result.frontier, result.envelope = _fit_safely(
        notes, "frontier law", lambda: frontier_law(frontier_points, grid, n_draws=n_draws, seed=seed)
    ) or (None, None)
    _law_notes(notes, "frontier law", result.frontier)
    budgets = np.sort(points["budget_flops"].dropna().unique().astype(float))
    result.optimal = compute_optimal(frontier_points, budgets, grid, n_draws=n_draws, seed=seed)
    for row in result.optimal.optima[~result.optimal.optima["interior"]].itertuples():
        notes.append(
            Warning_(
                "optimum at the grid edge", f"budget {row.compute:.3g} FLOPs: {row.reason}; excluded from N_opt = k C^a"
            )
        )
    _fit_joint(result, n_draws, seed)
    return result


def size_ladder(points: pd.DataFrame) -> pd.DataFrame:
    """Each size's final eval (largest step), ascending in parameters: one run per size."""
    ladder = final_evals(points).sort_values("params")
    return ladder[["preset", "params", "step", "train_flops", "fid"]].reset_index(drop=True)


def ladder_falls_with_size(ladder: pd.DataFrame) -> bool:
    """FID strictly lower at every larger size of the ladder (at least 2 sizes)."""
    fids = ladder["fid"].to_numpy(float)
    return len(fids) >= 2 and bool(np.all(np.diff(fids) < 0))


def _band_frame(choice: LawChoice, x: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"x": x, "y": choice.kept.predict(x)})
    if choice.kept.bootstrap is not None:
        frame["lo"], frame["hi"] = choice.kept.bootstrap.band(x)
    return frame


def _figures_for_method(result: MethodAnalysis, fig_dir: Path) -> list[FigureRecord]:
    from cmscale.analysis import plots

    points = result.points
    stem = f"{result.method}_{result.metric.name}" if result.method != D.TEACHER_METHOD else "teacher"
    curves = {}
    for preset, choice in result.size_fits.items():
        if choice.kept is not None:
            sub = points[points["preset"] == preset]
            curves[preset] = _band_frame(choice, plots.log_grid(sub["train_flops"].min(), sub["train_flops"].max()))
    frontier = None if result.envelope is None else result.envelope.rename(columns={"compute": "x"})
    frontier_fit = None
    if result.frontier is not None and result.frontier.kept is not None:
        frontier_fit = _band_frame(
            result.frontier, plots.log_grid(points["train_flops"].min(), points["train_flops"].max())
        )
    figure = plots.fid_vs_compute(
        points.rename(columns={"preset": "size"}),
        f"{result.title}: FID vs training compute",
        curves,
        frontier,
        frontier_fit,
    )
    records = [
        FigureRecord(
            f"{stem}_compute",
            f"{result.title}: FID vs training compute",
            "Points: evals per size (marker/line style per size). Lines: per-size laws with 95% bootstrap bands "
            "(runs resampled). Thick black: the lower envelope over runs on a common compute grid (each run "
            "interpolated within its own range); dashed grey: the law fitted to the envelope.",
            [result.sql],
            plots.save_figure(figure, fig_dir, f"{stem}_compute"),
        )
    ]
    optimal = result.optimal
    if optimal is not None and len(optimal.optima):
        fits = {}
        for name, fit in (("iso-FLOP", optimal.isoflop), ("envelope", optimal.envelope_fit)):
            if fit.a is not None:
                grid = plots.log_grid(optimal.optima["compute"].min(), optimal.optima["compute"].max())
                lo, hi = fit.band(grid)
                fits[name] = pd.DataFrame({"x": grid, "y": fit.predict(grid), "lo": lo, "hi": hi})
        joint_curve = _joint_curve_frame(result, plots.log_grid(optimal.optima["compute"].min(),
                                                                optimal.optima["compute"].max()))
        if joint_curve is not None:
            fits["joint law"] = joint_curve
        figure = plots.optimal_size_vs_compute(
            optimal.optima, optimal.envelope, fits, f"{result.title}: compute-optimal size"
        )
        records.append(
            FigureRecord(
                f"{stem}_nopt",
                f"{result.title}: N_opt vs C",
                "Circles: iso-FLOP optima (parabola in log N through the best size and its neighbours); "
                "crosses: optimum at the size grid's edge, excluded. Steps: size of the envelope's run. "
                "Lines: N_opt = k C^a where >= 3 budgets are interior, and the joint law's N_opt(C) where "
                "its exponent is reported (bands: 95% bootstrap).",
                [result.sql],
                plots.save_figure(figure, fig_dir, f"{stem}_nopt"),
            )
        )
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
        raise ValueError(
            f"sweep {sweep!r} has no runs in {root / 'cmscale.duckdb'}; check the name "
            f"(cmscale sweep status) and ingest it (cmscale results ingest --root {root})"
        )
    warnings: list[Warning_] = []
    for row in runs[runs["status"] != "done"].itertuples():
        reason = f": {row.reason}" if isinstance(row.reason, str) and row.reason else ""
        warnings.append(
            Warning_(
                "run not finished",
                f"run {row.run_id} ({row.method} {row.preset}, budget {row.budget_flops:.3g}) "
                f"is {row.status}{reason}; excluded from the fits",
            )
        )
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
                warnings.append(Warning_("data", f"{method} {name}: {note}"))
            if points.empty:
                continue
            result = _analyse_method(method, metric, sql, points, n_draws, seed)
            methods.append(result)
            figures.extend(_figures_for_method(result, fig_dir))
            warnings.extend(Warning_(w.kind, f"{result.title}, {w.text}") for w in result.notes)

    from cmscale.analysis import plots

    pair_sql = D.ratio_pairs_sql(sweep)
    pair_rows, note = D.pick_extractor(D.run_query(pair_sql, root))
    if note:
        warnings.append(Warning_("data", f"teacher-student pairs: {note}"))
    pairs = sweep_pairs(pair_rows)
    ratio = ratio_table(pairs) if len(pairs) else {}
    if pairs.empty and (runs["method"] != D.TEACHER_METHOD).any():
        warnings.append(
            Warning_(
                "data",
                "no teacher-student ratio: no finished student run has a finished edm teacher run of the "
                "same preset and seed in this sweep (teachers given as checkpoints are not in the store)",
            )
        )
    if len(pairs):
        figure = plots.teacher_student(pairs, "teacher vs student FID")
        figures.append(
            FigureRecord(
                "teacher_student",
                "Teacher vs student FID by size",
                "Top: teacher (Heun) and student FID per size, each student run paired with the "
                "teacher of "
                "the same preset and seed, at the student's largest budget. Bottom: the ratio.",
                [pair_sql],
                plots.save_figure(figure, fig_dir, "teacher_student"),
            )
        )
    sampling = _sampling_points(finals)
    if len(sampling):
        figure = plots.fid_vs_sampling_compute(sampling, "FID vs sampling compute")
        figures.append(
            FigureRecord(
                "sampling",
                "FID vs sampling compute",
                "Final evals of each method's largest-budget runs: FID against NFE x forward FLOPs per image.",
                [D.final_evals_sql(sweep)],
                plots.save_figure(figure, fig_dir, "sampling"),
            )
        )
    return SweepAnalysis(
        sweep, root, runs, methods, pairs, ratio, sampling, warnings, figures, n_draws, time.time() - started
    )


def _sampling_points(finals: pd.DataFrame) -> pd.DataFrame:
    finals, _ = D.pick_extractor(finals)
    if finals.empty:
        return finals
    rows = finals.dropna(subset=["sampling_flops_per_image", "fid"]).copy()
    rows = rows[rows["budget_flops"] == rows.groupby(["method", "preset"])["budget_flops"].transform("max")]
    rows = rows.groupby(["method", "preset", "params", "sampler_steps"], as_index=False)[
        ["sampling_flops_per_image", "fid"]
    ].mean()
    rows["label"] = np.where(
        rows["method"] == D.TEACHER_METHOD,
        "edm Heun " + rows["sampler_steps"].astype(str) + " steps",
        rows["method"] + " " + rows["sampler_steps"].astype(str) + "-step",
    )
    return rows.rename(columns={"preset": "size"})

