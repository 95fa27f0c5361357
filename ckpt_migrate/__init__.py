"""Repair Hugging Face PEFT / Trainer checkpoints that a library bug left broken.

Public API (no torch import until a repair actually computes tensors)::

    >>> import ckpt_migrate
    >>> report = ckpt_migrate.fix("run/checkpoint-500", "fixed/checkpoint-500", dry_run=True)
    >>> report.checkpoints[0].status
    'repairable'
"""

__version__ = "0.1.0"

from ckpt_migrate.api import CheckpointResult, Report, fix, inspect, list_migrations  # noqa: E402
from ckpt_migrate.errors import CkptMigrateError, OutputError, UnreadableInputError, UnrecoverableError  # noqa: E402

__all__ = [
    "CheckpointResult",
    "CkptMigrateError",
    "OutputError",
    "Report",
    "UnreadableInputError",
    "UnrecoverableError",
    "__version__",
    "fix",
    "inspect",
    "list_migrations",
]
