"""Import EDM's published network pickles as cmscale teacher checkpoints, without running EDM's code.

EDM (NVlabs/edm) saves ``network-snapshot-*.pkl`` as ``pickle.dump(dict(ema=..., loss_fn=...,
augment_pipe=..., dataset_kwargs=...))``. Every network class there is wrapped by EDM's
``torch_utils.persistence``, which pickles an instance as a call

    torch_utils.persistence._reconstruct_persistent_obj(meta),
    meta = {type: 'class', version, module_src: <source of the whole module>, class_name, state}

where ``state`` is the module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, and the
constructor arguments ``_init_args``/``_init_kwargs``). Unpickling it normally *executes*
``module_src``. Here a restricted unpickler resolves only an allow-list of globals: that one
persistence call (turned into an inert :class:`PersistentRecord`, its source kept as text and
never run), torch's tensor and storage rebuilders (storages are read with ``torch.load(...,
weights_only=True)``), numpy's array rebuilders, and plain containers. Any other global -- the way
a pickle runs code -- is refused with :class:`EDMPickleError` before anything is called.

The network inside ``ema`` (an ``EDMPrecond`` around a ``SongUNet`` or ``DhariwalUNet``, or EDM2's
``Precond`` around its ``UNet``) becomes a cmscale checkpoint:

    {'net': state dict (EDM's / EDM2's own keys), 'preset' (a matching preset, or None), 'resolution',
     'img_channels', 'label_dim', 'sigma_data', 'method': 'edm',
     'architecture': {'family', 'kwargs'} (rebuilds the network whatever its width and depth),
     'encoder': EDM2's data encoder (class, and for the SD-VAE one its name, scale and bias) or None,
     'source': {file name, sha256, classes and constructor arguments}}

which ``teacher_ckpt`` accepts for ECT (initialisation) and sCD (teacher), and
:func:`cmscale.teacher.load_denoiser` turns into a denoiser module. EDM2 snapshots (NVlabs/edm2
``training_loop.py``, ``reconstruct_phema.py``) are an ``EasyDict`` with ``ema`` (the network, in
float16), ``encoder``, ``loss_fn`` and ``dataset_kwargs``: the same persistence records.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmscale.models.edm2 import EDM2Net
from cmscale.models.presets import PRESETS, build_network, get_preset
from cmscale.safe_pickle import BoundedUnpickler, PickleBoundsError


class EDMPickleError(ValueError):
    """An EDM pickle that cannot (or must not) be imported; the message names the file and the fix."""


@dataclass
class PersistentRecord:
    """An EDM persistent object as data: its class name, its state, and its source (never executed)."""

    class_name: str
    state: dict
    module_src: str
    version: Any


class _EasyDict(dict):
    """Stands in for ``dnnlib.util.EasyDict`` (a dict subclass) inside constructor arguments."""


class ContainerRecord:
    """A torch container module (ModuleDict, ...) as data: only its state is kept."""

    class_name = "container"

    def __init__(self) -> None:
        self.state: dict = {}

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise EDMPickleError(f"a {self.class_name} without a state dict")
        self.state = dict(state)


def _container_reconstructor(cls, base, state):
    # Protocol 0/1 spelling of 'make an empty instance of cls'; only the inert container records qualify.
    if not (isinstance(cls, type) and issubclass(cls, ContainerRecord)) or state is not None:
        raise EDMPickleError(f"copyreg._reconstructor of {cls!r}: only torch container modules are accepted")
    return cls()


def _persistent_record(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise EDMPickleError("a torch_utils.persistence record without type 'class' and a class_name")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise EDMPickleError(f"the persistence record of {meta['class_name']} has no state dict")
    return PersistentRecord(meta["class_name"], dict(state), str(meta.get("module_src", "")), meta.get("version"))


def _storage_from_bytes(data: bytes):
    # torch pickles a storage as torch.save(storage) bytes; read them with torch's own safe loader.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parameter_data(data: torch.Tensor, requires_grad: bool = False, backward_hooks: Any = None, state: Any = None):
    return data


def _tensor_of_type(func, new_type, args, state=None):
    return func(*args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _parameter_data,
        ("torch._utils", "_rebuild_parameter_with_state"): _parameter_data,
        ("torch._tensor", "_rebuild_from_type_v2"): _tensor_of_type,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("dnnlib.util", "EasyDict"): _EasyDict,
    }
    for name in ("float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    import numpy

    try:  # numpy 2 moved the array rebuilders to numpy._core; pickles name either module
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = numpy.ndarray
    allowed[("numpy", "dtype")] = numpy.dtype
    # torch containers are the only non-persistent modules in EDM's networks (enc/dec are ModuleDicts);
    # they arrive as NEWOBJ + BUILD (or copyreg._reconstructor) and become inert ContainerRecords.
    for module, name in (
        ("torch.nn.modules.container", "ModuleDict"),
        ("torch.nn.modules.container", "ModuleList"),
        ("torch.nn.modules.container", "Sequential"),
    ):
        allowed[(module, name)] = type(name, (ContainerRecord,), {"class_name": name})
    allowed[("copyreg", "_reconstructor")] = _container_reconstructor
    return allowed


class RestrictedUnpickler(BoundedUnpickler):
    """Resolves only allow-listed globals; anything else would run code and is refused. The work a
    file can ask for is bounded (pickle depth, node count and memo size: cmscale.safe_pickle)."""

    def __init__(self, file, source: str):
        super().__init__(file, source, _allowed_globals())

    def find_class(self, module: str, name: str) -> Any:
        target = self.allowed.get((module, name))
        if target is None:
            raise EDMPickleError(
                f"{self.source}: refusing to load {module}.{name}: unpickling it could execute code. cmscale reads "
                "EDM network pickles without running them and accepts only tensors, arrays, plain containers and "
                "EDM's torch_utils.persistence records. Import a network pickle written by NVlabs/edm "
                "(e.g. edm-cifar10-32x32-uncond-vp.pkl), or convert other files to a state dict yourself"
            )
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise EDMPickleError(
            f"{self.source}: persistent id {pid!r} found: this is a torch.save file, not an EDM "
            "network pickle; pass it as teacher_ckpt directly if it holds a cmscale checkpoint"
        )


def read_edm_pickle(path: str | Path) -> Any:
    """The top-level object of an EDM pickle, with persistent objects as :class:`PersistentRecord`."""
    path = Path(path)
    if not path.is_file():
        raise EDMPickleError(f"{path}: EDM network pickle not found (download it first, see README 'Start from EDM')")
    with path.open("rb") as handle:
        try:
            return RestrictedUnpickler(handle, str(path)).load()
        except EDMPickleError:
            raise
        except PickleBoundsError as error:
            raise EDMPickleError(str(error)) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError) as error:
            raise EDMPickleError(
                f"{path}: not a readable EDM network pickle ({type(error).__name__}: {error})"
            ) from None


def record_tensors(record: PersistentRecord | ContainerRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a persistent module record: parameters and persistent buffers, recursively."""
    state = record.state
    tensors: dict[str, torch.Tensor] = {}
    skipped = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is not None and name not in skipped:
                tensors[prefix + name] = value.detach().clone()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, (PersistentRecord, ContainerRecord)):
            tensors.update(record_tensors(child, f"{prefix}{name}."))
        elif child is not None:
            raise EDMPickleError(f"module {prefix}{name} is not an EDM persistent module ({type(child).__name__})")
    return tensors


