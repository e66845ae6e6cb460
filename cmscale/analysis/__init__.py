"""cmscale.analysis: scaling-law fits with honest uncertainty, and the sweep report.

- ``fit``: variable-projection fits of pure, saturating and joint (Chinchilla) laws; clustered bootstrap; HC3 OLS.
- ``frontier``: lower envelope over sizes, optimal size per budget (edge flags), ``N_opt = k C^a``.
- ``extrapolation``: refit without the largest budget(s) or size and score the held-out predictions.
- ``ratio``: teacher-student FID ratio per method and step count (slope on log size, mean ratio, gap).
- ``data``: metric names and the SQL that reads a sweep from the DuckDB store.
- ``plots``, ``report``: figures (PNG and PDF) and the self-contained HTML/Markdown report.
- ``synthetic``: data from known laws for tests, coverage studies and benchmarks.

The commands ``cmscale fit powerlaw|joint|ratio``, ``cmscale plot`` and ``cmscale report`` live in
:mod:`cmscale.cli.analysis`.
"""
