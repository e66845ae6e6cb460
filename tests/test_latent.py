"""Latent space through a local VAE: EDM2's scaling, `cmscale data encode` in shards, a latent run end to end.

The VAE is a tiny randomly initialised diffusers AutoencoderKL built from a config and saved with
save_pretrained (nothing downloaded); FID uses torch-fidelity's Inception-v3 with random weights
saved to a local file, since the published weights cannot be fetched here.
"""

from __future__ import annotations

import io
import json
import zipfile
from unittest import mock

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("diffusers")

from cmscale.cli import main  # noqa: E402
from cmscale.data import DataFormatError, load_dataset  # noqa: E402
from cmscale.data.encode import encode_parts, latent_member, merge_parts  # noqa: E402
from cmscale.data.latents import LatentScaling  # noqa: E402
from cmscale.data.vae import VAECodec, VAEError, check_vae_folder  # noqa: E402

SIDE = 16  # pixels; the tiny VAE has 3 levels, so latents are 4x4


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=SIDE)
    folder = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_zip(tmp_path_factory):
    """20 RGB images (smooth gradients plus noise) with labels i % 3, in EDM's layout."""
    path = tmp_path_factory.mktemp("images") / "images.zip"
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, SIDE)
    entries = []
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(20):
            base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp[::-1], ramp) / 2,
                             np.full((SIDE, SIDE), 12.0 * index)], axis=-1)
            pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            name = f"00000/img{index:08d}.png"
            archive.writestr(name, buffer.getvalue())
            entries.append([name, index % 3])
        archive.writestr("dataset.json", json.dumps({"labels": entries}))
    return path


def test_scaling_is_edm2s_float32_affine_map_and_decode_inverts_it(vae_folder):
    scaling = LatentScaling()
    raw = torch.randn(3, 4, 5, 5) * 4 + 2
    # EDM2's StabilityVAEEncoder, in its own float32 numpy constants.
    scale = np.float32(0.5) / np.array([4.17, 4.62, 3.71, 3.28], np.float32)
    bias = np.float32(0) - np.array([5.81, 3.25, 0.12, -2.15], np.float32) * scale
    expected = raw * torch.from_numpy(scale).reshape(1, -1, 1, 1) + torch.from_numpy(bias).reshape(1, -1, 1, 1)
    final = scaling.whiten(raw)
    assert torch.equal(final, expected)
    expected_raw = (final - torch.from_numpy(bias).reshape(1, -1, 1, 1)) / torch.from_numpy(scale).reshape(1, -1, 1, 1)
    assert torch.equal(scaling.unwhiten(final), expected_raw)
    torch.testing.assert_close(scaling.unwhiten(final), raw, rtol=0, atol=2e-6)
    codec = VAECodec(vae_folder)
    with torch.no_grad():
        direct = codec.vae.decode(expected_raw).sample.clamp(0, 1).mul(255).to(torch.uint8)
    assert torch.equal(codec.decode(final), direct)


def test_encode_stores_the_posterior_mean_and_std_as_edm2(vae_folder, image_zip):
    codec = VAECodec(vae_folder)
    pixels = torch.from_numpy(np.stack([load_dataset("imagefolder", path=image_zip).images[i].numpy()
                                        for i in range(2)]))
    mean_std = codec.encode_pixels(pixels)
    posterior = codec.vae.encode(pixels.float() / 255).latent_dist
    assert mean_std.shape == (2, 8, SIDE // 4, SIDE // 4)
    torch.testing.assert_close(mean_std, torch.cat([posterior.mean, posterior.std], dim=1))


def test_encoding_in_shards_resumes_and_merges_to_the_unsharded_zip_with_labels(vae_folder, image_zip, tmp_path):
    codec = VAECodec(vae_folder, batch_size=4)
    whole = tmp_path / "whole.zip"
    assert encode_parts(image_zip, codec, whole, (0, 1), chunk=6) == [0, 1, 2, 3]
    merge_parts(image_zip, whole, chunk=6)
    split = tmp_path / "split.zip"
    assert encode_parts(image_zip, codec, split, (1, 2), chunk=6) == [1, 3]
    with pytest.raises(DataFormatError, match=r"2 of 4 parts are not encoded yet \(parts 0, 2; part c belongs"):
        merge_parts(image_zip, split, chunk=6)
    assert encode_parts(image_zip, codec, split, (1, 2), chunk=6) == []  # a rerun skips finished parts
    assert encode_parts(image_zip, codec, split, (0, 2), chunk=6) == [0, 2]
    merge_parts(image_zip, split, chunk=6)
    with zipfile.ZipFile(whole) as a, zipfile.ZipFile(split) as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(name) == b.read(name) for name in a.namelist())
        labels = json.loads(a.read("dataset.json"))["labels"]
    assert labels[7] == [latent_member(7), 1] and latent_member(7) == "00000/img-mean-std-00000007.npy"
    latents = load_dataset("imagefolder", path=split, vae_path=vae_folder)
    assert latents.kind == "latents" and len(latents) == 20 and latents.item_shape == (8, 4, 4)
    assert latents.labels.tolist() == [i % 3 for i in range(20)]


