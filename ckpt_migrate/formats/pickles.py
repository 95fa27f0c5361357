"""Pickled files (``torch.save`` archives): list their globals without torch, load them only weights-only.

:func:`pickle_globals` walks the opcodes with :mod:`pickletools` (nothing is executed or imported), so
a dry run can see what a pickle references and refuse foreign globals before anything loads it.
:func:`load_weights_only` and :func:`load_skeleton` are the only places the tool unpickles, both with
torch's weights-only unpickler: ``torch.load(weights_only=True)``, optionally with extra globals allowed
by their exact names (``torch.serialization.safe_globals``); or the same unpickler with every storage
left unread on the meta device, so a file's structure costs no memory, whatever its size.
"""

from __future__ import annotations

import functools
import io
import os
import pickletools
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.text import one_line

MAX_PICKLE_BYTES = 16 * 1024 * 1024
#: Opcodes that build objects without naming a global through GLOBAL/STACK_GLOBAL; torch never writes them.
_OBJECT_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4"})


def _not_an_archive(path: Path) -> str:
    """Why a file is no readable torch zip archive, judged by its first bytes: a zip cut short (a copy or a save
    that did not finish), a pickle (torch.save before 1.6), or something else."""
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError:
        magic = b""
    if magic.startswith(b"PK"):
        return "a truncated or corrupt torch zip archive (an interrupted save or copy?)"
    if magic[:1] == b"\x80":
        return "a legacy torch file (torch.save before 1.6), not a zip archive"
    return "not a torch file"


def _data_pkl(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise UnreadableInputError("torch archive does not have exactly one data.pkl", path)
            info = archive.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise UnreadableInputError(f"data.pkl is {info.file_size} bytes, over {MAX_PICKLE_BYTES}", path)
            return archive.read(info)
    except FileNotFoundError:
        raise UnreadableInputError("missing", path) from None
    except (zipfile.BadZipFile, NotImplementedError, ValueError):
        raise UnreadableInputError(f"{_not_an_archive(path)}; cannot read it safely", path) from None
    except OSError as exc:
        raise UnreadableInputError(f"cannot read: {exc.strerror or exc}", path) from exc


def data_pkl(path: Path) -> bytes:
    """The ``data.pkl`` record of a torch archive (at most :data:`MAX_PICKLE_BYTES`), not decoded."""
    return _data_pkl(Path(path))


def pickle_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a torch archive's pickle references, in order; nothing is executed.

    Raises :class:`UnreadableInputError` for a file that is not a torch zip archive, a pickle that
    cannot be scanned, or an opcode that builds objects outside GLOBAL/STACK_GLOBAL (INST, OBJ, EXT*).
    """
    data = _data_pkl(Path(path))
    found: list[str] = []
    # What each opcode pushed, when it is a string (else None): STACK_GLOBAL takes its module and name from
    # the two topmost values, pushed directly or fetched from the memo. Anything uncertain is refused.
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in _OBJECT_OPCODES:
                raise UnreadableInputError(f"pickle opcode {name} is not supported", path)
            if name in ("FRAME", "PROTO"):
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif "UNICODE" in name:
                pushed.append(arg)
            elif name == "GLOBAL":
                module, _, attribute = arg.partition(" ")
                found.append(f"{module}.{attribute}")
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module, attribute = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                if module is None or attribute is None:
                    raise UnreadableInputError("malformed pickle (STACK_GLOBAL without a module and a name)", path)
                found.append(f"{module}.{attribute}")
                pushed.append(None)
            else:
                pushed.append(None)
    except (ValueError, TypeError) as exc:  # truncated or unknown opcode
        raise UnreadableInputError(f"malformed pickle ({exc})", path) from None
    return found


def torch_load_problem(exc: BaseException) -> str:
    """One plain line saying why ``torch.load(weights_only=True)`` refused a file.

    torch's message spans many lines, carries ANSI escapes, and suggests loading with
    ``weights_only=False`` or allow-listing the global; keep only what the file did wrong.
    """
    lines = [one_line(line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    prefix = "WeightsUnpickler error:"
    detail = next((line[len(prefix) :].strip() for line in lines if line.startswith(prefix)), None)
    if detail is None:
        detail = lines[0] if lines else type(exc).__name__
    detail = re.split(r"\. Please use| This file can still be loaded|\. Check the recommended", detail, maxsplit=1)[0]
    return detail.rstrip(". ")


_SAFE_GLOBALS_LOCK = threading.Lock()


def load_weights_only(path: Path, allowed: list[Any] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: no code from the file runs.

    ``allowed``: extra globals for ``torch.serialization.safe_globals`` (objects, or ``(object, "module.name")``
    pairs that admit an object under another name). Any refusal becomes an :class:`UnreadableInputError`.
    """
    import contextlib

    import torch

    path = Path(path)
    scope = torch.serialization.safe_globals(allowed) if allowed else contextlib.nullcontext()
    try:
        # torch's allow-list is one per process and safe_globals restores it on exit: a thread leaving it would
        # take the globals away from a thread still loading (threads of one Dask worker; seen as a refusal)
        with _SAFE_GLOBALS_LOCK, scope:
            # mmap needs torch's zip format; an older plain pickle goes through the same weights-only unpickler.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - a hostile file can make the unpickler raise anything
        raise UnreadableInputError(f"refused to load pickle safely ({torch_load_problem(exc)})", path) from exc


@dataclass(frozen=True)
class Skeleton:
    """A torch archive's object with every tensor on the meta device (no storage read), and for each
    storage (by ``untyped_storage()._cdata``) the key of the ``data/<key>`` record holding its bytes."""

    obj: Any
    storage_key: dict[int, str]
    storages: tuple[Any, ...]  # keeps the meta storages (and so their ``_cdata``) alive


def load_skeleton(path: Path) -> Skeleton:
    """Unpickle ``path``'s ``data.pkl`` with torch's weights-only unpickler, reading no tensor bytes.

    The last few results are kept while their file is unchanged (same inode, size and modification
    time): the planner and the writer of a remap read the same file. Do not modify what is returned.
    """
    path = Path(os.path.abspath(path))
    try:
        st = path.stat()
    except OSError:
        return _load_skeleton(path, None)
    return _load_skeleton(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _load_skeleton(path: Path, identity: tuple[int, ...] | None) -> Skeleton:
    import torch
    from torch import _weights_only_unpickler

    data = _data_pkl(path)
    storages: dict[str, Any] = {}

    def persistent_load(saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise UnreadableInputError("a persistent id that is not a torch storage", path)
        _, storage_type, key, _location, numel = saved_id
        if key not in storages:
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            meta = torch.UntypedStorage(numel * torch._utils._element_size(dtype), device="meta")
            storages[key] = torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)
        return storages[key]

    try:
        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
        unpickler.persistent_load = persistent_load
        obj = unpickler.load()
    except UnreadableInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile file can make the unpickler raise anything
        raise UnreadableInputError(f"refused to load pickle safely ({torch_load_problem(exc)})", path) from exc
    keys = {storage._untyped_storage._cdata: key for key, storage in storages.items()}
    return Skeleton(obj, keys, tuple(storages.values()))
