"""A directory in object storage, through fsspec: list it, read byte ranges, stream files down and up.

Credentials and endpoints are what each filesystem's own client reads (for S3 the standard AWS
environment and config files). ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` are passed to s3fs as
``endpoint_url`` explicitly: botocore reads them itself since 1.31, but an older botocore under s3fs
would silently go to AWS instead of the endpoint the user named.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import OutputError, UnreadableInputError
from ckpt_migrate.core.text import describe_exception

#: Bytes per ranged read when streaming a file down: bounds the memory a download uses.
CHUNK_BYTES = 8 * 1024 * 1024
#: Multipart parts for S3 uploads, two in flight: s3fs reads each part into memory (by default 50 MiB, 10 at once).
#: 16 MiB parts still allow objects up to 160 GB (10,000 parts).
S3_PART_BYTES = 16 * 1024 * 1024
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Largest object one S3 CopyObject copies (and the only copy call that takes a CopySourceIfMatch condition).
S3_COPY_MAX_BYTES = 5 * 2**30


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - fsspec comes with torch
        raise UnreadableInputError("remote locations need fsspec: pip install 'ckpt-migrate[s3]'", url) from None
    protocol = url.split("://", 1)[0].lower()
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        options["endpoint_url"] = endpoint
    try:
        fsspec.get_filesystem_class(protocol)
        return url_to_fs(url, **options)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'ckpt-migrate[{extra}]'" if extra == "s3" else f"install fsspec's {protocol} support"
        raise UnreadableInputError(
            f"{protocol}:// needs a package that is not installed ({hint}): {exc}", url
        ) from None
    except ValueError as exc:
        raise UnreadableInputError(f"unknown location scheme {protocol}:// ({exc})", url) from None


@dataclass
class Location:
    """A directory (key prefix) at ``url``; ``fs``/``path`` are fsspec's filesystem and its path for it."""

    url: str
    fs: Any
    path: str
    etags: dict[str, str] = field(default_factory=dict, repr=False)  # relative name -> ETag, of the last listing

    @classmethod
    def open(cls, url: str) -> Location:
        url = url.rstrip("/")
        fs, path = _filesystem(url)
        return cls(url, fs, path.rstrip("/"))

    def child(self, relative: str) -> Location:
        if relative in (".", ""):
            return self
        return Location(f"{self.url}/{relative}", self.fs, f"{self.path}/{relative}")

    def key(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def listing(self) -> dict[str, int]:
        """Every object below this prefix: relative name -> size (one paginated LIST on object stores)."""
        try:
            self.fs.invalidate_cache(self.path)  # another process (a worker, a killed run) may have written since
            found = self.fs.find(self.path, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001 - credentials, network, a missing bucket: one line
            raise UnreadableInputError(f"cannot list: {describe_exception(exc, 200)}", self.url) from None
        prefix = self.path + "/"
        listed = {}
        self.etags = {}
        for name, info in found.items():
            name = name.rstrip("/")
            if name.startswith(prefix) and info.get("type", "file") == "file":
                listed[name[len(prefix) :]] = int(info.get("size") or 0)
                if info.get("ETag"):
                    self.etags[name[len(prefix) :]] = info["ETag"]
        return listed

    @property
    def is_s3(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return "s3" in protocols

    def can_copy_from(self, source: Location, relative: str, size: int) -> bool:
        """Whether :meth:`copy_from` can copy ``relative`` of ``source`` here without its bytes passing through
        this machine: both on the same S3 filesystem (endpoint and credentials), the object's ETag known from
        the listing it was read by, and small enough for one CopyObject."""
        return self.is_s3 and source.fs is self.fs and relative in source.etags and size <= S3_COPY_MAX_BYTES

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of one object, by one ranged read."""
        if end <= start:
            return b""
        try:
            return self.fs.cat_file(self.key(relative), start=start, end=end)
        except Exception as exc:  # noqa: BLE001
            raise UnreadableInputError(
                f"cannot read: {describe_exception(exc, 200)}", self.url + "/" + relative
            ) from None

    def read_all(self, relative: str) -> bytes:
        try:
            return self.fs.cat_file(self.key(relative))
        except Exception as exc:  # noqa: BLE001
            raise UnreadableInputError(
                f"cannot read: {describe_exception(exc, 200)}", self.url + "/" + relative
            ) from None

    def download(self, relative: str, size: int, target: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream one object into ``target`` in ranged reads of :data:`CHUNK_BYTES` (memory stays bounded)."""
        with open(target, "xb") as handle:
            for start in range(0, size, CHUNK_BYTES):
                chunk = self.read_range(relative, start, min(size, start + CHUNK_BYTES))
                if len(chunk) != min(size, start + CHUNK_BYTES) - start:
                    raise UnreadableInputError(
                        "changed while it was read (shorter than listed)", self.url + "/" + relative
                    )
                handle.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))

    def upload(self, source: Path, relative: str) -> None:
        """One local file to ``relative`` (s3fs: multipart in bounded parts)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        options = {"chunksize": S3_PART_BYTES, "max_concurrency": 2} if "s3" in protocols else {}
        try:
            self.fs.put_file(str(source), self.key(relative), **options)
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"upload failed: {describe_exception(exc, 200)}", self.url + "/" + relative) from None

    def copy_from(self, source: Location, relative: str) -> None:
        """``relative`` of ``source`` to the same name here by S3's server-side CopyObject, on the condition that
        the source is still the version listed (``CopySourceIfMatch``: the ETag of the bytes that were read and
        hashed); an object replaced since is refused. moto ignores the condition; S3 honours it."""
        try:
            self.fs.cp_file(source.key(relative), self.key(relative), CopySourceIfMatch=source.etags[relative])
        except Exception as exc:  # noqa: BLE001
            if "precondition" in str(exc).lower():
                raise UnreadableInputError(
                    "changed while it was repaired (its ETag no longer matches the bytes read)",
                    f"{source.url}/{relative}",
                ) from None
            raise OutputError(
                f"server-side copy failed: {describe_exception(exc, 200)}", self.url + "/" + relative
            ) from None

    def write_bytes(self, relative: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self.key(relative), data)
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"write failed: {describe_exception(exc, 200)}", self.url + "/" + relative) from None

    def remove(self, relatives: list[str]) -> None:
        if not relatives:
            return
        try:
            self.fs.rm([self.key(r) for r in relatives])
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"cannot remove: {describe_exception(exc, 200)}", self.url) from None
