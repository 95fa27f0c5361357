"""Which release of a library knows which key: the version tables of the target-stack migrations, as data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


@dataclass(frozen=True)
class KeyTable:
    """Keys a library reads from a file: those every covered release knows, and the release that introduced the rest.

    ``checked_up_to``: the newest release the table was read from; a key it does not list exists in no
    release up to there.
    """

    always: frozenset[str]
    introduced: Mapping[str, str]
    checked_up_to: Version

    def unknown_to(self, target: Version, keys: Iterable[str]) -> tuple[list[str], list[str]]:
        """(keys ``target`` does not know, keys newer than the table whose fate cannot be told), sorted."""
        unknown, undecidable = [], []
        for key in sorted(keys):
            if key in self.always:
                continue
            if key in self.introduced:
                if target < Version(self.introduced[key]):
                    unknown.append(key)
            elif target <= self.checked_up_to:
                unknown.append(key)  # no release up to the target has it
            else:
                undecidable.append(key)
        return unknown, undecidable


def target_release(package: str, wanted: str | None, fallback: Version) -> Version:
    """The release that will read the checkpoint: the one asked for, else the installed one (package metadata)."""
    if wanted is None:
        try:
            wanted = version(package)
        except PackageNotFoundError:
            return fallback
    return Version(wanted)
