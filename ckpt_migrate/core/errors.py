"""Errors the tool reports as one line, each carrying the process exit code it maps to."""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_REPAIRABLE = 3
EXIT_UNRECOVERABLE = 4
EXIT_UNREADABLE = 5
EXIT_OUTPUT = 6
EXIT_PARTIAL = 7
EXIT_VERIFY_FAILED = 8
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""\b
Exit codes:
  {EXIT_OK}    success: healthy, repaired, or (dry run) repairable
  {EXIT_USAGE}    bad command line
  {EXIT_REPAIRABLE}    inspect only: the checkpoint is broken and repairable
  {EXIT_UNRECOVERABLE}    unrecoverable or lossy: the trained model cannot be reconstructed (see --allow-lossy)
  {EXIT_UNREADABLE}    unreadable or invalid input (bad JSON, corrupt safetensors, ...)
  {EXIT_OUTPUT}    output refused or failed (non-empty --out, disk full, ...)
  {EXIT_PARTIAL}    batch: some checkpoints succeeded, others failed
  {EXIT_VERIFY_FAILED}    verify (or fix --verify): the checkpoint does not reproduce its model
  {EXIT_INTERRUPTED}  interrupted; nothing was published"""


class CkptMigrateError(Exception):
    """Base error: a message for the user, optionally about one file."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        # a URL (s3://...) stays a string: Path would fold its "//"
        self.path = path if isinstance(path, str) and "://" in path else Path(path) if path is not None else None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


class UsageError(CkptMigrateError):
    """The call itself is incomplete or contradictory (a required option is missing): exit 2, as click's own."""

    exit_code = EXIT_USAGE


class UnreadableInputError(CkptMigrateError):
    """The input is missing, malformed, inconsistent or unsafe to read."""

    exit_code = EXIT_UNREADABLE


class UnrecoverableError(CkptMigrateError):
    """The input is understood, but the trained model cannot be reconstructed from it."""

    exit_code = EXIT_UNRECOVERABLE


class OutputError(CkptMigrateError):
    """The output location is refused, or writing it failed."""

    exit_code = EXIT_OUTPUT


class VerificationFailedError(CkptMigrateError):
    """A written checkpoint failed ``verify``; it was not published."""

    exit_code = EXIT_VERIFY_FAILED
