"""Reading pickles that cmscale did not write (EDM network pickles, CIFAR-10 batches, reference
statistics) without running code from them and without unbounded work.

:class:`BoundedUnpickler` resolves only the globals of an allow-list (anything else could run code)
and bounds the work a small file can ask for, each bound checked before the cost is paid:

- the stream is scanned first (``pickletools.genops``, which builds nothing): at most
  :data:`MAX_OPS` opcodes, memo indices below :data:`MAX_MEMO` (a single ``LONG_BINPUT 2**32-1``
  would make the C unpickler allocate a 32 GiB memo) and nesting below :data:`MAX_DEPTH`;
- the loaded object is walked once, iteratively, as every later reader would walk it (shared
  references counted each time they are reached): a list that contains itself is refused, and so
  is a graph of more than :data:`MAX_NODES` nodes, the 896-byte "billion laughs" list DAG (each
  list holding the one before twice), which loads in microseconds and expands to 2**n nodes.
"""

from __future__ import annotations

import pickle
import pickletools
from typing import Any

MAX_OPS = 50_000_000  # opcodes in one file (an EDM2-XXL pickle has about 20,000)
MAX_MEMO = 10_000_000  # memo index
MAX_DEPTH = 1_000  # nesting of containers (a network state is about 10 deep)
MAX_NODES = 2_000_000  # objects reached walking the result (EDM's largest network: about 30,000)

MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
LEAF_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None), type)


class PickleBoundsError(ValueError):
    """A pickle asks for more work than any file of its kind needs; the message names the file."""


def numpy_array_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array names (numpy 1 and 2 spell the module differently)."""
    import numpy

    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): numpy.ndarray, ("numpy", "dtype"): numpy.dtype,
                                           ("_codecs", "encode"): _latin1_bytes}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickles of bytes written under protocol 2 use it: latin-1 text to bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}): only latin-1 text")
    return text.encode("latin-1")


def check_stream(file: Any, source: str) -> None:
    """Scan the pickle at ``file``'s position without building anything; the position is kept."""
    start = file.tell()
    ops = memoised = depth = 0
    try:
        for opcode, arg, _ in pickletools.genops(file):
            ops += 1
            if ops > MAX_OPS:
                raise PickleBoundsError(f"{source}: more than {MAX_OPS:,} pickle opcodes; not a file of this kind")
            if opcode.name in MEMO_OPS or opcode.name == "MEMOIZE":
                memoised += 1
                index = arg if isinstance(arg, int) else memoised
                if index >= MAX_MEMO:
                    raise PickleBoundsError(f"{source}: pickle memo index {index:,} is above {MAX_MEMO:,}; the file "
                                            "is crafted or damaged")
            if opcode.name == "MARK":
                depth += 1
                if depth > MAX_DEPTH:
                    raise PickleBoundsError(f"{source}: pickle nested deeper than {MAX_DEPTH} levels; the file is "
                                            "crafted or damaged")
            elif pickletools.markobject in opcode.stack_before:
                depth -= 1
    except ValueError as error:  # a truncated or malformed stream: the load itself reports it
        if isinstance(error, PickleBoundsError):
            raise
    finally:
        file.seek(start)


def check_graph(obj: Any, source: str) -> None:
    """Walk ``obj`` as a reader would (iteratively): refuse cycles, and more than MAX_NODES nodes
    or MAX_DEPTH levels, naming ``source``."""
    nodes = 0
    path: set[int] = set()
    stack: list[tuple[Any, Any]] = [(obj, iter(_children(obj)))]
    path.add(id(obj))
    while stack:
        parent, children = stack[-1]
        child = next(children, _END)
        if child is _END:
            stack.pop()
            path.discard(id(parent))
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise PickleBoundsError(
                f"{source}: the pickled object reaches more than {MAX_NODES:,} nodes (shared references counted "
                "where they are reached, as a reader walks them); no file of this kind holds that many: it is "
                "crafted (a 'billion laughs' graph) or damaged")
        if isinstance(child, LEAF_TYPES) or not _is_container(child):
            continue
        if id(child) in path:
            raise PickleBoundsError(f"{source}: a pickled {type(child).__name__} contains itself; no file of this "
                                    "kind does: it is crafted or damaged")
        if len(stack) >= MAX_DEPTH:
            raise PickleBoundsError(f"{source}: pickled objects nested deeper than {MAX_DEPTH} levels")
        path.add(id(child))
        stack.append((child, iter(_children(child))))


_END = object()


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (list, tuple, dict, set, frozenset)) or (
        hasattr(obj, "__dict__") and not hasattr(obj, "__array__") and not _is_tensor(obj))


def _is_tensor(obj: Any) -> bool:
    module = type(obj).__module__
    return module.startswith("torch") or module.startswith("numpy")


def _children(obj: Any) -> Any:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield value
        if type(obj) is not dict and getattr(obj, "__dict__", None):
            yield from vars(obj).values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif hasattr(obj, "__dict__"):
        yield from vars(obj).values()


class BoundedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed`` globals ({(module, name): object}) and bounds the
    work a file can ask for (:func:`check_stream` before loading, :func:`check_graph` after)."""

    refused_hint = "only plain containers and the listed types are accepted"

    def __init__(self, file: Any, source: str, allowed: dict[tuple[str, str], Any] | None = None, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.file = file
        self.source = source
        self.allowed = dict(allowed or {})

    def find_class(self, module: str, name: str) -> Any:
        target = self.allowed.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load {module}.{name}: unpickling it could execute code; "
                f"{self.refused_hint}")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self.source}: persistent id {pid!r}: not a plain pickle")

    def load(self) -> Any:
        if self.file.seekable():
            check_stream(self.file, self.source)
        obj = super().load()
        check_graph(obj, self.source)
        return obj
