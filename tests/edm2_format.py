"""Test helper: EDM2's network-pickle format (NVlabs/edm2 ``training_loop.py``) written without EDM2's code.

A snapshot is ``pickle.dump(EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=Precond in float16))``
where every EDM2 class is a ``torch_utils.persistence`` record (module ``__dict__`` as state, with the
constructor arguments in ``_init_args``/``_init_kwargs``) and ``enc``/``dec`` are plain ModuleDicts.
The records are built from a cmscale :class:`~cmscale.models.edm2.EDM2Net` (whose state dict is EDM2's),
with EDM2's class names and plain attributes (``Block.dropout`` a float, not a module).
"""

from __future__ import annotations

import pickle
import types
from contextlib import contextmanager

import numpy as np
import torch
from edm_format import _fake_persistence_module, _module_state, _ModuleDictLike, _Persistent, installed_modules

from cmscale.models.edm2 import Block, EDM2Net, EDM2UNet, MPConv, MPFourier

_CLASS_NAMES = {EDM2Net: "Precond", EDM2UNet: "UNet", Block: "Block", MPConv: "MPConv", MPFourier: "MPFourier"}


class EasyDict(dict):
    """Pickles as ``dnnlib.util.EasyDict`` (a dict subclass), as EDM2's snapshots are."""


EasyDict.__module__ = "dnnlib.util"


@contextmanager
def _fake_dnnlib():
    package, module = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    module.EasyDict = EasyDict
    package.util = module
    with installed_modules({"dnnlib": package, "dnnlib.util": module}):
        yield


def _record(module: torch.nn.Module, dtype: torch.dtype, init_kwargs: dict | None = None):
    state = _module_state(_init_args=(), _init_kwargs=init_kwargs or {})
    for name, parameter in module._parameters.items():
        state["_parameters"][name] = torch.nn.Parameter(parameter.detach().to(dtype).clone(), requires_grad=False)
    for name, buffer in module._buffers.items():
        state["_buffers"][name] = buffer.detach().to(dtype).clone()
    for name, child in module._modules.items():
        if name == "dropout":
            continue  # EDM2 keeps the rate as a float attribute
        if isinstance(child, torch.nn.ModuleDict):
            inner = _module_state()
            for key, item in child.items():
                inner["_modules"][key] = _record(item, dtype)
            state["_modules"][name] = _ModuleDictLike(inner)
        else:
            state["_modules"][name] = None if child is None else _record(child, dtype)
    if isinstance(module, Block):
        state.update(out_channels=module.out_channels, flavor=module.flavor, resample_filter=[1, 1],
                     resample_mode=module.resample_mode, num_heads=module.num_heads, dropout=module.dropout.p,
                     res_balance=module.res_balance, attn_balance=module.attn_balance, clip_act=module.clip_act)
    if isinstance(module, MPConv):
        state["out_channels"] = module.out_channels
    return _Persistent(_CLASS_NAMES[type(module)], state)


def write_edm2_pickle(path, net: EDM2Net, network_kwargs: dict, encoder: str = "rgb",
                      dtype: torch.dtype = torch.float16, precond_class: str | None = None) -> None:
    """EDM2's snapshot of ``net`` (weights cast to ``dtype``); ``network_kwargs`` as train_edm2.py passes them
    (e.g. model_channels, dropout), ``encoder`` 'rgb' (StandardRGBEncoder) or 'vae' (StabilityVAEEncoder)."""
    interface = dict(img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim)
    precond = _record(net, dtype, {**network_kwargs, **interface, "use_fp16": True})
    precond.state.update(interface, use_fp16=True, sigma_data=net.sigma_data)
    unet_kwargs = {key: value for key, value in network_kwargs.items() if key not in ("sigma_data", "logvar_channels")}
    precond.state["_modules"]["unet"] = _record(net.unet, dtype, {**interface, **unet_kwargs})
    if precond_class:
        precond.class_name = precond_class
    if encoder == "rgb":
        encoder_record = _Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}))
    else:
        std = np.float32(0.5) / np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32)
        encoder_record = _Persistent("StabilityVAEEncoder", dict(
            vae_name="stabilityai/sd-vae-ft-mse", scale=std, bias=np.float32(0) - np.array(
                [5.81, 3.25, 0.12, -2.15], dtype=np.float32) * std, batch_size=8, _vae=None,
            _init_args=(), _init_kwargs={}))
    snapshot = EasyDict(
        encoder=encoder_record,
        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="img64.zip", use_labels=True),
        loss_fn=_Persistent("EDM2Loss", dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5, _init_args=(), _init_kwargs={})),
    )
    snapshot["ema"] = precond
    with _fake_persistence_module(), _fake_dnnlib(), open(path, "wb") as handle:
        pickle.dump(snapshot, handle)
