"""Test helpers: EDM's network-pickle format written without EDM's code, and DDPM++ re-derived from its equations.

``write_edm_pickle`` emits what ``pickle.dump(dict(ema=EDMPrecond(...), ...))`` emits in NVlabs/edm:
each persistent module as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the
module's ``__dict__`` as ``meta['state']`` (parameters, buffers, children, constructor arguments,
numpy scalars such as ``skip_scale``), and EDM's ``enc``/``dec`` as plain ``torch.nn.ModuleDict``
objects (NEWOBJ + BUILD). The embedded module source raises if it is ever executed.

``ddpmpp_reference`` computes the DDPM++ forward pass from a state dict with bare functional ops
(nearest-neighbour upsampling, 2x2 average pooling, per-pixel attention), independently of
``cmscale.models.edm_networks``.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn import functional as F

NEVER_RUN_SOURCE = "raise RuntimeError('the pickled module source was executed')\n"


class _Persistent:
    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=NEVER_RUN_SOURCE, class_name=self.class_name, state=self.state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


class _ModuleDictLike:
    """Pickles as a real ``torch.nn.ModuleDict`` (NEWOBJ of that class, then BUILD with the state)."""

    def __init__(self, state: dict):
        self.state = state

    @property
    def __class__(self):  # pickle checks that __newobj__'s class is the object's class
        return torch.nn.ModuleDict

    def __reduce_ex__(self, protocol):
        import copyreg

        return (copyreg.__newobj__, (torch.nn.ModuleDict,), self.state)


@contextmanager
def _fake_persistence_module():
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: the importer must not resolve to it
        raise AssertionError("EDM's reconstruct function was called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    with installed_modules({"torch_utils": package, "torch_utils.persistence": module}):
        yield


@contextmanager
def installed_modules(modules: dict[str, types.ModuleType]):
    """``modules`` in sys.modules for the block (pickle resolves the forged classes there), then as before."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def _module_state(**extra) -> dict:
    state = {
        "training": False,
        "_parameters": OrderedDict(),
        "_buffers": OrderedDict(),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": OrderedDict(),
        "_forward_hooks": OrderedDict(),
        "_forward_pre_hooks": OrderedDict(),
        "_state_dict_hooks": OrderedDict(),
        "_load_state_dict_pre_hooks": OrderedDict(),
        "_modules": OrderedDict(),
    }
    state.update(extra)
    return state


def _class_of(name: str) -> str:
    if name.startswith("norm") or name.endswith("_aux_norm"):
        return "GroupNorm"
    if name in ("affine", "map_layer0", "map_layer1", "map_augment"):
        return "Linear"
    if name in ("conv0", "conv1", "skip", "qkv", "proj") or name.endswith("_conv"):
        return "Conv2d"
    return "UNetBlock"


def _records(tree: dict, name: str, class_name: str):
    state = _module_state(_init_args=(), _init_kwargs={})
    for key, value in tree.items():
        if isinstance(value, dict):
            state["_modules"][key] = _records(value, key, "ModuleDict" if key in ("enc", "dec") else _class_of(key))
        elif key == "resample_filter":
            state["_buffers"][key] = value
        else:
            state["_parameters"][key] = torch.nn.Parameter(value, requires_grad=False)
    if class_name == "Conv2d":
        state["_buffers"].setdefault("resample_filter", None)
    if class_name == "UNetBlock":
        state["skip_scale"] = np.float64(np.sqrt(0.5))  # EDM stores numpy scalars in the state
    if class_name == "ModuleDict":
        return _ModuleDictLike(state)
    return _Persistent(class_name, state)


