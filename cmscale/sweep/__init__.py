"""cmscale.sweep: methods x presets x compute budgets x seeds, from a spec to launched runs.

- :mod:`cmscale.sweep.spec`: the sweep spec, validated once from TOML.
- :mod:`cmscale.sweep.plan`: spec -> planned runs (deterministic run ids, iteration counts,
  teacher dependencies) and the plan on disk (``sweep.json``).
- :mod:`cmscale.sweep.launch`: submit (idempotent), relaunch, cancel and follow a sweep; where the
  runs go is :mod:`cmscale.cluster`'s business.
- :mod:`cmscale.sweep.status`: each run's state from its folder, checked against the scheduler.

The commands live in :mod:`cmscale.cli.sweep`.
"""
