"""The ``cmscale`` command: the top-level group, with one module per command group attached."""

from __future__ import annotations

import sys

import click

from cmscale.cli.analysis import fit_group, plot_command, report_command
from cmscale.cli.data import data_group
from cmscale.cli.demo import demo_command
from cmscale.cli.ema import ema_group
from cmscale.cli.eval import eval_command
from cmscale.cli.models import models_group
from cmscale.cli.results import results_group
from cmscale.cli.sweep import sweep_group
from cmscale.cli.teacher import teacher_group
from cmscale.cli.train import train_command
from cmscale.cli.tune import tune_group

# Packages of the `train` extra: the light base install (store, fits, reports) has none of them.
TRAIN_EXTRA_MODULES = frozenset({"torch", "torchvision", "torch_fidelity", "sklearn"})


class CmscaleGroup(click.Group):
    """Turns a missing `train` extra into one line that says how to install it."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as error:
            if (error.name or "").partition(".")[0] not in TRAIN_EXTRA_MODULES:
                raise
            raise click.ClickException(
                f"this command needs {error.name}, which the light install leaves out; install the train extra: "
                "pip install 'cmscale[train]' (or -e '.[train]' in a checkout; beside a site torch it keeps that torch)"
            ) from None


@click.group(cls=CmscaleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cmscale")
def main() -> None:
    """cmscale: scaling-law studies of consistency models (ECT, sCT, sCD)."""


# In the order `cmscale --help` has always listed them (click sorts the names anyway).
for command in (models_group, data_group, demo_command, sweep_group, results_group, fit_group, plot_command,
                report_command, tune_group, train_command, eval_command, teacher_group, ema_group):
    main.add_command(command)

if __name__ == "__main__":
    sys.exit(main())
