"""What a migration is: the contract every module in ``migrations/`` fulfils, and everything the runner asks of it.

A migration is a module with (see :class:`Migration`):

- ``ID`` (its file name without the ``m``), a one-line ``SUMMARY``, ``CAUSED_BY`` (the upstream release and issue
  that produced the broken format) and a docstring saying what broke and why;
- ``CHANGES_TRAINABLE_PARAMETERS``: whether its plan changes the adapter's trainable parameters (which tensors are
  trained, or their names). The planner records it for the checkpoint, so that the migrations that drop state of
  the old parameters (0003 the optimizer, 0009 the engine state) run after it; no migration sets it by hand;
- ``detect(state, context)`` and ``plan(state, context)``, called by the planner (``ckpt_migrate.planner``).

And the hooks the runner calls when the plan says so (:data:`OPTIONAL_HOOKS`):

- ``write(rewrite, source, target, on_bytes=None)`` when its plan rewrites a file (a
  :class:`~ckpt_migrate.core.plan.FileRewrite` naming it): the executor (``execute/write.py``) calls it for that file;
- ``compute(tensor, read)`` when it plans tensors of kind ``COMPUTED`` naming it: the executor
  (``execute/tensors.py``) asks it for their values;
- ``failures(state)``: where the unrepaired checkpoint fails, for ``inspect`` (the planner collects them).

:func:`check_migration` checks all of it when the index is built; ``tests/test_migration_contract.py`` checks that
the runner calls nothing else.
"""

from __future__ import annotations

import inspect
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
    CHANGES_TRAINABLE_PARAMETERS: bool

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


#: The hooks every migration has, with their parameters (the planner calls them).
REQUIRED_HOOKS: dict[str, tuple[str, ...]] = {"detect": ("state", "context"), "plan": ("state", "context")}
#: The hooks a migration has when its plan needs them (RewritingMigration, ComputingMigration, ExplainingMigration).
OPTIONAL_HOOKS: dict[str, tuple[str, ...]] = {
    "write": ("rewrite", "source", "target", "on_bytes"),
    "compute": ("tensor", "read"),
    "failures": ("state",),
}
ATTRIBUTES = ("ID", "SUMMARY", "CAUSED_BY", "CHANGES_TRAINABLE_PARAMETERS")
#: Every name of the contract: all that the runner, the report and the docs may read from a migration.
CONTRACT = (*ATTRIBUTES, *REQUIRED_HOOKS, *OPTIONAL_HOOKS)


def check_migration(module: ModuleType) -> Migration:
    """The module itself, once it is known to fulfil the contract (fails loudly at import otherwise)."""
    name = module.__name__
    missing = [a for a in (*ATTRIBUTES, *REQUIRED_HOOKS) if not hasattr(module, a)]
    if missing:
        raise TypeError(f"migration {name} lacks {', '.join(missing)}")
    if not name.rsplit(".", 1)[-1] == "m" + module.ID:
        raise TypeError(f"migration {name}: its file must be named m{module.ID}.py")
    if not isinstance(module.CHANGES_TRAINABLE_PARAMETERS, bool):
        raise TypeError(f"migration {name}: CHANGES_TRAINABLE_PARAMETERS must be True or False")
    for hook, params in {**REQUIRED_HOOKS, **OPTIONAL_HOOKS}.items():
        function = getattr(module, hook, None)
        if function is not None and (not callable(function) or tuple(inspect.signature(function).parameters) != params):
            raise TypeError(f"migration {name}: {hook} must be a function of ({', '.join(params)})")
    return module  # type: ignore[return-value]
