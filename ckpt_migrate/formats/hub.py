"""Names people give models by: a local directory, or a Hugging Face Hub id resolved through huggingface_hub.

A Hub id is looked up in huggingface_hub's own cache first (``HF_HOME``/``HF_HUB_CACHE``, revisions,
``HF_HUB_OFFLINE`` all honoured by the library); only when it is not there and the Hub is not
offline is it downloaded. Nothing here imports huggingface_hub until a name is not a local path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.text import describe_exception

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` or ``name``: no path syntax (``./``, ``..``, absolute paths, more than one ``/``)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve(name_or_path: str | Path, *, what: str, revision: str | None = None) -> Path:
    """A local directory for ``name_or_path``: the path itself, else the Hub snapshot (cached or downloaded).

    Raises :class:`UnreadableInputError` (one line) when it is neither.
    """
    path = Path(name_or_path)
    if path.exists() or not looks_like_repo_id(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download

    repo_id = str(name_or_path)
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, or a broken cache entry
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise UnreadableInputError(
                f"{what} is neither a local directory nor in the Hugging Face cache (HF_HUB_OFFLINE is set)", path
            ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as exc:  # noqa: BLE001 - any Hub or network failure is one line for the user
        raise UnreadableInputError(
            f"{what} is neither a local directory nor in the Hugging Face cache, and downloading it failed: "
            f"{describe_exception(exc, 160)}",
            path,
        ) from None


def check_model_directory(path: Path, what: str = "base model") -> Path:
    """``path``, or the one wording every command uses for a model directory that is missing or a file."""
    if not path.exists():
        raise UnreadableInputError(f"{what} not found: no such directory (nor a Hub id in the cache)", path)
    if not path.is_dir():
        raise UnreadableInputError(f"{what} is a file, not a model directory", path)
    return path


def resolve_model(name_or_path: str | Path, what: str = "base model") -> Path:
    """:func:`resolve`, then :func:`check_model_directory`."""
    return check_model_directory(resolve(name_or_path, what=what), what)


def resolve_cached(name: str | None) -> Path | None:
    """A local directory for ``name`` without touching the network (a path, or a cached snapshot), else None."""
    if not name or not isinstance(name, str):
        return None
    if Path(name).is_dir():
        return Path(name)
    if not looks_like_repo_id(name):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: no implicit base model
        return None


def link_root(directory: Path) -> Path:
    """How far symbolic links below ``directory`` may point: the whole cached repository for a Hub snapshot.

    huggingface_hub stores ``models--org--name/snapshots/<commit>/<file>`` as links into ``../../blobs``.
    """
    resolved = directory.resolve()
    for parent in (resolved, *resolved.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            return parent.parent.parent
    return resolved
