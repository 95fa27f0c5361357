"""Rewrite Trainer RNG states so a resume restores them under numpy 1 and numpy 2 alike.

``rng_state.pth`` (``rng_state_<rank>.pth`` in distributed runs) pickles ``np.random.get_state()``,
whose key array names ``numpy.core.multiarray._reconstruct`` (numpy 1) or
``numpy._core.multiarray._reconstruct`` (numpy 2). With torch >= 2.6 ``torch.load`` defaults to
``weights_only=True`` and Trainer's resume fails with "Unsupported global: GLOBAL
numpy.core.multiarray._reconstruct was not an allowed global by default" (or the ``numpy._core``
name under numpy 1): transformers 4.x allows no numpy global at all, 5.x only its own numpy's name.

The file is rewritten with the key as a list of ints (``np.random.set_state`` accepts any sequence,
under both numpy majors); every state is kept exactly. Planning only scans the pickle's opcodes
(no torch, nothing executed) and refuses any global outside :data:`ALLOWED_GLOBALS`. Writing does not
import torch (its import costs more than the rest of a ``fix``): the pickle is decoded by a restricted
unpickler admitting only those globals, numpy's ``_reconstruct`` under both of its names (tensors stay
references to their storage records), pickled again exactly as ``torch.save`` pickles the state
``torch.load(weights_only=True)`` reads (:mod:`ckpt_migrate.formats.torch_pickle`; the tests compare the
bytes with torch's on every fixture), the storage records are copied, and the written file, decoded again
with no numpy global allowed, must give the planned state. :func:`portable_rng_state_bytes` is the same
rewrite with torch (``torch.load``, ``torch.save``, a plain weights-only reload), which the tests compare with.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import OutputError, UnreadableInputError
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import CheckpointState, FileRewrite
from ckpt_migrate.formats.digests import OnBytes
from ckpt_migrate.formats.pickles import pickle_globals

ID = "0004_portable_rng_state"
SUMMARY = "Rewrite rng_state*.pth without numpy globals, so Trainer resumes under numpy 1 and numpy 2"
CAUSED_BY = (
    "numpy 2.0 renamed numpy.core to numpy._core (numpy#24634), so the pickled ndarray global's name "
    "depends on the numpy major; torch 2.6.0 made torch.load default to weights_only=True (its release notes), "
    "which refuses any global not allow-listed by that exact name"
)
CHANGES_TRAINABLE_PARAMETERS = False

REASON = "numpy RNG key stored as a list of ints instead of a numpy.core/numpy._core ndarray pickle"
RNG_STATE_FILE = re.compile(r"^rng_state(?:_\d+)?\.pth$")
MT19937_KEY_LENGTH = 624
NUMPY_CORE_PACKAGES = ("numpy.core.", "numpy._core.")
_STORAGES = ("Byte", "Char", "Bool", "Short", "Int", "Long", "Half", "BFloat16", "Float", "Double")
#: What torch's default weights_only unpickler allows and a Trainer RNG state uses.
TORCH_GLOBALS = frozenset(
    {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "_codecs.encode"}
    | {f"torch.{kind}Storage" for kind in _STORAGES}
)
#: numpy's ndarray/scalar pickle, under the numpy 1 and numpy 2 module names.
NUMPY_GLOBALS = frozenset(
    {"numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}
    | {f"{package}multiarray.{name}" for package in NUMPY_CORE_PACKAGES for name in ("_reconstruct", "scalar")}
)
ALLOWED_GLOBALS = TORCH_GLOBALS | NUMPY_GLOBALS


def is_rng_state_file(name: str) -> bool:
    """``rng_state.pth`` or ``rng_state_<rank>.pth`` at the top of a checkpoint."""
    return bool(RNG_STATE_FILE.match(name))


def references_numpy_core(path: Path) -> bool:
    """Whether the pickle names a ``numpy.core``/``numpy._core`` global (opcode scan; False if unscannable)."""
    try:
        return any(g.startswith(NUMPY_CORE_PACKAGES) for g in pickle_globals(path))
    except UnreadableInputError:
        return False


def _targets(state: CheckpointState) -> list[str]:
    return [n for n in sorted(state.files) if is_rng_state_file(n) and references_numpy_core(state.source_dir / n)]


def detect(state: CheckpointState, context: Context) -> bool:
    return bool(_targets(state))


def plan(state: CheckpointState, context: Context) -> None:
    for name in _targets(state):
        found = _allowed_globals_of(state.source_dir / name)  # a dry run already refuses foreign globals
        numpy_globals = tuple(sorted({g for g in found if g.startswith("numpy")}))
        state.rewrite_file(name, FileRewrite(ID, REASON, listed=(("numpy_globals", numpy_globals),)))


def write(rewrite: FileRewrite, source: Path, target: Path, on_bytes: OnBytes | None = None) -> Callable[[], str]:
    """The portable file, without importing torch (see :func:`portable_rng_state_pickle`); its storage records
    copied from the source. Before it is published, decoding the written file with no numpy global allowed must
    give exactly the planned state. Returns what gives its sha256."""
    from ckpt_migrate.formats.pickles import data_pkl
    from ckpt_migrate.formats.torch_archive import write_pickled
    from ckpt_migrate.formats.torch_pickle import CODECS_ENCODE, RefusedPickle, loads

    pickled = portable_rng_state_pickle(source)
    expected = loads(pickled[0], CODECS_ENCODE)

    def check() -> None:
        try:
            reloaded = loads(data_pkl(target), CODECS_ENCODE)
        except RefusedPickle as exc:
            raise OutputError(f"rewritten RNG state is not portable: {exc}", source) from None
        if not _same(reloaded, expected):
            raise OutputError("rewritten RNG state does not decode to the original values", source)

    return write_pickled(target, pickled, source, on_bytes, check)


def portable_rng_state_pickle(path: Path) -> tuple[bytes, list[str]]:
    """``data.pkl`` of the rewritten ``path`` (and its storages' source keys), made without torch: the same bytes
    ``torch.save`` pickles for :func:`read_rng_state`'s state (:mod:`ckpt_migrate.formats.torch_pickle`). Torch
    is not imported for a 14 KB file: its import costs about 3 CPU-seconds and 190 MB, more than the rest of a
    ``fix``; the tests compare these bytes with torch's on every fixture."""
    from ckpt_migrate.formats.pickles import data_pkl
    from ckpt_migrate.formats.torch_pickle import CODECS_ENCODE, RefusedPickle, TensorRef, dumps, loads

    path = Path(path)
    _allowed_globals_of(path)
    allowed = {**CODECS_ENCODE, **_numpy_globals()}
    try:
        state = loads(data_pkl(path), allowed)
    except RefusedPickle as exc:
        raise _refuse(str(exc), path) from None
    cpu = state.get("cpu") if isinstance(state, dict) else None
    uint8 = isinstance(cpu, TensorRef) and repr(cpu.storage.kind) == "torch.ByteStorage"
    return dumps(_portable(state, path, uint8))


def _allowed_globals_of(path: Path) -> list[str]:
    found = pickle_globals(path)
    for name in found:
        if name not in ALLOWED_GLOBALS:
            raise UnreadableInputError(
                f"refusing to read RNG state: pickle references {name}, which is not an allowed global", path
            )
    return found


def _numpy_safe_globals() -> list[Any]:
    """numpy's ndarray pickle admitted under both module names (it is one function, wherever it lives)."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for package in NUMPY_CORE_PACKAGES:
        allowed += [(multiarray._reconstruct, f"{package}multiarray._reconstruct")]
        allowed += [(multiarray.scalar, f"{package}multiarray.scalar")]
    return allowed


def _refuse(why: str, path: Path) -> UnreadableInputError:
    return UnreadableInputError(f"refusing to read RNG state: {why}", path)


def _portable_numpy_state(value: Any, path: Path) -> tuple:
    import numpy as np

    if not isinstance(value, tuple) or len(value) != 5 or value[0] != "MT19937":
        raise _refuse("'numpy' is not a legacy MT19937 state (np.random.get_state())", path)
    _, key, pos, has_gauss, gauss = value
    if isinstance(key, np.ndarray) and key.dtype.kind in "ui" and key.shape == (MT19937_KEY_LENGTH,):
        key = [int(k) for k in key]
    if (
        not isinstance(key, list)
        or len(key) != MT19937_KEY_LENGTH
        or not all(type(k) is int and 0 <= k < 2**32 for k in key)
    ):
        raise _refuse(f"numpy MT19937 key is not {MT19937_KEY_LENGTH} unsigned 32-bit integers", path)
    if not isinstance(pos, int) or not 0 <= pos <= MT19937_KEY_LENGTH or not isinstance(gauss, float):
        raise _refuse("numpy MT19937 position or cached gaussian out of range", path)
    return ("MT19937", key, pos, int(has_gauss), gauss)


def _numpy_globals() -> dict[str, Any]:
    """Every numpy global :data:`NUMPY_GLOBALS` admits, by its pickled ``module.name``."""
    found: dict[str, Any] = {}
    for entry in _numpy_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        found[name] = obj
    return {name: obj for name, obj in found.items() if name in NUMPY_GLOBALS}


def _portable(state: Any, path: Path, cpu_is_uint8: bool) -> dict[str, Any]:
    """``state`` with the numpy key as a list of ints, after checking it is a Trainer RNG state."""
    import numpy as np

    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _refuse("not a Trainer RNG state (expected a dict with string keys)", path)
    missing = [k for k in ("python", "numpy", "cpu") if k not in state]
    if missing:
        raise _refuse(f"not a Trainer RNG state (no {', '.join(missing)})", path)
    python = state["python"]
    if not isinstance(python, tuple) or len(python) != 3 or not isinstance(python[1], tuple):
        raise _refuse("'python' is not a random.getstate() tuple", path)
    if not cpu_is_uint8:
        raise _refuse("'cpu' is not a uint8 tensor", path)
    portable = {**state, "numpy": _portable_numpy_state(state["numpy"], path)}
    if any(isinstance(v, np.ndarray | np.generic) for v in _leaves(portable)):
        raise _refuse("numpy value outside the numpy RNG state", path)
    return portable


def read_rng_state(path: Path) -> dict[str, Any]:
    """The RNG state of ``path`` as plain data and CPU tensors, the numpy key as a list of ints.

    Loaded with ``torch.load(weights_only=True)`` after the opcode scan; raises
    :class:`UnreadableInputError` when the file is not a plain Trainer RNG state.
    """
    import torch

    from ckpt_migrate.formats.pickles import load_weights_only

    path = Path(path)
    _allowed_globals_of(path)
    state = load_weights_only(path, allowed=_numpy_safe_globals())
    cpu = state.get("cpu") if isinstance(state, dict) else None
    return _portable(state, path, isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def check_rng_state(path: Path) -> dict[str, list[str]]:
    """Validate ``path`` as a Trainer RNG state; return ``{"keys": [...], "globals": [...]}``."""
    return {"keys": sorted(read_rng_state(path)), "globals": sorted(set(_allowed_globals_of(Path(path))))}


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types (tensors: equal dtype and elements, or equal :class:`TensorRef`)."""
    import sys

    torch = sys.modules.get("torch")  # a TensorRef compares as a dataclass; a torch.Tensor needs torch, loaded
    if torch is not None and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def portable_rng_state_bytes(path: Path) -> bytes:
    """The bytes of the rewritten ``path``: the same RNG states, loadable under numpy 1 and 2 (deterministic).

    Proven before they are returned: a plain ``torch.load(weights_only=True)``, with no global
    allowed beyond torch's defaults, must decode them to exactly the input's values.
    """
    import torch

    path = Path(path)
    state = read_rng_state(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    try:
        reloaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch refuses here is our bug, reported as an output failure
        raise OutputError(f"rewritten RNG state is not portable: {exc}", path) from None
    if not _same(reloaded, state):
        raise OutputError("rewritten RNG state does not decode to the original values", path)
    return data


def failures(state: CheckpointState) -> list[str]:
    lines = []
    for name in _targets(state):
        found = [g for g in pickle_globals(state.source_dir / name) if g.endswith("multiarray._reconstruct")]
        if found:
            where = "transformers 4.x, and 5.x under numpy " + ("2" if found[0].startswith("numpy.core.") else "1")
            lines.append(
                f"Trainer resume on torch >= 2.6 ({where}): {name}: UnpicklingError: Weights only load failed ... "
                f"Unsupported global: GLOBAL {found[0]} was not an allowed global by default"
            )
    return lines