def test_a_folder_that_is_not_an_autoencoderkl_is_refused_naming_its_config(tmp_path, image_zip):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(VAEError, match=r"config.json describes a 'UNet2DConditionModel', not an AutoencoderKL"):
        check_vae_folder(tmp_path)
    with pytest.raises(VAEError, match="not a diffusers model folder"):
        check_vae_folder(tmp_path / "..")
    result = CliRunner().invoke(main, ["data", "encode", str(image_zip), "--vae", str(tmp_path),
                                       "--out", str(tmp_path / "x.zip")])
    assert result.exit_code != 0 and "not an AutoencoderKL" in result.output


def test_images_with_a_vae_and_latents_without_one_are_refused_before_training(vae_folder, image_zip):
    with pytest.raises(DataFormatError, match="holds images; encode them once with `cmscale data encode"):
        load_dataset("imagefolder", path=image_zip, vae_path=vae_folder)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved as a local weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pt")
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=str(folder / "empty.pt"))
    torch.save(network.state_dict(), folder / "inception-random.pth")
    return folder / "inception-random.pth"


@pytest.mark.slow
def test_a_latent_run_trains_samples_decodes_and_evaluates_end_to_end(vae_folder, image_zip, random_inception,
                                                                      tmp_path, monkeypatch):
    from cmscale.config import RunConfig
    from cmscale.rundir import read_metrics
    from cmscale.train import train

    monkeypatch.setenv("CMSCALE_CACHE_DIR", str(tmp_path / "cache"))
    latents = tmp_path / "latents.zip"
    result = CliRunner().invoke(main, ["data", "encode", str(image_zip), "--vae", str(vae_folder),
                                       "--out", str(latents), "--chunk", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = RunConfig(method="sct", preset="t2", dataset="imagefolder", data_path=str(latents), resolution=4,
                       vae_path=str(vae_folder), fid_reference=str(image_zip), batch_size=4, budget_iters=3,
                       log_every=1, device="cpu", eval={"num_samples": 6, "batch_size": 6, "cm_steps": [1],
                                                        "kid_subsets": 2, "grid_images": 4,
                                                        "inception_weights": str(random_inception)})
    done = train(config, tmp_path / "run")
    assert done["status"] == "done", done
    rows = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if row["kind"] == "eval"]
    assert len(rows) == 1 and np.isfinite(rows[0]["fid"]) and rows[0]["num_samples"] == 6
    assert rows[0]["extractor"] == "inception-v3-compat" and rows[0]["reference"].startswith("imagefolder-r16-")
    grid = Image.open(next((tmp_path / "run" / "samples").glob("*.png")))
    assert grid.size == (2 * SIDE + 3, 2 * SIDE + 3)  # 2x2 decoded 16x16 samples, padding 1
    config_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config_json["img_channels"] == 4 and config_json["vae_path"] == str(vae_folder)
    # The 50k path on the same run: one shard, then the reduction (decoded samples against the image zip).
    for arguments in (["--shard", "0/1"], ["--reduce"]):
        result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--num-samples", "6", *arguments])
        assert result.exit_code == 0, result.output
    reduced = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if row["kind"] == "eval"]
    assert len(reduced) == 2 and reduced[1]["reference"] == rows[0]["reference"]
    assert np.isfinite(reduced[1]["fid"]) and reduced[1]["num_samples"] == 6 and reduced[1]["nfe"] == 1
