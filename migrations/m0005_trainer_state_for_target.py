"""Make ``trainer_state.json`` fit the transformers release that will resume the run.

Older than the writer: ``TrainerState.load_from_json`` passes every key of the file to the dataclass
(``cls(**json.loads(text))``, unchanged from 4.30 to 5.x), so a Trainer older than the one that wrote
the file refuses it: ``TypeError: TrainerState.__init__() got an unexpected keyword argument
'stateful_callbacks'`` (LlamaFactory#4406, InternVL#558; likewise ``best_global_step``,
``train_batch_size``). Those keys are removed, each listed with its value.

Newer than the writer: since 4.45 (huggingface/transformers#32115) ``Trainer._save_checkpoint`` reads
``state.stateful_callbacks["TrainerControl"]``, so a run resumed from a file written before 4.41 (no
``stateful_callbacks``) trains and then dies at its first save with ``KeyError: 'TrainerControl'``.
The entry is added exactly as those Trainers write it at a save. Every other value (global step, log
history, best metric, …) is kept as it was.

Which release introduced which field is data (:data:`FIELD_INTRODUCED`), read from each release's
wheel by ``scripts/stack_fields.py``. The target defaults to the installed transformers, found from
package metadata (nothing is imported).
"""

from __future__ import annotations

import json
from pathlib import Path

from packaging.version import Version

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import CheckpointState, FileRewrite
from ckpt_migrate.core.releases import KeyTable, target_release
from ckpt_migrate.formats.digests import OnBytes
from ckpt_migrate.formats.files import read_json_object

ID = "0005_trainer_state_for_target"
SUMMARY = "Fit trainer_state.json to the target transformers: drop fields it does not know, add TrainerControl"
CAUSED_BY = (
    "transformers TrainerState.load_from_json is cls(**json): releases refuse fields added after them "
    "(logging_steps/eval_steps/save_steps 4.32, train_batch_size/num_input_tokens_seen 4.36, "
    "stateful_callbacks 4.41 by huggingface/transformers#29666, best_global_step 4.50); since 4.45 "
    "(huggingface/transformers#32115) a resume needs stateful_callbacks['TrainerControl'] at its first save"
)
CHANGES_TRAINABLE_PARAMETERS = False

TRAINER_STATE = "trainer_state.json"
#: TrainerState fields of transformers 4.30.0, the oldest release the table covers.
FIELDS_SINCE_4_30 = frozenset(
    {
        "epoch",
        "global_step",
        "max_steps",
        "num_train_epochs",
        "total_flos",
        "log_history",
        "best_metric",
        "best_model_checkpoint",
        "is_local_process_zero",
        "is_world_process_zero",
        "is_hyper_param_search",
        "trial_name",
        "trial_params",
    }
)
#: The first release whose TrainerState has each later field (scripts/stack_fields.py over 4.30.0 ... 5.24.0).
FIELD_INTRODUCED = {
    "logging_steps": "4.32.0",
    "eval_steps": "4.32.0",
    "save_steps": "4.32.0",
    "train_batch_size": "4.36.0",
    "num_input_tokens_seen": "4.36.0",
    "stateful_callbacks": "4.41.0",  # huggingface/transformers#29666
    "best_global_step": "4.50.0",
}
#: The newest release the table was checked against: no field beyond the table exists up to it.
TABLE_CHECKED_UP_TO = Version("5.24.0")
#: From this release on a resume fails at its first save without stateful_callbacks["TrainerControl"].
NEEDS_TRAINER_CONTROL = Version("4.45.0")


TABLE = KeyTable(FIELDS_SINCE_4_30, FIELD_INTRODUCED, TABLE_CHECKED_UP_TO)


def target_transformers(context: Context) -> Version:
    """The transformers release that will read the checkpoint: ``--target-transformers`` or the installed one."""
    return target_release("transformers", context.options.target_transformers, TABLE_CHECKED_UP_TO)


def _read(state: CheckpointState) -> dict:
    return read_json_object(state.source_dir / TRAINER_STATE)


def _lacks_trainer_control(content: dict) -> bool:
    callbacks = content.get("stateful_callbacks")
    return not isinstance(callbacks, dict) or "TrainerControl" not in callbacks


def _trainer_control(content: dict) -> dict:
    """The TrainerControl state a Trainer (4.41 to 5.x) saves with a checkpoint: saving, stopping at the last step."""
    last_step = content.get("global_step", 0) >= content.get("max_steps", 0) > 0
    args = {"should_epoch_stop": False, "should_evaluate": False, "should_log": False, "should_save": True}
    return {"args": {**args, "should_training_stop": last_step}, "attributes": {}}


def _changes(content: dict, target: Version) -> tuple[list[str], bool, list[str]]:
    """(fields to drop, whether to add TrainerControl, fields nobody can tell about)."""
    unknown, undecidable = TABLE.unknown_to(target, content)
    add_control = target >= NEEDS_TRAINER_CONTROL and _lacks_trainer_control(content)
    return unknown, add_control, undecidable


def detect(state: CheckpointState, context: Context) -> bool:
    if TRAINER_STATE not in state.files:
        return False
    unknown, add_control, _ = _changes(_read(state), target_transformers(context))
    return bool(unknown) or add_control


def plan(state: CheckpointState, context: Context) -> None:
    target = target_transformers(context)
    content = _read(state)
    unknown, add_control, undecidable = _changes(content, target)
    kept = {key: value for key, value in content.items() if key not in unknown}
    dropped = tuple(f"{key}={json.dumps(content[key], sort_keys=True)}" for key in unknown)
    why = [f"fields transformers {target} does not know are removed: {', '.join(unknown)}"] if unknown else []
    added: tuple[str, ...] = ()
    if add_control:
        control = _trainer_control(content)
        kept["stateful_callbacks"] = {**(kept.get("stateful_callbacks") or {}), "TrainerControl": control}
        added = (f"stateful_callbacks.TrainerControl={json.dumps(control, sort_keys=True)}",)
        why.append(f"the TrainerControl state transformers {target} needs at its first save is added")
    text = json.dumps(kept, indent=2, sort_keys=True) + "\n"  # as TrainerState.save_to_json writes it
    listed = (("dropped", dropped), ("added", added))
    state.rewrite_file(TRAINER_STATE, FileRewrite(ID, "; ".join(why), listed=listed, payload=text))
    if undecidable:
        state.warn(
            f"{TRAINER_STATE}: fields {', '.join(undecidable)} are newer than the releases this tool knows; "
            f"kept, but transformers {target} may refuse them"
        )


def write(rewrite: FileRewrite, source: Path, target: Path, on_bytes: OnBytes | None = None) -> None:
    from ckpt_migrate.formats.files import write_new

    write_new(target, rewrite.payload.encode("utf-8"))


def failures(state: CheckpointState) -> list[str]:
    if TRAINER_STATE not in state.files:
        return []
    content = _read(state)
    lines = []
    newer = [key for key in content if key in FIELD_INTRODUCED]
    if newer:
        key = max(newer, key=lambda k: Version(FIELD_INTRODUCED[k]))
        lines.append(
            f"transformers < {FIELD_INTRODUCED[key]}: resume fails: TypeError: TrainerState.__init__() got an "
            f"unexpected keyword argument '{key}'"
        )
    if _lacks_trainer_control(content):
        lines.append(
            f"transformers >= {NEEDS_TRAINER_CONTROL}: resume fails at its first save: KeyError: 'TrainerControl'"
        )
    return lines
