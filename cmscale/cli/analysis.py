"""``cmscale fit powerlaw|joint|frontier|ratio``, ``cmscale plot`` and ``cmscale report``.

These commands parse options, call :mod:`cmscale.analysis` and print; they fit nothing themselves.
A sweep is fitted by :mod:`cmscale.analysis.pipeline` (the functions the report uses, so
``fit powerlaw --sweep``, ``fit frontier --sweep`` and ``report`` give the same numbers), a table
by :mod:`cmscale.analysis.tables`.

JSON output: ``fit powerlaw --sweep`` gives one item per fit (``method``, ``metric``, ``fit_of``:
``size <preset>`` or ``frontier``) holding the law choice as ``report.json`` does (``params``,
``ci``, ``kept_law``, ``status``, ``n_points``, ...); a table fit gives the keys of the law
(``E, A, B, alpha, beta``), ``ci``, ``status`` and ``n_points``; ``fit frontier`` gives the
``compute_optimal`` object of ``report.json``; ``fit ratio`` gives per group ``mean_ratio``,
``ci``, ``slope``, ``slope_ci``, ``slope_p`` and ``n_points``; ``report --json`` prints
``report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cmscale.cli.options import CSV_OPTION, JSON_OPTION, PARQUET_OPTION, ROOT_OPTION, clear_errors, json_option

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
def _parse_ema(ctx, param, value: str | None):  # noqa: ARG001
    from cmscale.analysis.data import EmaChoice

    try:
        return EmaChoice.parse(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


EMA_OPTION = click.option(
    "--ema", default=None, metavar="trained|best|WIDTH", callback=_parse_ema,
    help="Which EMA of each run: 'trained' (default) its own, evaluated during training; 'best' the width whose "
    "final eval has the lowest FID (its own or a post-hoc one from `cmscale eval --ema-sigma-rel`), per run and "
    "sampler step count; or a width such as 0.05 (ema_sigma_rel). The output names the EMA taken per run.",
)
METRIC_OPTION = click.option(
    "--metric", default="fid_2step", show_default=True,
    help="fid_<k>step: FID at k sampler steps (teachers: their Heun eval).",
)


def _echo_json(obj) -> None:
    from cmscale.analysis.data import json_safe

    click.echo(json.dumps(json_safe(obj), indent=2))


def _sweep_methods(root, sweep: str, metric_name: str, only_method: str | None):
    """(the parsed metric, the methods to fit), refusing an unknown metric or an empty sweep."""
    from cmscale.analysis import data as D

    try:
        metric = D.parse_metric(metric_name)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--metric") from None
    with clear_errors(ValueError):
        runs = D.sweep_runs(root, sweep)
    methods = D.sweep_methods(runs)
    if only_method and only_method not in methods:
        raise click.BadParameter(f"sweep {sweep!r} has no runs of method {only_method!r}; its methods: "
                                 f"{', '.join(methods) or 'none'}", param_hint="--method")
    return metric, [only_method] if only_method else methods


def _no_evals(sweep: str, metric, method: str | None) -> str:
    return f"sweep {sweep!r}: no finished run has {metric.name} evals" + (f" for method {method!r}" if method else "")


def _table(csv, parquet):
    from cmscale.analysis.tables import read_table

    try:
        return read_table(csv, parquet)
    except ValueError as error:
        usage = "exactly one" in str(error)
        raise (click.UsageError if usage else click.ClickException)(str(error)) from None


def _values(params: dict, ci: dict, unbounded: dict | None = None) -> str:
    """``name=value [lo, hi]`` per parameter; ``[unbounded]`` where the CI is wider than the data support."""

    def interval(name: str) -> str:
        if ci.get(name):
            return f" [{ci[name][0]:.4g}, {ci[name][1]:.4g}]"
        return " [unbounded]" if name in (unbounded or {}) else ""

    return ", ".join(f"{name}={value:.4g}{interval(name)}" for name, value in params.items())


def _fit_line(label: str, fit) -> str:
    flag = f" at bound: {', '.join(fit.at_bound)}" if fit.at_bound else ""
    return f"{label}: {_values(fit.params, fit.ci)}  status={fit.status}{flag}  n={fit.n_points}"


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
    help="y = E + A x^-alpha (saturating) or y = A x^-alpha (pure; adds HC3 log-log OLS). A sweep's fits keep "
    "the nested pure law where E is not identified, as the report does.",
)
@LOSS_OPTION
@DELTA_OPTION
@EMA_OPTION
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
@JSON_OPTION
def powerlaw_command(
    sweep, metric, method, csv, parquet, x_col, y_col, group_col, form, loss, delta, ema, n_draws, seed, root, as_json
) -> None:
    """Power law of FID in training compute: per size and on the frontier of a sweep (the report's
    fits), or on a table."""
    if sweep is None and csv is None and parquet is None:
        raise click.UsageError("give --sweep NAME, or --csv/--parquet FILE with --x-col and --y-col")
    if sweep is None:
        from cmscale.analysis.tables import table_power_law

        table, source = _table(csv, parquet)
        if not x_col or not y_col:
            raise click.UsageError("a table fit needs --x-col and --y-col")
        with clear_errors(ValueError):
            fit = table_power_law(table, source, x_col=x_col, y_col=y_col, group_col=group_col, form=form,
                                  n_draws=n_draws, seed=seed, loss=loss, delta=delta)
        if as_json:
            _echo_json(fit.to_json())
        else:
            click.echo(_fit_line(f"{y_col} vs {x_col}", fit))
        return
    from cmscale.analysis.pipeline import sweep_power_laws

    metric, methods = _sweep_methods(root, sweep, metric, method)
    with clear_errors(ValueError):
        results = sweep_power_laws(root, sweep, metric, methods, n_draws=n_draws, seed=seed, form=form, loss=loss,
                                   delta=delta, ema=ema)
    if not results:
        raise click.ClickException(_no_evals(sweep, metric, method))
    if as_json:
        _echo_json(results)
        return
    _echo_ema(ema, results)
    for item in results:
        label = f"{item['method']} {item['fit_of']}"
        if item["status"] == "not_fitted" or item.get("kept_law") is None:
            click.echo(f"{label}: not fitted ({item.get('reason')})")
            continue
        click.echo(
            f"{label}: {item['kept_law']}: {_values(item['params'], item['ci'], item.get('ci_unbounded'))}  "
            f"status={item['status']}  "
            f"n={item['n_points']}"
            + (f"  ({item['ci_note']})" if item["ci_note"] else "")
        )
        if item["degenerate"]:
            click.echo(f"  {item['reason']}")


def _echo_ema(ema, items: list[dict]) -> None:
    """With an EMA other than the default (each run's own): the rule, and per run the EMA taken."""
    if ema.is_default:
        return
    click.echo(ema.description)
    taken: dict[str, str] = {}
    for item in items:
        taken |= (item.get("ema") or {}).get("runs", {})
    for run_id, text in sorted(taken.items()):
        click.echo(f"  {run_id}: {text}")


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
    from cmscale.analysis.tables import holdout_json, table_joint

    if (d_col is None) == (c_col is None):
        raise click.UsageError("give exactly one of --d-col or --c-col")
    table, source = _table(csv, parquet)
    with clear_errors(ValueError):
        fit, held = table_joint(table, source, n_col=n_col, d_col=d_col, c_col=c_col, y_col=y_col,
                                group_col=group_col, drop_top=drop_top, n_draws=n_draws, seed=seed, loss=loss,
                                delta=delta)
    out = fit.to_json()
    if held is not None:
        out["holdout"] = holdout_json(held, y_col)
    if as_json:
        _echo_json(out)
        return
    click.echo(_fit_line(f"{y_col} = E + A N^-alpha + B D^-beta", fit))
    if fit.derived and fit.status != "converged":
        click.echo(f"N_opt ∝ C^a: {out['derived_reason']}")
    elif fit.derived:
        click.echo("N_opt ∝ C^a, D_opt ∝ C^b: " + _values(fit.derived, fit.ci))
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
@EMA_OPTION
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
@JSON_OPTION
def frontier_command(
    sweep, method, metric, csv, parquet, size_col, compute_col, y_col, run_col, ema, n_draws, seed, root, as_json
) -> None:
    """Compute-optimal size N_opt(C) by iso-FLOP profiles and by the lower envelope over runs, and
    N_opt = k C^a with a bootstrap over runs (only with >= 3 budgets whose optimum is interior)."""
    if sweep is not None:
        from cmscale.analysis.pipeline import sweep_compute_optimal

        metric, methods = _sweep_methods(root, sweep, metric, method)
        with clear_errors(ValueError):
            out = sweep_compute_optimal(root, sweep, metric, methods, n_draws=n_draws, seed=seed, ema=ema)
        if not out:
            raise click.ClickException(_no_evals(sweep, metric, method))
    else:
        from cmscale.analysis.tables import table_frontier

        table, source = _table(csv, parquet)
        if not (size_col and compute_col and y_col):
            raise click.UsageError("a table needs --size-col, --compute-col and --y-col (and optionally --run-col)")
        with clear_errors(ValueError):
            result = table_frontier(table, source, size_col=size_col, compute_col=compute_col, y_col=y_col,
                                    run_col=run_col, n_draws=n_draws, seed=seed)
        out = [{"of": source, **result.to_json()}]
    if as_json:
        _echo_json(out if sweep is not None else out[0])
        return
    if sweep is not None:
        _echo_ema(ema, out)
    for item in out:
        if "isoflop" not in item:
            click.echo(f"{item['of']}: not fitted ({item['reason']})")
            continue
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
@EMA_OPTION
@ROOT_OPTION
@JSON_OPTION
def ratio_command(
    sweep, csv, parquet, size_col, teacher_col, student_col, group_col, budget, level, ema, root, as_json
) -> None:
    """Teacher-student FID ratio per group: mean ratio, gap, and the slope of log ratio on log size."""
    if sweep is not None:
        from cmscale.analysis.report import sweep_ratio_table

        with clear_errors(ValueError):
            result = sweep_ratio_table(root, sweep, budget=budget, level=level, ema=ema)
    else:
        from cmscale.analysis.tables import table_ratio

        table, source = _table(csv, parquet)
        if not (size_col and teacher_col and student_col):
            raise click.UsageError("a table needs --size-col, --teacher-col and --student-col")
        with clear_errors(ValueError):
            result = table_ratio(table, source, size_col=size_col, teacher_col=teacher_col, student_col=student_col,
                                 group_col=group_col, level=level)
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
    help="Folder for the figures: PNG, PDF and the CSV of each figure's data.",
)
@EMA_OPTION
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
@json_option("Print each figure's files (png, pdf, csv) as JSON.")
def plot_command(sweep, out_dir, ema, n_draws, seed, root, as_json) -> None:
    """Draw a sweep's figures (FID vs compute with fits and frontier, N_opt vs C, teacher vs student,
    FID vs sampling compute) as PNG and PDF, each with a CSV of its data."""
    from cmscale.analysis.render import draw_figures
    from cmscale.analysis.report import analyse_sweep

    with clear_errors(ValueError):
        records = draw_figures(analyse_sweep(root, sweep, n_draws=n_draws, seed=seed, ema=ema), out_dir)
    if as_json:
        _echo_json({r.key: {ext: str(path) for ext, path in r.paths.items()} for r in records})
        return
    for record in records:
        click.echo(f"{record.key}: {record.paths['png']}  {record.paths['pdf']}  {record.paths['csv']}")


@click.command("report")
@click.argument("sweep")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for report.html, report.md, report.json and figures/.",
)
@click.option(
    "--ingest/--no-ingest", default=True, show_default=True, help="Ingest the run directories into the store first."
)
@EMA_OPTION
@DRAWS_OPTION
@SEED_OPTION
@ROOT_OPTION
@json_option("Print report.json (every number of the findings) instead of the paths.")
def report_command(sweep, out_dir, ingest, ema, n_draws, seed, root, as_json) -> None:
    """Write a self-contained report.html, a report.md and report.json for SWEEP: figures, fit tables
    with CIs, the teacher-student ratio table, warnings and the SQL behind each figure (--json: print
    report.json)."""
    from cmscale.analysis.render import write_report

    if ingest:
        from cmscale.results import StoreError
        from cmscale.results import ingest as ingest_root

        with clear_errors(StoreError):
            ingest_root(Path(root))
    with clear_errors(ValueError):
        paths = write_report(root, sweep, out_dir, n_draws=n_draws, seed=seed, ema=ema)
    if as_json:
        click.echo(paths["json"].read_text())
        return
    click.echo(f"report: {paths['html']}\n        {paths['md']}\n        {paths['json']}")
