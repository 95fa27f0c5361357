"""Publish a repaired checkpoint to object storage, where there is no rename: the manifest is the commit.

For ``--out s3://b/run-fixed`` each checkpoint is written to its final prefix (``.../checkpoint-N/``):

1. a staging marker object (``.ckpt-migrate-staging``: who wrote it, from which source) first;
2. every file but ``ckpt_migrate_manifest.json``;
3. the manifest, last: one PUT, which an object store makes visible whole or not at all;
4. the marker removed.

A prefix holding the marker and no manifest is an unfinished write: every command treats it as not there
(:func:`ckpt_migrate.remote.mirror.visible`), and the next ``fix`` to it removes it and writes it anew.
Writing at the final keys rather than under a separate staging prefix saves a server-side copy of every
byte (S3 has no rename; a copy is as non-atomic as the upload itself): the manifest alone is the commit.
Two runs writing the same ``--out`` at the same time are not supported (nothing here can lock a prefix).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ckpt_migrate.core.errors import OutputError
from ckpt_migrate.formats.adapter import MANIFEST
from ckpt_migrate.remote.mirror import STAGING_MARKER
from ckpt_migrate.remote.store import Location


def published_source(target: Location, listing: dict[str, int] | None = None) -> str | None:
    """The ``source`` named by the manifest at ``target`` (a published checkpoint), else None."""
    listing = target.listing() if listing is None else listing
    if MANIFEST not in listing:
        return None
    try:
        source = json.loads(target.read_all(MANIFEST)).get("source")
    except (ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def prepare_target(target: Location, source: str) -> bool:
    """Make ``target`` ready for a checkpoint of ``source``: False if an earlier run already published it
    (the same source in its manifest); an unfinished earlier write is removed; anything else is refused."""
    listing = target.listing()
    if not listing:
        return True
    if MANIFEST in listing:
        if published_source(target, listing) == source:
            target.remove([STAGING_MARKER] if STAGING_MARKER in listing else [])
            return False
        raise OutputError(
            "holds another checkpoint (its manifest names another source); refusing to overwrite", target.url
        )
    if STAGING_MARKER not in listing:
        raise OutputError("--out exists and is not empty; refusing to overwrite", target.url)
    target.remove(sorted(listing))  # an unfinished write of an earlier, killed run: no manifest, so never published
    return True


def upload_checkpoint(local: Path, target: Location, source: str, origin: Location | None = None) -> dict[str, int]:
    """Upload the checkpoint written at ``local`` to ``target``, manifest last (see the module doc).

    The manifest's ``source`` becomes ``source`` (the URL the checkpoint was read from, not the
    temporary directory it was mirrored into), which is what resuming an interrupted batch compares.
    ``origin``: the location the checkpoint was read from; a file the repair left byte for byte as it was
    (the same sha256 in and out, per the manifest) is copied from there server-side where the store can
    (S3 to S3 on one endpoint), not uploaded. Returns the bytes uploaded and copied.
    """
    marker = {"source": source, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    target.write_bytes(STAGING_MARKER, json.dumps(marker).encode())
    manifest = json.loads((local / MANIFEST).read_text(encoding="utf-8"))
    inputs, outputs = manifest.get("inputs_sha256", {}), manifest.get("outputs_sha256", {})
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    moved = {"uploaded": 0, "copied": 0}
    for name in names:
        if name == MANIFEST:
            continue
        size = (local / name).stat().st_size
        unchanged = name in outputs and inputs.get(name) == outputs[name]
        if unchanged and origin is not None and target.can_copy_from(origin, name, size):
            target.copy_from(origin, name)
            moved["copied"] += size
        else:
            target.upload(local / name, name)
            moved["uploaded"] += size
    manifest["source"] = source
    target.write_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    target.remove([STAGING_MARKER])
    return moved


def check_remote_target(source: str, out: str) -> None:
    """Refuse an output that is the source or lies inside it, or that contains it (compared as URLs)."""
    src, dst = source.rstrip("/") + "/", out.rstrip("/") + "/"
    if dst.startswith(src):
        raise OutputError("--out must not be the source or inside it", out)
    if src.startswith(dst):
        raise OutputError("--out must not contain the source", out)
