"""Check that a LoRA checkpoint loads into a working model with the installed transformers and peft.

Works on any LoRA checkpoint, repaired by this tool or not:

* the adapter must load with ``PeftModel.from_pretrained`` onto the base model (the Auto class is
  chosen from the base ``config.json`` ``architectures``, else from its ``model_type`` and the adapter's
  ``task_type`` or the top-level modules its tensors use);
* every adapter tensor must be used, and every LoRA / modules_to_save tensor the config implies
  must be present;
* nothing on the forward path may be left to random initialisation: the model is loaded twice
  under different torch seeds and the logits on fixed random token ids compared; parameters that
  differ between the two loads are reported as random;
* with ``source_dir`` (the broken original), the source's own function is computed independently
  of the fold -- base model + body LoRA through peft, every LoRA-wrapped head computed unmerged as
  ``W x + b + s * B (A x)`` (DoRA: ``m / ||W + s B A||_row * (W x + s B A x) + b``) -- and the
  checkpoint's logits must agree with it within the dtype tolerance (fp32 1e-4, bf16/fp16 1e-2).

Only :func:`verify_checkpoint` and :func:`compute_source_logits` import torch, transformers and peft.
Layout: :mod:`.result` (the verdict as data), :mod:`.probes` (inputs, logits, fingerprints),
:mod:`.checks` (the checks), :mod:`.source` (the source computed unmerged).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import EXIT_VERIFY_FAILED, UnreadableInputError
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.formats.adapter import ADAPTER_CONFIG, EXPORT_MANIFEST, read_manifest
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import load_state
from ckpt_migrate.formats.hub import resolve_model
from ckpt_migrate.verification.result import SEEDS, TOLERANCES, VerifyResult

__all__ = [
    "EXIT_VERIFY_FAILED",
    "SEEDS",
    "TOLERANCES",
    "VerifyResult",
    "choose_auto_class",
    "compute_source_logits",
    "verify_checkpoint",
]


def verify_checkpoint(
    checkpoint_dir: str | Path,
    base_model_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
) -> VerifyResult:
    """Load ``checkpoint_dir`` onto ``base_model_dir`` with the installed peft and judge it.

    A directory written by ``export`` (a ``config.json``, no adapter) is loaded with plain transformers
    instead, and compared with ``source_dir``'s own function on ``base_model_dir``.

    Raises :class:`~ckpt_migrate.core.errors.UnreadableInputError` for inputs that cannot be read
    (missing directories, invalid configs, a base model transformers cannot load); everything
    wrong with the checkpoint itself is a failed verdict with its reasons.

    >>> verify_checkpoint("fixed/checkpoint-500", "bart-base", source_dir="run/checkpoint-500").ok  # doctest: +SKIP
    True
    """
    checkpoint = _adapter_dir(checkpoint_dir, "checkpoint")
    base = _base_model(base_model_dir)
    source = _adapter_dir(source_dir, "source") if source_dir is not None else None
    source_state = load_state(source) if source is not None else None
    merged = (checkpoint / "config.json").is_file() and not (checkpoint / ADAPTER_CONFIG).exists()
    state = None if merged else load_state(checkpoint)
    adapter = source_state if merged else state
    described = BaseModel(checkpoint) if merged else base
    auto_name = choose_auto_class(
        described.config(),
        adapter.config if adapter else {},
        described.directory / "config.json",
        adapter.tensors if adapter else (),
    )

    import peft
    import transformers

    result = VerifyResult(
        ok=False,
        reasons=[],
        max_logit_diff_between_loads=math.nan,
        random_parameters=[],
        unused_tensors=[],
        missing_tensors=[],
        max_logit_diff_vs_source=None,
        checkpoint=str(checkpoint),
        base_model=str(base.directory),
        source=str(source) if source is not None else None,
        model_class=auto_name,
        peft_version=peft.__version__,
        transformers_version=transformers.__version__,
    )
    from ckpt_migrate.verification.checks import run_checks, run_merged_checks
    from ckpt_migrate.verification.probes import preserved_rng, quiet

    with quiet(), preserved_rng():
        if state is None:  # a model written by ``export``: plain transformers, no adapter
            run_merged_checks(result, BaseModel(checkpoint), base, auto_name, source, source_state)
        else:
            run_checks(result, checkpoint, state, base, auto_name, source, source_state)
    result.losses = _recorded_losses(checkpoint, state)
    result.ok = not result.reasons
    return result


def _recorded_losses(checkpoint: Path, state: CheckpointState | None) -> list[str]:
    """The losses an --allow-lossy ``fix`` (in the state, from its manifest) or ``export`` recorded."""
    if state is not None:
        return list(state.losses)
    return list((read_manifest(checkpoint, EXPORT_MANIFEST) or {}).get("losses", []))


def compute_source_logits(source_dir: str | Path, base_model_dir: str | Path, inputs: Any) -> tuple[Any, str]:
    """A checkpoint's own logits on ``inputs`` (token ids, or a dict of the model's inputs: ``pixel_values``, ...),
    every LoRA-wrapped head computed unmerged.

    Returns ``(logits, "")``, or ``(None, why)`` when the source's function cannot be computed
    independently (e.g. its head base weights are random). ``verify_checkpoint(..., source_dir=)``
    compares against exactly this.
    """
    from ckpt_migrate.verification.probes import preserved_rng, quiet
    from ckpt_migrate.verification.source import source_logits

    source = _adapter_dir(source_dir, "source")
    base = _base_model(base_model_dir)
    state = load_state(source)
    auto_name = choose_auto_class(base.config(), state.config, base.directory / "config.json", state.tensors)
    with quiet(), preserved_rng():
        return source_logits(source, state, base, auto_name, inputs)


def choose_auto_class(
    base_config: dict[str, Any],
    adapter_config: dict[str, Any],
    where: Path | None = None,
    tensor_names: Iterable[str] = (),
) -> str:
    """The transformers Auto class of the base: from ``architectures``, else ``model_type`` and the adapter's
    ``task_type`` or, without one, the top-level modules of its ``tensor_names`` (one resolver:
    :func:`ckpt_migrate.formats.architecture.choose_model`)."""
    from ckpt_migrate.formats.architecture import choose_model

    auto_class = choose_model(base_config, adapter_config, tensor_names, where).auto_class
    assert auto_class is not None  # the classification tasks always name their Auto class
    return auto_class


def _adapter_dir(path: str | Path, what: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise UnreadableInputError(f"{what} directory not found", directory)
    if not directory.is_dir():
        raise UnreadableInputError(f"{what} is not a directory (expected an adapter checkpoint directory)", directory)
    return directory


def _base_model(name_or_path: str | Path) -> BaseModel:
    return BaseModel(resolve_model(name_or_path))
