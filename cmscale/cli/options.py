"""What the command groups share: the ``--root`` and ``--json`` options, the consoles, and turning a
bad-input error into a one-line message instead of a traceback."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cmscale.config import DEFAULT_RESULTS_ROOT, RESULTS_ENV, ConfigError, default_results_root, parse_override

console = Console()
err_console = Console(stderr=True)

ROOT_OPTION = click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=lambda: str(default_results_root()),
    show_default=f"{DEFAULT_RESULTS_ROOT} (or ${RESULTS_ENV})",
    help="Results root.",
)


def json_option(help: str | None = "Print JSON."):
    """``--json`` (as ``as_json``); each command says what it prints."""
    return click.option("--json", "as_json", is_flag=True, help=help)


JSON_OPTION = json_option()

# A table to analyse instead of a sweep in the store (the fit commands).
CSV_OPTION = click.option(
    "--csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="A CSV table to analyse instead of a sweep.",
)
PARQUET_OPTION = click.option(
    "--parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="A Parquet table to analyse instead of a sweep.",
)


def set_option(example: str):
    """``--set KEY=VALUE`` (repeatable, as ``overrides``): the same dotted syntax as ``cmscale train``."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"Override a field of the spec, e.g. {example} (dotted keys, TOML values; repeatable).")


def parse_overrides(texts: tuple[str, ...]) -> dict:
    """``--set KEY=VALUE`` options as {dotted key: value}; a malformed one is a usage error naming --set."""
    overrides = {}
    for text in texts:
        try:
            key, value = parse_override(text)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--set") from None
        overrides[key] = value
    return overrides


def spec_error(error: ConfigError, overrides: dict, keys_hint: str) -> click.ClickException:
    """A spec that failed validation; with overrides, the message says how --set keys are written."""
    message = str(error)
    if overrides:
        message += (f"\n  --set: check the key and the value's type: {keys_hint}; remove or correct the --set option "
                    "named above")
    return click.ClickException(message)


def print_table(table: Table) -> None:
    """Print every value whole: a terminal gets the table with long cells folded onto more lines
    (never cut with an ellipsis); a pipe or a file gets the same cells as CSV (the title, if any,
    goes to stderr), which is also what scripts want to read."""
    if console.is_terminal:
        for column in table.columns:
            column.overflow = "fold"
        console.print(table)
        return
    if table.title:
        err_console.print(table.title, highlight=False, soft_wrap=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(str(column.header) for column in table.columns)
    cells = [[getattr(cell, "plain", cell) for cell in column.cells] for column in table.columns]
    writer.writerows(zip(*cells))
    click.echo(buffer.getvalue(), nl=False)


@contextmanager
def clear_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Re-raise ``errors`` (bad input: a config, a missing file) as click errors: message, no traceback."""
    try:
        yield
    except errors as error:
        raise click.ClickException(str(error)) from None
