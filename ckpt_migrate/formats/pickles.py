"""Pickled files (``torch.save`` archives): list their globals without torch, load them only weights-only.

:func:`pickle_globals` walks the opcodes with :mod:`pickletools` (nothing is executed or imported), so
a dry run can see what a pickle references and refuse foreign globals before anything loads it.
:func:`load_weights_only` is the only place the tool unpickles: ``torch.load(weights_only=True)``,
optionally with extra globals allowed by their exact names (``torch.serialization.safe_globals``).
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.text import one_line

MAX_PICKLE_BYTES = 16 * 1024 * 1024
#: Opcodes that build objects without naming a global through GLOBAL/STACK_GLOBAL; torch never writes them.
_OBJECT_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4"})


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
        raise UnreadableInputError(
            "not a torch zip archive (torch.save before 1.6 or not a torch file); cannot read it safely", path
        ) from None
    except OSError as exc:
        raise UnreadableInputError(f"cannot read: {exc.strerror or exc}", path) from exc


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
        with scope:
            # mmap needs torch's zip format; an older plain pickle goes through the same weights-only unpickler.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - a hostile file can make the unpickler raise anything
        raise UnreadableInputError(f"refused to load pickle safely ({torch_load_problem(exc)})", path) from exc
