"""A repair plan as plain data: what detection decided, what a dry run renders and apply executes.

Migrations build the plan by editing a :class:`CheckpointState`, a model of the output
checkpoint that starts as a copy of the input. The plan is the difference between the two.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Status = Literal["clean", "repairable", "repaired", "unrecoverable"]


@dataclass(frozen=True)
class Source:
    """Where an output tensor's value comes from.

    ``kind`` is ``"adapter"`` (a tensor of the input adapter, unchanged), ``"base"`` (a tensor of
    the ``--base-model`` checkpoint, unchanged) or ``"fold"`` (a LoRA delta folded into a weight).
    """

    kind: Literal["adapter", "base", "fold"]
    tensor: str = ""
    lora_A: str = ""
    lora_B: str = ""
    magnitude: str = ""
    weight_kind: Literal["adapter", "base"] = "adapter"
    scale: float = 0.0
    fan_in_fan_out: bool = False

    def describe(self) -> str:
        """A one-line formula; adapter names are shortened by their ``base_model.model.`` prefix."""

        def short(name: str) -> str:
            return name.removeprefix("base_model.model.")

        if self.kind == "adapter":
            return f"copied from {short(self.tensor)}"
        if self.kind == "base":
            return f"copied from base model {self.tensor}"
        weight = f"base model {self.tensor}" if self.weight_kind == "base" else short(self.tensor)
        formula = f"{weight} + {self.scale:.6g} * {short(self.lora_B)} @ {short(self.lora_A)}"
        if self.fan_in_fan_out:
            formula = f"{weight} + {self.scale:.6g} * ({short(self.lora_B)} @ {short(self.lora_A)}).T"
        if self.magnitude:
            return f"DoRA: {short(self.magnitude)} * row_normalize({formula})"
        return formula


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor of the output adapter."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: Source

    @property
    def unchanged(self) -> bool:
        return self.source.kind == "adapter" and self.source.tensor == self.name

    def as_dict(self, with_how: bool = True) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if with_how:
            entry["how"] = self.source.describe()
        return entry


@dataclass(frozen=True)
class FileRewrite:
    """A file of the checkpoint that is rewritten rather than copied; ``kind`` selects the writer."""

    kind: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointState:
    """The checkpoint as it will be written. Migrations edit it; the runner diffs it against the input."""

    source_dir: Path
    config: dict[str, Any]
    tensors: dict[str, PlannedTensor]
    files: dict[str, int]
    weights_file: str
    applied: list[str] = field(default_factory=list)
    base_model: Any = None
    trainable_parameters_changed: bool = False
    warnings: list[str] = field(default_factory=list)
    unrecoverable: list[str] = field(default_factory=list)
    dropped_files: dict[str, str] = field(default_factory=dict)
    rewritten_files: dict[str, FileRewrite] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    original: CheckpointState | None = None

    def clone(self) -> CheckpointState:
        # Planned tensors are frozen: share them and copy only the mapping (deep-copying thousands
        # of them was most of a dry run's time).
        twin = copy.deepcopy(replace(self, tensors={}))
        twin.tensors = dict(self.tensors)
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


@dataclass
class CheckpointPlan:
    """Everything a repair of one checkpoint will do, computed without reading tensor data."""

    source: Path
    relative: str
    status: Status
    migrations: list[str]
    before: CheckpointState
    after: CheckpointState

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
        keys = sorted(set(self.before.config) | set(self.after.config))
        return {
            key: {"before": self.before.config.get(key), "after": self.after.config.get(key)}
            for key in keys
            if self.before.config.get(key) != self.after.config.get(key)
        }

    @property
    def warnings(self) -> list[str]:
        return list(self.after.warnings)
