"""Report only what the data identify: nested-law selection and honest intervals.

A fit is **degenerate** when a parameter sits at its bound: the floor ``E`` at 0 (the data want
E < 0), a coefficient ``A``/``B`` at 0 (that term carries no signal), or an exponent at an end of
its range (the term is a constant, or decays within the first point). Its other parameters, and
anything derived from them, then describe the bound rather than the data.

:func:`select_law` therefore fits the requested law and its nested sub-laws (drop E: the pure
power law; drop the N or the D term of the joint law), keeps only those whose parameters are all
inside their bounds, and chooses among them by **AIC** = n log(mean r^2) + 2k (r: the fit's log
residuals, or the residuals for the linear error model; k: number of parameters). When the
requested law is degenerate, only sub-laws without the collapsed parts are candidates. The
choice and the reason are kept with the result, and derived quantities (``a = beta/(alpha+beta)``)
are given only when the kept law has both terms.

A CI is reported only with at least ``MIN_CI_GROUPS`` independent runs behind it; a CI wider
than the data can support (a coefficient over ``MAX_CI_DECADES`` decades or down to 0, an
exponent reaching its bound) is shown as unbounded (:func:`ci_problem`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cmscale.analysis.fit import (
    MIN_CI_GROUPS,
    FitResult,
    bootstrap_fit,
    derived_quantities,
    fit_law,
    get_form,
)

MAX_CI_DECADES = 3.0
EXPONENTS = ("alpha", "beta", "a", "b")
# Quantities that may take either sign (the ratio's drift on log N): an interval across 0 is
# informative for them (no detectable drift), not a vanishing term.
SIGNED = ("slope",)

# (sub-law form, inputs it uses, its parameter names -> the requested law's names)
_D_TERM = {"A": "B", "alpha": "beta"}
NESTED: dict[str, list[tuple[str, tuple[int, ...], dict[str, str]]]] = {
    "pure": [("pure", (0,), {})],
    "saturating": [("saturating", (0,), {}), ("pure", (0,), {})],
    "joint": [
        ("joint", (0, 1), {}),
        ("joint_pure", (0, 1), {}),
        ("saturating", (1,), _D_TERM),
        ("saturating", (0,), {}),
        ("pure", (1,), _D_TERM),
        ("pure", (0,), {}),
    ],
}
_TERMS = {"A": ("alpha", "N"), "B": ("beta", "D")}


def law_text(names: Sequence[str], variables: dict[str, str] | None = None) -> str:
    """``E + A x^-alpha``-style text of the law with these parameters (the requested law's names)."""
    variables = variables or {}
    parts = ["E"] if "E" in names else []
    for coef, (expo, var) in _TERMS.items():
        if coef in names:
            parts.append(f"{coef} {variables.get(coef, var)}^-{expo}")
    return " + ".join(parts)


def _aic(fit: FitResult) -> float:
    """n log(mean r^2) + 2k from the fit's residuals (log residuals for the log and Huber losses)."""
    residuals = fit._problem.residuals(fit._theta)  # noqa: SLF001
    mean_square = max(float(np.mean(residuals**2)), 1e-300)
    return residuals.size * math.log(mean_square) + 2 * len(fit.params)


def ci_problem(
    name: str, value: float, ci: Sequence[float] | None, exponent_bounds: tuple[float, float] = (1e-4, 5.0)
) -> str:
    """Why ``ci`` is not informative ('' when it is): shown as 'unbounded' in reports."""
    if ci is None or len(ci) != 2 or not all(v is not None and math.isfinite(v) for v in ci):
        return "no finite interval"
    lo, hi = float(ci[0]), float(ci[1])
    if name in EXPONENTS[:2]:
        if lo - exponent_bounds[0] <= 1e-6 or exponent_bounds[1] - hi <= 1e-6:
            return "the interval reaches the exponent's bound"
        return ""
    if name in EXPONENTS or name in SIGNED:
        return ""
    if name == "E" and lo <= 1e-9 * max(hi, 1e-300):
        return ""  # E >= 0 is the law's own bound: [0, hi] is a one-sided interval, not a failure
    if lo <= 0:
        return "the interval reaches 0 (the term may vanish)"
    decades = math.log10(hi / lo)
    if decades > MAX_CI_DECADES:
        return f"the interval spans {decades:.0f} decades (> {MAX_CI_DECADES:g})"
    return ""


@dataclass
class LawChoice:
    """The requested law, the nested laws tried, and the one kept (None: none identified)."""

    requested: str
    kept: FitResult | None
    kept_law: str
    inputs: tuple[int, ...]
    names: dict[str, str]  # kept law's parameter name -> requested law's name
    candidates: list[dict]
    reason: str
    degenerate: bool
    n_groups: int
    ci_note: str = ""
    criterion: str = "AIC"
    form: str = ""  # the requested form's name
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, float]:
        return {self.names.get(k, k): v for k, v in self.kept.params.items()} if self.kept else {}

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        if self.kept is None:
            return {}
        return {self.names.get(k, k): v for k, v in self.kept.ci.items() if k in self.kept.params}

    def predict(self, *X: np.ndarray) -> np.ndarray:
        return self.kept.predict(*[X[i] for i in self.inputs])

    @property
    def derived(self) -> dict[str, float]:
        """``a`` and ``b`` of N_opt ∝ C^a, D_opt ∝ C^b: only from a kept law with both terms."""
        if self.kept is None or self.kept.form not in ("joint", "joint_pure") or self.kept.status != "converged":
            return {}
        return derived_quantities(get_form(self.kept.form), self.kept.params)

    @property
    def derived_ci(self) -> dict[str, tuple[float, float]]:
        return {k: v for k, v in (self.kept.ci.items() if self.kept else []) if k in self.derived}

    @property
    def derived_reason(self) -> str:
        if self.derived or self.form != "joint":
            return ""  # only the joint law has derived quantities
        if self.kept is None:
            return f"not identifiable from these runs: {self.reason}"
        dropped = [c for c in ("A", "B") if c not in self.params]
        terms = " and no ".join(f"{_TERMS[c][1]} term ({c} {_TERMS[c][1]}^-{_TERMS[c][0]})" for c in dropped)
        return f"not identifiable from these runs: the kept law {self.kept_law} has no {terms}; {self.reason}"

    def to_json(self) -> dict:
        out = {
            "requested_law": self.requested,
            "kept_law": self.kept_law or None,
            "criterion": self.criterion,
            "reason": self.reason,
            "degenerate": self.degenerate,
            "n_groups": self.n_groups,
            "ci_note": self.ci_note or None,
            "candidates": self.candidates,
        }
        if self.kept is not None:
            out["params"] = self.params
            out["ci"] = {}
            for name, value in self.params.items():
                interval = self.ci.get(name)
                problem = ci_problem(name, value, interval) if interval else ""
                out["ci"][name] = None if interval is None or problem else [float(interval[0]), float(interval[1])]
                if interval is not None and problem:
                    out.setdefault("ci_unbounded", {})[name] = problem
            out["status"], out["n_points"] = self.kept.status, self.kept.n_points
        derived = self.derived
        out["derived"] = (
            {
                k: {"value": v, "ci": list(self.derived_ci[k]) if k in self.derived_ci else None}
                for k, v in derived.items()
            }
            if derived
            else None
        )
        out["derived_reason"] = self.derived_reason or None
        return out


