"""``cmscale fit powerlaw|joint|ratio``, ``cmscale plot`` and ``cmscale report`` (the analysis itself
lives in :mod:`cmscale.analysis`).

JSON output of a fit uses the keys ``E, A, B, alpha, beta`` (those of the law), ``ci`` (the same
keys -> [lo, hi]), ``status`` and ``n_points``; ``fit ratio`` gives per group ``mean_ratio``,
``ci``, ``slope``, ``slope_ci``, ``slope_p`` and ``n_points``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pandas as pd

from cmscale.cli.options import CSV_OPTION, JSON_OPTION, PARQUET_OPTION, ROOT_OPTION
from cmscale.rundir import DB_FILE

LOSS_OPTION = click.option(
    "--loss",
    type=click.Choice(["log", "linear", "huber"]),
    default="log",
    show_default=True,
    help="Error model: squares of log residuals, of residuals, or Huber on log residuals.",
)
DELTA_OPTION = click.option(
    "--delta",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="Huber delta (with --loss huber).",
)
DRAWS_OPTION = click.option(
    "--n-draws", type=click.IntRange(min=0), default=1000, show_default=True, help="Bootstrap draws (0: no CIs)."
)
SEED_OPTION = click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
METRIC_OPTION = click.option(
    "--metric", default="fid_2step", show_default=True,
    help="fid_<k>step: FID at k sampler steps (teachers: their Heun eval).",
)


def _sweep_runs(root, sweep: str, metric_name: str):
    """(the parsed metric, the sweep's runs table), refusing an unknown metric or an empty sweep."""
    from cmscale.analysis import data as D

    try:
        metric = D.parse_metric(metric_name)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--metric") from None
    runs = _query(D.runs_sql(sweep), root)
    if runs.empty:
        raise click.ClickException(f"sweep {sweep!r} has no runs in {Path(root) / DB_FILE}")
    return metric, runs


def _echo_json(obj) -> None:
    from cmscale.analysis.data import json_safe

    click.echo(json.dumps(json_safe(obj), indent=2))


def _read_table(csv: Path | None, parquet: Path | None) -> tuple[pd.DataFrame, str]:
    if (csv is None) == (parquet is None):
        raise click.UsageError("give exactly one of --csv FILE or --parquet FILE")
    path = csv or parquet
    try:
        table = pd.read_csv(path) if csv else pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"{path}: cannot read the table ({error})") from None
    return table, str(path)


def _columns(table: pd.DataFrame, source: str, **columns: str | None) -> None:
    for option, column in columns.items():
        if column is not None and column not in table:
            raise click.ClickException(
                f"{source}: no column {column!r} (from --{option.replace('_', '-')}); columns are {list(table.columns)}"
            )


def _positive(table: pd.DataFrame, source: str, *columns: str) -> None:
    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise click.ClickException(
                f"{source}: column {column!r} must hold numbers > 0; row {row} has {table[column].iloc[row]!r}"
            )


def _fit_line(label: str, fit) -> str:
    values = ", ".join(
        f"{name}={value:.4g}" + (f" [{fit.ci[name][0]:.4g}, {fit.ci[name][1]:.4g}]" if name in fit.ci else "")
        for name, value in fit.params.items()
    )
    flag = f" at bound: {', '.join(fit.at_bound)}" if fit.at_bound else ""
    return f"{label}: {values}  status={fit.status}{flag}  n={fit.n_points}"


@click.group("fit")
def fit_group() -> None:
    """Fit scaling laws to a sweep or to any table."""


