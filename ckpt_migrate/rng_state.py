"""Read a Trainer ``rng_state*.pth`` without running its pickle, and rewrite it in a portable form.

``transformers.Trainer`` saves ``{"python": random.getstate(), "numpy": np.random.get_state(),
"cpu": torch.random.get_rng_state(), ["cuda": ...]}`` with ``torch.save``. The numpy state holds an
``ndarray``, pickled through ``numpy.core.multiarray._reconstruct`` under numpy 1 and
``numpy._core.multiarray._reconstruct`` under numpy 2 (numpy 2.0 renamed ``numpy.core``). Since torch
2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses globals it does not know:
transformers 4.x calls ``torch.load(rng_file)`` and allows no numpy global at all, transformers 5.x
allows only the ``_reconstruct`` of the numpy it runs with. So no file holding an ``ndarray`` loads
everywhere.

The portable file stores the numpy state as ``("MT19937", [624 ints], pos, has_gauss, gauss)``:
``np.random.set_state`` accepts any sequence for the key (numpy 1 and 2), and a pickle of plain
tuples, lists, ints, floats, strings and CPU tensors needs no global outside torch's default
``weights_only`` allow-list. Every other value is kept exactly.

Reading never unpickles: :func:`_parse_pickle` walks the opcodes (``pickletools.genops``) with a small
stack machine that builds inert nodes. A global outside :data:`ALLOWED_GLOBALS` is refused on sight,
and the allowed ones are never imported or called; they are only recognised by name and their
arguments decoded as data.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickletools
import re
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_migrate.errors import OutputError, UnreadableInputError

RNG_STATE_FILE = re.compile(r"^rng_state(?:_\d+)?\.pth$")
MT19937_KEY_LENGTH = 624
MAX_PICKLE_BYTES = 16 * 1024 * 1024
MAX_STORAGE_BYTES = 64 * 1024 * 1024
MAX_ARRAY_ITEMS = 1_000_000
MAX_DEPTH = 64
MAX_NODES = 1_000_000
NUMPY_CORE_PACKAGES = ("numpy.core", "numpy._core")

_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_NDARRAY = ("numpy", "ndarray")
_DTYPE = ("numpy", "dtype")
_ENCODE = ("_codecs", "encode")
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = ("collections", "OrderedDict")
# torch storage class -> (torch dtype name, element size in bytes)
_STORAGES = {
    "ByteStorage": ("uint8", 1),
    "CharStorage": ("int8", 1),
    "BoolStorage": ("bool", 1),
    "ShortStorage": ("int16", 2),
    "IntStorage": ("int32", 4),
    "LongStorage": ("int64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
}
_TORCH_GLOBALS = {_REBUILD_TENSOR, _ORDERED_DICT} | {("torch", name) for name in _STORAGES}
# Recognised by name only: nothing here is ever imported or called.
ALLOWED_GLOBALS = frozenset(_RECONSTRUCT | _SCALAR | {_NDARRAY, _DTYPE, _ENCODE} | _TORCH_GLOBALS)
# What the rewritten file may reference: all in torch's default weights_only allow-list.
PORTABLE_GLOBALS = frozenset(_TORCH_GLOBALS)
# numpy dtype kind -> struct codes by item size
_STRUCT_CODES = {
    "u": {1: "B", 2: "H", 4: "I", 8: "Q"},
    "i": {1: "b", 2: "h", 4: "i", 8: "q"},
    "f": {2: "e", 4: "f", 8: "d"},
    "b": {1: "?"},
}
_CONSTANT_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
}  # fmt: skip
_UNSET = object()


def is_rng_state_file(name: str) -> bool:
    """``rng_state.pth`` or ``rng_state_<rank>.pth`` at the top of a checkpoint."""
    return bool(RNG_STATE_FILE.match(name))


class _Refused(Exception):
    """Internal: the pickle is outside what this module reads; becomes an UnreadableInputError."""


@dataclass(eq=False)
class _Global:
    module: str
    name: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.name)


@dataclass(eq=False)
class _Call:
    """``func(*args)`` as recorded by REDUCE, with the BUILD state and SETITEMS pairs applied to it."""

    func: _Global
    args: tuple
    state: Any = _UNSET
    items: list = field(default_factory=list)


@dataclass(eq=False)
class _PersistentId:
    pid: Any


@dataclass(frozen=True)
class _DType:
    kind: str
    itemsize: int
    byteorder: str  # a struct byte-order character

    def decode(self, raw: bytes, count: int) -> list:
        if len(raw) != count * self.itemsize:
            raise _Refused(f"array data is {len(raw)} bytes, expected {count} x {self.itemsize}")
        return list(struct.unpack(f"{self.byteorder}{count}{_STRUCT_CODES[self.kind][self.itemsize]}", raw))

    @property
    def name(self) -> str:
        return f"{self.kind}{self.itemsize}"


@dataclass(frozen=True)
class _Array:
    dtype: _DType
    shape: tuple[int, ...]
    values: tuple


@dataclass(frozen=True)
class _TensorRef:
    """A tensor in the archive, by storage key; built into a torch tensor only when rewriting."""

    storage_key: str
    dtype: str
    itemsize: int
    storage_numel: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


# ---------------------------------------------------------------------------------------- archive


@dataclass
class _Archive:
    path: Path
    zf: zipfile.ZipFile
    prefix: str

    def read(self, record: str, limit: int) -> bytes:
        name = f"{self.prefix}/{record}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise UnreadableInputError(f"torch archive has no record {record!r}", self.path) from None
        if info.file_size > limit:
            raise UnreadableInputError(f"record {record!r} is {info.file_size} bytes, over {limit}", self.path)
        try:
            return self.zf.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
            raise UnreadableInputError(f"cannot read record {record!r} ({exc})", self.path) from exc

    def has(self, record: str) -> bool:
        try:
            self.zf.getinfo(f"{self.prefix}/{record}")
        except KeyError:
            return False
        return True


def _open_archive(path: Path) -> _Archive:
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UnreadableInputError("missing", path) from None
    except zipfile.BadZipFile:
        raise UnreadableInputError(
            "not a torch zip archive (torch.save before 1.6 or not a torch file); cannot read it safely", path
        ) from None
    except OSError as exc:
        raise UnreadableInputError(f"cannot read: {exc.strerror or exc}", path) from exc
    pickles = [name for name in zf.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        zf.close()
        raise UnreadableInputError("torch archive does not have exactly one data.pkl", path)
    return _Archive(path, zf, pickles[0].rsplit("/", 1)[0])


def _read_pickle_bytes(path: Path) -> bytes:
    archive = _open_archive(path)
    try:
        return archive.read("data.pkl", MAX_PICKLE_BYTES)
    finally:
        archive.zf.close()


# ----------------------------------------------------------------------------------------- parsing


def _parse_pickle(data: bytes) -> tuple[Any, list[tuple[str, str]]]:
    """Run the pickle's opcodes on inert values; return the result tree and the globals it names.

    Raises :class:`_Refused` for an opcode outside the supported subset or a global outside
    :data:`ALLOWED_GLOBALS`, at the point it appears. Nothing from the pickle is imported or called.
    """
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    seen: list[tuple[str, str]] = []

    def pop_mark() -> list[Any]:
        nonlocal stack
        items = stack
        stack = metastack.pop()
        return items

    def push_global(module: Any, name: Any) -> None:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Refused("global with a non-string name")
        if (module, name) not in ALLOWED_GLOBALS:
            raise _Refused(f"pickle references {module}.{name}, which is not an allowed global")
        seen.append((module, name))
        stack.append(_Global(module, name))

    def set_item(target: Any, key: Any, value: Any) -> None:
        if isinstance(target, dict):
            target[key] = value
        elif isinstance(target, _Call) and target.func.key == _ORDERED_DICT:
            target.items.append((key, value))
        else:
            raise _Refused("SETITEM on something that is not a dict")

    try:
        for opcode, arg, _ in pickletools.genops(data):
            op = opcode.name
            if op in _CONSTANT_OPS:
                stack.append(arg)
            elif op == "PROTO":
                if arg > 5:
                    raise _Refused(f"pickle protocol {arg} is not supported")
            elif op == "FRAME":
                pass
            elif op == "NONE":
                stack.append(None)
            elif op in ("NEWTRUE", "NEWFALSE"):
                stack.append(op == "NEWTRUE")
            elif op == "EMPTY_DICT":
                stack.append({})
            elif op == "EMPTY_LIST":
                stack.append([])
            elif op == "EMPTY_TUPLE":
                stack.append(())
            elif op == "MARK":
                metastack.append(stack)
                stack = []
            elif op == "TUPLE":
                items = pop_mark()
                stack.append(tuple(items))
            elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(op[-1])
                if len(stack) < count:
                    raise _Refused("malformed pickle (stack underflow)")
                items = stack[-count:]
                del stack[-count:]
                stack.append(tuple(items))
            elif op == "LIST":
                stack.append(pop_mark())
            elif op == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            elif op == "APPEND":
                value = stack.pop()
                if not isinstance(stack[-1], list):
                    raise _Refused("APPEND to something that is not a list")
                stack[-1].append(value)
            elif op == "APPENDS":
                items = pop_mark()
                if not isinstance(stack[-1], list):
                    raise _Refused("APPENDS to something that is not a list")
                stack[-1].extend(items)
            elif op == "SETITEM":
                value, key = stack.pop(), stack.pop()
                set_item(stack[-1], key, value)
            elif op == "SETITEMS":
                items = pop_mark()
                if len(items) % 2:
                    raise _Refused("malformed pickle (odd SETITEMS)")
                for key, value in zip(items[::2], items[1::2], strict=True):
                    set_item(stack[-1], key, value)
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif op == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise _Refused("malformed pickle (memo key missing)")
                stack.append(memo[arg])
            elif op == "GLOBAL":
                module, _, name = arg.partition(" ")
                push_global(module, name)
            elif op == "STACK_GLOBAL":
                name, module = stack.pop(), stack.pop()
                push_global(module, name)
            elif op == "REDUCE":
                args, func = stack.pop(), stack.pop()
                if not isinstance(func, _Global) or not isinstance(args, tuple):
                    raise _Refused("REDUCE of something that is not an allowed global")
                stack.append(_Call(func, args))
            elif op == "BUILD":
                state = stack.pop()
                target = stack[-1]
                if not isinstance(target, _Call) or target.state is not _UNSET:
                    raise _Refused("BUILD on something that is not a freshly reduced object")
                target.state = state
            elif op == "BINPERSID":
                stack.append(_PersistentId(stack.pop()))
            elif op == "STOP":
                if metastack or len(stack) != 1:
                    raise _Refused("malformed pickle (unbalanced stack at STOP)")
                return stack[0], seen
            else:
                raise _Refused(f"pickle opcode {op} is not supported")
    except IndexError:
        raise _Refused("malformed pickle (stack underflow)") from None
    except (TypeError, ValueError) as exc:  # unhashable dict key, odd DICT, truncated or unknown opcode
        raise _Refused(f"malformed pickle ({exc})") from exc
    raise _Refused("malformed pickle (no STOP)")


# -------------------------------------------------------------------------------------- evaluating


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Refused(f"{what} is not an integer")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple):
        raise _Refused(f"{what} is not a tuple")
    return tuple(_int(v, what) for v in value)


def _dtype(call: _Call) -> _DType:
    if len(call.args) != 3 or not isinstance(call.args[0], str) or not isinstance(call.state, tuple):
        raise _Refused("unexpected numpy dtype pickle")
    typestr = call.args[0]
    kind, size = typestr[:1], typestr[1:]
    if kind not in _STRUCT_CODES or not size.isdigit() or int(size) not in _STRUCT_CODES[kind]:
        raise _Refused(f"numpy dtype {typestr!r} is not supported")
    order = call.state[1] if len(call.state) > 1 else None
    orders = {"<": "<", ">": ">", "|": "<", "=": "<" if sys.byteorder == "little" else ">"}
    if not isinstance(order, str) or order not in orders:
        raise _Refused(f"numpy dtype byte order {order!r} is not supported")
    return _DType(kind, int(size), orders[order])


class _Evaluator:
    """Turns the parse tree into plain values, numpy arrays into :class:`_Array`, tensors into refs.

    Counts the values it produces, so memo references cannot expand a small pickle exponentially.
    """

    def __init__(self) -> None:
        self.nodes = 0

    def value(self, node: Any, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Refused(f"pickle expands to more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise _Refused("pickle nests too deeply")
        if node is None or isinstance(node, (bool, int, float, str, bytes)):
            return node
        if isinstance(node, tuple):
            return tuple(self.value(v, depth + 1) for v in node)
        if isinstance(node, list):
            return [self.value(v, depth + 1) for v in node]
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                key = self.value(key, depth + 1)
                if not isinstance(key, (str, int)):
                    raise _Refused("dict key is not a string or integer")
                out[key] = self.value(value, depth + 1)
            return out
        if isinstance(node, _Call):
            return self.call(node, depth)
        if isinstance(node, _Global):
            raise _Refused(f"{node.module}.{node.name} appears as a value")
        raise _Refused("persistent id outside a tensor")

    def call(self, call: _Call, depth: int) -> Any:
        key = call.func.key
        if key != _ORDERED_DICT and call.items:
            raise _Refused(f"items set on {call.func.module}.{call.func.name}")
        if key == _ORDERED_DICT:
            if call.args not in ((), ([],)) or call.state not in (_UNSET, None):
                raise _Refused("unexpected OrderedDict pickle")
            result: OrderedDict = OrderedDict()
            for k, v in call.items:
                k = self.value(k, depth + 1)
                if not isinstance(k, (str, int)):
                    raise _Refused("OrderedDict key is not a string or integer")
                result[k] = self.value(v, depth + 1)
            return result
        if key == _ENCODE:
            args = call.args
            if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
                raise _Refused("_codecs.encode is allowed only as torch/numpy use it (str, 'latin1')")
            if call.state is not _UNSET:
                raise _Refused("unexpected state on _codecs.encode")
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise _Refused("_codecs.encode payload is not latin-1") from None
        if key == _DTYPE:
            return _dtype(call)
        if key in _SCALAR:
            if len(call.args) != 2 or call.state is not _UNSET:
                raise _Refused("unexpected numpy scalar pickle")
            dtype, raw = self.value(call.args[0], depth + 1), self.value(call.args[1], depth + 1)
            if not isinstance(dtype, _DType) or not isinstance(raw, bytes):
                raise _Refused("unexpected numpy scalar pickle")
            return dtype.decode(raw, 1)[0]
        if key in _RECONSTRUCT:
            return self.array(call, depth)
        if key == _REBUILD_TENSOR:
            return self.tensor(call, depth)
        raise _Refused(f"{call.func.module}.{call.func.name} is not callable here")

    def array(self, call: _Call, depth: int) -> _Array:
        args = call.args
        if len(args) != 3 or not (isinstance(args[0], _Global) and args[0].key == _NDARRAY):
            raise _Refused("numpy _reconstruct of something other than ndarray")
        state = self.value(call.state, depth + 1) if call.state is not _UNSET else None
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused("unexpected ndarray state")
        _, shape, dtype, _fortran, raw = state
        shape = _int_tuple(shape, "ndarray shape")
        if not isinstance(dtype, _DType):
            raise _Refused("ndarray without a plain dtype")
        if not isinstance(raw, bytes):
            raise _Refused("ndarray data is not raw bytes (object arrays are not supported)")
        count = math.prod(shape)
        if len(shape) > 1 or count > MAX_ARRAY_ITEMS:
            raise _Refused(f"numpy array of shape {shape} is not supported")
        return _Array(dtype, shape, tuple(dtype.decode(raw, count)))

    def tensor(self, call: _Call, depth: int) -> _TensorRef:
        if call.state is not _UNSET or len(call.args) not in (6, 7):
            raise _Refused("unexpected torch._utils._rebuild_tensor_v2 call")
        storage, offset, size, stride, requires_grad, hooks = call.args[:6]
        metadata = self.value(call.args[6], depth + 1) if len(call.args) == 7 else None
        if not isinstance(storage, _PersistentId) or not isinstance(storage.pid, tuple) or len(storage.pid) != 5:
            raise _Refused("tensor without a storage record")
        kind, storage_type, storage_key, location, numel = storage.pid
        if kind != "storage" or not isinstance(storage_type, _Global) or storage_type.module != "torch":
            raise _Refused("unexpected tensor storage record")
        if not isinstance(storage_key, str) or not re.fullmatch(r"[0-9A-Za-z_]+", storage_key):
            raise _Refused("unexpected tensor storage key")
        if location != "cpu":
            raise _Refused(f"tensor stored on {location!r}; RNG states are CPU tensors")
        if requires_grad is not False or metadata not in (None, {}, OrderedDict()):
            raise _Refused("tensor with requires_grad or extra metadata")
        if self.value(hooks, depth + 1) not in ({}, OrderedDict()):
            raise _Refused("tensor with backward hooks")
        dtype, itemsize = _STORAGES[storage_type.name]
        ref = _TensorRef(
            storage_key,
            dtype,
            itemsize,
            _int(numel, "storage size"),
            _int(offset, "storage offset"),
            _int_tuple(size, "tensor size"),
            _int_tuple(stride, "tensor stride"),
        )
        if len(ref.size) != len(ref.stride) or ref.offset < 0 or any(s < 0 for s in ref.size + ref.stride):
            raise _Refused("invalid tensor size, stride or offset")
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
        if math.prod(ref.size) and last >= ref.storage_numel:
            raise _Refused("tensor view reaches past its storage")
        return ref


# ------------------------------------------------------------------------------------- validating


def _find_arrays(value: Any) -> bool:
    if isinstance(value, _Array):
        return True
    if isinstance(value, (tuple, list)):
        return any(_find_arrays(v) for v in value)
    if isinstance(value, dict):
        return any(_find_arrays(v) for v in value.values())
    return False


def _portable_numpy_state(value: Any) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 5 or value[0] != "MT19937":
        raise _Refused("'numpy' is not a legacy MT19937 state (np.random.get_state())")
    _, key, pos, has_gauss, gauss = value
    if isinstance(key, _Array):
        if key.dtype.kind not in "ui" or key.shape != (MT19937_KEY_LENGTH,):
            raise _Refused(f"numpy MT19937 key has dtype {key.dtype.name} and shape {key.shape}")
        key = list(key.values)
    if (
        not isinstance(key, list)
        or len(key) != MT19937_KEY_LENGTH
        or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 2**32 for k in key)
    ):
        raise _Refused("numpy MT19937 key is not 624 unsigned 32-bit integers")
    if not 0 <= _int(pos, "numpy MT19937 position") <= MT19937_KEY_LENGTH:
        raise _Refused("numpy MT19937 position out of range")
    if not isinstance(gauss, float):
        raise _Refused("numpy cached gaussian is not a float")
    return ("MT19937", key, pos, _int(has_gauss, "numpy has_gauss"), gauss)


def _portable(state: Any) -> dict[str, Any]:
    """Check the evaluated tree is a Trainer RNG state; return it with the numpy key as a list."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _Refused("not a Trainer RNG state (expected a dict with string keys)")
    missing = [k for k in ("python", "numpy", "cpu") if k not in state]
    if missing:
        raise _Refused(f"not a Trainer RNG state (no {', '.join(missing)})")
    python = state["python"]
    if not isinstance(python, tuple) or len(python) != 3 or not isinstance(python[1], tuple):
        raise _Refused("'python' is not a random.getstate() tuple")
    if not isinstance(state["cpu"], _TensorRef) or state["cpu"].dtype != "uint8":
        raise _Refused("'cpu' is not a uint8 tensor")
    out = dict(state)
    out["numpy"] = _portable_numpy_state(state["numpy"])
    if _find_arrays(out):
        raise _Refused("numpy array outside the numpy RNG state")
    return out


