"""Repair Hugging Face PEFT / Trainer checkpoints that a library bug left broken.

Public API (no torch import until a repair actually computes tensors)::

    >>> import ckpt_migrate
    >>> report = ckpt_migrate.fix("run/checkpoint-500", "fixed/checkpoint-500", dry_run=True)  # doctest: +SKIP
    >>> report.checkpoints[0].status  # doctest: +SKIP
    <Status.REPAIRABLE: 'repairable'>
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs ~30 ms before the Ctrl-C handler is in place

# The version, verbs and errors are looked up on first use (PEP 562): importing the package, as the console script
# does before it installs its Ctrl-C handler (ckpt_migrate/interrupts.py), imports nothing else (importlib.metadata
# alone takes ~100 ms, a window in which Ctrl-C would print a traceback).
_LAZY = {
    **dict.fromkeys(
        ["CheckpointResult", "Report", "export", "fix", "inspect", "list_migrations", "load", "verify"],
        "ckpt_migrate.api",
    ),
    **dict.fromkeys(
        ["CkptMigrateError", "OutputError", "UnreadableInputError", "UnrecoverableError"], "ckpt_migrate.core.errors"
    ),
    "Status": "ckpt_migrate.core.plan",
}

if TYPE_CHECKING:
    from typing import Any

    __version__: str
    from ckpt_migrate.api import CheckpointResult, Report, export, fix, inspect, list_migrations, load, verify
    from ckpt_migrate.core.errors import CkptMigrateError, OutputError, UnreadableInputError, UnrecoverableError
    from ckpt_migrate.core.plan import Status


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckpt-migrate")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    if name not in _LAZY:
        raise AttributeError(f"module 'ckpt_migrate' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "CheckpointResult",
    "CkptMigrateError",
    "OutputError",
    "Report",
    "Status",
    "UnreadableInputError",
    "UnrecoverableError",
    "__version__",
    "export",
    "fix",
    "inspect",
    "list_migrations",
    "load",
    "verify",
]
