"""Import EDM2's network pickles (NVlabs/edm2): its ``Precond`` around its ``UNet`` becomes an
:class:`~cmscale.models.edm_pickle.ImportedNetwork` with the architecture from the recorded
constructor arguments, the weights loaded strictly, and EDM2's data encoder as metadata.
:func:`cmscale.models.edm_import.import_edm_network` reads the pickle and hands EDM2's networks here.
"""

from __future__ import annotations

from typing import Any

import torch

from cmscale.models.edm2 import EDM2Net
from cmscale.models.edm_pickle import EDMPickleError, ImportedNetwork, PersistentRecord, plain_data, record_tensors
from cmscale.models.presets import PRESETS, build_network

# EDM2's constructor arguments (training/networks_edm2.py): Precond's own, and those it passes to UNet and Block.
_EDM2_PRECOND_ARGS = ("use_fp16", "sigma_data", "logvar_channels")
_EDM2_UNET_ARGS = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
                   "attn_resolutions", "label_balance", "concat_balance", "resample_filter", "channels_per_head",
                   "dropout", "res_balance", "attn_balance", "clip_act")
_EDM2_ENCODERS = ("StandardRGBEncoder", "StabilityVAEEncoder")


def _edm2_encoder(top: Any, source: str) -> dict | None:
    """EDM2's data encoder as metadata: pixels in [-1, 1] (StandardRGBEncoder) or SD-VAE latents (scale, bias)."""
    encoder = top.get("encoder") if isinstance(top, dict) else None
    if encoder is None:
        return None
    if not isinstance(encoder, PersistentRecord) or encoder.class_name not in _EDM2_ENCODERS:
        name = getattr(encoder, "class_name", type(encoder).__name__)
        raise EDMPickleError(f"{source}: field 'encoder' holds a {name}; cmscale knows EDM2's "
                             f"{' and '.join(_EDM2_ENCODERS)}")
    meta = {"class_name": encoder.class_name}
    for key in ("vae_name", "scale", "bias", "batch_size"):
        if key in encoder.state:
            meta[key] = plain_data(encoder.state[key])
    return meta


def import_edm2(top: Any, precond: PersistentRecord, source: str) -> ImportedNetwork:
    """EDM2's Precond: the architecture from its recorded constructor arguments, the weights loaded strictly."""
    unet = precond.state["_modules"]["unet"]
    recorded = plain_data(unet.state.get("_init_kwargs") or {})
    outer = plain_data(precond.state.get("_init_kwargs") or {})
    for name, value in (("img_resolution", precond.state.get("img_resolution")),
                        ("img_channels", precond.state.get("img_channels")),
                        ("label_dim", precond.state.get("label_dim"))):
        recorded.setdefault(name, outer.get(name, plain_data(value)))
    missing = [name for name in ("img_resolution", "img_channels", "label_dim") if recorded.get(name) is None]
    if missing:
        raise EDMPickleError(f"{source}: EDM2's Precond records no {', '.join(missing)} (field 'ema._init_kwargs'); "
                             "the pickle was not written by NVlabs/edm2's training loop or reconstruct_phema.py")
    unknown = sorted(set(recorded) - {"img_resolution", "img_channels", "label_dim", *_EDM2_UNET_ARGS})
    if unknown:
        raise EDMPickleError(f"{source}: EDM2's UNet was built with arguments cmscale does not implement: {unknown} "
                             "(field 'ema.unet._init_kwargs'); cmscale follows NVlabs/edm2's networks_edm2.py")
    kwargs = {**recorded, **{key: outer[key] for key in _EDM2_PRECOND_ARGS if key in outer}}
    kwargs["sigma_data"] = float(precond.state.get("sigma_data", kwargs.get("sigma_data", 0.5)))
    logvar = (precond.state.get("_modules") or {}).get("logvar_fourier")
    if isinstance(logvar, PersistentRecord) and "freqs" in (logvar.state.get("_buffers") or {}):
        kwargs["logvar_channels"] = int(logvar.state["_buffers"]["freqs"].shape[0])
    tensors = record_tensors(precond)
    with torch.device("meta"):
        shapes = EDM2Net(**kwargs).state_dict()
    missing_keys = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = [f"{key} {tuple(tensors[key].shape)} vs {tuple(value.shape)}"
             for key, value in shapes.items() if key in tensors and tensors[key].shape != value.shape]
    if missing_keys or unexpected or wrong:
        raise EDMPickleError(f"{source}: the EDM2 weights do not fit the network its constructor arguments describe "
                             f"({kwargs}): missing {missing_keys[:5]}, unexpected {unexpected[:5]}, "
                             f"wrong shapes {wrong[:5]}")
    net = build_network({"family": "edm2", "kwargs": kwargs})
    net.load_state_dict({key: value.float() for key, value in tensors.items()}, strict=True)
    resolution, channels, label_dim = int(kwargs["img_resolution"]), int(kwargs["img_channels"]), int(
        kwargs["label_dim"])
    preset = _edm2_preset(kwargs)
    notes = [] if preset else ["no edm2-* preset has this width and depth; the checkpoint's 'architecture' "
                               "rebuilds it (cmscale.teacher.load_denoiser)"]
    return ImportedNetwork(
        preset=preset, resolution=resolution, img_channels=channels, sigma_data=kwargs["sigma_data"],
        state_dict={key: value.float().contiguous() for key, value in net.state_dict().items()},
        network_class=f"{precond.class_name}/{unet.class_name}", network_kwargs=recorded, notes=notes,
        architecture={"family": "edm2", "kwargs": kwargs}, label_dim=label_dim, encoder=_edm2_encoder(top, source),
    )


def _edm2_preset(kwargs: dict) -> str | None:
    """The edm2-* preset that builds exactly this network (at its resolution), if any."""
    defaults = dict(channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8])
    for name, spec in PRESETS.items():
        if spec.architecture != "edm2":
            continue
        built = dict(model_channels=spec.model_channels, channel_mult=list(spec.channel_mult),
                     num_blocks=spec.num_blocks, attn_resolutions=list(spec.attn_resolutions(kwargs["img_resolution"])))
        wanted = {key: kwargs.get(key, defaults.get(key)) for key in built}
        wanted["attn_resolutions"] = list(wanted["attn_resolutions"])
        others = {key for key in _EDM2_UNET_ARGS if key in kwargs} - set(built) - {"dropout"}
        if wanted == built and not others and (kwargs["img_channels"] == 4) == name.startswith("edm2-img512"):
            return name
    return None
