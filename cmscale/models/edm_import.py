"""Import EDM's published network pickles as cmscale teacher checkpoints, without running EDM's code.

The pickle is read as data (:mod:`cmscale.models.edm_pickle`: a restricted unpickler, nothing
executed). The network inside ``ema`` (an ``EDMPrecond`` around a ``SongUNet`` or ``DhariwalUNet``,
or EDM2's ``Precond`` around its ``UNet``, :mod:`cmscale.models.edm2_import`) becomes a cmscale
checkpoint:

    {'net': state dict (EDM's / EDM2's own keys), 'preset' (a matching preset, or None), 'resolution',
     'img_channels', 'label_dim', 'sigma_data', 'method': 'edm',
     'architecture': {'family', 'kwargs'} (rebuilds the network whatever its width and depth),
     'encoder': EDM2's data encoder (class, and for the SD-VAE one its name, scale and bias) or None,
     'source': {file name, sha256, classes and constructor arguments}}

which ``teacher_ckpt`` accepts for ECT (initialisation) and sCD (teacher), and
:func:`cmscale.teacher.load_denoiser` turns into a denoiser module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from cmscale.models.edm2_import import import_edm2
from cmscale.models.edm_pickle import (
    EDMPickleError,
    ImportedNetwork,
    PersistentRecord,
    plain_data,
    read_edm_pickle,
    record_tensors,
)
from cmscale.models.presets import PRESETS, build_network, get_preset

# EDM's constructor defaults (training/networks.py), for arguments a pickle does not record.
_SONG_DEFAULTS = dict(
    model_channels=128,
    channel_mult=[1, 2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
    augment_dim=0,
    label_dim=0,
)
_DHARIWAL_DEFAULTS = dict(
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    channel_mult_emb=4,
    num_blocks=3,
    attn_resolutions=[32, 16, 8],
    augment_dim=0,
    label_dim=0,
)
_DDPMPP_ONLY = dict(
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
    channel_mult_emb=4,
)


def _network_record(top: Any, source: str) -> PersistentRecord:
    if isinstance(top, dict) and "ema" in top:
        top = top["ema"]
    if not isinstance(top, PersistentRecord):
        raise EDMPickleError(
            f"{source}: expected EDM's snapshot dict with an 'ema' network (or a pickled EDMPrecond); "
            f"found {type(top).__name__}"
        )
    unet = (top.state.get("_modules") or {}).get("unet")
    if top.class_name == "Precond" and isinstance(unet, PersistentRecord) and unet.class_name == "UNet":
        return top  # EDM2's training.networks_edm2.Precond
    if top.class_name != "EDMPrecond":
        raise EDMPickleError(
            f"{source}: field 'ema' holds a {top.class_name}, but cmscale imports EDM's EDMPrecond (the 'edm-*' "
            "pickles of NVlabs/edm) and EDM2's Precond around its UNet (the pickles of NVlabs/edm2); the "
            "VP/VE/iDDPM 'baseline-*' pickles use other noise conditioning. Download an edm-*.pkl or edm2-*.pkl"
        )
    return top


def import_edm_network(path: str | Path) -> ImportedNetwork:
    """Read an EDM pickle safely and map its network onto a cmscale preset (checked by a strict load)."""
    source = str(path)
    top = read_edm_pickle(path)
    precond = _network_record(top, source)
    if precond.class_name == "Precond":
        return import_edm2(top, precond, source)
    state = precond.state
    model = (state.get("_modules") or {}).get("model")
    if not isinstance(model, PersistentRecord):
        raise EDMPickleError(f"{source}: EDMPrecond has no 'model' network")
    label_dim = int(state.get("label_dim") or 0)
    recorded = plain_data(model.state.get("_init_kwargs") or {})
    if model.class_name == "SongUNet":
        architecture, kwargs = "ddpmpp", {**_SONG_DEFAULTS, **recorded}
        unsupported = {key: kwargs[key] for key, value in _DDPMPP_ONLY.items() if kwargs[key] != value}
        if unsupported:
            raise EDMPickleError(
                f"{source}: a SongUNet with {unsupported}: that is NCSN++ or a non-standard DDPM++; "
                "cmscale has EDM's DDPM++ only (positional embedding, standard encoder and decoder)"
            )
    elif model.class_name == "DhariwalUNet":
        architecture, kwargs = "adm", {**_DHARIWAL_DEFAULTS, **recorded}
    else:
        raise EDMPickleError(
            f"{source}: unknown EDM network class {model.class_name} (field 'ema.model'); cmscale imports SongUNet "
            "(DDPM++) and DhariwalUNet (ADM)"
        )
    resolution = int(kwargs.get("img_resolution", state.get("img_resolution")))
    img_channels = int(kwargs.get("in_channels", state.get("img_channels")))
    label_dim = int(kwargs.get("label_dim") or label_dim)
    wanted = (
        int(kwargs["model_channels"]),
        tuple(kwargs["channel_mult"]),
        int(kwargs["num_blocks"]),
        tuple(sorted(kwargs["attn_resolutions"])),
    )
    preset = next(
        (
            name
            for name, spec in PRESETS.items()
            if spec.architecture == architecture
            and (
                spec.model_channels,
                spec.channel_mult,
                spec.num_blocks,
                tuple(sorted(spec.attn_resolutions(resolution))),
            )
            == wanted
            and int(kwargs.get("channel_mult_emb", 4)) == 4
        ),
        None,
    )
    tensors = record_tensors(model)
    notes = []
    augment_dim = int(kwargs.get("augment_dim") or 0)
    if preset is not None:
        # A preset's layout (with its augmentation layer), so that teacher_ckpt fits runs of that preset.
        augment_dim = max(augment_dim, get_preset(preset).augment_dim)
    else:
        notes.append(f"no {architecture} preset has this width and depth; the checkpoint's 'architecture' rebuilds "
                     "it (cmscale.teacher.load_denoiser)")
    network_kwargs = dict(img_resolution=resolution, img_channels=img_channels, model_channels=wanted[0],
                          channel_mult=list(wanted[1]), channel_mult_emb=int(kwargs.get("channel_mult_emb", 4)),
                          num_blocks=wanted[2], attn_resolutions=list(kwargs["attn_resolutions"]),
                          augment_dim=augment_dim, label_dim=label_dim)
    net = build_network({"family": architecture, "kwargs": network_kwargs})
    expected = net.state_dict()
    if not kwargs.get("augment_dim") and "map_augment.weight" in expected:
        # The augmentation-label layer is never used without augmentation labels; zeros make the load strict.
        tensors["map_augment.weight"] = torch.zeros_like(expected["map_augment.weight"])
        notes.append("the pickle has no augmentation-label layer; map_augment.weight set to zeros (unused)")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{key} {tuple(tensors[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in tensors and tensors[key].shape != value.shape
    ]
    if missing or unexpected or wrong:
        raise EDMPickleError(
            f"{source}: the {model.class_name} weights do not fit the network its constructor arguments describe "
            f"({network_kwargs}): missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    net.load_state_dict({key: value.float() for key, value in tensors.items()}, strict=True)
    return ImportedNetwork(
        preset=preset,
        resolution=resolution,
        img_channels=img_channels,
        sigma_data=float(state.get("sigma_data", 0.5)),
        state_dict={key: value.float().contiguous() for key, value in net.state_dict().items()},
        network_class=f"{precond.class_name}/{model.class_name}",
        network_kwargs={key: value for key, value in recorded.items()},
        notes=notes,
        architecture={"family": architecture, "kwargs": network_kwargs},
        label_dim=label_dim,
    )


def teacher_checkpoint(imported: ImportedNetwork, source: str | Path) -> dict[str, Any]:
    """The cmscale teacher checkpoint (plain keys; ``torch.load(weights_only=True)`` reads it)."""
    source = Path(source)
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {
        "net": imported.state_dict,
        "preset": imported.preset,
        "resolution": imported.resolution,
        "img_channels": imported.img_channels,
        "sigma_data": imported.sigma_data,
        "label_dim": imported.label_dim,
        "method": "edm",
        "step": 0,
        "architecture": imported.architecture,
        "encoder": imported.encoder,
        "source": {
            "file": source.name,
            "sha256": digest.hexdigest(),
            "network": imported.network_class,
            "init_kwargs": imported.network_kwargs,
        },
    }


def import_edm_pickle(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Import ``path`` and write the teacher checkpoint to ``out``; returns its metadata (no weights)."""
    imported = import_edm_network(path)
    checkpoint = teacher_checkpoint(imported, path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)
    summary = {key: value for key, value in checkpoint.items() if key != "net"}
    # parameters only: EDM's resample filters and EDM2's Fourier frequencies and phases are buffers
    buffers = ("resample_filter", ".freqs", ".phases")
    summary["params"] = sum(value.numel() for key, value in imported.state_dict.items() if not key.endswith(buffers))
    summary["notes"] = imported.notes
    return summary
