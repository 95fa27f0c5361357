"""What a command found and did: one result per checkpoint, and the exit code they add up to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import (
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PARTIAL,
    EXIT_REPAIRABLE,
    EXIT_UNREADABLE,
    EXIT_UNRECOVERABLE,
    EXIT_VERIFY_FAILED,
)
from ckpt_migrate.core.plan import CheckpointPlan, Status

FAILURE_CODES = {
    Status.UNRECOVERABLE: EXIT_UNRECOVERABLE,
    Status.UNREADABLE: EXIT_UNREADABLE,
    Status.VERIFY_FAILED: EXIT_VERIFY_FAILED,
    Status.FAILED: EXIT_OUTPUT,
}


@dataclass
class CheckpointResult:
    """The outcome for one checkpoint: its plan (when it could be read) and what happened."""

    relative: str
    source: Path
    status: Status
    plan: CheckpointPlan | None = None
    output: Path | None = None
    error: str | None = None
    verification: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        return self.status in FAILURE_CODES


@dataclass
class Report:
    """What a command found and did, for every checkpoint under the source."""

    command: str
    source: Path
    dry_run: bool
    out: Path | None = None
    checkpoints: list[CheckpointResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about the whole command, e.g. which base model was used
    export: Any = None  # the ExportPlan of ``export``

    @property
    def exit_code(self) -> int:
        failures = [c for c in self.checkpoints if c.failed]
        if self.command == "inspect":
            if failures:
                return max(FAILURE_CODES[c.status] for c in failures)
            return EXIT_REPAIRABLE if any(c.status is Status.REPAIRABLE for c in self.checkpoints) else EXIT_OK
        if not failures:
            return EXIT_OK
        if len(failures) < len(self.checkpoints):
            return EXIT_PARTIAL
        return max(FAILURE_CODES[c.status] for c in failures)
