"""The one analysis of a method's evals: every command that fits a sweep calls these functions.

``cmscale fit powerlaw --sweep``, ``fit frontier --sweep``, ``plot`` and ``report`` read the same
points (:func:`cmscale.analysis.data.method_points`) and fit them here, so the same question gets
the same answer everywhere. Per consistency-model method and sampler step count (and for the
teachers' Heun evals):

* per-size laws ``FID = E + A C^-alpha`` in training FLOPs C (or the nested pure law when E is not
  identified; :func:`cmscale.analysis.selection.select_law`), bootstrap over runs
  (:func:`size_laws`);
* the lower envelope over runs on a common compute grid and a law fitted to it, each bootstrap
  draw rebuilding the envelope from resampled runs (:func:`frontier_of_runs`);
* the compute-optimal size by iso-FLOP profiles at the sweep's budgets and by the envelope, with
  ``N_opt = k C^a`` where >= 3 budgets have an interior optimum (:func:`optimal_sizes`);
* the joint law ``FID = E + A N^-alpha + B D^-beta`` (or the nested law kept) on each run's final
  eval (a run trained to D images, as the iso-FLOP profiles read runs trained to C: a longer run's
  mid-run eval is not a run of D images when its schedule depends on its length), the exponent
  ``N_opt ∝ C^a`` it implies (Chinchilla's approach 3), and its extrapolation check: refit
  without the largest budget, predict the held-out runs (:func:`joint_law`).

A teacher sweep of one run per size, each trained to one fixed budget, is a size ladder
(:func:`is_size_ladder`): none of the above is fitted to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cmscale.analysis import data as D
from cmscale.analysis.extrapolation import HoldoutResult, holdout_validation
from cmscale.analysis.fit import MIN_CI_GROUPS, single_threaded_blas
from cmscale.analysis.frontier import compute_grid, frontier_law
from cmscale.analysis.optimal import ComputeOptimal, compute_optimal
from cmscale.analysis.selection import LawChoice, select_law

MIN_POINTS_PER_SIZE = 4  # the saturating law has 3 parameters (the pure one 2): leave a degree of freedom
MIN_JOINT_RUNS = 7  # the joint law has up to 5 parameters: leave degrees of freedom
# The joint law gives N_opt ∝ C^(beta / (alpha + beta)) when training FLOPs ∝ N D, i.e. FLOPs per
# training image ∝ N (Hoffmann et al. 2022). The runs' own FLOP counts must bear that out: the
# exponent gamma of N in FLOPs per image, fitted over the runs, within this of 1 (the demo's
# UNets: 1.005-1.008). Otherwise a = beta / (alpha + gamma beta), which this analysis does not assume.
FLOPS_PER_IMAGE_EXPONENT_TOL = 0.05
LADDER_REASON = "one teacher per size, each trained to one fixed budget: a size ladder, not a compute sweep"


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
        if D.is_teacher(self.method):
            return "teacher (edm, Heun)"
        return f"{self.method}, {self.metric.sampler_steps}-step"

    @property
    def ratio_group(self) -> str:
        return f"{self.method} {self.metric.sampler_steps}-step"

    def params_of(self, preset: str) -> float:
        return float(self.points.loc[self.points["preset"] == preset, "params"].iloc[0])


def final_evals(points: pd.DataFrame) -> pd.DataFrame:
    """Each run's last eval: the run trained to its own budget."""
    return points[points["step"] == points.groupby("run_id")["step"].transform("max")]


def sweep_budgets(points: pd.DataFrame) -> np.ndarray:
    """The budgets of the iso-FLOP profiles: the runs' nominal budgets, ascending."""
    return np.sort(points["budget_flops"].dropna().unique().astype(float))


def is_size_ladder(method: str, points: pd.DataFrame) -> bool:
    """Teachers of one run per size: FID by size, no compute sweep to fit."""
    return D.is_teacher(method) and points.groupby("preset")["run_id"].nunique().max() == 1


def size_ladder(points: pd.DataFrame) -> pd.DataFrame:
    """Each size's final eval (largest step), ascending in parameters: one run per size."""
    ladder = final_evals(points).sort_values("params")
    return ladder[["preset", "params", "step", "train_flops", "fid"]].reset_index(drop=True)


def ladder_falls_with_size(ladder: pd.DataFrame) -> bool:
    """FID strictly lower at every larger size of the ladder (at least 2 sizes)."""
    fids = ladder["fid"].to_numpy(float)
    return len(fids) >= 2 and bool(np.all(np.diff(fids) < 0))


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


