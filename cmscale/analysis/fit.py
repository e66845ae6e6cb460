"""Power-law fits by variable projection, with a clustered bootstrap for honest uncertainty.

Three law forms (``x``, ``N``, ``D`` > 0; all linear coefficients >= 0)::

    pure        y = A x^-alpha
    saturating  y = E + A x^-alpha
    joint       y = E + A N^-alpha + B D^-beta        (Chinchilla form; N params, D images/tokens)

How a fit is found
------------------
1. **Scaling.** Each input is divided by its geometric mean and ``y`` by its geometric mean, so
   every design column is O(1) and every linear coefficient is O(1); reported parameters are in the
   caller's units.
2. **Grid with variable projection.** For every exponent pair on a grid the linear coefficients
   (E, A, B) are solved by non-negative least squares (``scipy.optimize.nnls``). With the
   ``linear`` error model this projection is exact. With the ``log`` and ``huber`` error models the
   objective is not linear in the coefficients, so the projection solves the *relative-error* least
   squares problem ``min_c ||(Mc - y) / y||`` instead: ``(Mc - y)/y = log(Mc/y) + O(r^2)``, so it is
   the first-order (Gauss-Newton) projection of the log objective. Every grid point is then scored
   with the *true* objective.
3. **Joint refinement.** The best ``n_starts`` grid points seed L-BFGS-B over all parameters
   (coefficients and exponents together) on the true objective with its analytic gradient, bounds
   ``coefficients >= 0`` and ``exponent_bounds`` on the exponents, and tight tolerances. The best
   refined start wins. So the projection only supplies starting points; the reported optimum is
   the optimum of the selected error model, not of the projected surrogate.

The error model is the loss on residuals, summed over points (never averaged)::

    log     r = log(pred) - log(y),  rho(r) = r^2
    linear  r = pred - y,            rho(r) = r^2
    huber   r = log(pred) - log(y),  rho(r) = r^2/2 if |r| <= delta else delta (|r| - delta/2)

Status: ``converged``; ``max_iter`` (L-BFGS-B ran out of iterations); ``at_bound`` (converged with
a parameter at its bound, e.g. E == 0 because the data want E < 0: the names are in
``FitResult.at_bound``); ``failed`` (the line search stopped with a non-small gradient).

The bootstrap (:func:`bootstrap_fit`) resamples whole groups (runs), never rows, expressed as
integer row weights so every draw keeps the array shapes. Each draw starts L-BFGS-B from the
full-data optimum (no grid), and draws are split over worker processes with joblib.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import minimize, nnls

ErrorModel = Literal["log", "linear", "huber"]
ERROR_MODELS: tuple[str, ...] = ("log", "linear", "huber")
STATUSES: tuple[str, ...] = ("converged", "max_iter", "at_bound", "failed")

# Below these distances a parameter counts as sitting at its bound (scaled units: y/geomean(y) ~ 1).
_COEF_BOUND_TOL = 1e-9
_EXPONENT_BOUND_TOL = 1e-7
# A line-search stop counts as converged when the projected gradient, relative to the objective,
# is this small: float precision, not a bad direction, stopped the search.
_LINESEARCH_GRAD_TOL = 1e-4


@dataclass(frozen=True)
class LawForm:
    """One law: an optional offset E plus one power term per input variable.

    Power term ``j`` multiplies coefficient ``power_coefs[j]`` with ``X[j] ** -exponents[j]``.
    """

    name: str
    has_offset: bool
    power_coefs: tuple[str, ...]
    exponents: tuple[str, ...]
    variables: tuple[str, ...]

    @property
    def linear_names(self) -> tuple[str, ...]:
        return (("E",) if self.has_offset else ()) + self.power_coefs

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.linear_names + self.exponents

    @property
    def n_vars(self) -> int:
        return len(self.variables)


FORMS: dict[str, LawForm] = {
    "pure": LawForm("pure", False, ("A",), ("alpha",), ("x",)),
    "saturating": LawForm("saturating", True, ("A",), ("alpha",), ("x",)),
    "joint": LawForm("joint", True, ("A", "B"), ("alpha", "beta"), ("N", "D")),
}


def get_form(name: str) -> LawForm:
    if name not in FORMS:
        raise ValueError(f"unknown law form {name!r}; choose one of {sorted(FORMS)}")
    return FORMS[name]


def evaluate_law(form: str | LawForm, params: dict[str, float], *X: np.ndarray) -> np.ndarray:
    """The law's prediction at inputs ``X`` (one array per variable) in the caller's units."""
    form = get_form(form) if isinstance(form, str) else form
    if len(X) != form.n_vars:
        raise ValueError(f"the {form.name} law takes {form.n_vars} input(s) {form.variables}, got {len(X)}")
    pred = np.full(np.broadcast(*[np.asarray(x, float) for x in X]).shape, params.get("E", 0.0), dtype=float)
    for coef, expo, x in zip(form.power_coefs, form.exponents, X):
        pred = pred + params[coef] * np.asarray(x, float) ** -params[expo]
    return pred


def derived_quantities(form: LawForm, params: dict[str, float]) -> dict[str, float]:
    """Quantities that follow from the parameters and deserve their own CI.

    For the joint form with C = 6 N D, minimising the law at fixed C gives N_opt ∝ C^a and
    D_opt ∝ C^b with a = beta / (alpha + beta), b = alpha / (alpha + beta) (Hoffmann et al. 2022).
    """
    if form.name == "joint":
        total = params["alpha"] + params["beta"]
        if total <= 0:
            return {"a": math.nan, "b": math.nan}
        return {"a": params["beta"] / total, "b": params["alpha"] / total}
    return {}


def single_threaded_blas():
    """Context manager limiting BLAS to one thread. These problems are tiny (a few hundred rows,
    <= 5 parameters): with OpenBLAS's default threads the fits ran 10x slower (measured: fit +
    300 draws, 9 points, 41 s wall vs 3.9 s), so every fit and bootstrap runs under this limit."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# --------------------------------------------------------------------------------------------
