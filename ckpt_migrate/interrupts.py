"""Ctrl-C and SIGTERM, at any moment: exit 130 with one line, and no staging directory left behind.

Standard library only, so the console script can install the handler before click, torch or transformers are
imported. A KeyboardInterrupt does not always surface as itself: transformers' lazy imports turn one raised
mid-import into ``ModuleNotFoundError: Could not import module 'LlamaConfig'``, and a thread pool or a library's
``except Exception`` may wrap it further. So the handler also sets a flag, and :func:`is_interrupt` answers from
the flag or from the exception's ``__cause__`` / ``__context__`` chain.
"""

from __future__ import annotations

import signal
import sys

TYPE_CHECKING = False  # typing, pathlib, shutil: imported late, the handler must be in place first
if TYPE_CHECKING:
    from pathlib import Path
    from types import FrameType

INTERRUPTED_LINE = "ckpt-migrate: interrupted; nothing was published"
EXIT_INTERRUPTED = 130  # also core.errors.EXIT_INTERRUPTED (not imported: this module must stay import-free)

_received: list[int] = []
#: Staging directories of this process not yet published or removed (execute/publish.py registers them), removed
#: on an interrupt even when the interrupt arrived inside the cleanup that would have removed them.
live_staging: set[Path] = set()
#: What this process published (renamed into place) before an interrupt: then "nothing was published" is untrue.
published: list[Path] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
    _received.append(signum)
    raise KeyboardInterrupt


def install() -> dict[int, object]:
    """Route SIGINT and SIGTERM to :func:`_on_signal` (main thread only, as Python requires); returns the handlers
    it replaced, for :func:`restore`."""
    _received.clear()
    published.clear()
    # a signal the parent ignores (a background job of a non-interactive shell, nohup) stays ignored, as Python does
    current = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    return {signum: signal.signal(signum, _on_signal) for signum, was in current.items() if was is not signal.SIG_IGN}


def restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


def interrupted() -> bool:
    return bool(_received)


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused while handling, an interrupt."""
    if interrupted():
        return True
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return True
        stack += [current.__cause__, current.__context__]
    return False


def finish_interrupted() -> int:
    """Remove what this run staged (ignoring further signals meanwhile), say so in one line, return 130."""
    import shutil

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    for staging in list(live_staging):
        shutil.rmtree(staging, ignore_errors=True)
        live_staging.discard(staging)
    line = INTERRUPTED_LINE
    if published:
        line = f"ckpt-migrate: interrupted after publishing {', '.join(map(str, published))}; nothing else was"
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return EXIT_INTERRUPTED


def entry_point() -> None:
    """The ``ckpt-migrate`` console script: the handler first, then everything else (click, the CLI)."""
    import os

    install()
    try:
        from ckpt_migrate.cli import entry_point as run_cli

        run_cli()
    except BaseException as exc:  # noqa: BLE001 - only an interrupt can get here: the CLI handles the rest
        if isinstance(exc, SystemExit) and not interrupted():
            raise
        if not is_interrupt(exc):
            raise
        os._exit(finish_interrupted())
