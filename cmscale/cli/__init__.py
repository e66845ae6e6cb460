"""The ``cmscale`` command: :mod:`cmscale.cli.main` wires one module per command group.

- ``main``: the top-level group; ``models``: presets; ``data``: datasets; ``demo``: the demo study;
- ``train``, ``eval``: one run; ``sweep``: sweeps; ``tune``: Optuna searches;
- ``results``: the DuckDB store; ``analysis``: ``fit``, ``plot``, ``report``;
- ``options``: ``--root``, ``--json`` and the consoles they share.

No module outside this package imports click: the library below it raises typed errors
(ConfigError, StoreError, ...), which the commands turn into messages.
"""

from cmscale.cli.main import main

__all__ = ["main"]