# The objective on scaled data
# --------------------------------------------------------------------------------------------


class _Problem:
    """Scaled data plus the objective and its gradient; picklable for worker processes."""

    def __init__(self, form: LawForm, X: Sequence[np.ndarray], y: np.ndarray, loss: str, delta: float,
                 exponent_bounds: tuple[float, float]):
        self.form = form
        self.loss = loss
        self.delta = float(delta)
        self.x_ref = np.array([math.exp(np.mean(np.log(x))) for x in X])
        self.y_ref = math.exp(float(np.mean(np.log(y))))
        # log of the scaled inputs, shape (n_vars, n); x_s^-a = exp(-a * log x_s)
        self.log_xs = np.stack([np.log(x) - math.log(ref) for x, ref in zip(X, self.x_ref)])
        self.ys = y / self.y_ref
        self.log_ys = np.log(self.ys)
        self.n_lin = len(form.linear_names)
        self.n_exp = len(form.exponents)
        self.bounds = [(0.0, None)] * self.n_lin + [tuple(exponent_bounds)] * self.n_exp

    # design and prediction ------------------------------------------------------------------
    def power_columns(self, exponents: np.ndarray) -> np.ndarray:
        """Columns x_s^-exponent, shape (n_vars, n)."""
        return np.exp(-exponents[:, None] * self.log_xs)

    def design(self, exponents: np.ndarray) -> np.ndarray:
        cols = self.power_columns(exponents)
        if self.form.has_offset:
            cols = np.vstack([np.ones((1, cols.shape[1])), cols])
        return cols.T

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        pred = self.design(theta[self.n_lin:]) @ theta[: self.n_lin]
        if self.loss == "linear":
            return pred - self.ys
        return np.log(np.maximum(pred, 1e-300)) - self.log_ys

    # objective --------------------------------------------------------------------------------
    def value_and_grad(self, theta: np.ndarray, weights: np.ndarray | None) -> tuple[float, np.ndarray]:
        """Summed loss and its gradient in theta = (linear coefficients, exponents)."""
        coefs, exps = theta[: self.n_lin], theta[self.n_lin:]
        powers = self.power_columns(exps)  # (n_vars, n)
        n_off = 1 if self.form.has_offset else 0
        pred = (coefs[n_off:, None] * powers).sum(axis=0)
        if n_off:
            pred = pred + coefs[0]
        pred = np.maximum(pred, 1e-300)
        if self.loss == "linear":
            r = pred - self.ys
            rho, drho = r * r, 2.0 * r
            dpred = drho
        else:
            r = np.log(pred) - self.log_ys
            if self.loss == "log":
                rho, drho = r * r, 2.0 * r
            else:
                absr = np.abs(r)
                small = absr <= self.delta
                rho = np.where(small, 0.5 * r * r, self.delta * (absr - 0.5 * self.delta))
                drho = np.clip(r, -self.delta, self.delta)
            dpred = drho / pred
        if weights is not None:
            rho = rho * weights
            dpred = dpred * weights
        grad = np.empty_like(theta)
        if n_off:
            grad[0] = dpred.sum()
        grad[n_off : self.n_lin] = powers @ dpred
        # d/d(exp_j) of c_j x_s^-exp_j = -c_j log(x_s) x_s^-exp_j
        grad[self.n_lin:] = -coefs[n_off:] * ((powers * self.log_xs) @ dpred)
        return float(rho.sum()), grad

    def value(self, theta: np.ndarray, weights: np.ndarray | None = None) -> float:
        return self.value_and_grad(theta, weights)[0]

    # variable projection ------------------------------------------------------------------------
    def project(self, exponents: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """NNLS for the linear coefficients at fixed exponents (relative-error rows for log/huber)."""
        M = self.design(exponents)
        target = self.ys
        row_scale = np.ones_like(target) if self.loss == "linear" else 1.0 / self.ys
        if weights is not None:
            row_scale = row_scale * np.sqrt(weights)
        coefs, _ = nnls(M * row_scale[:, None], target * row_scale)
        return coefs

    def grid_starts(self, grid: np.ndarray, n_starts: int, weights: np.ndarray | None = None) -> list[np.ndarray]:
        """The ``n_starts`` best grid points, each with its projected coefficients."""
        axes = [grid] * self.n_exp
        mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, self.n_exp)
        scored = []
        for exps in mesh:
            theta = np.concatenate([self.project(exps, weights), exps])
            value = self.value(theta, weights)
            if np.isfinite(value):
                scored.append((value, theta))
        scored.sort(key=lambda item: item[0])
        return [theta for _, theta in scored[:n_starts]]

    # refinement ----------------------------------------------------------------------------------
    def refine(self, theta0: np.ndarray, weights: np.ndarray | None, maxiter: int) -> tuple[np.ndarray, float, str,
                                                                                            str]:
        """L-BFGS-B from theta0; returns (theta, objective, status, message) before bound checks."""
        scale = max(self.value(theta0, weights), 1e-300)  # normalise so ftol/gtol are relative

        def fun(theta):
            value, grad = self.value_and_grad(theta, weights)
            return value / scale, grad / scale

        lo = np.array([b[0] if b[0] is not None else -np.inf for b in self.bounds])
        hi = np.array([b[1] if b[1] is not None else np.inf for b in self.bounds])
        theta0 = np.clip(theta0, lo, hi)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # trial steps may hit pred ~ 0
            result = minimize(fun, theta0, jac=True, method="L-BFGS-B", bounds=self.bounds,
                              options={"maxiter": maxiter, "maxfun": 4 * maxiter, "ftol": 1e-13, "gtol": 1e-9,
                                       "maxcor": 20})
        theta = result.x
        if result.status == 0:
            status = "converged"
        elif result.status == 1:
            status = "max_iter"
        else:
            # A line-search stop at machine precision is a converged fit; a stop with a large
            # projected gradient is not.
            grad = self.value_and_grad(theta, weights)[1] / max(self.value(theta, weights), 1e-300)
            projected = np.where((theta <= lo) & (grad > 0) | (theta >= hi) & (grad < 0), 0.0, grad)
            status = "converged" if np.max(np.abs(projected)) < _LINESEARCH_GRAD_TOL else "failed"
        return theta, self.value(theta, weights), status, str(result.message)

    def at_bound(self, theta: np.ndarray) -> list[str]:
        names = self.form.param_names
        hits = [names[i] for i in range(self.n_lin) if theta[i] <= _COEF_BOUND_TOL]
        lo, hi = self.bounds[-1]
        for j in range(self.n_exp):
            value = theta[self.n_lin + j]
            if value - lo <= _EXPONENT_BOUND_TOL or hi - value <= _EXPONENT_BOUND_TOL:
                hits.append(names[self.n_lin + j])
        return hits

    # units ---------------------------------------------------------------------------------------
    def to_params(self, theta: np.ndarray) -> dict[str, float]:
        """Scaled theta -> parameters in the caller's units: A = A_s * y_ref * x_ref^alpha."""
        form = self.form
        params: dict[str, float] = {}
        n_off = 1 if form.has_offset else 0
        if n_off:
            params["E"] = float(theta[0] * self.y_ref)
        for j, (coef, expo) in enumerate(zip(form.power_coefs, form.exponents)):
            exponent = float(theta[self.n_lin + j])
            params[coef] = float(theta[n_off + j] * self.y_ref * self.x_ref[j] ** exponent)
            params[expo] = exponent
        return {name: params[name] for name in form.param_names}

    def objective_units(self, value: float) -> float:
        """Objective in the caller's units (only the linear model depends on the y scaling)."""
        return value * self.y_ref**2 if self.loss == "linear" else value


