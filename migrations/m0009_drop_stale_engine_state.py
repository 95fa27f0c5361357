"""Drop the optimizer and engine state of DeepSpeed, FSDP and accelerate once the trainable parameters changed.

Trainer's own ``optimizer.pt`` is migration 0003's. Other backends keep state laid out by the trainable parameters
of the broken checkpoint too: DeepSpeed's ``global_step*/`` (``*_optim_states.pt`` ZeRO partitions,
``mp_rank_*_model_states.pt`` with the module state; ``latest`` names the directory), FSDP's
``pytorch_model_fsdp*.bin`` / ``pytorch_model_fsdp_N/`` / ``optimizer_N/`` / ``optimizer.bin``, and accelerate's
``save_state``: ``optimizer*.bin`` and, beside an adapter, ``model.safetensors`` holding the whole PeftModel in
the broken layout. Resuming from them fails as ``optimizer.pt`` does (the parameter groups do not match) or
restores the broken head. They are dropped without being read, and the report states, per backend, what a resume
does then and how to start from the repaired weights. Which file is which is the table of
:mod:`ckpt_migrate.formats.trainer_files`.
"""

from __future__ import annotations

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.formats.safetensors import read_header
from ckpt_migrate.formats.trainer_files import CONSEQUENCES, PEFT_MODEL_STATE, FileKind, classify

ID = "0009_drop_stale_engine_state"
SUMMARY = "Drop DeepSpeed/FSDP/accelerate optimizer and engine state that no longer matches the repaired parameters"
CAUSED_BY = "follows 0001/0002: state DeepSpeed, FSDP or accelerate saved for the broken trainable parameters"
CHANGES_TRAINABLE_PARAMETERS = False


def _peft_model_state(state: CheckpointState, name: str) -> bool:
    """A model file beside an adapter that holds LoRA tensors: accelerate's save_state of the PeftModel."""
    if state.weights_file is None:
        return False
    return any("lora_" in tensor for tensor in read_header(state.source_dir / name).tensors)


def _stale(state: CheckpointState) -> dict[str, FileKind]:
    """Files holding per-parameter state still planned to be copied."""
    stale = {}
    for name in sorted(state.files):
        kind = classify(name, beside_adapter=state.weights_file is not None)
        if kind is None or name in state.rewritten_files:
            continue
        if kind.per_parameter:
            stale[name] = kind
        elif kind.what == "model weights" and _peft_model_state(state, name):
            stale[name] = PEFT_MODEL_STATE
    return stale


def detect(state: CheckpointState, context: Context) -> bool:
    return state.trainable_parameters_changed and bool(_stale(state))


def plan(state: CheckpointState, context: Context) -> None:
    stale = _stale(state)
    backends = {kind.backend for kind in stale.values()}
    for name, kind in stale.items():
        state.drop_file(name, f"{kind.what}: laid out for the trainable parameters before the repair")
    if "FSDP" in backends:
        backends.discard("accelerate")  # FSDP's full optimizer state is an optimizer.bin too
    for backend in sorted(backends):
        state.warn(CONSEQUENCES[backend])