def write_edm_pickle(
    path,
    state_dict: dict,
    model_kwargs: dict,
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    sigma_data: float = 0.5,
    model_class: str = "SongUNet",
    precond: str = "EDMPrecond",
) -> None:
    """An EDM training snapshot ``dict(ema=..., loss_fn=..., augment_pipe=None, dataset_kwargs=...)``."""
    tree: dict = {}
    for key, value in state_dict.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.detach().clone()
    model = _records(tree, "model", model_class)
    model.state["_modules"]["map_noise"] = _Persistent(
        "PositionalEmbedding", _module_state(num_channels=8, endpoint=True)
    )
    model.state["_init_kwargs"] = dict(
        img_resolution=img_resolution,
        in_channels=img_channels,
        out_channels=img_channels,
        label_dim=label_dim,
        **model_kwargs,
    )
    ema_state = _module_state(
        img_resolution=img_resolution,
        img_channels=img_channels,
        label_dim=label_dim,
        use_fp16=False,
        sigma_min=0,
        sigma_max=float("inf"),
        sigma_data=sigma_data,
        _init_args=(),
        _init_kwargs=dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, model_type=model_class
        ),
    )
    ema_state["_modules"]["model"] = model
    snapshot = dict(
        ema=_Persistent(precond, ema_state),
        loss_fn=_Persistent(
            "EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=sigma_data, _init_args=(), _init_kwargs={})
        ),
        augment_pipe=None,
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip"),
    )
    with _fake_persistence_module(), open(path, "wb") as handle:
        pickle.dump(snapshot, handle)


def ddpmpp_reference(
    sd: dict,
    x: torch.Tensor,
    c_noise: torch.Tensor,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_blocks: int,
    attn_resolutions: tuple[int, ...],
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDPM++ (EDM's SongUNet; class-conditional with one-hot ``labels``) from its layer equations and a state dict."""

    def conv(prefix, h, up=False, down=False):
        if up:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        if down:
            h = F.avg_pool2d(h, 2)
        weight = sd.get(prefix + ".weight")
        return h if weight is None else F.conv2d(h, weight, sd[prefix + ".bias"], padding=weight.shape[-1] // 2)

    def norm(prefix, h):
        return F.group_norm(h, min(32, h.shape[1] // 4), sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)

    def linear(prefix, h):
        return h @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    def block(prefix, h, emb, up=False, down=False, attention=False):
        out = conv(prefix + ".conv0", F.silu(norm(prefix + ".norm0", h)), up, down)
        out = F.silu(norm(prefix + ".norm1", out + linear(prefix + ".affine", emb)[:, :, None, None]))
        out = conv(prefix + ".conv1", out)
        skip = conv(prefix + ".skip", h, up, down) if prefix + ".skip.weight" in sd else h
        h = (out + skip) / math.sqrt(2)
        if attention:
            batch, channels, height, width = h.shape
            qkv = conv(prefix + ".qkv", norm(prefix + ".norm2", h)).reshape(batch, channels, 3, height * width)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(channels), dim=2)
            attended = torch.einsum("bij,bcj->bci", weights, v).reshape(h.shape)
            h = (conv(prefix + ".proj", attended) + h) / math.sqrt(2)
        return h

    half = model_channels // 2
    freqs = (1 / 10_000) ** (torch.arange(half, dtype=x.dtype) / (half - 1))
    angles = c_noise[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if labels is not None:  # EDM's conditional DDPM++: one-hot labels times sqrt(label_dim), added to the noise
        emb = emb + linear("map_label", labels * math.sqrt(labels.shape[1]))
    emb = F.silu(linear("map_layer1", F.silu(linear("map_layer0", emb))))

    resolution = x.shape[-1]
    h = conv(f"enc.{resolution}x{resolution}_conv", x)
    skips = [h]
    for level in range(len(channel_mult)):
        res = resolution >> level
        if level > 0:
            h = block(f"enc.{res}x{res}_down", h, emb, down=True)
            skips.append(h)
        for index in range(num_blocks):
            h = block(f"enc.{res}x{res}_block{index}", h, emb, attention=res in attn_resolutions)
            skips.append(h)
    for level in reversed(range(len(channel_mult))):
        res = resolution >> level
        if level == len(channel_mult) - 1:
            h = block(f"dec.{res}x{res}_in0", h, emb, attention=True)
            h = block(f"dec.{res}x{res}_in1", h, emb)
        else:
            h = block(f"dec.{res}x{res}_up", h, emb, up=True)
        for index in range(num_blocks + 1):
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(
                f"dec.{res}x{res}_block{index}", h, emb, attention=index == num_blocks and res in attn_resolutions
            )
    return conv(f"dec.{resolution}x{resolution}_aux_conv", F.silu(norm(f"dec.{resolution}x{resolution}_aux_norm", h)))
