"""cmscale.analysis: scaling-law fits with honest uncertainty, and the sweep report.

- ``fit``: variable-projection fits of pure, saturating and joint (Chinchilla) laws; clustered bootstrap; HC3 OLS.
- ``selection``: nested-law choice (AIC among laws with every parameter inside its bounds), honest CIs.
- ``frontier``: runs on a compute grid, the lower envelope over runs and its law, iso-FLOP optima (edge flags).
- ``optimal``: ``N_opt = k C^a`` by iso-FLOP profiles and by the envelope, bootstrap over runs.
- ``extrapolation``: refit without the largest budget(s) or size and score the held-out predictions.
- ``ratio``: teacher-student FID ratio per method and step count (slope on log size, mean ratio, gap).
- ``data``: metric names and the SQL that reads a sweep from the DuckDB store.
- ``pipeline``: the one analysis of a method's evals (per-size laws, frontier, compute-optimal size, joint
  law) behind every command; ``tables``: the same fits on any table.
- ``report``: the sweep's findings (``report.json``); ``render``: its figures (with their data as CSV) and
  the HTML/Markdown pages from ``templates/``; ``plots``: seaborn plots that take ``ax=``.
- ``synthetic``: data from known laws for tests, coverage studies and benchmarks.

The commands ``cmscale fit powerlaw|joint|frontier|ratio``, ``cmscale plot`` and ``cmscale report``
live in :mod:`cmscale.cli.analysis`; they only parse options, call these and print.
"""
