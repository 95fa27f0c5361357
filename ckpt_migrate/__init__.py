"""Repair Hugging Face PEFT / Trainer checkpoints that a library bug left broken.

Public API (no torch import until a repair actually computes tensors)::

    >>> import ckpt_migrate
    >>> report = ckpt_migrate.fix("run/checkpoint-500", "fixed/checkpoint-500", dry_run=True)  # doctest: +SKIP
    >>> report.checkpoints[0].status  # doctest: +SKIP
    <Status.REPAIRABLE: 'repairable'>
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ckpt-migrate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from ckpt_migrate.api import (  # noqa: E402
    CheckpointResult,
    Report,
    export,
    fix,
    inspect,
    list_migrations,
    load,
    verify,
)
from ckpt_migrate.core.errors import (  # noqa: E402
    CkptMigrateError,
    OutputError,
    UnreadableInputError,
    UnrecoverableError,
)
from ckpt_migrate.core.plan import Status  # noqa: E402

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
