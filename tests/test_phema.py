"""Post-hoc EMA (cmscale.models.phema): the reconstruction of a width that was also tracked directly
equals it (EDM2's own check), and the profile inner products equal their integrals."""

from __future__ import annotations

import numpy as np
import torch

from cmscale.models.ema import power_ema_decay, power_ema_gamma
from cmscale.models.phema import list_snapshots, profile_inner_products, reconstruct, save_snapshot, snapshot_path


def test_profile_inner_products_equal_numerical_integrals():
    t_a, g_a, t_b, g_b = 300.0, power_ema_gamma(0.05), 200.0, power_ema_gamma(0.1)
    tau = np.linspace(0, 200, 2_000_001)[1:]
    integrand = (g_a + 1) * tau**g_a / t_a ** (g_a + 1) * (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
    numeric = np.sum(integrand) * (tau[1] - tau[0])
    closed = profile_inner_products(np.array([t_a]), np.array([g_a]), np.array([t_b]), np.array([g_b]))[0, 0]
    assert abs(closed - numeric) <= 1e-4 * closed


def test_reconstruction_of_a_directly_tracked_width_equals_it(tmp_path):
    # A random walk of 64 "weights" over 2,000 steps with drift, as training moves them; power EMAs of widths
    # 0.05 and 0.10 stored every 100 steps, and 0.075 tracked directly with the trainer's update rule.
    generator = torch.Generator().manual_seed(0)
    steps, interval, stored, checked = 2000, 100, (0.05, 0.10), 0.075
    theta = torch.zeros(64, dtype=torch.float64)
    drift = torch.randn(64, generator=generator, dtype=torch.float64)
    gammas = {s: power_ema_gamma(s) for s in (*stored, checked)}
    emas = {s: theta.clone() for s in gammas}
    for step in range(1, steps + 1):
        theta = theta + 0.01 * drift + 0.05 * torch.randn(64, generator=generator, dtype=torch.float64)
        for sigma_rel, gamma in gammas.items():
            emas[sigma_rel].lerp_(theta, 1 - power_ema_decay(step, gamma))
        if step % interval == 0:
            for sigma_rel in stored:
                save_snapshot(tmp_path, step, sigma_rel, {"w": emas[sigma_rel].clone()})
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 2 * steps // interval
    step, (rebuilt,) = reconstruct(snapshots, [checked])
    assert step == steps
    error = (rebuilt["w"].double() - emas[checked]).norm()
    spread = (emas[0.05] - emas[0.10]).norm()  # how far apart the two stored widths are
    assert error <= 0.005 * spread, (error, spread)
    # a stored width reconstructs to itself
    _, (same,) = reconstruct(snapshots, [0.10])
    assert (same["w"].double() - emas[0.10]).norm() <= 1e-3 * spread


def test_a_run_stores_snapshots_and_the_cli_reconstructs_the_exported_width(tmp_path, monkeypatch):
    """A real run tracks widths 0.075 (exported in final.pt), 0.05 and 0.10, storing snapshots of each every
    4 steps; with the 0.075 snapshots removed, `cmscale ema reconstruct` rebuilds 0.075 from the other two."""
    import json

    from click.testing import CliRunner

    from cmscale.cli import main
    from cmscale.config import RunConfig
    from cmscale.train import train

    config = RunConfig(method="edm", preset="t4", resolution=8, batch_size=8, budget_iters=48, lr=2e-3,
                       ema_rates=[], ema_sigma_rels=[0.075, 0.05, 0.1], phema_every=4,
                       eval={"at_fractions": []}, log_every=100, ckpt_every=100)
    run = tmp_path / "run"
    assert train(config, run)["status"] == "done"
    snapshots = list_snapshots(run)
    assert [(s.step, s.sigma_rel) for s in snapshots[:3]] == [(4, 0.05), (4, 0.075), (4, 0.1)]
    assert len(snapshots) == 3 * 12
    for snap in snapshots:
        if snap.sigma_rel == 0.075:
            snap.path.unlink()
    result = CliRunner().invoke(main, ["ema", "reconstruct", str(run), "--sigma-rel", "0.075,0.15", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)
    assert [row["sigma_rel"] for row in written] == [0.075, 0.15] and written[0]["step"] == 48
    rebuilt = torch.load(written[0]["path"], weights_only=True)
    final = torch.load(run / "ckpt" / "final.pt", weights_only=True)
    assert rebuilt["ema_sigma_rel"] == 0.075 and rebuilt["preset"] == "t4"
    narrow = torch.load(snapshot_path(run, 48, 0.05), weights_only=True)["net"]
    wide = torch.load(snapshot_path(run, 48, 0.1), weights_only=True)["net"]
    error = sum((rebuilt["net"][k] - final["net"][k]).double().square().sum() for k in final["net"]).sqrt()
    spread = sum((narrow[k] - wide[k]).double().square().sum() for k in final["net"]).sqrt()
    assert error <= 0.05 * spread, (float(error), float(spread))
    # the reconstruction is evaluated beside the run's own evals, its rows naming the width
    monkeypatch.setenv("CMSCALE_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["eval", str(run), "--ema-sigma-rel", "0.15", "--num-samples", "40", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows and all(row["kind"] == "eval-ema" and row["ema_sigma_rel"] == 0.15 and row["fid"] > 0
                        for row in rows)
    missing = CliRunner().invoke(main, ["eval", str(run), "--ema-sigma-rel", "0.2"])
    assert missing.exit_code != 0 and "cmscale ema reconstruct" in missing.output


def test_bad_widths_and_a_run_without_snapshots_get_clear_errors(tmp_path):
    from click.testing import CliRunner

    from cmscale.cli import main

    result = CliRunner().invoke(main, ["ema", "reconstruct", str(tmp_path), "--sigma-rel", "0.05,0.4"])
    assert result.exit_code != 0 and "(0, 0.2887)" in result.output
    result = CliRunner().invoke(main, ["ema", "reconstruct", str(tmp_path), "--sigma-rel", "0.05"])
    assert result.exit_code != 0 and "phema_every" in result.output and "Traceback" not in result.output