def _inspect(path: Path) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    data = _read_pickle_bytes(path)
    try:
        tree, seen = _parse_pickle(data)
        return _portable(_Evaluator().value(tree)), seen
    except _Refused as exc:
        raise UnreadableInputError(f"refusing to read RNG state: {exc}", path) from None
    except (TypeError, ValueError, KeyError, OverflowError, struct.error) as exc:
        raise UnreadableInputError(f"refusing to read RNG state: malformed pickle ({exc})", path) from None
    except RecursionError:
        raise UnreadableInputError("refusing to read RNG state: pickle nests too deeply", path) from None


# ----------------------------------------------------------------------------------------- public


def references_numpy_core(path: Path) -> bool:
    """Whether the pickle names a ``numpy.core``/``numpy._core`` global (opcode scan; no execution).

    Tolerant, for detection: a file that cannot be scanned is not this migration's business (False).
    """
    try:
        data = _read_pickle_bytes(Path(path))
        for _, arg, _ in pickletools.genops(data):
            # GLOBAL/INST args are "module name"; STACK_GLOBAL takes its module from a pushed string.
            if isinstance(arg, str) and arg.startswith(NUMPY_CORE_PACKAGES):
                module = arg.split(" ", 1)[0]
                if any(module == p or module.startswith(p + ".") for p in NUMPY_CORE_PACKAGES):
                    return True
    except (UnreadableInputError, ValueError):
        return False
    return False


