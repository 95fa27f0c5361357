"""What a migration is: the contract every module in ``migrations/`` fulfils.

A migration is a module with ``ID``, a one-line ``SUMMARY``, ``CAUSED_BY`` (the upstream release and
issue that produced the broken format), ``detect(state, context)`` and ``plan(state, context)``. When
its plan rewrites a file (a :class:`~ckpt_migrate.core.plan.FileRewrite` naming it), the module also
has ``write(rewrite, source, target)``; the executor calls it for that file and nothing else. A
module may also have ``failures(state)``: where the unrepaired checkpoint fails, for ``inspect``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ckpt_migrate.core.plan import CheckpointState, FileRewrite, Options, PlannedTensor

if TYPE_CHECKING:
    from ckpt_migrate.formats.base_model import BaseModel
    from ckpt_migrate.formats.digests import OnBytes


#: Reads one input tensor (torch): ``read(name)`` from the adapter, ``read(name, base_file)`` from a base model file.
TensorSource = Callable[..., Any]


@dataclass(frozen=True)
class Context:
    """What a migration may consult besides the state it edits: the input as read, the base model, options."""

    source: CheckpointState  # the checkpoint as read; never edited
    base_model: BaseModel | None
    options: Options


@runtime_checkable
class Migration(Protocol):
    ID: str
    SUMMARY: str
    CAUSED_BY: str

    def detect(self, state: CheckpointState, context: Context) -> bool:
        """Whether the checkpoint needs this step. Reads config, file sizes and headers only."""
        ...

    def plan(self, state: CheckpointState, context: Context) -> None:
        """Edit ``state`` into what this step writes; append to ``state.unrecoverable`` to refuse."""
        ...


@runtime_checkable
class RewritingMigration(Migration, Protocol):
    """A migration whose plan rewrites files: the executor hands it each :class:`FileRewrite` naming it."""

    def write(
        self, rewrite: FileRewrite, source: Path, target: Path, on_bytes: OnBytes | None = None
    ) -> Callable[[], str] | None:
        """Write the new file ``target`` (exclusive create, fsynced) from ``source`` as ``rewrite`` says.

        May return a function giving the sha256 of ``target`` as written, read back while it is written
        (``on_bytes`` then counts the bytes hashed); on None the executor hashes ``target`` afterwards."""
        ...


@runtime_checkable
class ComputingMigration(Migration, Protocol):
    """A migration that plans tensors of kind ``COMPUTED``: the executor asks it for their values."""

    def compute(self, tensor: PlannedTensor, read: TensorSource) -> Any:
        """The torch tensor for ``tensor`` (planned shape and dtype); ``read(name, base_file=None)`` loads inputs."""
        ...


@runtime_checkable
class ExplainingMigration(Migration, Protocol):
    """A migration that can say where the unrepaired checkpoint fails, whatever the target."""

    def failures(self, state: CheckpointState) -> list[str]:
        """One line per failure: ``<which stacks>: <the message people see there>``; [] when not broken this way."""
        ...


def check_migration(module: ModuleType) -> Migration:
    """The module itself, once it is known to fulfil the contract (fails loudly at import otherwise)."""
    missing = [a for a in ("ID", "SUMMARY", "CAUSED_BY", "detect", "plan") if not hasattr(module, a)]
    if missing or not isinstance(module, Migration):
        raise TypeError(f"migration {module.__name__} lacks {', '.join(missing) or 'a callable detect/plan'}")
    if not module.__name__.rsplit(".", 1)[-1] == "m" + module.ID:
        raise TypeError(f"migration {module.__name__}: its file must be named m{module.ID}.py")
    return module  # type: ignore[return-value]
