"""Header-only access to a local Hugging Face model directory given as ``--base-model``."""

from __future__ import annotations

import os
from pathlib import Path

from ckpt_migrate.checkpoint import read_json_object
from ckpt_migrate.errors import UnreadableInputError
from ckpt_migrate.safetensors_io import SafetensorsHeader, TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class BaseModel:
    """The tensors of a base model checkpoint, indexed by name, read from headers only."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UnreadableInputError("--base-model must be a local model directory", self.directory)
        self._headers: dict[str, SafetensorsHeader] = {}
        if (self.directory / SINGLE_FILE).is_file():
            self._weight_map = {name: SINGLE_FILE for name in self._header(SINGLE_FILE).tensors}
        elif (self.directory / SHARD_INDEX).is_file():
            index = read_json_object(self.directory / SHARD_INDEX)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UnreadableInputError(
                    "weight_map must map tensor names to shard files", self.directory / SHARD_INDEX
                )
            self._weight_map = dict(weight_map)
        else:
            raise UnreadableInputError(
                f"no {SINGLE_FILE} or {SHARD_INDEX} (only safetensors base models are read)", self.directory
            )

    def _header(self, filename: str) -> SafetensorsHeader:
        if filename not in self._headers:
            # Judge the index entry itself, not where links point: hub cache snapshots are symlinks into ../blobs.
            normalized = os.path.normpath(filename)
            path = self.directory / normalized
            if os.path.isabs(filename) or normalized == ".." or normalized.startswith(".." + os.sep):
                raise UnreadableInputError("shard path leaves the model directory", path)
            self._headers[filename] = read_header(path)
        return self._headers[filename]

    def names_under(self, module: str) -> list[str]:
        """Names of the tensors of ``module`` and its submodules."""
        return sorted(name for name in self._weight_map if name.startswith(module + "."))

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def locate(self, name: str) -> tuple[SafetensorsHeader, TensorInfo]:
        header = self._header(self._weight_map[name])
        if name not in header.tensors:
            raise UnreadableInputError(f"index names {name!r} but the shard lacks it", header.path)
        return header, header.tensors[name]