def fit_safely(notes: list[Warning_], what: str, call):
    """``call()``, or None with a 'not fitted' note when it raises ValueError."""
    try:
        return call()
    except ValueError as error:
        notes.append(Warning_("not fitted", f"{what}: not fitted ({error})"))
        return None


def law_notes(notes: list[Warning_], what: str, choice: LawChoice | None) -> None:
    """Notes on a law choice: none identified, a degenerate law replaced, a missing CI."""
    if choice is None:
        return
    if choice.kept is None:
        notes.append(Warning_("no law identified", f"{what}: {choice.reason}"))
    elif choice.degenerate:
        notes.append(Warning_("degenerate fit: nested law kept", f"{what}: {choice.reason}"))
    if choice.ci_note:
        notes.append(Warning_(f"estimate without CI (< {MIN_CI_GROUPS} runs)", f"{what}: {choice.ci_note}"))


def size_laws(
    points: pd.DataFrame, notes: list[Warning_], *, n_draws: int, seed: int, form: str = "saturating", **fit_kwargs
) -> dict[str, LawChoice | None]:
    """Per size (preset, in the points' order): ``form`` and its nested laws in training FLOPs,
    bootstrap over runs; None (with a note) where a size has too few evals or the fit fails."""
    fits: dict[str, LawChoice | None] = {}
    for preset, sub in points.groupby("preset", sort=False):
        fits[str(preset)] = None
        if len(sub) < MIN_POINTS_PER_SIZE:
            notes.append(
                Warning_(
                    "not fitted", f"size {preset}: {len(sub)} evals; a per-size law needs >= {MIN_POINTS_PER_SIZE}"
                )
            )
            continue
        choice = fit_safely(
            notes,
            f"size {preset}",
            lambda sub=sub: select_law(
                form,
                [sub["train_flops"].to_numpy(float)],
                sub["fid"].to_numpy(float),
                sub["run_id"].to_numpy(),
                n_draws=n_draws,
                seed=seed,
                variables={"A": "C"},
                **fit_kwargs,
            ),
        )
        law_notes(notes, f"size {preset}", choice)
        fits[str(preset)] = choice
    return fits


def frontier_of_runs(
    points: pd.DataFrame, notes: list[Warning_], *, n_draws: int, seed: int, form: str = "saturating", **fit_kwargs
) -> tuple[LawChoice | None, pd.DataFrame | None]:
    """The lower envelope over runs on the compute grid and the law fitted to it, bootstrap over
    runs (each draw rebuilds the envelope); (None, None) with a note when it cannot be fitted."""
    frontier_points = D.frontier_points(points)
    grid = compute_grid(frontier_points)
    choice, table = fit_safely(
        notes,
        "frontier law",
        lambda: frontier_law(frontier_points, grid, n_draws=n_draws, seed=seed, form=form, **fit_kwargs),
    ) or (None, None)
    law_notes(notes, "frontier law", choice)
    return choice, table


def optimal_sizes(points: pd.DataFrame, notes: list[Warning_], *, n_draws: int, seed: int) -> ComputeOptimal:
    """Compute-optimal size by iso-FLOP profiles at the sweep's budgets and by the envelope, each
    with ``N_opt = k C^a`` bootstrapped over runs; a note per budget whose optimum is at the edge."""
    frontier_points = D.frontier_points(points)
    grid = compute_grid(frontier_points)
    optimal = compute_optimal(frontier_points, sweep_budgets(points), grid, n_draws=n_draws, seed=seed)
    for row in optimal.optima[~optimal.optima["interior"]].itertuples():
        notes.append(
            Warning_(
                "optimum at the grid edge", f"budget {row.compute:.3g} FLOPs: {row.reason}; excluded from N_opt = k C^a"
            )
        )
    return optimal


