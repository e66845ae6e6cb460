"""``cmscale results``: ingest run directories into DuckDB, query them with SQL, export Parquet."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
from rich.table import Table

from cmscale.cli.options import ROOT_OPTION, err_console, json_option, print_table

FORMATS = ("table", "csv", "json", "parquet")


def _quiet_store_logger() -> None:
    # The commands print the report themselves; the logger would say everything twice.
    logging.getLogger("cmscale.results").setLevel(logging.ERROR)


def _run_ingest(root: Path, quiet: bool = False):
    from cmscale.results import StoreError, ingest

    _quiet_store_logger()
    if quiet and Path(root).is_dir() and not os.access(root, os.W_OK):
        err_console.print(
            f"[yellow]warning[/yellow]: {root} is not writable; using the database as it is", highlight=False
        )
        return None
    try:
        report = ingest(root)
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    for warning in report.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False, soft_wrap=True)
    for problem in report.errors:
        err_console.print(f"[red]error[/red]: {problem.path}: {problem.message}", highlight=False, soft_wrap=True)
    if not quiet:
        err_console.print(
            f"ingested {report.train_rows:,} train rows, {report.eval_rows:,} eval rows, {report.runs} runs, "
            f"{report.sweeps} sweeps, {report.trials} trials from {report.metrics_files_read} metrics files "
            f"({report.bytes_parsed:,} new bytes) in {report.seconds:.2f} s",
            highlight=False,
        )
    return report


@click.group("results")
def results_group() -> None:
    """Results store: run directories -> <root>/cmscale.duckdb (DuckDB), queried with SQL."""


@results_group.command("ingest")
@ROOT_OPTION
@json_option("Print the ingest report as JSON on stdout.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when a file was malformed.")
def ingest_command(root: Path, as_json: bool, strict: bool) -> None:
    """Copy new rows from every <root>/<sweep>/<run_id>/ into <root>/cmscale.duckdb.

    Incremental and idempotent: only bytes appended since the last ingest are parsed; files that
    were rewritten (a resumed run) are re-read whole and their run's rows replaced. Safe to run
    while jobs write and while other ingests or queries run (they wait for each other).
    """
    report = _run_ingest(root, quiet=as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    if strict and report.errors:
        sys.exit(1)


def _print_table(frame, max_rows: int) -> None:
    """Whole values (floats as their shortest exact repr), folded in a terminal, CSV into a pipe."""
    table = Table(show_lines=False)
    for name, dtype in frame.schema.items():
        table.add_column(name, justify="right" if dtype.is_numeric() else "left")
    for row in frame.head(max_rows).iter_rows():
        table.add_row(*("" if value is None else str(value) for value in row))
    print_table(table)
    if frame.height > max_rows:
        err_console.print(f"{max_rows} of {frame.height:,} rows shown; use --max-rows or --format csv",
                          highlight=False)


@results_group.command("query")
@click.argument("sql")
@ROOT_OPTION
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write to this file (needed for parquet).",
)
@click.option("--no-ingest", is_flag=True, help="Query the database as it is, without ingesting new rows first.")
@click.option(
    "--max-rows", type=click.IntRange(min=1), default=100, show_default=True, help="Rows shown by --format table."
)
@click.option(
    "--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
    help="Seconds the query may run before it is interrupted.",
)
def query_command(
    sql: str, root: Path, fmt: str, out: Path | None, no_ingest: bool, max_rows: int, timeout_s: float
) -> None:
    """Run SQL on a read-only, sandboxed connection (after an incremental ingest).

    Tables: sweeps, runs, train, evals, trials; views: latest_eval, run_summary.
    Statements that write (INSERT, UPDATE, DELETE, DROP, CREATE, ...) or reach files, extensions or
    settings (COPY, EXPORT, read_csv, INSTALL, LOAD, SET) are refused; save results with --out.

    Example: cmscale results query "SELECT method, preset, fid_1step FROM run_summary ORDER BY fid_1step"
    """
    import duckdb

    from cmscale.results import StoreError, read_query, refuse_writes

    if fmt == "parquet" and out is None:
        raise click.UsageError("--format parquet writes a file: give --out FILE.parquet")
    try:
        refuse_writes(sql)
        if not no_ingest:
            _run_ingest(root, quiet=True)
        frame = read_query(sql, root=root, query_timeout_s=timeout_s)
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    except duckdb.Error as error:
        raise click.ClickException(f"query failed: {error}") from None
    except KeyboardInterrupt:
        raise click.ClickException("stopped by Ctrl-C; nothing was changed") from None
    if fmt == "table":
        if out is not None:
            raise click.UsageError("--format table prints to the terminal; use csv, json or parquet with --out")
        _print_table(frame, max_rows)
    elif fmt == "parquet":
        frame.write_parquet(out)
        err_console.print(f"wrote {frame.height:,} rows to {out}", highlight=False)
    elif fmt == "csv":
        text = frame_as_csv(frame)
        _emit(text, out, frame.height)
    else:
        text = json.dumps(frame.to_dicts(), default=str, indent=1)
        _emit(text + "\n", out, frame.height)


def frame_as_csv(frame) -> str:
    """CSV of ``frame``; list and struct columns (CSV has no nesting) are written as JSON text."""
    import polars as pl

    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    if nested:
        frame = frame.with_columns(
            pl.Series(name, [None if v is None else json.dumps(v, default=_json_scalar) for v in frame[name].to_list()],
                      dtype=pl.String)
            for name in nested
        )
    return frame.write_csv()


def _json_scalar(value):
    """JSON for what json cannot encode: DuckDB decimals as numbers, dates and the rest as text."""
    from decimal import Decimal

    return float(value) if isinstance(value, Decimal) else str(value)


def _emit(text: str, out: Path | None, rows: int) -> None:
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        err_console.print(f"wrote {rows:,} rows to {out}", highlight=False)


@results_group.command("export")
@click.argument("name")
@ROOT_OPTION
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Output file (.parquet; .csv and .json also work).",
)
@click.option("--no-ingest", is_flag=True, help="Export the database as it is, without ingesting new rows first.")
def export_command(name: str, root: Path, out: Path, no_ingest: bool) -> None:
    """Export a table or view (runs, train, evals, sweeps, trials, latest_eval, run_summary) to a file."""
    import duckdb

    from cmscale.results import StoreError, connect

    fmt = {".parquet": "parquet", ".csv": "csv", ".json": "json"}.get(out.suffix.lower())
    if fmt is None:
        raise click.UsageError(f"--out {out}: use a .parquet, .csv or .json file name")
    try:
        if not no_ingest:
            _run_ingest(root, quiet=True)
        with connect(root, read_only=True) as con:
            names = {
                row[0]
                for row in con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
                ).fetchall()
            }
            if name not in names:
                raise click.BadParameter(
                    f"no table or view {name!r}; choose one of {', '.join(sorted(names))}", param_hint="NAME"
                )
            out.parent.mkdir(parents=True, exist_ok=True)
            options = {
                "parquet": "FORMAT parquet",
                "csv": "FORMAT csv, HEADER true",
                "json": "FORMAT json, ARRAY true",
            }[fmt]
            con.execute(f"COPY (SELECT * FROM \"{name}\") TO '{_sql_string(str(out))}' ({options})")
            rows = con.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    except duckdb.Error as error:
        raise click.ClickException(f"export failed: {error}") from None
    err_console.print(f"wrote {rows:,} rows of {name} to {out}", highlight=False)


def _sql_string(text: str) -> str:
    return text.replace("'", "''")
