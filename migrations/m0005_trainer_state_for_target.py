"""Make ``trainer_state.json`` loadable by the transformers release that will resume the run.

``TrainerState.load_from_json`` passes every key of the file to the dataclass (``cls(**json.loads(text))``,
unchanged from 4.30 to 5.x), so a Trainer older than the one that wrote the file refuses it:
``TypeError: TrainerState.__init__() got an unexpected keyword argument 'stateful_callbacks'``
(LlamaFactory#4406, InternVL#558; likewise ``best_global_step``, ``train_batch_size``). A checkpoint
written by today's stack, repaired to be resumed on an older one (``--target-transformers``), needs
those keys removed. The values every release understands (global step, log history, best metric, …)
are kept as they are; what is dropped is listed with its value.

Which release introduced which field is data (:data:`FIELD_INTRODUCED`), read from each release's
wheel by ``scripts/stack_fields.py``. The target defaults to the installed transformers, found from
package metadata (nothing is imported).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import Version

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import CheckpointState, FileRewrite
from ckpt_migrate.formats.files import read_json_object

ID = "0005_trainer_state_for_target"
SUMMARY = "Drop trainer_state.json fields the target transformers' TrainerState does not know"
CAUSED_BY = (
    "transformers TrainerState.load_from_json is cls(**json): releases refuse fields added after them "
    "(logging_steps/eval_steps/save_steps 4.32, train_batch_size/num_input_tokens_seen 4.36, "
    "stateful_callbacks 4.41 by huggingface/transformers#29666, best_global_step 4.50)"
)

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


def target_transformers(context: Context) -> Version:
    """The transformers release that will read the checkpoint: ``--target-transformers`` or the installed one."""
    wanted = context.options.target_transformers
    if wanted is None:
        try:
            wanted = version("transformers")
        except PackageNotFoundError:
            wanted = str(TABLE_CHECKED_UP_TO)
    return Version(wanted)


def _unknown_to(target: Version, state: dict) -> tuple[list[str], list[str]]:
    """(fields the target does not know, fields nobody can tell about)."""
    unknown, undecidable = [], []
    for key in sorted(state):
        if key in FIELDS_SINCE_4_30:
            continue
        if key in FIELD_INTRODUCED:
            if target < Version(FIELD_INTRODUCED[key]):
                unknown.append(key)
        elif target <= TABLE_CHECKED_UP_TO:
            unknown.append(key)  # no release up to the target has it
        else:
            undecidable.append(key)
    return unknown, undecidable


def _read(state: CheckpointState) -> dict:
    return read_json_object(state.source_dir / TRAINER_STATE)


def detect(state: CheckpointState, context: Context) -> bool:
    if TRAINER_STATE not in state.files:
        return False
    unknown, _ = _unknown_to(target_transformers(context), _read(state))
    return bool(unknown)


def plan(state: CheckpointState, context: Context) -> None:
    target = target_transformers(context)
    content = _read(state)
    unknown, undecidable = _unknown_to(target, content)
    kept = {key: value for key, value in content.items() if key not in unknown}
    dropped = tuple(f"{key}={json.dumps(content[key], sort_keys=True)}" for key in unknown)
    reason = f"fields transformers {target} does not know are removed: {', '.join(unknown)}"
    text = json.dumps(kept, indent=2, sort_keys=True) + "\n"  # as TrainerState.save_to_json writes it
    state.rewrite_file(TRAINER_STATE, FileRewrite(ID, reason, listed=(("dropped", dropped),), payload=text))
    if undecidable:
        state.warn(
            f"{TRAINER_STATE}: fields {', '.join(undecidable)} are newer than the releases this tool knows; "
            f"kept, but transformers {target} may refuse them"
        )


def write(rewrite: FileRewrite, source: Path, target: Path) -> None:
    from ckpt_migrate.formats.files import write_new

    write_new(target, rewrite.payload.encode("utf-8"))


def failures(state: CheckpointState) -> list[str]:
    if TRAINER_STATE not in state.files:
        return []
    newer = [key for key in _read(state) if key in FIELD_INTRODUCED]
    if not newer:
        return []
    key = max(newer, key=lambda k: Version(FIELD_INTRODUCED[k]))
    return [
        f"transformers < {FIELD_INTRODUCED[key]}: resume fails: TypeError: TrainerState.__init__() got an "
        f"unexpected keyword argument '{key}'"
    ]
