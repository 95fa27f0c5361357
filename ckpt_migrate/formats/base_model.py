"""The base model given as ``--base-model``: the only reader of a base model directory.

Tensor names and byte locations come from safetensors headers (no tensor data is read, no torch);
``config.json`` is read as JSON. Only :meth:`BaseModel.choose`, :meth:`BaseModel.meta_model` and
:meth:`BaseModel.load` import transformers: the first names the model class (``architectures``, else
``model_type`` and the adapter's task), the second builds it on the meta device (no weights), the third loads
the model for ``verify``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.plan import PlannedTensor, Source, SourceKind
from ckpt_migrate.core.text import describe_exception
from ckpt_migrate.formats.files import read_json_object
from ckpt_migrate.formats.hub import check_model_directory
from ckpt_migrate.formats.safetensors import SafetensorsHeader, TensorInfo, read_header

if TYPE_CHECKING:
    from ckpt_migrate.formats.architecture import ModelChoice

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


class BaseModel:
    """A local Hugging Face model directory (a hub cache snapshot of symlinks works too)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        check_model_directory(self.directory)
        self._headers: dict[str, SafetensorsHeader] = {}
        self._weight_map: dict[str, str] | None = None

    # ------------------------------------------------------------------ tensors (headers only)

    @classmethod
    def open(cls, directory: str | Path) -> BaseModel:
        """The base model, with its safetensors index read and checked now (``fix`` needs its tensors)."""
        base = cls(directory)
        base._index()
        return base

    def has_safetensors(self) -> bool:
        return any((self.directory / name).is_file() for name in (SINGLE_FILE, SHARD_INDEX))

    def _index(self) -> dict[str, str]:
        if self._weight_map is None:
            if (self.directory / SINGLE_FILE).is_file():
                self._weight_map = {name: SINGLE_FILE for name in self._header(SINGLE_FILE).tensors}
            elif (self.directory / SHARD_INDEX).is_file():
                weight_map = read_json_object(self.directory / SHARD_INDEX).get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise UnreadableInputError(
                        "weight_map must map tensor names to shard files", self.directory / SHARD_INDEX
                    )
                self._weight_map = dict(weight_map)
            else:
                raise UnreadableInputError(
                    f"no {SINGLE_FILE} or {SHARD_INDEX} (only safetensors base models are read)", self.directory
                )
        return self._weight_map

    def _header(self, filename: str) -> SafetensorsHeader:
        if filename not in self._headers:
            # Judge the index entry itself, not where links point: hub cache snapshots are symlinks into ../blobs.
            normalized = os.path.normpath(filename)
            path = self.directory / normalized
            if os.path.isabs(filename) or normalized == ".." or normalized.startswith(".." + os.sep):
                raise UnreadableInputError("shard path leaves the model directory", path)
            self._headers[filename] = read_header(path)
        return self._headers[filename]

    def tensor_names(self) -> list[str]:
        """Every tensor of the base model, in the order its index (or single file's header) lists them."""
        return list(self._index())

    def names_under(self, module: str) -> list[str]:
        """Names of the tensors of ``module`` and its submodules."""
        return sorted(name for name in self._index() if name.startswith(module + "."))

    def has(self, name: str) -> bool:
        return name in self._index()

    def planned(self, name: str, prefix: str = "") -> PlannedTensor:
        """The base tensor ``name``, planned unchanged as ``prefix + name`` (its bytes copied, never loaded)."""
        header, info = self.locate(name)
        return PlannedTensor(
            prefix + name, info.shape, info.dtype, Source(SourceKind.BASE, name, base_file=header.path)
        )

    def locate(self, name: str) -> tuple[SafetensorsHeader, TensorInfo]:
        header = self._header(self._index()[name])
        if name not in header.tensors:
            raise UnreadableInputError(f"index names {name!r} but the shard lacks it", header.path)
        return header, header.tensors[name]

    # ------------------------------------------------------------------ the model (transformers)

    def config(self) -> dict[str, Any]:
        return read_json_object(self.directory / CONFIG)

    def choose(
        self,
        adapter_config: Mapping[str, Any] | None = None,
        tensor_names: Iterable[str] = (),
        tasks: Mapping[str, str] | None = None,
    ) -> ModelChoice:
        """The base's transformers class for this adapter (see :func:`~ckpt_migrate.formats.architecture.choose_model`;
        ``tasks`` default: the classification heads). Imports transformers."""
        from ckpt_migrate.formats.architecture import CLASSIFICATION, choose_model

        where = self.directory / CONFIG
        return choose_model(self.config(), adapter_config, tensor_names, where, tasks or CLASSIFICATION)

    def meta_model(self, adapter_config: Mapping[str, Any] | None = None, tensor_names: Iterable[str] = ()) -> Any:
        """The base's architecture built on the meta device: parameter names and shapes only.

        The class is ``config.json``'s ``architectures``; without them, the class transformers maps ``model_type``
        to for the adapter's task (``adapter_config``'s task_type, else the top-level modules of ``tensor_names``).
        """
        import transformers

        from ckpt_migrate.formats.architecture import ANY_TASK, meta_instance

        choice = self.choose(adapter_config, tensor_names, ANY_TASK)
        model_class = getattr(transformers, choice.model_class or "", None)
        if model_class is None:
            named = f"class {choice.model_class!r}" if choice.model_class else f"{choice.auto_class} class"
            raise UnreadableInputError(
                f"transformers {transformers.__version__} has no {named} ({choice.how})",
                self.directory / CONFIG,
            )
        config = transformers.AutoConfig.from_pretrained(self.directory)
        return meta_instance(model_class, config)

    def load(self, auto_class_name: str, seed: int) -> tuple[Any, set[str]]:
        """The model (weights as saved, eval mode, torch seeded first) and the names transformers initialised."""
        import torch
        import transformers

        torch.manual_seed(seed)
        auto_class = getattr(transformers, auto_class_name)
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            model, info = auto_class.from_pretrained(
                str(self.directory), output_loading_info=True, **{dtype_kw: "auto"}
            )
        except Exception as exc:  # noqa: BLE001 - any failure to load the base is an input problem
            raise UnreadableInputError(
                f"transformers {transformers.__version__} cannot load it as {auto_class_name}: "
                f"{describe_exception(exc)}",
                self.directory,
            ) from exc
        return model.eval(), set(info.get("missing_keys") or [])
