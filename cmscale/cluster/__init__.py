"""Where jobs run: cluster profiles, submitit executors, SLURM queries and the run launchers.

- :mod:`cmscale.cluster.profiles`: ``slurm/profiles/<name>.toml`` -> submitit parameters.
- :mod:`cmscale.cluster.executors`: :func:`make_executor`, the one builder of submitit executors
  (sweeps and searches alike), for the kinds ``slurm``, ``local`` and ``debug``.
- :mod:`cmscale.cluster.slurm`: what the scheduler says (job states, array limits, this job's id).
- :mod:`cmscale.cluster.launchers`: one :class:`Launcher` interface, implemented for SLURM job
  arrays with dependencies and for local processes, that submits planned runs and records job.json.

Nothing here knows sweeps or searches: launchers take any runs with an id, a stage, dependencies,
an iteration count and a config.
"""