@fit_group.command("powerlaw")
@click.option("--sweep", default=None, help="Sweep name in the store.")
@METRIC_OPTION
@click.option("--method", default=None, help="Only this method (default: all).")
@CSV_OPTION
@PARQUET_OPTION
@click.option("--x-col", default=None, help="Table column with x (e.g. compute).")
@click.option("--y-col", default=None, help="Table column with y (e.g. FID).")
@click.option("--group-col", default=None, help="Table column naming the bootstrap unit (run); default: each row.")
@click.option(
    "--form",
    type=click.Choice(["saturating", "pure"]),
    default="saturating",
    show_default=True,
    help="y = E + A x^-alpha (saturating) or y = A x^-alpha (pure; adds HC3 log-log OLS).",
)
@LOSS_OPTION
@DELTA_OPTION
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
@JSON_OPTION
def powerlaw_command(
    sweep, metric, method, csv, parquet, x_col, y_col, group_col, form, loss, delta, n_draws, seed, root, as_json
) -> None:
    """Power law of FID in training compute: per size and on the frontier of a sweep, or on a table."""
    from cmscale.analysis.fit import fit_with_bootstrap

    if sweep is None and csv is None and parquet is None:
        raise click.UsageError("give --sweep NAME, or --csv/--parquet FILE with --x-col and --y-col")
    if sweep is None:
        table, source = _read_table(csv, parquet)
        if not x_col or not y_col:
            raise click.UsageError("a table fit needs --x-col and --y-col")
        _columns(table, source, x_col=x_col, y_col=y_col, group_col=group_col)
        _positive(table, source, x_col, y_col)
        try:
            fit = fit_with_bootstrap(
                form,
                [table[x_col].to_numpy(float)],
                table[y_col].to_numpy(float),
                table[group_col].to_numpy() if group_col else None,
                n_draws=n_draws,
                seed=seed,
                loss=loss,
                delta=delta,
            )
        except ValueError as error:
            raise click.ClickException(f"{source}: {error}") from None
        if as_json:
            _echo_json(fit.to_json())
        else:
            click.echo(_fit_line(f"{y_col} vs {x_col}", fit))
        return
    results = _sweep_powerlaws(root, sweep, metric, method, form, loss, delta, n_draws, seed)
    if as_json:
        _echo_json(results)
        return
    for item in results:
        click.echo(
            f"{item['method']} {item['fit_of']}: "
            + ", ".join(
                f"{k}={item[k]:.4g}" + (f" [{item['ci'][k][0]:.4g}, {item['ci'][k][1]:.4g}]" if k in item["ci"] else "")
                for k in ("E", "A", "alpha")
                if k in item
            )
            + f"  status={item['status']}  n={item['n_points']}"
        )


def _sweep_powerlaws(root, sweep, metric_name, only_method, form, loss, delta, n_draws, seed) -> list[dict]:
    from cmscale.analysis import data as D
    from cmscale.analysis.fit import fit_with_bootstrap
    from cmscale.analysis.frontier import envelope

    metric, runs = _sweep_runs(root, sweep, metric_name)
    methods = [only_method] if only_method else D.sweep_methods(runs)
    out = []
    for method in methods:
        points, _ = D.pick_extractor(_query(D.points_sql(sweep, method, metric), root))
        if points.empty:
            continue
        jobs = [
            (
                f"size {preset}",
                sub["train_flops"].to_numpy(float),
                sub["fid"].to_numpy(float),
                sub["run_id"].to_numpy(),
                float(sub["params"].iloc[0]),
            )
            for preset, sub in points.groupby("preset", sort=False)
        ]
        env = envelope(D.frontier_points(points))
        jobs.append(("frontier", env["compute"].to_numpy(), env["y"].to_numpy(), None, None))
        for label, x, y, groups, params in jobs:
            item = {"method": method, "metric": metric.name, "fit_of": label, "params": params}
            try:
                fit = fit_with_bootstrap(form, [x], y, groups, n_draws=n_draws, seed=seed, loss=loss, delta=delta)
            except ValueError as error:
                item.update(status="not_fitted", reason=str(error), n_points=int(len(y)), ci={})
            else:
                item.update(fit.to_json())
            out.append(item)
    return out


def _query(sql: str, root: Path) -> pd.DataFrame:
    from cmscale.analysis.data import run_query

    db = Path(root) / DB_FILE
    if not db.exists():
        raise click.ClickException(f"{db}: no results store; run `cmscale results ingest --root {root}` first")
    return run_query(sql, root)


