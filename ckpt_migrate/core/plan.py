"""A repair plan as plain data: what detection decided, what a dry run renders and apply executes.

Migrations build the plan by editing a :class:`CheckpointState`, a model of the output checkpoint
that starts as a copy of the input. The runner then freezes both into a :class:`CheckpointPlan`,
whose properties are the difference between them. Nothing here holds a reader, a file handle or a
model: a plan can be rendered, compared and executed without its planner.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

# declared with the command-line options (core/options.py); part of the plan as the migrations see it
from ckpt_migrate.core.options import OptimizerPolicy as OptimizerPolicy
from ckpt_migrate.core.options import Options as Options
from ckpt_migrate.core.peft_layout import short_name


class Status(str, Enum):
    """What became of one checkpoint."""

    CLEAN = "clean"
    REPAIRABLE = "repairable"
    REPAIRED = "repaired"  # written, and the static proof showed it loads into the target model (ckpt_migrate.proof)
    WRITTEN = "written"  # written, not proven: no base model at hand to prove it on
    UNRECOVERABLE = "unrecoverable"
    UNREADABLE = "unreadable"
    VERIFY_FAILED = "verify_failed"
    FAILED = "failed"  # a fleet task did not finish (its output failed, its worker was lost): re-run to resume

    __str__ = str.__str__  # f-strings and reports show the value


class SourceKind(str, Enum):
    ADAPTER = "adapter"  # a tensor of the input adapter, unchanged
    BASE = "base"  # a tensor of a --base-model safetensors file, unchanged
    FOLD = "fold"  # a LoRA delta folded into a weight
    COMPUTED = "computed"  # computed by the ``compute`` of migration ``migration`` (see core/migration.py)

    __str__ = str.__str__


@dataclass(frozen=True)
class Source:
    """Where an output tensor's value comes from.

    ``tensor`` names a tensor of the input adapter, or, with ``base_file`` set, of that base model
    file (for a fold: the weight the delta is folded into). A ``COMPUTED`` tensor names the migration
    that computes it, a one-line ``formula`` for the report, and a frozen ``payload`` for that migration.
    """

    kind: SourceKind
    tensor: str = ""
    base_file: Path | None = None
    lora_A: str = ""
    lora_B: str = ""
    magnitude: str = ""
    scale: float = 0.0
    fan_in_fan_out: bool = False
    migration: str = ""
    formula: str = ""
    payload: Any = None

    def describe(self) -> str:
        """A one-line formula; adapter names are shortened by their ``base_model.model.`` prefix."""
        weight = f"base model {self.tensor}" if self.base_file is not None else short_name(self.tensor)
        if self.kind is SourceKind.ADAPTER:
            return f"copied from {weight}"
        if self.kind is SourceKind.BASE:
            return f"copied from {weight}"
        if self.kind is SourceKind.COMPUTED:
            return self.formula
        delta = f"{short_name(self.lora_B)} @ {short_name(self.lora_A)}"
        formula = f"{weight} + {self.scale:.6g} * " + (f"({delta}).T" if self.fan_in_fan_out else delta)
        return f"DoRA: {short_name(self.magnitude)} * row_normalize({formula})" if self.magnitude else formula


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor of the output adapter."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: Source

    def as_dict(self, with_how: bool = True) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if with_how:
            entry["how"] = self.source.describe()
        return entry


@dataclass(frozen=True)
class FileRewrite:
    """A file that is rewritten rather than copied, by the ``write`` of migration ``migration``.

    ``listed``: named lists the report shows (e.g. optimizer states kept / reset / dropped).
    ``payload``: frozen data only that migration's writer reads.
    """

    migration: str
    reason: str
    listed: tuple[tuple[str, tuple[str, ...]], ...] = ()
    payload: Any = None


@dataclass
class CheckpointState:
    """The checkpoint as it will be written. Migrations edit it during planning; nothing else does."""

    source_dir: Path
    config: dict[str, Any]
    tensors: dict[str, PlannedTensor]
    files: dict[str, int]
    weights_file: str | None  # None: a Trainer checkpoint without an adapter
    applied: list[str] = field(default_factory=list)
    trainable_parameters_changed: bool = False  # set by the planner: a migration that ran declares it
    warnings: list[str] = field(default_factory=list)
    unrecoverable: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)  # trained values the output does not have (--allow-lossy)
    dropped_files: dict[str, str] = field(default_factory=dict)
    rewritten_files: dict[str, FileRewrite] = field(default_factory=dict)

    def clone(self) -> CheckpointState:
        # Planned tensors are frozen: share them and copy only the mapping (deep-copying thousands
        # of them was most of a dry run's time).
        tensors, self.tensors = self.tensors, {}
        try:
            twin = copy.deepcopy(self)
        finally:
            self.tensors = tensors
        twin.tensors = dict(tensors)
        return twin

    def remove_tensor(self, name: str) -> None:
        del self.tensors[name]

    def add_tensor(self, tensor: PlannedTensor) -> None:
        self.tensors[tensor.name] = tensor

    def drop_file(self, name: str, reason: str) -> None:
        self.files.pop(name)
        self.dropped_files[name] = reason

    def rewrite_file(self, name: str, rewrite: FileRewrite) -> None:
        self.rewritten_files[name] = rewrite

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


@dataclass(frozen=True)
class CheckpointPlan:
    """Everything a repair of one checkpoint will do, computed without reading tensor data."""

    source: Path
    relative: str
    status: Status
    migrations: tuple[str, ...]
    before: CheckpointState
    after: CheckpointState
    not_needed: tuple[str, ...] = ()  # checked and not needed (or already applied)
    fails_on: tuple[str, ...] = ()  # where the unrepaired checkpoint fails: "<stacks>: <message>"
    adapters: tuple[CheckpointPlan, ...] = ()  # adapters in subfolders (``relative``: the subfolder = adapter name)

    def _with_adapters(self, field_name: str) -> list[str]:
        own = list(getattr(self.after, field_name))
        return own + [f"adapter {a.relative}: {line}" for a in self.adapters for line in getattr(a.after, field_name)]

    @property
    def rewritten_adapters(self) -> list[tuple[str, CheckpointPlan]]:
        """The adapters written anew, by path prefix ("" at the top, "task_b/" in a subfolder).

        An adapter is rewritten when its tensors or its config change; of its two files only the one that changes
        is written anew (``weights_changed``, ``config_changed``), the other is copied byte for byte, as is every
        adapter a migration ran on without changing it (the manifest records the migrations, not the adapter).
        """
        candidates = [("", self)] + [(f"{adapter.relative}/", adapter) for adapter in self.adapters]
        return [(p, a) for p, a in candidates if a.after.weights_file and (a.weights_changed or a.config_changed)]

    @property
    def weights_changed(self) -> bool:
        """Whether the adapter's weights file is written anew: a tensor added, removed or recomputed, or a .bin
        rewritten as safetensors."""
        before, after = self.before, self.after
        return after.weights_file != before.weights_file or before.tensors != after.tensors

    @property
    def config_changed(self) -> bool:
        return self.before.config != self.after.config

    @property
    def tensors_removed(self) -> list[PlannedTensor]:
        return [t for name, t in sorted(self.before.tensors.items()) if self.after.tensors.get(name) != t]

    @property
    def tensors_added(self) -> list[PlannedTensor]:
        return [t for name, t in sorted(self.after.tensors.items()) if self.before.tensors.get(name) != t]

    @property
    def files_removed(self) -> list[tuple[str, int, str]]:
        return [(name, self.before.files[name], reason) for name, reason in sorted(self.after.dropped_files.items())]

    @property
    def files_rewritten(self) -> list[tuple[str, FileRewrite]]:
        return sorted(self.after.rewritten_files.items())

    @property
    def config_changes(self) -> dict[str, dict[str, Any]]:
        """``{key: {"before": .., "after": ..}}``, plus ``"added"``/``"removed": True`` where a key appears or goes."""
        before, after = self.before.config, self.after.config
        changes: dict[str, dict[str, Any]] = {}
        for key in sorted(set(before) | set(after)):
            if key in before and key in after and before[key] == after[key]:
                continue
            change = {"before": before.get(key), "after": after.get(key)}
            if key not in after:
                change["removed"] = True
            elif key not in before:
                change["added"] = True
            changes[key] = change
        return changes

    @property
    def warnings(self) -> list[str]:
        """Every warning, those of subfolder adapters prefixed with their name."""
        return self._with_adapters("warnings")

    @property
    def unrecoverable(self) -> list[str]:
        """Why the checkpoint cannot be repaired (its own reasons and its subfolder adapters')."""
        return self._with_adapters("unrecoverable")

    @property
    def losses(self) -> list[str]:
        """Trained values the output does not have (only with ``allow_lossy``)."""
        return self._with_adapters("losses")
