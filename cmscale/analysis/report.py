"""The sweep report's findings: every number of a sweep, and the sentence each method's numbers support.

:func:`analyse_sweep` reads the store (``cmscale.results.read_query(sql, root=root)``) and fits
each method and sampler step count with :mod:`cmscale.analysis.pipeline` (the same functions
behind ``cmscale fit powerlaw|frontier --sweep``), pairs students with teachers for the FID ratio
(:mod:`cmscale.analysis.ratio`, as ``cmscale fit ratio --sweep``) and collects FID against
sampling compute. :func:`findings` returns what ``report.json`` holds: every summary number,
nulls with their reason, and one finding per method. Figures and text are drawn from the same
analysis by :mod:`cmscale.analysis.render`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cmscale.analysis import data as D
from cmscale.analysis.fit import single_threaded_blas
from cmscale.analysis.pipeline import MethodAnalysis, Warning_, analyse_method, ladder_falls_with_size
from cmscale.analysis.ratio import ratio_table, sweep_pairs
from cmscale.analysis.selection import LawChoice, ci_problem


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
    n_draws: int
    seed: int = 0
    seconds: float = 0.0
    sql: dict[str, str] | None = None  # the queries behind the ratio pairs and the final evals
    ema: D.EmaChoice = field(default_factory=D.EmaChoice)
    finals: pd.DataFrame | None = None  # each run's final evals of the EMA taken (final_evals_sql)
    ema_widths: pd.DataFrame | None = None  # the EMAs evaluated per run (ema_widths_sql)
    guided_runs: dict[str, float] = field(default_factory=dict)  # finished runs configured with guidance != 1
    other_guidance: pd.DataFrame | None = None  # evals at another guidance than the run's, left out

    @property
    def has_posthoc(self) -> bool:
        return self.ema_widths is not None and bool(self.ema_widths["ema_posthoc"].any())


def sweep_ratio(
    root: Path | str, sweep: str, budget: str = "max", ema: D.EmaChoice | None = None
) -> tuple[str, pd.DataFrame, str | None]:
    """(the SQL, the teacher-student pairs of one feature extractor, a note when others were dropped)."""
    sql = D.ratio_pairs_sql(sweep, ema)
    rows, note = D.pick_extractor(D.run_query(sql, root))
    return sql, sweep_pairs(rows, budget=budget), note


def sweep_ratio_table(
    root: Path | str, sweep: str, *, budget: str = "max", level: float = 0.95, ema: D.EmaChoice | None = None
) -> dict[str, dict]:
    """The teacher-student FID ratio per student method and step count, as the report computes it."""
    _, pairs, _ = sweep_ratio(root, sweep, budget, ema)
    if pairs.empty:
        raise ValueError(
            f"sweep {sweep!r}: no finished student run has a finished teacher of the same preset and seed"
        )
    return ratio_table(pairs, level=level)


def analyse_sweep(
    root: Path | str, sweep: str, *, n_draws: int = 1000, seed: int = 0, ema: D.EmaChoice | None = None
) -> SweepAnalysis:
    """Read the sweep from the store and fit everything, on the EMA ``ema`` picks per run (default:
    the run's own) at each run's configured guidance; no files are written."""
    with single_threaded_blas():  # tiny linear algebra throughout: BLAS threads only add overhead
        return _analyse_sweep(Path(root), sweep, n_draws=n_draws, seed=seed, ema=ema or D.EmaChoice())


def _guidance_warnings(root: Path, sweep: str) -> tuple[dict[str, float], pd.DataFrame, list[Warning_]]:
    """(guided runs and their scales, the evals left out for their guidance, a warning per run)."""
    configured = D.run_query(D.run_guidance_sql(sweep), root)
    guided = {str(r.run_id): float(r.guidance) for r in configured.itertuples() if float(r.guidance) != 1.0}
    other = D.run_query(D.other_guidance_sql(sweep), root)
    warnings = [
        Warning_("data", f"run {r.run_id}: {r.n_evals} evals at guidance {r.guidance:g} left out; the analysis reads "
                         f"each run's evals at its configured guidance ({r.configured:g})")
        for r in other.itertuples()
    ]
    return guided, other, warnings


def _ema_warnings(ema: D.EmaChoice, widths: pd.DataFrame, finals: pd.DataFrame) -> list[Warning_]:
    """A warning per finished, evaluated run that has no eval of the EMA width asked for."""
    if ema.mode != "width":
        return []
    taken = set(finals["run_id"].astype(str))
    missing = sorted(set(widths["run_id"].astype(str)) - taken)
    return [
        Warning_("no eval at this EMA width",
                 f"run {run_id} has no eval at ema_sigma_rel {ema.width:g}; left out (cmscale ema reconstruct RUN "
                 f"--sigma-rel {ema.width:g}, then cmscale eval RUN --ema-sigma-rel {ema.width:g})")
        for run_id in missing
    ]


def _analyse_sweep(root: Path, sweep: str, *, n_draws: int, seed: int, ema: D.EmaChoice) -> SweepAnalysis:
    started = time.time()
    runs = D.sweep_runs(root, sweep)
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
    finals = D.run_query(D.final_evals_sql(sweep, ema), root)
    widths = D.run_query(D.ema_widths_sql(sweep), root)
    warnings.extend(_ema_warnings(ema, widths, finals))
    guided, other_guidance, guidance_warnings = _guidance_warnings(root, sweep)
    warnings.extend(guidance_warnings)
    methods: list[MethodAnalysis] = []
    for method in D.sweep_methods(runs):
        if D.is_teacher(method):
            metric_names = ["fid_1step"]  # teachers: the metric means their own Heun eval
        else:
            steps = sorted(int(s) for s in finals.loc[finals["method"] == method, "sampler_steps"].unique())
            metric_names = [f"fid_{s}step" for s in steps]
        for name in metric_names:
            metric = D.parse_metric(name)
            sql, points, note = D.method_points(root, sweep, method, metric, ema)
            if note:
                warnings.append(Warning_("data", f"{method} {name}: {note}"))
            if points.empty:
                continue
            result = analyse_method(method, metric, sql, points, n_draws=n_draws, seed=seed)
            methods.append(result)
            warnings.extend(Warning_(w.kind, f"{result.title}, {w.text}") for w in result.notes)
    pair_sql, pairs, note = sweep_ratio(root, sweep, ema=ema)
    if note:
        warnings.append(Warning_("data", f"teacher-student pairs: {note}"))
    ratio = ratio_table(pairs) if len(pairs) else {}
    if pairs.empty and (~D.is_teacher(runs["method"])).any():
        warnings.append(
            Warning_(
                "data",
                "no teacher-student ratio: no finished student run has a finished edm teacher run of the "
                "same preset and seed in this sweep (teachers given as checkpoints are not in the store)",
            )
        )
    sql = {"ratio_pairs": pair_sql, "final_evals": D.final_evals_sql(sweep, ema)}
    return SweepAnalysis(
        sweep, root, runs, methods, pairs, ratio, sampling_points(finals), warnings, n_draws, seed,
        time.time() - started, sql, ema, finals, widths, guided, other_guidance,
    )


def ema_section(analysis: SweepAnalysis) -> dict | None:
    """report.json's ``ema``: the option, what it means, and the EMA taken per run and sampler step
    count with its final FID. None (no section) when the default was used and no run has post-hoc
    EMA evals: then every eval is of the run's own EMA and there was nothing to choose."""
    if analysis.ema.is_default and not analysis.has_posthoc:
        return None
    finals = analysis.finals if analysis.finals is not None else pd.DataFrame()
    taken = [
        {"run_id": row.run_id, "method": row.method, "preset": row.preset, "sampler_steps": int(row.sampler_steps),
         "extractor": row.extractor, "ema_sigma_rel": row.ema_sigma_rel, "posthoc": bool(row.ema_posthoc),
         "step": int(row.step), "fid": row.fid}
        for row in finals.itertuples()
    ]
    return {"option": analysis.ema.option, "description": analysis.ema.description, "taken": taken}


def guidance_section(analysis: SweepAnalysis) -> dict | None:
    """report.json's ``guidance``: the rule, the guided runs' scales and the evals left out; None when
    no finished run is guided and no eval was left out."""
    other = analysis.other_guidance
    left_out = [] if other is None else other.to_dict(orient="records")
    if not analysis.guided_runs and not left_out:
        return None
    return {"description": D.GUIDANCE_DESCRIPTION, "guided_runs": analysis.guided_runs, "left_out": left_out}


def sampling_points(finals: pd.DataFrame) -> pd.DataFrame:
    """Final evals of each method's largest-budget runs, averaged per size and step count, with
    a label per method and steps: FID against sampling FLOPs per image."""
    finals, _ = D.pick_extractor(finals)
    if finals.empty:
        return finals
    rows = finals.dropna(subset=["sampling_flops_per_image", "fid"]).copy()
    rows = rows[rows["budget_flops"] == rows.groupby(["method", "preset"])["budget_flops"].transform("max")]
    rows = rows.groupby(["method", "preset", "params", "sampler_steps"], as_index=False)[
        ["sampling_flops_per_image", "fid"]
    ].mean()
    rows["label"] = np.where(
        D.is_teacher(rows["method"]),
        "edm Heun " + rows["sampler_steps"].astype(str) + " steps",
        rows["method"] + " " + rows["sampler_steps"].astype(str) + "-step",
    )
    return rows.rename(columns={"preset": "size"})


# --------------------------------------------------------------------------------------------
# Numbers as text, and the finding each method's numbers support
# --------------------------------------------------------------------------------------------


def num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def with_ci(name: str, value, ci, digits: int = 3) -> str:
    """``value [lo, hi]``; ``value [unbounded]`` when the CI is wider than the data support; the bare
    value when there is no CI."""
    if ci is None or any(v is None or not math.isfinite(v) for v in ci):
        return num(value, digits)
    if ci_problem(name, value, ci):
        return f"{num(value, digits)} [unbounded]"
    return f"{num(value, digits)} [{num(ci[0], digits)}, {num(ci[1], digits)}]"


def choice_param(choice: LawChoice | None, name: str) -> str:
    if choice is None or choice.kept is None:
        return "not identified"
    if name not in choice.params:
        return "(dropped)"
    return with_ci(name, choice.params[name], choice.ci.get(name))


def n_opt_text(fit) -> str:
    if fit.a is None:
        return fit.reason.replace("not identifiable from these runs: ", "not identified: ")
    ci = f" [{num(fit.ci['a'][0])}, {num(fit.ci['a'][1])}]" if fit.ci else f" (no CI: {fit.ci_reason})"
    return f"a = {num(fit.a)}{ci}, {fit.n_budgets} interior"


def ladder_finding(ladder) -> str:
    steps = sorted({int(step) for step in ladder["step"]})
    at = f"{steps[0]:,} iterations" if len(steps) == 1 else "their own budgets"
    by_size = ", ".join(f"{row.preset} {num(row.fid)}" for row in ladder.itertuples())
    verdict = "falls with size" if ladder_falls_with_size(ladder) else "does not fall at every larger size"
    return f"Teacher FID at {at} {verdict}: {by_size} (one teacher per size: no CI)."


def joint_n_opt_text(joint) -> str:
    if joint is None:
        return "not fitted"
    if joint.a is None:
        return joint.reason.replace("not identifiable from these runs: ", "not identified: ")
    ci = f" [{num(joint.ci[0])}, {num(joint.ci[1])}]" if joint.ci else f" (no CI: {joint.ci_reason})"
    return f"a = {num(joint.a)}{ci}"


def n_opt_estimates(result: MethodAnalysis) -> list[tuple[str, float, tuple | None, str]]:
    """(approach, a, CI or None, why no CI) for every approach that estimated N_opt ∝ C^a."""
    estimates = []
    if result.optimal is not None:
        for name, fit in (("iso-FLOP", result.optimal.isoflop), ("envelope", result.optimal.envelope_fit)):
            if fit.a is not None:
                estimates.append((name, fit.a, fit.ci.get("a"), fit.ci_reason or "too few runs"))
    joint = result.joint_n_opt
    if joint is not None and joint.a is not None:
        estimates.append(("joint law", joint.a, joint.ci, joint.ci_reason))
    return estimates


def _n_opt_finding(result: MethodAnalysis) -> str | None:
    """One clause on N_opt ∝ C^a: every approach's estimate, and which CIs exclude 0."""
    estimates = n_opt_estimates(result)
    if not estimates:
        if result.optimal is None:
            return None
        interior, budgets = int(result.optimal.optima["interior"].sum()), len(result.optimal.optima)
        return f"the compute-optimal size is not identified ({interior} of {budgets} budgets interior)"

    def shown(estimate) -> str:
        name, a, ci, _ = estimate
        return f"{name} a = {num(a, 2)} [{num(ci[0], 2)}, {num(ci[1], 2)}]"

    above = [e for e in estimates if e[2] and e[2][0] > 0]
    below = [e for e in estimates if e[2] and e[2][1] < 0]
    spanning = [e for e in estimates if e[2] and e[2][0] <= 0 <= e[2][1]]
    if above and below:
        return "the approaches disagree on the sign of N_opt ∝ C^a: " + "; ".join(map(shown, above + below))
    if above or below:
        verb = "grows" if above else "shrinks"
        text = f"the compute-optimal size {verb} with compute (CI of a excludes 0): " + "; ".join(
            map(shown, above or below)
        )
        if spanning:
            text += "; the CI includes 0 for " + "; ".join(map(shown, spanning))
        return text
    if spanning:
        return (
            "N_opt ∝ C^a, but every CI includes 0: no detectable growth of the compute-optimal size ("
            + "; ".join(map(shown, spanning))
            + ")"
        )
    name, a, _, why = estimates[0]
    return f"N_opt ∝ C^{num(a, 2)} by {name} (no CI: {why})"


def finding(result: MethodAnalysis, ratio: dict | None) -> str:
    """The one sentence a method's numbers support."""
    if result.ladder is not None:
        return ladder_finding(result.ladder)
    parts = []
    fits = [c for c in result.size_fits.values() if c.kept is not None and "alpha" in c.params]
    falling = [c for c in fits if c.ci.get("alpha") and c.ci["alpha"][0] > 0]
    if fits:
        with_ci_count = sum(bool(c.ci.get("alpha")) for c in fits)
        parts.append(
            f"FID falls with compute (alpha CI above 0) for {len(falling)} of {len(result.size_fits)} sizes"
            + ("" if with_ci_count == len(fits) else f" ({len(fits) - with_ci_count} without a CI)")
        )
    n_opt = _n_opt_finding(result)
    if n_opt:
        parts.append(n_opt)
    if ratio:
        drift = ratio["slope_ci"]
        steady = drift and all(v is not None and math.isfinite(v) for v in drift) and drift[0] < 0 < drift[1]
        parts.append(
            f"students reach {num(ratio['mean_ratio'], 3)}x the teacher's FID"
            + (", with no detectable drift with size" if steady else f", slope {num(ratio['slope'], 2)} on log N")
        )
    return ("; ".join(parts) + ".") if parts else "Too few evals for any fit."


def findings(analysis: SweepAnalysis) -> dict:
    """``report.json``: every number of the summary, per method; nulls carry a reason."""
    methods = []
    for result in analysis.methods:
        ratio = analysis.ratio.get(result.ratio_group)
        methods.append(
            {
                "method": result.method,
                "sampler_steps": None if D.is_teacher(result.method) else result.metric.sampler_steps,
                "title": result.title,
                "n_runs": int(result.points["run_id"].nunique()),
                "n_evals": len(result.points),
                # the law's JSON replaces the size's parameter count under "params" (kept for report.json's shape)
                "per_size": {p: {"params": result.params_of(p), **c.to_json()} for p, c in result.size_fits.items()},
                "frontier": result.frontier.to_json() if result.frontier else None,
                "compute_optimal": result.optimal.to_json() if result.optimal else None,
                "joint": result.joint.to_json() if result.joint else None,
                "n_opt_joint": result.joint_n_opt.to_json() if result.joint_n_opt else None,
                "ladder": (
                    {
                        "sizes": result.ladder.to_dict(orient="records"),
                        "falls_with_size": ladder_falls_with_size(result.ladder),
                    }
                    if result.ladder is not None
                    else None
                ),
                "ratio": (
                    {
                        "group": result.ratio_group,
                        "mean_ratio": ratio["mean_ratio"],
                        "ci": ratio["ci"],
                        "slope": ratio["slope"],
                        "slope_ci": ratio["slope_ci"],
                        "slope_p": ratio["slope_p"],
                        "n_points": ratio["n_points"],
                    }
                    if ratio
                    else None
                ),
                "finding": finding(result, ratio),
            }
        )
    out = {
        "sweep": analysis.sweep,
        "n_runs": len(analysis.runs),
        "n_draws": analysis.n_draws,
    }
    # Only where there was a choice to make, so a sweep without one keeps its report.json as it was.
    for key, section in (("ema", ema_section(analysis)), ("guidance", guidance_section(analysis))):
        if section is not None:
            out[key] = section
    out |= {
        "methods": methods,
        "ratio": analysis.ratio,
        "warnings": [{"kind": w.kind, "text": w.text} for w in analysis.warnings],
    }
    return D.json_safe(out)