@fit_group.command("joint")
@CSV_OPTION
@PARQUET_OPTION
@click.option("--n-col", required=True, help="Column with N (parameters).")
@click.option("--d-col", default=None, help="Column with D (training images or tokens).")
@click.option("--c-col", default=None, help="Column with compute C instead of D; then D = C / (6 N).")
@click.option("--y-col", required=True, help="Column with the loss or FID.")
@click.option("--group-col", default=None, help="Column naming the bootstrap unit (run); default: each row.")
@click.option(
    "--drop-top",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Hold out the K largest compute values (C, or 6ND), fit the rest and report the held-out error.",
)
@LOSS_OPTION
@DELTA_OPTION
@DRAWS_OPTION
@SEED_OPTION
@JSON_OPTION
def joint_command(
    csv, parquet, n_col, d_col, c_col, y_col, group_col, drop_top, loss, delta, n_draws, seed, as_json
) -> None:
    """Fit y = E + A N^-alpha + B D^-beta (Chinchilla form) to any table."""
    from cmscale.analysis.extrapolation import holdout_validation
    from cmscale.analysis.fit import fit_with_bootstrap

    if (d_col is None) == (c_col is None):
        raise click.UsageError("give exactly one of --d-col or --c-col")
    table, source = _read_table(csv, parquet)
    _columns(table, source, n_col=n_col, d_col=d_col, c_col=c_col, y_col=y_col, group_col=group_col)
    _positive(table, source, *[c for c in (n_col, d_col, c_col, y_col) if c])
    table = table.copy()
    table["_N"] = table[n_col].astype(float)
    if c_col:
        table["_C"] = table[c_col].astype(float)
        table["_D"] = table["_C"] / (6.0 * table["_N"])
    else:
        table["_D"] = table[d_col].astype(float)
        table["_C"] = 6.0 * table["_N"] * table["_D"]
    kwargs = {"loss": loss, "delta": delta}
    try:
        if drop_top:
            held = holdout_validation(
                table,
                form="joint",
                x_cols=["_N", "_D"],
                y_col=y_col,
                by="_C",
                k=drop_top,
                group_col=group_col,
                n_draws=n_draws,
                seed=seed,
                **kwargs,
            )
            fit = held.fit
        else:
            held = None
            fit = fit_with_bootstrap(
                "joint",
                [table["_N"].to_numpy(float), table["_D"].to_numpy(float)],
                table[y_col].to_numpy(float),
                table[group_col].to_numpy() if group_col else None,
                n_draws=n_draws,
                seed=seed,
                **kwargs,
            )
    except ValueError as error:
        raise click.ClickException(f"{source}: {error}") from None
    out = fit.to_json()
    if held is not None:
        summary = held.to_json()
        summary.pop("fit")
        summary["points"] = [
            {
                "N": p["_N"],
                "D": p["_D"],
                "C": p["_C"],
                "y": p[y_col],
                "pred": p["pred"],
                "log_error": p["log_error"],
                "ci": [p["ci_lo"], p["ci_hi"]],
                "inside_ci": p["inside_ci"],
                "pi": [p["pi_lo"], p["pi_hi"]],
                "inside_pi": p["inside_pi"],
            }
            for p in summary["points"]
        ]
        out["holdout"] = summary
    if as_json:
        _echo_json(out)
        return
    click.echo(_fit_line(f"{y_col} = E + A N^-alpha + B D^-beta", fit))
    if fit.derived and fit.status != "converged":
        click.echo(f"N_opt ∝ C^a: {out['derived_reason']}")
    elif fit.derived:
        click.echo(
            "N_opt ∝ C^a, D_opt ∝ C^b: "
            + ", ".join(
                f"{k}={v:.4g}" + (f" [{fit.ci[k][0]:.4g}, {fit.ci[k][1]:.4g}]" if k in fit.ci else "")
                for k, v in fit.derived.items()
            )
        )
    if held is not None:
        click.echo(
            f"held out {len(held.points)} rows (top {drop_top} compute values): mean |log error| "
            f"{held.mean_abs_log_error:.4f}, "
            f"inside CI {int(held.points['inside_ci'].sum())}/{len(held.points)}, inside PI "
            f"{int(held.points['inside_pi'].sum())}/{len(held.points)}"
        )


