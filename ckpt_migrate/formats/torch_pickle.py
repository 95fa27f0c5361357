"""A small ``torch.save`` pickle decoded and pickled again without importing torch.

For Trainer files of a few KB (``rng_state.pth``) importing torch costs more than everything else a ``fix`` does
(about 3 CPU-seconds and 190 MB here). A tensor is then a :class:`TensorRef` (its storage's persistent id,
offset, size, stride) and a storage a :class:`StorageRef`; their bytes stay in the archive's records, which the
writer copies (:func:`~ckpt_migrate.formats.torch_archive.write_pickled`).

Decoding uses :class:`pickle.Unpickler` with ``find_class`` restricted to exactly the globals the caller allows
(Python's documented way of restricting globals; torch's weights-only unpickler does the same): torch's tensor
rebuild and storage classes become the stand-ins below, nothing of torch is imported or called. Pickling uses
Python's pickler (protocol 2, as ``torch.save``) with torch's reduce of each tensor and torch's persistent id of
each storage, the torch globals written by name: the same bytes ``torch.save`` pickles for the same object
(``tests/test_m0004_portable_rng_state.py`` compares them on every fixture).
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
STORAGE_TYPES = frozenset(
    f"torch.{kind}Storage"
    for kind in ("Byte", "Char", "Bool", "Short", "Int", "Long", "Half", "BFloat16", "Float", "Double")
)


class TorchGlobal:
    """A torch global named by a pickle (``torch.ByteStorage``, torch's rebuild function): its name only."""

    _made: dict[str, TorchGlobal] = {}

    def __init__(self, qualified: str):
        self.module, self.name = qualified.rsplit(".", 1)

    @classmethod
    def named(cls, qualified: str) -> TorchGlobal:
        """One object per name: the pickler memoizes it, as it memoizes torch's one class object."""
        if qualified not in cls._made:
            cls._made[qualified] = cls(qualified)
        return cls._made[qualified]

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"

    def __call__(self, *args: Any) -> Any:  # callable, as the pickler requires of a reduce's function; never called
        raise RefusedPickle(f"{self!r} is not called without torch")


@dataclass(frozen=True)
class StorageRef:
    """A storage's persistent id: ``("storage", torch.<Kind>Storage, key, location, numel)``."""

    kind: TorchGlobal
    key: str
    location: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())``."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool


class RefusedPickle(ValueError):
    """The pickle is not a plain weights-only ``torch.save`` of the allowed globals."""


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, *rest: Any):
    if not isinstance(storage, StorageRef) or rest or hooks != OrderedDict():
        raise RefusedPickle("a tensor with metadata or backward hooks, or without a storage")
    if not isinstance(offset, int) or not all(isinstance(v, tuple) for v in (size, stride)):
        raise RefusedPickle("a tensor with a malformed offset, size or stride")
    return TensorRef(storage, offset, size, stride, bool(requires_grad))


def loads(data: bytes, allowed: dict[str, Any]) -> Any:
    """Decode ``data.pkl``: ``allowed`` maps each further admitted global's ``module.name`` to its object;
    torch's rebuild and storage classes (as stand-ins) and ``collections.OrderedDict`` are always admitted.
    Anything else raises :class:`RefusedPickle`."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            qualified = f"{module}.{name}"
            if qualified == REBUILD_TENSOR:
                return _rebuild_tensor
            if qualified in STORAGE_TYPES:
                return TorchGlobal.named(qualified)
            if qualified == "collections.OrderedDict":  # a tensor's (empty) backward hooks
                return OrderedDict
            if qualified in allowed:
                return allowed[qualified]
            raise RefusedPickle(f"global {qualified} is not allowed")

        def persistent_load(self, pid: Any) -> StorageRef:
            valid = (
                isinstance(pid, tuple)
                and len(pid) == 5
                and pid[0] == "storage"
                and isinstance(pid[1], TorchGlobal)
                and all(isinstance(v, t) for v, t in zip(pid[2:], (str, str, int), strict=True))
            )
            if not valid:
                raise RefusedPickle(f"persistent id {pid!r} is not a torch storage")
            return StorageRef(*pid[1:])

    try:
        return Restricted(io.BytesIO(data)).load()
    except RefusedPickle:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure of the restricted decode: not a plain torch pickle
        raise RefusedPickle(f"cannot decode: {exc}") from None


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch can write a global it cannot import
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=2)
        self.sources: list[str] = []  # the source key of each new storage key, in order
        self._keys: dict[StorageRef, str] = {}
        self._locations: dict[str, str] = {}

    def save_torch_global(self, obj: TorchGlobal) -> None:
        # what pickle.save_global writes for a class or function under protocol 2, then memoizes
        self.write(pickle.GLOBAL + obj.module.encode("ascii") + b"\n" + obj.name.encode("ascii") + b"\n")
        self.memoize(obj)

    dispatch[TorchGlobal] = save_torch_global

    def persistent_id(self, obj: Any) -> tuple | None:
        if type(obj) is not StorageRef:
            return None
        if obj not in self._keys:  # torch.save numbers storages in the order it meets them
            self._keys[obj] = str(len(self.sources))
            self.sources.append(obj.key)
        # torch's location is its own "cpu" literal: one object for every storage, never a "cpu" of the data
        location = self._locations.setdefault(obj.location, obj.location.encode("utf-8").decode("utf-8"))
        return ("storage", obj.kind, self._keys[obj], location, obj.numel)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is TensorRef:
            args = (obj.storage, obj.offset, obj.size, obj.stride, obj.requires_grad, OrderedDict())
            return TorchGlobal.named(REBUILD_TENSOR), args
        return NotImplemented


def dumps(obj: Any) -> tuple[bytes, list[str]]:
    """``data.pkl`` for ``obj`` as ``torch.save`` pickles it, and the source key of each new storage key."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.sources


#: ``_codecs.encode``: how protocol 2 pickles ``bytes`` (numpy's array state holds its raw bytes so).
CODECS_ENCODE = {"_codecs.encode": codecs.encode}
