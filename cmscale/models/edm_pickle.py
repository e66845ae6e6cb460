"""EDM's and EDM2's network pickles read as data, without running EDM's code.

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

EDM2 snapshots (NVlabs/edm2 ``training_loop.py``, ``reconstruct_phema.py``) are an ``EasyDict``
with ``ema`` (the network, in float16), ``encoder``, ``loss_fn`` and ``dataset_kwargs``: the same
persistence records. :class:`ImportedNetwork` is what an import of either makes of them
(:mod:`cmscale.models.edm_import`, :mod:`cmscale.models.edm2_import`).
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def plain_data(value: Any) -> Any:
    """Constructor arguments as plain JSON-like data (EasyDicts to dicts, tuples to lists)."""
    if isinstance(value, dict):
        return {str(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars (EDM2's encoder constants, EDM's skip_scale)
        return plain_data(value.tolist())
    return repr(value)


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