def check_rng_state(path: Path) -> dict[str, list[str]]:
    """Parse and validate (without execution or reading tensor data).

    Returns ``{"keys": [...], "globals": [...]}``: the state's keys and the globals the pickle names.
    Raises :class:`UnreadableInputError` for anything that is not a plain Trainer RNG state,
    including any global outside :data:`ALLOWED_GLOBALS`.
    """
    state, seen = _inspect(Path(path))
    return {"keys": sorted(state), "globals": sorted({f"{m}.{n}" for m, n in seen})}


def _materialize(value: Any, archive: _Archive, storages: dict[str, bytes]) -> Any:
    import torch

    if isinstance(value, _TensorRef):
        if value.storage_key not in storages:
            nbytes = value.storage_numel * value.itemsize
            raw = archive.read(f"data/{value.storage_key}", MAX_STORAGE_BYTES)
            if len(raw) != nbytes:
                raise UnreadableInputError(
                    f"storage {value.storage_key} is {len(raw)} bytes, expected {nbytes}", archive.path
                )
            storages[value.storage_key] = raw
        raw = storages[value.storage_key]
        if value.itemsize > 1 and archive.has("byteorder"):
            if archive.read("byteorder", 16).strip() != b"little":
                raise UnreadableInputError("big-endian torch archives are not supported", archive.path)
        dtype = getattr(torch, value.dtype)
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return torch.as_strided(flat, value.size, value.stride, value.offset).clone()
    if isinstance(value, tuple):
        return tuple(_materialize(v, archive, storages) for v in value)
    if isinstance(value, list):
        return [_materialize(v, archive, storages) for v in value]
    if isinstance(value, OrderedDict):
        return OrderedDict((k, _materialize(v, archive, storages)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _materialize(v, archive, storages) for k, v in value.items()}
    return value


def read_rng_state(path: Path) -> dict[str, Any]:
    """The RNG state of ``path`` as plain data and CPU tensors, numpy key as a list of ints.

    Nothing from the file is executed. Raises :class:`UnreadableInputError` when the file is not a
    plain Trainer RNG state.
    """
    path = Path(path)
    state, _ = _inspect(path)
    archive = _open_archive(path)
    try:
        return _materialize(state, archive, {})
    finally:
        archive.zf.close()


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def portable_rng_state_bytes(path: Path) -> bytes:
    """The bytes of the rewritten ``path``: same RNG states, loadable by Trainer under numpy 1 and 2.

    The result is re-parsed before it is returned: it must name only :data:`PORTABLE_GLOBALS`
    (torch's default ``weights_only`` allow-list, no numpy) and decode to exactly the input's values.
    Deterministic: the same input gives the same bytes.
    """
    import torch

    path = Path(path)
    state = read_rng_state(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    verify_portable(data, expected=state, where=path)
    return data


def write_portable_rng_state(source: Path, target: Path, rewrite: Any = None) -> str:
    """Write the rewritten ``source`` to the new file ``target`` (fsynced); return its sha256.

    ``rewrite`` (the plan's FileRewrite) is accepted for the writer's dispatch and not needed.
    """
    data = portable_rng_state_bytes(source)
    with open(target, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def verify_portable(data: bytes, expected: dict[str, Any] | None = None, where: Path | str = "") -> None:
    """Check a rewritten RNG state: only portable globals, and (given ``expected``) the same values."""
    where = Path(where) if where else None
    try:
        archive = _Archive(where or Path("<memory>"), zipfile.ZipFile(io.BytesIO(data)), "")
        pickles = [n for n in archive.zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _Refused("no data.pkl")
        archive.prefix = pickles[0].rsplit("/", 1)[0]
        tree, seen = _parse_pickle(archive.read("data.pkl", MAX_PICKLE_BYTES))
        stray = sorted({f"{m}.{n}" for m, n in seen if (m, n) not in PORTABLE_GLOBALS})
        if stray:
            raise _Refused(f"still references {', '.join(stray)}")
        value = _materialize(_portable(_Evaluator().value(tree)), archive, {})
    except (_Refused, zipfile.BadZipFile) as exc:
        raise OutputError(f"rewritten RNG state is not portable: {exc}", where) from None
    if expected is not None and not _same(value, expected):
        raise OutputError("rewritten RNG state does not decode to the original values", where)
