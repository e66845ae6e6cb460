"""The plotting API in a notebook's terms: no global matplotlib state changes, each plot draws into
the axes it is given (seaborn, with hue and style) and returns them."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _points() -> pd.DataFrame:
    rows = []
    for size, params in (("s", 1e6), ("m", 3e6)):
        for flops in (1e12, 2e12, 4e12):
            rows.append({"size": size, "params": params, "train_flops": flops, "fid": 30 * (flops / 1e12) ** -0.3})
    return pd.DataFrame(rows)


def _state() -> tuple[str, dict]:
    import matplotlib

    return matplotlib.get_backend(), {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}


def test_importing_and_plotting_leave_the_backend_and_rcparams_alone():
    import matplotlib
    from matplotlib.figure import Figure

    before = _state()
    from cmscale.analysis import plots

    assert _state() == before  # importing changes nothing
    axis = Figure().subplots()
    points = _points()
    x = np.logspace(12, np.log10(4e12), 8)
    curves = pd.concat([pd.DataFrame({"size": s, "x": x, "y": 30 * (x / 1e12) ** -0.3, "lo": 1.0, "hi": 99.0})
                        for s in ("s", "m")])
    returned = plots.fid_vs_compute(points, curves, pd.DataFrame({"x": x, "y": 25 * (x / 1e12) ** -0.3}),
                                    title="t", ax=axis)
    assert returned is axis and _state() == before
    with plots.paper_style():  # the style is a context: applied inside, restored after
        assert matplotlib.rcParams["savefig.dpi"] == plots.PAPER_RC["savefig.dpi"]
    assert _state() == before


def test_each_plot_draws_into_the_axes_it_is_given():
    from matplotlib.figure import Figure

    from cmscale.analysis import plots

    points = _points()
    axis = Figure().subplots()
    assert plots.fid_vs_compute(points, ax=axis) is axis
    # seaborn's scatterplot: one marker per eval, a legend entry per size (hue and style)
    assert sum(len(c.get_offsets()) for c in axis.collections) == len(points)
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["s (1M)", "m (3M)"]
    assert axis.get_xscale() == "log" and axis.get_ylabel() == "FID"

    optima = pd.DataFrame({"compute": [1e12, 2e12, 4e12], "n_opt": [1e6, 1.5e6, 2e6], "interior": [True, True, False]})
    fits = pd.DataFrame({"approach": "iso-FLOP", "x": [1e12, 4e12], "y": [1e6, 2e6]})
    axis = Figure().subplots()
    assert plots.optimal_size_vs_compute(optima, None, fits, ax=axis) is axis
    labels = [t.get_text() for t in axis.get_legend().get_texts()]
    assert "iso-FLOP optimum" in labels and "at size-grid edge (excluded)" in labels

    pairs = pd.DataFrame({"group": ["ect 2-step"] * 2, "params": [1e6, 3e6], "teacher_fid": [10.0, 8.0],
                          "student_fid": [11.0, 9.0]})
    top_bottom = Figure().subplots(2, 1)
    assert plots.teacher_student(pairs, ax=top_bottom) is top_bottom
    np.testing.assert_allclose(top_bottom[1].lines[0].get_ydata(), [1.1, 9 / 8])  # the ratio panel

    sampling = pd.DataFrame({"label": ["ect 1-step", "ect 2-step"], "size": ["s", "s"],
                             "sampling_flops_per_image": [1e6, 2e6], "fid": [12.0, 10.0]})
    axis = Figure().subplots()
    assert plots.fid_vs_sampling_compute(sampling, ax=axis) is axis
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["ect 1-step", "ect 2-step"]