def _plain(value: Any) -> Any:
    """Constructor arguments as plain JSON-like data (EasyDicts to dicts, tuples to lists)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars (EDM2's encoder constants, EDM's skip_scale)
        return _plain(value.tolist())
    return repr(value)


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


# EDM2's constructor arguments (training/networks_edm2.py): Precond's own, and those it passes to UNet and Block.
_EDM2_PRECOND_ARGS = ("use_fp16", "sigma_data", "logvar_channels")
_EDM2_UNET_ARGS = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
                   "attn_resolutions", "label_balance", "concat_balance", "resample_filter", "channels_per_head",
                   "dropout", "res_balance", "attn_balance", "clip_act")
_EDM2_ENCODERS = ("StandardRGBEncoder", "StabilityVAEEncoder")


@dataclass
class ImportedNetwork:
    preset: str | None
    resolution: int
    img_channels: int
    sigma_data: float
    state_dict: dict[str, torch.Tensor]
    network_class: str
    network_kwargs: dict
    notes: list[str]
    architecture: dict | None = None  # {'family', 'kwargs'}: build_network rebuilds it
    label_dim: int = 0
    encoder: dict | None = None


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
            meta[key] = _plain(encoder.state[key])
    return meta


def _import_edm2(top: Any, precond: PersistentRecord, source: str) -> ImportedNetwork:
    """EDM2's Precond: the architecture from its recorded constructor arguments, the weights loaded strictly."""
    unet = precond.state["_modules"]["unet"]
    recorded = _plain(unet.state.get("_init_kwargs") or {})
    outer = _plain(precond.state.get("_init_kwargs") or {})
    for name, value in (("img_resolution", precond.state.get("img_resolution")),
                        ("img_channels", precond.state.get("img_channels")),
                        ("label_dim", precond.state.get("label_dim"))):
        recorded.setdefault(name, outer.get(name, _plain(value)))
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


def import_edm_network(path: str | Path) -> ImportedNetwork:
    """Read an EDM pickle safely and map its network onto a cmscale preset (checked by a strict load)."""
    source = str(path)
    top = read_edm_pickle(path)
    precond = _network_record(top, source)
    if precond.class_name == "Precond":
        return _import_edm2(top, precond, source)
    state = precond.state
    model = (state.get("_modules") or {}).get("model")
    if not isinstance(model, PersistentRecord):
        raise EDMPickleError(f"{source}: EDMPrecond has no 'model' network")
    label_dim = int(state.get("label_dim") or 0)
    recorded = _plain(model.state.get("_init_kwargs") or {})
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