def _final_status(status: str, hits: list[str]) -> str:
    if status in ("failed", "max_iter"):
        return status
    return "at_bound" if hits else "converged"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """One fitted law. ``params`` is in the caller's units; ``ci`` is filled by the bootstrap."""

    form: str
    params: dict[str, float]
    status: str
    at_bound: list[str]
    objective: float
    n_points: int
    loss: str
    delta: float | None
    message: str = ""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    derived: dict[str, float] = field(default_factory=dict)
    ols: dict | None = None
    bootstrap: BootstrapResult | None = field(default=None, repr=False)

    def predict(self, *X: np.ndarray) -> np.ndarray:
        """The fitted curve at ``X`` (one array per input variable: x, or N and D)."""
        return evaluate_law(self.form, self.params, *X)

    def to_json(self) -> dict:
        out: dict = dict(self.params)
        out["ci"] = {name: [float(lo), float(hi)] for name, (lo, hi) in self.ci.items() if name in self.params}
        out["status"] = self.status
        out["n_points"] = self.n_points
        out["at_bound"] = list(self.at_bound)
        out["form"] = self.form
        out["loss"] = self.loss
        if self.loss == "huber":
            out["delta"] = self.delta
        out["objective"] = self.objective
        if self.derived:
            out["derived"] = dict(self.derived)
            out["derived_ci"] = {name: [float(lo), float(hi)] for name, (lo,
                                                                         hi) in self.ci.items() if name in self.derived}
        if self.bootstrap is not None:
            out["bootstrap"] = {"n_draws": self.bootstrap.n_draws, "n_groups": self.bootstrap.n_groups,
                                "seed": self.bootstrap.seed, "level": self.bootstrap.level,
                                "status_counts": self.bootstrap.status_counts()}
        if self.ols is not None:
            out["ols"] = self.ols
        return out


