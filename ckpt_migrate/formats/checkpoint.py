"""Find checkpoints under a path and read one into a :class:`CheckpointState` (headers only)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.core.tuners import foreign_tuner
from ckpt_migrate.formats.adapter import (
    ADAPTER_CONFIG,
    BIN_WEIGHTS,
    MANIFEST,
    SAFETENSORS_WEIGHTS,
    adapter_tensors,
    read_adapter_config,
    read_manifest,
)
from ckpt_migrate.formats.hub import link_root

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
#: Any of these makes a directory a checkpoint: an adapter, or a Trainer checkpoint with or without one.
CHECKPOINT_MARKERS = (ADAPTER_CONFIG, SAFETENSORS_WEIGHTS, BIN_WEIGHTS, TRAINER_STATE)


def _is_checkpoint(directory: Path) -> bool:
    return any((directory / name).exists() for name in CHECKPOINT_MARKERS) or bool(adapter_subdirs(directory))


def adapter_subdirs(directory: Path) -> list[str]:
    """Subfolders holding an adapter: peft's save_pretrained puts every adapter but "default" in a subfolder named
    after it (a second adapter, or the only one when named: ``get_peft_model(..., adapter_name="task_a")``).

    ``checkpoint-N`` subfolders are separate checkpoints, not adapters.
    """
    found = []
    for child in sorted(directory.iterdir()):
        if child.is_dir() and not child.is_symlink() and not _CHECKPOINT_DIR.match(child.name):
            try:
                if any((child / name).is_file() for name in (ADAPTER_CONFIG, SAFETENSORS_WEIGHTS, BIN_WEIGHTS)):
                    found.append(child.name)
            except OSError:  # an unreadable subfolder: listing the checkpoint's files refuses it, naming it
                continue
    return found


def find_checkpoints(src: Path) -> list[str]:
    """Relative paths of the checkpoints at ``src``: ``"."`` and/or its ``checkpoint-*`` directories."""
    if not src.exists():
        raise UnreadableInputError("no such file or directory", src)
    if not src.is_dir():
        raise UnreadableInputError("not a directory (expected an adapter or checkpoint directory)", src)
    top_level = _is_checkpoint(src)
    nested = nested_checkpoints(src)
    if not top_level and not nested:
        raise UnreadableInputError(
            f"no {ADAPTER_CONFIG} or {TRAINER_STATE} here nor in any checkpoint-*/ directory", src
        )
    # A training output directory often holds the final adapter beside its checkpoint-* directories.
    return (["."] if top_level else []) + nested


def nested_checkpoints(directory: Path) -> list[str]:
    """``checkpoint-N`` subdirectories that are checkpoints, in step order: separate checkpoints."""
    found = []
    for child in directory.iterdir():
        match = _CHECKPOINT_DIR.match(child.name)
        if match and child.is_dir() and not child.is_symlink() and _is_checkpoint(child):
            found.append((int(match.group(1)), child.name))
    return [name for _, name in sorted(found)]


def list_files(directory: Path) -> dict[str, int]:
    """Every regular file below ``directory`` with its size, refusing links that leave it.

    Nested ``checkpoint-N`` adapter directories are separate checkpoints and are not listed.
    """
    root = link_root(directory)
    files: dict[str, int] = {}

    def walk_error(exc: OSError) -> None:  # os.walk would otherwise skip an unreadable directory silently
        raise UnreadableInputError(f"cannot list directory: {exc.strerror or exc}", exc.filename or directory)

    separate = set(nested_checkpoints(directory))
    for dirpath, dirnames, filenames in os.walk(directory, onerror=walk_error, followlinks=False):
        if Path(dirpath) == directory:
            dirnames[:] = [d for d in dirnames if d not in separate]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError) as exc:  # dangling link or a loop
                raise UnreadableInputError("symbolic link cannot be resolved (dangling or a loop)", path) from exc
            if not target.is_relative_to(root):
                raise UnreadableInputError("symbolic link points outside the checkpoint", path)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():
                raise UnreadableInputError("not a regular file", path)
            if not os.access(path, os.R_OK):
                raise UnreadableInputError("permission denied", path)
            files[path.relative_to(directory).as_posix()] = path.stat().st_size
    return files


def load_state(directory: Path) -> CheckpointState:
    """Model one checkpoint from its adapter config, weight headers and file list.

    A Trainer checkpoint without an adapter at its top (a full fine-tune, or adapters only in subfolders) has no
    config, no tensors and ``weights_file`` None: its model files are files like any other. ``files`` lists the
    files of adapter subfolders too (``task_b/adapter_model.safetensors``); :func:`load_subfolder_adapters` reads
    those adapters.
    """
    files = list_files(directory)
    manifest = read_manifest(directory) or {}
    applied = list(manifest.get("migrations_applied", []))
    has_weights = SAFETENSORS_WEIGHTS in files or BIN_WEIGHTS in files
    if ADAPTER_CONFIG not in files:
        if has_weights or (TRAINER_STATE not in files and not adapter_subdirs(directory)):
            raise UnreadableInputError("missing", directory / ADAPTER_CONFIG)
        state = CheckpointState(directory, config={}, tensors={}, files=files, weights_file=None, applied=applied)
    else:
        state = _adapter_state(directory, files, applied)
    state.losses = list(manifest.get("losses", []))  # an earlier --allow-lossy repair: the loss stays with the files
    return state


def load_subfolder_adapters(directory: Path) -> dict[str, CheckpointState]:
    """The adapters in subfolders of a checkpoint, by subfolder (= adapter) name; each lists only its own files."""
    manifest = read_manifest(directory) or {}
    recorded = manifest.get("adapters") if isinstance(manifest.get("adapters"), dict) else {}
    adapters = {}
    for name in adapter_subdirs(directory):
        subfolder = directory / name
        files = list_files(subfolder)
        if ADAPTER_CONFIG not in files:
            raise UnreadableInputError("missing", subfolder / ADAPTER_CONFIG)
        entry = recorded.get(name)
        applied = entry.get("migrations_applied", []) if isinstance(entry, dict) else []
        if not isinstance(applied, list) or not all(isinstance(a, str) for a in applied):
            message = f"adapters.{name}.migrations_applied must be a list of migration ids"
            raise UnreadableInputError(message, directory / MANIFEST)
        adapters[name] = _adapter_state(subfolder, files, list(applied))
    return adapters


def _adapter_state(directory: Path, files: dict[str, int], applied: list[str]) -> CheckpointState:
    has_weights = SAFETENSORS_WEIGHTS in files or BIN_WEIGHTS in files
    if not has_weights:
        raise UnreadableInputError(f"no {SAFETENSORS_WEIGHTS} or {BIN_WEIGHTS}", directory)
    weights_file = SAFETENSORS_WEIGHTS if SAFETENSORS_WEIGHTS in files else BIN_WEIGHTS
    config = read_adapter_config(directory / ADAPTER_CONFIG)
    tensors = adapter_tensors(directory, weights_file)
    other = foreign_tuner(config, tensors)
    if other is not None:
        raise UnreadableInputError(
            f"peft_type is {config['peft_type']!r} but {weights_file} holds {other} tensors and none of its own",
            directory / ADAPTER_CONFIG,
        )
    return CheckpointState(
        source_dir=directory,
        config=config,
        tensors=tensors,
        files=files,
        weights_file=weights_file,
        applied=applied,
    )
