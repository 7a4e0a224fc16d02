"""Read pickle files without running code from them: plain data and numpy arrays of chosen dtypes.

``pickle.load`` calls whatever callable a file names (``os.system`` included), so a file dbx did
not write in this process, such as a CIFAR batch from a mirror, is never read with it.
``load_plain`` rebuilds dicts, lists, tuples, sets, str, bytes, numbers, bools and None (the
pickle opcodes for those call nothing), plus:

- the numpy callables that rebuild an ndarray (``_reconstruct``, ``ndarray``, ``dtype``,
  ``_frombuffer``), each checked: only a plain ``ndarray`` of one of the allowed dtypes;
- ``_codecs.encode(text, "latin1")``, which is how Python 3 writes ``bytes`` in protocol 2.

Any other name a file asks for is refused with ``UnsafePickle`` before anything is called, and
the result is walked once more so that no array of another dtype gets through.
"""
from __future__ import annotations

import pickle
from typing import IO, Any, Callable, Iterable

import numpy as np

__all__ = ["UnsafePickle", "load_plain", "numpy_array_globals"]


class UnsafePickle(pickle.UnpicklingError):
    """The file asks for something plain data never needs. ``refused`` names it."""

    def __init__(self, refused: str) -> None:
        super().__init__(f"refused {refused}")
        self.refused = refused


def numpy_array_globals(dtypes: Iterable[Any]) -> dict[str, Callable[..., Any]]:
    """Checked stand-ins for the numpy names a pickled ndarray uses, by ``module.name``.

    numpy writes ``numpy._core...`` since 2.0 and ``numpy.core...`` before; both are mapped.
    """
    allowed = {np.dtype(d) for d in dtypes}
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce__()[0]  # numpy's own, wherever this version keeps it
    frombuffer = probe.__reduce_ex__(5)[0]

    def rebuild(subtype: Any, shape: Any, placeholder: Any) -> np.ndarray:
        if subtype is not np.ndarray:
            raise UnsafePickle(f"an ndarray subclass {subtype!r}")
        return reconstruct(np.ndarray, shape, placeholder)  # an empty array that BUILD then fills

    def dtype(*args: Any) -> np.dtype:
        made = np.dtype(*args)
        if made not in allowed:
            raise UnsafePickle(f"a numpy array of dtype {made} (allowed: {', '.join(sorted(map(str, allowed)))})")
        return made

    def from_buffer(buffer: Any, kind: Any, shape: Any, order: Any) -> np.ndarray:
        return frombuffer(buffer, dtype(kind), shape, order)

    names: dict[str, Callable[..., Any]] = {"numpy.ndarray": np.ndarray, "numpy.dtype": dtype}
    for package in ("numpy._core", "numpy.core"):
        names[f"{package}.multiarray._reconstruct"] = rebuild
        names[f"{package}.numeric._frombuffer"] = from_buffer
    return names


def _latin1_bytes(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise UnsafePickle(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _Restricted(pickle.Unpickler):
    def __init__(self, handle: IO[bytes], names: dict[str, Callable[..., Any]], encoding: str) -> None:
        super().__init__(handle, encoding=encoding)
        self._names = names

    def find_class(self, module: str, name: str) -> Any:  # every GLOBAL, STACK_GLOBAL, INST, EXT
        found = self._names.get(f"{module}.{name}")
        if found is None:
            raise UnsafePickle(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle(f"a persistent id {pid!r}")


def load_plain(handle: IO[bytes], *, array_dtypes: Iterable[Any] = (), encoding: str = "latin1") -> Any:
    """Unpickle ``handle`` admitting only plain data and ndarrays of ``array_dtypes``.

    ``encoding`` decodes Python 2 ``str`` objects (latin1 also keeps numpy's Python 2 arrays
    intact). Raises ``UnsafePickle`` naming what was refused; nothing it names is ever called.
    """
    allowed = tuple(np.dtype(d) for d in array_dtypes)
    names = {"_codecs.encode": _latin1_bytes, **(numpy_array_globals(allowed) if allowed else {})}
    value = _Restricted(handle, names, encoding).load()
    _check_arrays(value, allowed)
    return value


def _check_arrays(value: Any, allowed: tuple[np.dtype, ...]) -> None:
    """A last look: every array in the result has an allowed dtype (``BUILD`` could set another)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, np.ndarray):
            if item.dtype not in allowed:
                raise UnsafePickle(f"a numpy array of dtype {item.dtype}")
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(i for i in item if not isinstance(i, (int, float, str, bytes)))