@dataclass
class BootstrapResult:
    """Parameter draws from a clustered bootstrap, and what the plots need from them."""

    form: str
    names: tuple[str, ...]
    draws: np.ndarray  # (n_draws, n_params), caller's units
    statuses: np.ndarray  # (n_draws,) of str
    derived_names: tuple[str, ...]
    derived_draws: np.ndarray  # (n_draws, n_derived)
    residuals: np.ndarray  # full-fit residuals (log or linear), for prediction intervals
    loss: str
    n_groups: int
    seed: int | None
    level: float

    @property
    def n_draws(self) -> int:
        return int(self.draws.shape[0])

    def status_counts(self) -> dict[str, int]:
        values, counts = np.unique(self.statuses, return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}

    def param_dicts(self) -> list[dict[str, float]]:
        return [dict(zip(self.names, row)) for row in self.draws]

    def ci(self, level: float | None = None) -> dict[str, tuple[float, float]]:
        """Percentile intervals for every parameter and derived quantity."""
        level = self.level if level is None else level
        tail = 100.0 * (1.0 - level) / 2.0
        out = {}
        for names, draws in ((self.names, self.draws), (self.derived_names, self.derived_draws)):
            for j, name in enumerate(names):
                column = draws[:, j]
                column = column[np.isfinite(column)]
                lo, hi = np.percentile(column, [tail, 100.0 - tail]) if column.size else (math.nan, math.nan)
                out[name] = (float(lo), float(hi))
        return out

    def predict_draws(self, *X: np.ndarray) -> np.ndarray:
        """The fitted curve of every draw at ``X``: shape (n_draws, len(X[0]))."""
        return np.stack([evaluate_law(self.form, params, *X) for params in self.param_dicts()])

    def band(self, *X: np.ndarray, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile confidence band of the fitted curve."""
        level = self.level if level is None else level
        tail = 100.0 * (1.0 - level) / 2.0
        lo, hi = np.percentile(self.predict_draws(*X), [tail, 100.0 - tail], axis=0)
        return lo, hi

    def prediction_interval(self, *X: np.ndarray, level: float | None = None, seed: int = 0) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
        """Pointwise interval for a *new observation*: curve draws plus a resampled full-fit residual.

        The residual is multiplicative (log/huber losses) or additive (linear loss), matching
        the error model the fit assumed.
        """
        level = self.level if level is None else level
        tail = 100.0 * (1.0 - level) / 2.0
        curves = self.predict_draws(*X)
        rng = np.random.default_rng(seed)
        noise = rng.choice(self.residuals, size=curves.shape, replace=True)
        observed = curves + noise if self.loss == "linear" else curves * np.exp(noise)
        lo, hi = np.percentile(observed, [tail, 100.0 - tail], axis=0)
        return lo, hi


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _validate(form: LawForm, X: Sequence, y, loss: str, delta: float) -> tuple[list[np.ndarray], np.ndarray]:
    if loss not in ERROR_MODELS:
        raise ValueError(f"unknown loss {loss!r}; choose one of {list(ERROR_MODELS)}")
    if loss == "huber" and not delta > 0:
        raise ValueError(f"huber delta must be > 0, got {delta}")
    if len(X) != form.n_vars:
        raise ValueError(f"the {form.name} law takes {form.n_vars} input(s) {form.variables}, got {len(X)}")
    y = np.asarray(y, dtype=float).ravel()
    arrays = [np.asarray(x, dtype=float).ravel() for x in X]
    for name, x in zip(form.variables, arrays):
        if x.shape != y.shape:
            raise ValueError(f"input {name} has {x.size} values but y has {y.size}")
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise ValueError(f"input {name} must be finite and > 0 (power laws need positive inputs)")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("y must be finite and > 0")
    n_params = len(form.param_names)
    if y.size < n_params + 1:
        raise ValueError(f"the {form.name} law has {n_params} parameters; need at least {n_params + 1} points, got "
                         f"{y.size}")
    return arrays, y


def fit_law(
    form: str,
    X: Sequence[np.ndarray],
    y: np.ndarray,
    *,
    loss: ErrorModel = "log",
    delta: float = 1e-3,
    exponent_bounds: tuple[float, float] = (1e-4, 5.0),
    grid: np.ndarray | None = None,
    n_starts: int = 5,
    maxiter: int = 5000,
) -> FitResult:
    """Fit one law form to data by variable projection on a grid, then joint L-BFGS-B refinement.

    ``X`` holds one array per input (``[x]`` for pure/saturating, ``[N, D]`` for joint).
    ``grid`` is the exponent grid searched per exponent (default 30 points on [0.02, 2]).
    """
    law = get_form(form)
    arrays, y = _validate(law, X, y, loss, delta)
    problem = _Problem(law, arrays, y, loss, delta, exponent_bounds)
    if grid is None:
        grid = np.linspace(0.02, 2.0, 30 if law.n_vars == 1 else 25)
    grid = np.clip(np.asarray(grid, float), *exponent_bounds)
    best = None
    with single_threaded_blas():
        for theta0 in problem.grid_starts(grid, n_starts):
            theta, value, status, message = problem.refine(theta0, None, maxiter)
            # prefer a clean finish over a marginally lower objective from a failed start
            key = (status in ("failed", "max_iter"), value)
            if best is None or key < best[0]:
                best = (key, theta, value, status, message)
    if best is None:
        raise ValueError("no grid point gave a finite objective; check that y > 0 and the inputs vary")
    _, theta, value, status, message = best
    return _result(problem, theta, value, status, message, y.size)


def _result(problem: _Problem, theta, value, status, message, n_points) -> FitResult:
    hits = problem.at_bound(theta)
    params = problem.to_params(theta)
    result = FitResult(
        form=problem.form.name, params=params, status=_final_status(status, hits), at_bound=hits,
        objective=problem.objective_units(value), n_points=int(n_points), loss=problem.loss,
        delta=problem.delta if problem.loss == "huber" else None, message=message,
        derived=derived_quantities(problem.form, params),
    )
    result._problem = problem  # noqa: SLF001 - kept for the bootstrap's warm start
    result._theta = theta
    return result


def fit_power_law(x, y, *, form: Literal["pure", "saturating"] = "saturating", **kwargs) -> FitResult:
    """``y = A x^-alpha`` (form='pure') or ``y = E + A x^-alpha`` (form='saturating')."""
    if form not in ("pure", "saturating"):
        raise ValueError(f"power-law form must be 'pure' or 'saturating', got {form!r}")
    return fit_law(form, [x], y, **kwargs)


def fit_joint(N, D, y, **kwargs) -> FitResult:
    """``y = E + A N^-alpha + B D^-beta`` (Chinchilla form)."""
    return fit_law("joint", [N, D], y, **kwargs)


# --------------------------------------------------------------------------------------------
# Clustered bootstrap
# --------------------------------------------------------------------------------------------


def group_weights(groups: np.ndarray | None, n_points: int, n_draws: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Row weights for ``n_draws`` cluster-bootstrap draws: each draw samples whole groups with
    replacement, and a row's weight is the number of times its group was drawn."""
    if groups is None:
        codes = np.arange(n_points)
    else:
        groups = np.asarray(groups)
        if groups.shape != (n_points,):
            raise ValueError(f"groups has {groups.size} values but the fit has {n_points} points")
        _, codes = np.unique(groups, return_inverse=True)
    n_groups = int(codes.max()) + 1
    picks = rng.integers(0, n_groups, size=(n_draws, n_groups))
    counts = np.stack([np.bincount(row, minlength=n_groups) for row in picks])  # (n_draws, n_groups)
    return counts[:, codes].astype(float), n_groups


def _refit_chunk(problem: _Problem, theta0: np.ndarray, weights: np.ndarray, maxiter: int) -> tuple[np.ndarray,
                                                                                                    list[str]]:
    thetas, statuses = [], []
    with single_threaded_blas():
        for w in weights:
            theta, _, status, _ = problem.refine(theta0, w, maxiter)
            thetas.append(theta)
            statuses.append(_final_status(status, problem.at_bound(theta)))
    return np.array(thetas), statuses


def default_n_jobs(n_draws: int, n_points: int) -> int:
    """Worker processes worth starting. A draw costs >= ~2 ms of optimiser overhead whatever the
    number of points (a 9-point fit takes about as long per draw as a 60-point one), so the draw
    count decides: below ~300 draws the worker start-up (~0.5 s; loky reuses workers across
    calls) does not pay off."""
    cores = os.cpu_count() or 1
    return 1 if n_draws < 300 else min(cores, 8)


def bootstrap_fit(
    fit: FitResult,
    groups: np.ndarray | None = None,
    *,
    n_draws: int = 1000,
    seed: int | None = 0,
    level: float = 0.95,
    n_jobs: int | None = None,
    maxiter: int = 2000,
) -> BootstrapResult:
    """Clustered bootstrap of a fit from :func:`fit_law`: resample whole groups (e.g. run ids).

    Each draw refits by L-BFGS-B warm-started at the full-data optimum. Fills ``fit.ci`` with
    percentile intervals for every parameter and derived quantity and attaches the draws as
    ``fit.bootstrap``. With ``groups=None`` every point is its own group.
    """
    problem: _Problem = getattr(fit, "_problem", None)
    if problem is None:
        raise ValueError("bootstrap_fit needs a FitResult produced by fit_law/fit_power_law/fit_joint in this process")
    rng = np.random.default_rng(seed)
    n_points = problem.ys.size
    weights, n_groups = group_weights(groups, n_points, n_draws, rng)
    if n_groups < 3:
        raise ValueError(f"a clustered bootstrap needs at least 3 groups, got {n_groups}")
    n_jobs = default_n_jobs(n_draws, n_points) if n_jobs is None else n_jobs
    theta0 = fit._theta  # noqa: SLF001
    if n_jobs <= 1:
        thetas, statuses = _refit_chunk(problem, theta0, weights, maxiter)
    else:
        from joblib import Parallel, delayed

        chunks = np.array_split(weights, n_jobs)
        parts = Parallel(n_jobs=n_jobs)(delayed(_refit_chunk)(problem, theta0, chunk, maxiter) for chunk in chunks)
        thetas = np.concatenate([p[0] for p in parts])
        statuses = [s for p in parts for s in p[1]]
    law = problem.form
    params = [problem.to_params(theta) for theta in thetas]
    draws = np.array([[p[name] for name in law.param_names] for p in params])
    derived = [derived_quantities(law, p) for p in params]
    derived_names = tuple(derived[0]) if derived else ()
    derived_draws = np.array([[d[name] for name in derived_names] for d in derived]).reshape(len(params),
                                                                                             len(derived_names))
    residuals = problem.residuals(theta0) * (problem.y_ref if problem.loss == "linear" else 1.0)
    result = BootstrapResult(
        form=law.name, names=law.param_names, draws=draws, statuses=np.array(statuses), derived_names=derived_names,
        derived_draws=derived_draws, residuals=residuals, loss=problem.loss, n_groups=n_groups, seed=seed, level=level,
    )
    fit.ci = result.ci()
    fit.bootstrap = result
    return result


# --------------------------------------------------------------------------------------------
# Log-log OLS with HC3 errors (form a)
# --------------------------------------------------------------------------------------------


def ols_loglog(x, y, level: float = 0.95, cov_type: str = "HC3") -> dict:
    """``log y = log A - alpha log x`` by statsmodels OLS with HC3 (heteroskedasticity-robust)
    standard errors. Returns A, alpha, their standard errors (alpha's; A's on the log scale), CIs,
    the p-value for alpha = 0, and R^2."""
    import statsmodels.api as sm

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("log-log OLS needs x > 0 and y > 0")
    design = sm.add_constant(np.log(x))
    model = sm.OLS(np.log(y), design).fit(cov_type=cov_type, use_t=True)
    (ci_const, ci_slope) = model.conf_int(alpha=1 - level)
    return {
        "A": float(np.exp(model.params[0])),
        "alpha": float(-model.params[1]),
        "se_log_A": float(model.bse[0]),
        "se_alpha": float(model.bse[1]),
        "ci": {"A": [float(np.exp(ci_const[0])), float(np.exp(ci_const[1]))], "alpha": [float(-ci_slope[1]),
                                                                                        float(-ci_slope[0])]},
        "p_alpha": float(model.pvalues[1]),
        "r2": float(model.rsquared),
        "cov_type": cov_type,
        "n_points": int(x.size),
    }


def fit_with_bootstrap(
    form: str,
    X: Sequence[np.ndarray],
    y: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    n_draws: int = 1000,
    seed: int | None = 0,
    level: float = 0.95,
    n_jobs: int | None = None,
    **fit_kwargs,
) -> FitResult:
    """:func:`fit_law`, then :func:`bootstrap_fit` (skipped when ``n_draws == 0``), plus the
    HC3 log-log OLS for the pure form."""
    fit = fit_law(form, X, y, **fit_kwargs)
    if n_draws > 0:
        bootstrap_fit(fit, groups, n_draws=n_draws, seed=seed, level=level, n_jobs=n_jobs)
    if form == "pure":
        fit.ols = ols_loglog(X[0], y, level=level)
    return fit