def select_law(
    form: str,
    X: Sequence[np.ndarray],
    y: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    n_draws: int = 1000,
    seed: int | None = 0,
    level: float = 0.95,
    n_jobs: int | None = None,
    variables: dict[str, str] | None = None,
    **fit_kwargs,
) -> LawChoice:
    """Fit ``form`` and its nested laws, keep the identified one with the lowest AIC, and
    bootstrap it over ``groups`` (runs) when there are at least ``MIN_CI_GROUPS`` of them.
    Raises ValueError when the requested law itself cannot be fitted (too few points, bad input)."""
    if form not in NESTED:
        raise ValueError(f"unknown law form {form!r}; choose one of {sorted(NESTED)}")
    variables = variables or ({} if form == "joint" else {"A": "x"})
    full = fit_law(form, X, y, **fit_kwargs)
    requested = law_text(full.params, variables)
    collapsed = set(full.at_bound)
    removed = set()
    if "E" in collapsed:
        removed.add("E")
    for coef, (expo, _) in _TERMS.items():
        if coef in full.params and ({coef, expo} & collapsed):
            removed |= {coef, expo}
    candidates, best = [], None
    for sub_form, inputs, names in NESTED[form]:
        full_names = {names.get(n, n) for n in get_form(sub_form).param_names}
        if removed & full_names:
            continue
        text = law_text(full_names, variables)
        try:
            fit = full if sub_form == form else fit_law(sub_form, [X[i] for i in inputs], y, **fit_kwargs)
        except ValueError as error:
            candidates.append({"law": text, "status": "not_fitted", "reason": str(error)})
            continue
        aic = _aic(fit)
        identified = fit.status == "converged"
        candidates.append(
            {
                "law": text,
                "n_params": len(fit.params),
                "aic": aic,
                "status": fit.status,
                "at_bound": list(fit.at_bound),
                "identified": identified,
            }
        )
        if identified and (best is None or aic < best[0]):
            best = (aic, fit, text, inputs, names)
    degenerate = bool(collapsed)
    why_full = (
        f"{requested} is degenerate (at bound: {', '.join(full.at_bound)})"
        if degenerate
        else f"{requested} has every parameter inside its bounds"
        if full.status == "converged"
        else f"{requested} did not converge ({full.status})"
    )
    n_groups = len(np.unique(groups)) if groups is not None else len(np.asarray(y))
    if best is None:
        return LawChoice(
            requested,
            None,
            "",
            (),
            {},
            candidates,
            f"{why_full}; no nested law has all its parameters inside their bounds",
            degenerate,
            n_groups,
            form=form,
            variables=variables,
        )
    _, kept, kept_text, inputs, names = best
    reason = (
        f"{why_full}; kept {kept_text} (lowest AIC among the nested laws with every parameter inside its bounds)"
        if kept_text != requested
        else f"{why_full}; kept it (lowest AIC among the nested laws)"
    )
    choice = LawChoice(
        requested,
        kept,
        kept_text,
        inputs,
        names,
        candidates,
        reason,
        degenerate,
        n_groups,
        form=form,
        variables=variables,
    )
    if n_draws > 0 and n_groups >= MIN_CI_GROUPS:
        bootstrap_fit(kept, groups, n_draws=n_draws, seed=seed, level=level, n_jobs=n_jobs)
    elif n_draws > 0:
        choice.ci_note = f"{n_groups} run(s): estimate without CI (a CI needs >= {MIN_CI_GROUPS} independent runs)"
    return choice
