"""Checkpoints in object storage (``s3://``, ``gs://``, ``hf://``, ``memory://``) and fleets on Dask.

Nothing here is imported by a local-path run with the default executor: :func:`is_url` is the only
function the API calls first, and it imports nothing. fsspec, s3fs and distributed load only when a
URL or ``--executor dask`` is given.

How a remote checkpoint is read: it is mirrored into a local temporary directory and the local planner
and writer run on that (see :mod:`ckpt_migrate.remote.mirror`). ``inspect`` and dry runs mirror it
*sparsely* (JSON files fetched, each safetensors file as its header bytes in a file of its full size,
each torch zip as its central directory and ``data.pkl`` record), so they read headers only; ``fix``
downloads each checkpoint in bounded chunks. Output to a bucket is published checkpoint by checkpoint
with ``ckpt_migrate_manifest.json`` written last (see :mod:`ckpt_migrate.remote.publish`).
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(location: object) -> bool:
    """``scheme://...`` (``s3://``, ``memory://``, ``file://``...): a location fsspec opens."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def local_path_of(location: str) -> str | None:
    """The local path of a ``file://`` URL (which then takes the local code path), else None."""
    if location.startswith("file://"):
        return location[len("file://") :] or "/"
    return None


def wants_fleet(*locations: object, executor: str = "local") -> bool:
    """Whether a command goes through this package: a non-local URL among ``locations``, or a Dask executor."""
    remote = any(is_url(str(loc)) and local_path_of(str(loc)) is None for loc in locations if loc is not None)
    return remote or executor != "local"


def as_local(location: object) -> object:
    """A ``file://`` URL as its local path; anything else unchanged."""
    if isinstance(location, str):
        local = local_path_of(location)
        if local is not None:
            return local
    return location
