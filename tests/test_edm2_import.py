"""Importing EDM2's network pickles (float16, EasyDict snapshots) and the public loader load_denoiser."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from edm2_format import write_edm2_pickle
from edm2_reference import edm2_denoiser

from cmscale.cli import main
from cmscale.models.edm2 import EDM2Net
from cmscale.models.edm2_import import _edm2_preset
from cmscale.models.edm_import import import_edm_network
from cmscale.models.edm_pickle import EDMPickleError
from cmscale.teacher import load_denoiser

# A width no preset has: the architecture must come from the pickle's constructor arguments.
NETWORK_KWARGS = dict(model_channels=24, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)


def _published_like(label_dim: int = 10, channels: int = 3) -> EDM2Net:
    torch.manual_seed(0)
    net = EDM2Net(16, channels, label_dim, **NETWORK_KWARGS)
    with torch.no_grad():  # trained gains are non-zero; random ones exercise every branch
        for name, parameter in net.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.5 if name.endswith("gain") else 1.0))
    return net


@pytest.fixture
def edm2_pickle(tmp_path):
    net = _published_like()
    path = tmp_path / "edm2-img16-xs-0001234-0.100.pkl"
    write_edm2_pickle(path, net, NETWORK_KWARGS)
    return path, {key: value.half() for key, value in net.state_dict().items()}


@pytest.mark.parametrize("with_labels", [False, True])
def test_imported_edm2_denoiser_equals_edm2s_equations(edm2_pickle, tmp_path, with_labels):
    path, published = edm2_pickle
    out = tmp_path / "teacher.pt"
    result = CliRunner().invoke(main, ["teacher", "import", str(path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["source"]["network"] == "Precond/UNet" and summary["preset"] is None
    assert summary["label_dim"] == 10 and summary["architecture"]["kwargs"]["model_channels"] == 24
    assert summary["encoder"] == {"class_name": "StandardRGBEncoder"}
    denoiser = load_denoiser(out)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=generator) * 2
    sigma = torch.tensor([0.005, 0.4, 3.0, 60.0])
    labels = torch.tensor([0, 4, 9, 2]) if with_labels else None
    onehot = torch.nn.functional.one_hot(labels, 10).float() if with_labels else None
    with torch.no_grad():
        got = denoiser(x, sigma, labels)
        want = edm2_denoiser({key: value.float() for key, value in published.items()}, x, sigma, onehot)
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        if with_labels:
            assert torch.equal(denoiser(x, sigma, onehot), got)
            assert (denoiser(x, sigma) - got).abs().max() > 1e-3  # the labels matter


def test_load_denoiser_reads_the_pickle_itself_and_keeps_the_vae_encoder(tmp_path):
    net = _published_like(label_dim=0, channels=4)
    path = tmp_path / "edm2-img512-like.pkl"
    write_edm2_pickle(path, net, NETWORK_KWARGS, encoder="vae")
    denoiser = load_denoiser(path)
    assert denoiser.encoder["class_name"] == "StabilityVAEEncoder"
    assert denoiser.encoder["vae_name"] == "stabilityai/sd-vae-ft-mse"
    torch.testing.assert_close(torch.tensor(denoiser.encoder["scale"]),
                               0.5 / torch.tensor([4.17, 4.62, 3.71, 3.28]))
    x, sigma = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 2.0])
    want = edm2_denoiser({key: value.half().float() for key, value in net.state_dict().items()}, x, sigma)
    with torch.no_grad():
        assert (denoiser(x, sigma).double() - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ValueError, match="unconditional"):
        denoiser(x, sigma, torch.tensor([1, 2]))


def test_the_architecture_comes_from_the_pickle_and_a_published_size_names_its_preset(tmp_path):
    net = EDM2Net(64, 3, 1000, model_channels=8, num_blocks=1)
    path = tmp_path / "narrow.pkl"
    write_edm2_pickle(path, net, dict(model_channels=8, num_blocks=1))
    imported = import_edm_network(path)
    assert imported.preset is None and imported.architecture["kwargs"]["num_blocks"] == 1
    assert imported.label_dim == 1000 and imported.resolution == 64
    # train_edm2.py's edm2-img64-s and edm2-img512-xxl arguments (Precond's interface added by the training loop)
    assert _edm2_preset(dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
                             dropout=0.0)) == "edm2-img64-s"
    assert _edm2_preset(dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=448,
                             dropout=0.1)) == "edm2-img512-xxl"


def test_a_pickle_whose_network_is_neither_edm_nor_edm2_is_refused_naming_the_field(tmp_path):
    net = _published_like()
    path = tmp_path / "other.pkl"
    write_edm2_pickle(path, net, NETWORK_KWARGS, precond_class="VPPrecond")
    out = tmp_path / "teacher.pt"
    result = CliRunner().invoke(main, ["teacher", "import", str(path), "--out", str(out)])
    assert result.exit_code != 0
    assert "field 'ema' holds a VPPrecond" in result.output and "edm2-*.pkl" in result.output
    assert not out.exists()
    with pytest.raises(EDMPickleError, match="ema"):
        import_edm_network(path)


def test_an_imported_edm2_network_serves_as_autoguidance_guide(tmp_path):
    from cmscale.config import RunConfig
    from cmscale.methods import TeacherCheckpointError
    from cmscale.sampling import guide_from_checkpoint

    torch.manual_seed(0)
    guide_net = EDM2Net(8, 1, 10, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    path = tmp_path / "edm2-xs-like.pkl"
    write_edm2_pickle(path, guide_net, dict(model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                            attn_resolutions=[4]))
    out = tmp_path / "guide.pt"
    assert CliRunner().invoke(main, ["teacher", "import", str(path), "--out", str(out)]).exit_code == 0
    config = RunConfig(method="edm", preset="edm2-t16", resolution=8, budget_iters=1, label_dim=10, guidance=1.5,
                       guide_ckpt=str(out))
    guide = guide_from_checkpoint(config, img_channels=1, device="cpu")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 2]), 10).float()
    with torch.no_grad():
        want = edm2_denoiser({k: v.half().float() for k, v in guide_net.state_dict().items()}, x, sigma, labels)
        got = guide(x, sigma, labels)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    wrong = config.model_copy(update={"label_dim": 0, "guidance": 1.0})
    with pytest.raises(TeacherCheckpointError, match="label_dim: the checkpoint has 10, the run has 0"):
        guide_from_checkpoint(wrong, img_channels=1, device="cpu")