@fit_group.command("frontier")
@click.option("--sweep", default=None, help="Sweep name in the store.")
@click.option("--method", default=None, help="Only this method (default: all).")
@METRIC_OPTION
@CSV_OPTION
@PARQUET_OPTION
@click.option("--size-col", default=None, help="Table column with the model size N (parameters).")
@click.option("--compute-col", default=None, help="Table column with the training compute C at the eval.")
@click.option("--y-col", default=None, help="Table column with the loss or FID.")
@click.option(
    "--run-col",
    default=None,
    help="Table column naming the run (trajectory and bootstrap unit); default: each row is a run.",
)
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
@JSON_OPTION
def frontier_command(
    sweep, method, metric, csv, parquet, size_col, compute_col, y_col, run_col, n_draws, seed, root, as_json
) -> None:
    """Compute-optimal size N_opt(C) by iso-FLOP profiles and by the lower envelope over runs, and
    N_opt = k C^a with a bootstrap over runs (only with >= 3 budgets whose optimum is interior)."""
    from cmscale.analysis.frontier import compute_optimal

    if sweep is not None:
        jobs = _sweep_frontier_points(root, sweep, method, metric)
    else:
        table, source = _read_table(csv, parquet)
        if not (size_col and compute_col and y_col):
            raise click.UsageError("a table needs --size-col, --compute-col and --y-col (and optionally --run-col)")
        _columns(table, source, size_col=size_col, compute_col=compute_col, y_col=y_col, run_col=run_col)
        _positive(table, source, size_col, compute_col, y_col)
        points = pd.DataFrame(
            {
                "run": table[run_col].astype(str) if run_col else np.arange(len(table)).astype(str),
                "params": table[size_col].astype(float),
                "compute": table[compute_col].astype(float),
                "y": table[y_col].astype(float),
            }
        )
        jobs = [(source, None, points)]
    out = []
    for label, budgets, points in jobs:
        try:
            result = compute_optimal(points, budgets, n_draws=n_draws, seed=seed)
        except ValueError as error:
            raise click.ClickException(f"{label}: {error}") from None
        out.append({"of": label, **result.to_json()})
    if as_json:
        _echo_json(out if sweep is not None else out[0])
        return
    for item in out:
        click.echo(f"{item['of']}: {item['n_runs']} runs, {item['n_sizes']} sizes")
        for row in item["isoflop"]["optima"]:
            flag = "interior" if row["interior"] else f"edge ({row['reason']})"
            click.echo(
                f"  C={row['compute']:.4g}: N_opt={row['n_opt']:.4g} "
                f"(best grid size {row['n_best']:.4g}, y={row['y_best']:.4g}) {flag}"
            )
        for key in ("isoflop", "envelope"):
            fit = item[key]["n_opt_fit"]
            if fit["a"] is None:
                click.echo(f"  N_opt ∝ C^a ({fit['approach']}): {fit['reason']}")
                continue
            ci = (
                f" [{fit['ci']['a'][0]:.4g}, {fit['ci']['a'][1]:.4g}]" if fit["ci"] else f" (no CI: {fit['ci_reason']})"
            )
            click.echo(
                f"  N_opt ∝ C^a ({fit['approach']}): a = {fit['a']:.4g}{ci} from {fit['n_budgets']} interior points, "
                f"bootstrap over {fit['bootstrap']['n_groups']} runs"
            )


def _sweep_frontier_points(root, sweep, only_method, metric_name) -> list[tuple[str, np.ndarray, pd.DataFrame]]:
    from cmscale.analysis import data as D

    metric, runs = _sweep_runs(root, sweep, metric_name)
    jobs = []
    for method in [only_method] if only_method else D.sweep_methods(runs):
        rows, _ = D.pick_extractor(_query(D.points_sql(sweep, method, metric), root))
        if rows.empty:
            continue
        budgets = np.sort(rows["budget_flops"].dropna().unique().astype(float))
        jobs.append((f"{method} {metric.name}", budgets, D.frontier_points(rows)))
    if not jobs:
        raise click.ClickException(
            f"sweep {sweep!r}: no finished run has {metric.name} evals"
            + (f" for method {only_method!r}" if only_method else "")
        )
    return jobs


