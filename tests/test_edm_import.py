"""Importing EDM network pickles safely, and starting ECT and sCD from the imported teacher."""

import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from edm_format import ddpmpp_reference, write_edm_pickle

from cmscale.cli import main
from cmscale.config import RunConfig
from cmscale.methods import build_method
from cmscale.models.edm_import import import_edm_network
from cmscale.models.edm_pickle import EDMPickleError, read_edm_pickle
from cmscale.models.presets import PRESETS, build_unet
from cmscale.rundir import METRICS_FILE
from cmscale.train import train

SPEC = PRESETS["ddpmpp-xxs"]
# EDM's SongUNet constructor arguments for that width (attention at 8x8 on 16x16 images = cmscale's level 1).
MODEL_KWARGS = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                    resample_filter=[1, 1], model_channels=8, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13,
                    attn_resolutions=[8])


def _edm_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = build_unet("ddpmpp-xxs", 16, 1).state_dict()
    return {key: value if key.endswith("resample_filter") else torch.randn(value.shape, generator=generator) * 0.2
            for key, value in state.items()}


@pytest.fixture
def edm_pickle(tmp_path):
    weights = _edm_weights()
    path = tmp_path / "edm-digits-16x16-uncond-vp.pkl"
    write_edm_pickle(path, weights, MODEL_KWARGS, img_resolution=16, img_channels=1)
    return path, weights


def test_import_round_trips_the_weights_metadata_and_denoiser(edm_pickle, tmp_path):
    path, weights = edm_pickle
    out = tmp_path / "teacher.pt"
    result = CliRunner().invoke(main, ["teacher", "import", str(path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert {key: checkpoint[key] for key in ("preset", "resolution", "img_channels", "sigma_data", "method")} == {
        "preset": "ddpmpp-xxs", "resolution": 16, "img_channels": 1, "sigma_data": 0.5, "method": "edm"}
    assert summary["source"]["network"] == "EDMPrecond/SongUNet"
    assert checkpoint["net"].keys() == weights.keys()
    assert all(torch.equal(checkpoint["net"][key], weights[key]) for key in weights)

    # The loaded teacher's EDM denoiser against EDM's equations computed from the original weights.
    from cmscale.models.precond import EDMPrecond

    net = build_unet(checkpoint["preset"], 16, 1)
    net.load_state_dict(checkpoint["net"])
    denoiser = EDMPrecond(net.double().eval(), checkpoint["sigma_data"])
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.3, 4.0], dtype=torch.float64)
    sd = 0.5
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    reference_F = ddpmpp_reference({k: v.double() for k, v in weights.items()}, c_in[:, None, None, None] * x,
                                   sigma.log() / 4, model_channels=8, channel_mult=(2, 2, 2), num_blocks=4,
                                   attn_resolutions=(8,))
    expected = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * reference_F
    assert torch.allclose(denoiser(x, sigma), expected, rtol=1e-10, atol=1e-10)


def test_the_pickled_module_source_is_kept_as_text_and_never_run(edm_pickle):
    snapshot = read_edm_pickle(edm_pickle[0])  # the embedded source raises if executed
    assert "never" not in snapshot["ema"].class_name and "was executed" in snapshot["ema"].module_src
    assert snapshot["loss_fn"].class_name == "EDMLoss"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _RunsCode(marker)}))
    result = CliRunner().invoke(main, ["teacher", "import", str(path), "--out", str(tmp_path / "t.pt")])
    assert result.exit_code != 0 and "refusing to load" in result.output and "system" in result.output
    assert str(path) in result.output and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "t.pt").exists()


def test_a_class_conditional_edm_pickle_imports_and_its_denoiser_takes_labels(tmp_path):
    generator = torch.Generator().manual_seed(4)
    # EDM's map_label maps the labels to the noise embedding's width (model_channels, 8 here)
    weights = {**_edm_weights(), "map_label.weight": torch.randn(8, 10, generator=generator) * 0.2,
               "map_label.bias": torch.randn(8, generator=generator) * 0.2}
    conditional = tmp_path / "cond.pkl"
    write_edm_pickle(conditional, weights, MODEL_KWARGS, img_resolution=16, img_channels=1, label_dim=10)
    imported = import_edm_network(conditional)
    assert imported.preset == "ddpmpp-xxs" and imported.label_dim == 10
    assert all(torch.equal(imported.state_dict[key], value) for key, value in weights.items())
    from cmscale.teacher import load_denoiser

    denoiser = load_denoiser(conditional)
    x, sigma, labels = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 4.0]), torch.tensor([2, 7])
    sd = 0.5
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    x_in = (c_in[:, None, None, None] * x).double()
    reference_F = ddpmpp_reference({k: v.double() for k, v in weights.items()}, x_in, sigma.log().double() / 4,
                                   model_channels=8, channel_mult=(2, 2, 2), num_blocks=4,
                                   attn_resolutions=(8,), labels=torch.nn.functional.one_hot(labels, 10).double())
    expected = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * reference_F
    with torch.no_grad():
        got = denoiser(x, sigma, labels)
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_non_edm_preconditioners_are_refused_with_the_fix(tmp_path):
    weights = _edm_weights()
    baseline = tmp_path / "vp.pkl"
    write_edm_pickle(baseline, weights, MODEL_KWARGS, img_resolution=16, img_channels=1, precond="VPPrecond")
    with pytest.raises(EDMPickleError, match="VPPrecond.*EDMPrecond"):
        import_edm_network(baseline)


def test_a_pickle_without_the_augmentation_layer_gets_an_unused_zero_one(tmp_path):
    weights = {key: value for key, value in _edm_weights().items() if key != "map_augment.weight"}
    path = tmp_path / "noaug.pkl"
    write_edm_pickle(path, weights, {**MODEL_KWARGS, "augment_dim": 0}, img_resolution=16, img_channels=1)
    imported = import_edm_network(path)
    assert torch.count_nonzero(imported.state_dict["map_augment.weight"]) == 0 and imported.notes


@pytest.mark.parametrize("method", ["ect", "scd"])
def test_ect_and_scd_train_from_an_imported_teacher(edm_pickle, tmp_path, method):
    out = tmp_path / "teacher.pt"
    assert CliRunner().invoke(main, ["teacher", "import", str(edm_pickle[0]), "--out", str(out)]).exit_code == 0
    config = RunConfig(method=method, preset="ddpmpp-xxs", resolution=16, batch_size=4, budget_iters=2, dropout=0.2,
                       teacher_ckpt=str(out), log_every=1, eval={"at_fractions": []}, scm={"warmup_iters": 0})
    # The student starts as the imported network (ECT: the online net; sCD: the online net and the teacher).
    method_obj = build_method(config, img_channels=1)
    online = method_obj.model.net if method == "ect" else method_obj.model.edm.net
    assert all(torch.equal(online.state_dict()[key], value) for key, value in edm_pickle[1].items())
    done = train(config, tmp_path / "run")
    assert done["status"] == "done" and done["final_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    losses = [row["loss"] for row in rows if row.get("kind") == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    final = torch.load(tmp_path / "run" / "ckpt" / "final.pt", weights_only=True)
    assert final["preset"] == "ddpmpp-xxs" and not torch.equal(final["net"]["map_layer0.weight"],
                                                                edm_pickle[1]["map_layer0.weight"])
