"""What the command groups share: the ``--root`` and ``--json`` options, the consoles, and turning a
bad-input error into a one-line message instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console

from cmscale.config import DEFAULT_RESULTS_ROOT, RESULTS_ENV, default_results_root

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


@contextmanager
def clear_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Re-raise ``errors`` (bad input: a config, a missing file) as click errors: message, no traceback."""
    try:
        yield
    except errors as error:
        raise click.ClickException(str(error)) from None