@fit_group.command("ratio")
@click.option(
    "--sweep", default=None, help="Sweep name in the store (students paired with teachers by preset and seed)."
)
@CSV_OPTION
@PARQUET_OPTION
@click.option("--size-col", default=None, help="Table column with the model size (parameters).")
@click.option("--teacher-col", default=None, help="Table column with the teacher FID.")
@click.option("--student-col", default=None, help="Table column with the student FID.")
@click.option(
    "--group-col", default=None, help="Table column naming the group (e.g. method and steps); default: one group."
)
@click.option(
    "--budget",
    type=click.Choice(["max", "all"]),
    default="max",
    show_default=True,
    help="Sweep: each student's largest budget only, or every budget (one group per budget).",
)
@click.option("--level", type=click.FloatRange(0.5, 0.999), default=0.95, show_default=True, help="Confidence level.")
@ROOT_OPTION
@JSON_OPTION
def ratio_command(
    sweep, csv, parquet, size_col, teacher_col, student_col, group_col, budget, level, root, as_json
) -> None:
    """Teacher-student FID ratio per group: mean ratio, gap, and the slope of log ratio on log size."""
    from cmscale.analysis.ratio import ratio_table, sweep_pairs

    if sweep is not None:
        from cmscale.analysis import data as D

        pairs = sweep_pairs(D.pick_extractor(_query(D.ratio_pairs_sql(sweep), root))[0], budget=budget)
        if pairs.empty:
            raise click.ClickException(
                f"sweep {sweep!r}: no finished student run has a finished teacher of the same preset and seed"
            )
    else:
        table, source = _read_table(csv, parquet)
        if not (size_col and teacher_col and student_col):
            raise click.UsageError("a table needs --size-col, --teacher-col and --student-col")
        _columns(
            table, source, size_col=size_col, teacher_col=teacher_col, student_col=student_col, group_col=group_col
        )
        _positive(table, source, size_col, teacher_col, student_col)
        pairs = pd.DataFrame(
            {
                "group": table[group_col].astype(str) if group_col else "all",
                "params": table[size_col].astype(float),
                "teacher_fid": table[teacher_col].astype(float),
                "student_fid": table[student_col].astype(float),
            }
        )
    result = ratio_table(pairs, level=level)
    if as_json:
        _echo_json(result)
        return
    for group, r in result.items():
        click.echo(
            f"{group}: mean ratio {r['mean_ratio']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}], gap {r['gap']:.4g}, "
            f"slope {r['slope']:.4f} [{r['slope_ci'][0]:.4f}, {r['slope_ci'][1]:.4f}] p={r['slope_p']:.3g}, "
            f"n={r['n_points']}"
        )


@click.command("plot")
@click.option("--sweep", required=True, help="Sweep name in the store.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the PNG and PDF figures.",
)
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
def plot_command(sweep, out_dir, n_draws, seed, root) -> None:
    """Draw a sweep's figures (FID vs compute with fits and frontier, N_opt vs C, teacher vs student,
    FID vs sampling compute) as PNG and PDF."""
    from cmscale.analysis.report import analyse_sweep

    _query("SELECT 1", root)  # a clear error when the store is missing
    try:
        analysis = analyse_sweep(root, sweep, out_dir, n_draws=n_draws, seed=seed)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    for record in analysis.figures:
        click.echo(f"{record.key}: {record.paths['png']}  {record.paths['pdf']}")


@click.command("report")
@click.argument("sweep")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for report.html, report.md and figures/.",
)
@click.option(
    "--ingest/--no-ingest", default=True, show_default=True, help="Ingest the run directories into the store first."
)
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
def report_command(sweep, out_dir, ingest, n_draws, seed, root) -> None:
    """Write a self-contained report.html and a report.md for SWEEP: figures, fit tables with CIs,
    the teacher-student ratio table, warnings and the SQL behind each figure."""
    from cmscale.analysis.render import write_report

    if ingest:
        from cmscale.results import StoreError
        from cmscale.results import ingest as ingest_root

        try:
            ingest_root(Path(root))
        except StoreError as error:
            raise click.ClickException(str(error)) from None
    _query("SELECT 1", root)
    try:
        paths = write_report(root, sweep, out_dir, n_draws=n_draws, seed=seed)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"report: {paths['html']}\n        {paths['md']}")
