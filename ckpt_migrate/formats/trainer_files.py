"""The files of a training checkpoint by name: what each holds, and the verdict the plan gives it.

Names are those written by ``transformers.Trainer``, DeepSpeed (through Trainer), FSDP (through accelerate) and
``accelerate.Accelerator.save_state``, plus peft adapters and tokenizer/model files. Nothing is read here. A file
holding state *per trainable parameter* (optimizer moments, engine state keyed by the parameter layout) no longer
matches once a repair changes the trainable parameters; every other known file is independent of them; a file
not listed here is copied unexamined, and the report says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ckpt_migrate.core.plan import CheckpointPlan
from ckpt_migrate.formats.adapter import ADAPTER_CONFIG, BIN_WEIGHTS, MANIFEST, SAFETENSORS_WEIGHTS


class Verdict(str, Enum):
    """What the output does with one file of the source checkpoint."""

    COPIED = "copied"  # known, and independent of the repair: byte for byte
    REWRITTEN = "rewritten"
    DROPPED = "dropped"
    UNEXAMINED = "copied unexamined"  # not a file this tool knows: byte for byte, never read

    __str__ = str.__str__


WEIGHTS_ONLY_START = (
    "start from the repaired weights instead: PeftModel.from_pretrained(base, DIR, is_trainable=True), then "
    "trainer.train() without resume_from_checkpoint (fresh optimizer, learning-rate schedule from step 0: set "
    "max_steps to the steps that were left)"
)
#: What a resume does once a backend's per-parameter state is dropped.
CONSEQUENCES = {
    "DeepSpeed": "DeepSpeed engine state (global_step*/ and latest) was dropped: Trainer with DeepSpeed then refuses "
    "resume_from_checkpoint=DIR (ValueError: Can't find a valid checkpoint at DIR), and no DeepSpeed resume can "
    "use this checkpoint; " + WEIGHTS_ONLY_START,
    "FSDP": "FSDP model/optimizer state was dropped: Trainer with FSDP resumes from the repaired adapter, finds no "
    "optimizer state and starts fresh Adam moments, and ignores scheduler.pt, so the learning-rate schedule restarts",
    "accelerate": "accelerate save_state's per-parameter state was dropped: accelerator.load_state(DIR) then fails "
    "on the missing files; load the adapter with PeftModel.from_pretrained(base, DIR, is_trainable=True), build a "
    "fresh optimizer, and load scheduler*.bin / random_states_*.pkl yourself if wanted",
}


@dataclass(frozen=True)
class FileKind:
    """Files matching ``pattern`` (a full match of the path inside the checkpoint)."""

    pattern: str
    what: str
    backend: str = ""  # whose state it is, for CONSEQUENCES
    per_parameter: bool = False


_ANY_ADAPTER = r"(?:[^/]+/)?"
KINDS = (
    FileKind(rf"{_ANY_ADAPTER}{re.escape(ADAPTER_CONFIG)}", "peft adapter config"),
    FileKind(rf"{_ANY_ADAPTER}(?:{re.escape(SAFETENSORS_WEIGHTS)}|{re.escape(BIN_WEIGHTS)})", "peft adapter weights"),
    FileKind(re.escape(MANIFEST), "ckpt-migrate manifest of an earlier repair"),
    FileKind(r"optimizer\.pt", "Trainer optimizer state", "Trainer", per_parameter=True),
    FileKind(r"scheduler\.pt", "Trainer learning-rate schedule (per parameter group)"),
    FileKind(r"trainer_state\.json", "Trainer state (step, log history, callbacks)"),
    FileKind(r"training_args\.bin", "Trainer arguments"),
    FileKind(r"rng_state(?:_\d+)?\.pth", "Trainer RNG states"),
    FileKind(r"scaler\.pt", "mixed-precision gradient scaler (one scale factor)"),
    FileKind(r"latest", "DeepSpeed: the name of the engine state directory", "DeepSpeed", per_parameter=True),
    FileKind(r"global_step\d+/.+", "DeepSpeed engine state (ZeRO partitions, module state)", "DeepSpeed", True),
    FileKind(r"zero_to_fp32\.py", "DeepSpeed's script to consolidate ZeRO states (reads global_step*/)"),
    FileKind(r"pytorch_model_fsdp(?:_\d+)?\.bin", "FSDP model state", "FSDP", per_parameter=True),
    FileKind(r"pytorch_model_fsdp_\d+/.+", "FSDP sharded model state", "FSDP", per_parameter=True),
    FileKind(r"optimizer_\d+/.+", "FSDP sharded optimizer state", "FSDP", per_parameter=True),
    FileKind(r"optimizer(?:_\d+)?\.bin", "optimizer state (accelerate save_state, FSDP)", "accelerate", True),
    FileKind(r"scheduler(?:_\d+)?\.bin", "accelerate scheduler state (per parameter group)"),
    FileKind(r"(?:sampler|dl_state_dict)(?:_\d+)?\.bin", "accelerate data loader/sampler state"),
    FileKind(r"random_states_\d+\.pkl", "accelerate RNG states"),
    FileKind(r"(?:model|pytorch_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)", "model weights"),
    FileKind(r"(?:model\.safetensors|pytorch_model\.bin)\.index\.json", "index of sharded model weights"),
    FileKind(r"(?:generation_|preprocessor_|processor_)?config\.json", "model/generation/processor config"),
    FileKind(
        r"tokenizer(?:_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(?:txt|json)|merges\.txt"
        r"|(?:spiece|tokenizer|sentencepiece\.bpe)\.model|chat_template\.(?:jinja|json)",
        "tokenizer file",
    ),
    FileKind(r"README\.md", "model card"),
)
#: A model file beside an adapter is not a base model: accelerate's save_state wrote the whole PeftModel there.
PEFT_MODEL_STATE = FileKind("", "the whole PeftModel's state (accelerate save_state)", "accelerate", per_parameter=True)


def classify(name: str, beside_adapter: bool = False) -> FileKind | None:
    """The kind of the file at path ``name`` inside a checkpoint (None: not a file this tool knows).

    A pickled model file beside an adapter is unknown: it may be accelerate's save_state of the whole PeftModel
    (a safetensors one is told by its header, see migration 0009), and a pickle is not read to find out.
    """
    kind = next((kind for kind in KINDS if re.fullmatch(kind.pattern, name)), None)
    pickled_model = kind is not None and kind.what == "model weights" and name.endswith(".bin")
    return None if beside_adapter and pickled_model else kind


def rewritten_adapter_files(plan: CheckpointPlan) -> set[str]:
    """The adapter files (with their subfolder prefix) written anew rather than copied byte for byte."""
    written = set()
    for prefix, adapter in plan.rewritten_adapters:
        if adapter.weights_changed:
            written.add(prefix + (adapter.before.weights_file or ""))
        if adapter.config_changed:
            written.add(prefix + ADAPTER_CONFIG)
    return written


def file_verdicts(plan: CheckpointPlan) -> list[tuple[str, int, Verdict, str]]:
    """Every file of the source checkpoint: (path, bytes, verdict, why)."""
    after = plan.after
    rewritten = rewritten_adapter_files(plan)
    verdicts = []
    for name, size in sorted(plan.before.files.items()):
        kind = classify(name, beside_adapter=plan.before.weights_file is not None)
        if name in after.dropped_files:
            verdict, why = Verdict.DROPPED, after.dropped_files[name]
        elif name in after.rewritten_files:
            verdict, why = Verdict.REWRITTEN, after.rewritten_files[name].reason
        elif name in rewritten:
            what = "adapter config" if name.endswith(ADAPTER_CONFIG) else "adapter weights"
            verdict, why = Verdict.REWRITTEN, f"{what} rewritten by the repair"
        elif name == MANIFEST:
            verdict, why = Verdict.REWRITTEN, "replaced by the manifest of this repair"
        elif kind is None:
            verdict, why = Verdict.UNEXAMINED, "not a file this tool knows: copied byte for byte, never read"
        elif kind.what.startswith("peft adapter"):
            verdict, why = Verdict.COPIED, f"{kind.what}: unchanged by the repair"
        elif kind.per_parameter:
            verdict, why = Verdict.COPIED, f"{kind.what}: the trainable parameters did not change"
        else:
            verdict, why = Verdict.COPIED, f"{kind.what}: independent of the trainable parameters"
        verdicts.append((name, size, verdict, why))
    return verdicts
