"""``verify`` after the static proof: what ``ckpt_migrate.verify`` and ``fix --verify`` run on a written checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ckpt_migrate.formats.adapter import ADAPTER_CONFIG
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.hub import resolve_model
from ckpt_migrate.progress import step

if TYPE_CHECKING:
    from ckpt_migrate.verification import VerifyResult


def verify_after_proof(
    checkpoint: str | Path, base_model: str | Path | None, *, source: str | Path | None
) -> VerifyResult:
    """``verify``, after the static proof: a base that does not fit the adapter is exit 5, any other failed proof
    a reason of the verdict (exit 8)."""
    from ckpt_migrate.formats.checkpoint import load_state
    from ckpt_migrate.proof import CAUSE_BASE, prove_adapter
    from ckpt_migrate.verification import verify_checkpoint

    proof = None
    directory = Path(checkpoint)
    base = BaseModel(resolve_model(base_model)) if base_model is not None else None
    with step("importing torch, transformers and peft"):  # the first time: seconds, before anything is built
        import peft  # noqa: F401
    if base is not None and base.has_safetensors() and (directory / ADAPTER_CONFIG).is_file():
        with step("static proof: building the model on the meta device"):
            proof = prove_adapter(load_state(directory), base)
        if proof.state == "failed" and proof.cause == CAUSE_BASE:
            raise proof.error(directory, "the static proof failed")
    verdict = verify_checkpoint(checkpoint, base_model, source_dir=source)
    if proof is not None and proof.state == "failed":
        verdict.reasons.insert(0, f"static proof: {proof.reason}")
        verdict.ok = False
    return verdict
