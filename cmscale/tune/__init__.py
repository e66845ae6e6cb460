"""cmscale.tune: Optuna searches whose trials are ordinary cmscale runs.

- :mod:`cmscale.tune.spec`: the search spec (base run, space, objective, sampler, pruner).
- :mod:`cmscale.tune.storage`: a study on disk: its folder, ``tune.json`` and Optuna's journal.
- :mod:`cmscale.tune.study`: sampler, pruner, the study, claims and zombies, summaries.
- :mod:`cmscale.tune.worker`: running trials, the worker loop and launching workers.

The commands live in :mod:`cmscale.cli.tune`.
"""
