"""``python -m cmscale.results``: the ``cmscale results`` commands without loading the other areas' CLIs."""

from cmscale.cli.results import results_group

if __name__ == "__main__":
    results_group(prog_name="cmscale results")
