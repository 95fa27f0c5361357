"""What a person at a terminal sees while a command runs: one byte bar per write, and a line for each slow phase.

Everything goes to stderr, only when it is a terminal (or ``progress=True``), never with ``--quiet``
(``progress=False``). A bar's total is what its writer will count (:class:`Budget` makes an estimate exact), so
it ends at 100%. A phase that lasts over :data:`PHASE_AFTER_SECONDS` (importing torch, building a model on the meta
device, loading a base model, a verify probe) is named on its own line when that second has passed, so the
screen never sits silent for long and a fast phase prints nothing. A phase is also where an interrupt a library
swallowed is raised again. A command made of several slow steps (``verify``: the static proof, two loads, the
source's logits) opens :func:`steps`, and the code of each step, however deep, names it with :func:`step`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

PHASE_AFTER_SECONDS = 1.0


def wanted(progress: bool | None) -> bool:
    """``progress`` as asked; unasked (None): whether stderr is a terminal."""
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def label(relative: str, source: Path) -> str:
    """How a bar names a checkpoint: its path in the run directory, or the directory's own name (never ".")."""
    return relative if relative not in ("", ".") else (source.resolve().name or str(source))


def byte_bar(total: int, description: str, progress: bool | None) -> Any:
    """A tqdm bar of ``total`` bytes on stderr (disabled unless :func:`wanted`)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not wanted(progress),
        dynamic_ncols=True,
    )


class Budget:
    """Forward at most ``planned`` bytes to ``on_bytes``; :meth:`finish` forwards what was not counted.

    For a piece of work whose byte count is only estimated ahead (a rewritten pickle, a safetensors file with
    its header), so the bar's total stays right: it never runs past it, and ends exactly on it.
    """

    def __init__(self, on_bytes: Callable[[int], None] | None, planned: int):
        self._on_bytes, self._left, self._lock = on_bytes, planned, threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            n = min(n, self._left)
            self._left -= n
        if n and self._on_bytes is not None:
            self._on_bytes(n)

    def finish(self) -> None:
        with self._lock:
            n, self._left = self._left, 0
        if n and self._on_bytes is not None:
            self._on_bytes(n)


def _stop_if_interrupted() -> None:
    """Raise the interrupt a library swallowed during the phase (transformers' lazy imports re-raise one as a
    ModuleNotFoundError, and a caller may recover from that), so the run stops where the phase ends."""
    from ckpt_migrate import interrupts

    if interrupts.interrupted():
        raise KeyboardInterrupt


def _say(line: str) -> None:
    try:
        if "tqdm" in sys.modules:  # above any bar being drawn, not through it
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def phase(text: str, progress: bool | None) -> Iterator[None]:
    """Name ``text`` on stderr if it is still running after :data:`PHASE_AFTER_SECONDS` (and how long it took)."""
    if not wanted(progress):
        yield
        _stop_if_interrupted()
        return
    started, said = time.monotonic(), threading.Event()

    def announce() -> None:
        said.set()
        _say(f"ckpt-migrate: {text} ...")

    timer = threading.Timer(PHASE_AFTER_SECONDS, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    _stop_if_interrupted()
    if said.is_set():  # not after an error or an interrupt: its one line is the last word
        _say(f"ckpt-migrate: {text}: done in {time.monotonic() - started:.1f} s")


#: The :func:`steps` open in this thread of control: its heading and ``progress`` (None: no command asked for steps).
_steps: ContextVar[tuple[str, bool | None] | None] = ContextVar("ckpt_migrate_steps", default=None)


@contextlib.contextmanager
def steps(heading: str, progress: bool | None) -> Iterator[None]:
    """A command of several slow steps: each :func:`step` run inside is a :func:`phase` headed ``heading``."""
    token = _steps.set((heading, progress))
    try:
        yield
    finally:
        _steps.reset(token)
    _stop_if_interrupted()


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    """One step of the :func:`steps` open here, named ``heading: text`` if it lasts over a second; outside any
    (a library caller of the verification code): nothing shown."""
    opened = _steps.get()
    if opened is None:
        yield
        return
    heading, progress = opened
    with phase(f"{heading}: {text}", progress):
        yield