def joint_law(result: MethodAnalysis, n_draws: int, seed: int) -> None:
    """The joint law on each run's final eval, the N_opt exponent it implies, and its extrapolation
    check, stored on ``result``."""
    notes = result.notes
    finals = final_evals(result.points)
    if finals["params"].nunique() < 2 or len(finals) < MIN_JOINT_RUNS:
        notes.append(
            Warning_(
                "not fitted",
                f"joint law: fitted to runs trained to their budgets (final evals); needs >= 2 sizes and "
                f">= {MIN_JOINT_RUNS} runs, has {finals['params'].nunique()} size(s) and {len(finals)} run(s)",
            )
        )
        return
    result.joint = fit_safely(
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
    law_notes(notes, "joint law", result.joint)
    if result.joint is not None:
        result.joint_n_opt = joint_exponent(result.joint, finals)
    if finals["budget_flops"].nunique() >= 3 and len(finals) >= MIN_CI_GROUPS + 1:
        result.holdout = fit_safely(
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


def analyse_method(
    method: str, metric: D.Metric, sql: str, points: pd.DataFrame, *, n_draws: int, seed: int
) -> MethodAnalysis:
    """Every fit of one (method, metric): the per-size laws, the frontier, the compute-optimal
    size and the joint law (a size ladder for a teacher of one run per size)."""
    result = MethodAnalysis(method, metric, sql, points)
    if is_size_ladder(method, points):
        result.ladder = size_ladder(points)
        return result
    with single_threaded_blas():  # tiny linear algebra throughout: BLAS threads only add overhead
        fits = size_laws(points, result.notes, n_draws=n_draws, seed=seed)
        result.size_fits = {preset: choice for preset, choice in fits.items() if choice is not None}
        result.frontier, result.envelope = frontier_of_runs(points, result.notes, n_draws=n_draws, seed=seed)
        result.optimal = optimal_sizes(points, result.notes, n_draws=n_draws, seed=seed)
        joint_law(result, n_draws, seed)
    return result


def ema_taken(points: pd.DataFrame) -> dict[str, str]:
    """Per run, the EMA its points are of (:func:`cmscale.analysis.data.ema_text`)."""
    finals = final_evals(points)
    return {str(row.run_id): D.ema_text(row.ema_sigma_rel, row.ema_posthoc) for row in finals.itertuples()}


def sweep_power_laws(
    root, sweep: str, metric: D.Metric, methods: list[str], *, n_draws: int, seed: int,
    ema: D.EmaChoice | None = None, **law_kwargs
) -> list[dict]:
    """Per method: the per-size laws and the frontier law, as :func:`analyse_method` fits them,
    one JSON-ready item each (``fit_of``: ``size <preset>`` or ``frontier``) with the notes; with
    an ``ema`` other than the default, each item names it and the EMA taken per run (``ema``)."""
    out = []
    for method in methods:
        sql, points, _ = D.method_points(root, sweep, method, metric, ema)
        if points.empty:
            continue
        head = {"method": method, "metric": metric.name}
        if ema is not None and not ema.is_default:
            head["ema"] = {"option": ema.option, "runs": ema_taken(points)}
        if is_size_ladder(method, points):
            out.append({**head, "fit_of": "size ladder", "status": "not_fitted", "reason": LADDER_REASON})
            continue
        with single_threaded_blas():
            size_notes: list[Warning_] = []
            fits = size_laws(points, size_notes, n_draws=n_draws, seed=seed, **law_kwargs)
            frontier_notes: list[Warning_] = []
            frontier, _ = frontier_of_runs(points, frontier_notes, n_draws=n_draws, seed=seed, **law_kwargs)
        for preset, choice in fits.items():
            label = f"size {preset}"
            size_params = float(points.loc[points["preset"] == preset, "params"].iloc[0])
            item = {**head, "fit_of": label, "size_params": size_params}
            out.append(_law_item(item, choice, [n for n in size_notes if n.text.startswith(label + ":")]))
        out.append(_law_item({**head, "fit_of": "frontier"}, frontier, frontier_notes))
    return out


def _law_item(item: dict, choice: LawChoice | None, notes: list[Warning_]) -> dict:
    if choice is None:
        return {**item, "status": "not_fitted", "reason": "; ".join(n.text for n in notes)}
    return {**item, **choice.to_json(), "notes": [n.text for n in notes]}


def sweep_compute_optimal(
    root, sweep: str, metric: D.Metric, methods: list[str], *, n_draws: int, seed: int,
    ema: D.EmaChoice | None = None,
) -> list[dict]:
    """Per method: the compute-optimal size as :func:`analyse_method` finds it (``of``: method and
    metric), or why none is fitted (a size ladder); ``ema`` as in :func:`sweep_power_laws`."""
    out = []
    for method in methods:
        _, points, _ = D.method_points(root, sweep, method, metric, ema)
        if points.empty:
            continue
        label = f"{method} {metric.name}"
        head = {"of": label}
        if ema is not None and not ema.is_default:
            head["ema"] = {"option": ema.option, "runs": ema_taken(points)}
        if is_size_ladder(method, points):
            out.append({**head, "status": "not_fitted", "reason": LADDER_REASON})
            continue
        with single_threaded_blas():
            optimal = optimal_sizes(points, [], n_draws=n_draws, seed=seed)
        out.append({**head, **optimal.to_json()})
    return out
