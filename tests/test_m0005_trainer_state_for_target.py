"""Migration 0005: trainer_state.json written by today's transformers, made loadable by an older one.

The old side runs transformers 4.44.2's own ``TrainerState.load_from_json`` in the old interpreter
(CKPT_MIGRATE_OLD_PYTHON, as CI builds it); the version table is checked against the dataclass of
both installed releases, so it cannot drift silently when transformers moves on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import transformers
from conftest import FIXTURES, old_python, run_cli
from packaging.version import Version
from transformers.trainer_callback import TrainerControl, TrainerState

from ckpt_migrate.migrations import m0005_trainer_state_for_target as m0005

CHECKPOINT = FIXTURES / "llama_score" / "run" / "checkpoint-2"
OLD_LOAD = """
import dataclasses, json, sys, transformers
from transformers.trainer_callback import TrainerState
fields = [f.name for f in dataclasses.fields(TrainerState)]
try:
    state = TrainerState.load_from_json(sys.argv[1])
    print(json.dumps({"version": transformers.__version__, "fields": fields, "state": dataclasses.asdict(state)}))
except Exception as exc:
    print(json.dumps({"version": transformers.__version__, "fields": fields, "error": f"{type(exc).__name__}: {exc}"}))
"""


def run_old(path: Path) -> dict:
    python = old_python()
    if python is None:
        pytest.skip("no transformers 4.44 interpreter: set CKPT_MIGRATE_OLD_PYTHON")
    proc = subprocess.run([python, "-c", OLD_LOAD, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def newest_checkpoint(tmp_path) -> Path:
    """The llama_score checkpoint with a trainer_state.json as the installed transformers writes it."""
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(CHECKPOINT, checkpoint)
    old = json.loads((CHECKPOINT / "trainer_state.json").read_text())
    state = TrainerState(**old)
    state.best_global_step = 2  # a value only newer releases can hold
    state.best_metric = 0.25
    state.stateful_callbacks["TrainerControl"] = TrainerControl(should_save=True).state()
    (checkpoint / "trainer_state.json").unlink()
    state.save_to_json(str(checkpoint / "trainer_state.json"))
    return checkpoint


def check_table(version: str, fields: list[str]) -> None:
    for field in fields:
        known = field in m0005.FIELDS_SINCE_4_30 or field in m0005.FIELD_INTRODUCED
        assert known, f"TrainerState.{field} of transformers {version} is missing from the table"
        if field in m0005.FIELD_INTRODUCED:
            assert Version(m0005.FIELD_INTRODUCED[field]) <= Version(version), field
    later = [f for f, v in m0005.FIELD_INTRODUCED.items() if Version(v) > Version(version)]
    assert not set(later) & set(fields)


def test_the_table_matches_the_installed_transformers():
    check_table(transformers.__version__, [f.name for f in dataclasses.fields(TrainerState)])


def test_newest_state_is_refused_by_transformers_4_44_and_loads_after_the_migration(newest_checkpoint, tmp_path):
    before = run_old(newest_checkpoint / "trainer_state.json")
    assert before["version"] == "4.44.2"
    check_table(before["version"], before["fields"])
    assert "unexpected keyword argument 'best_global_step'" in before["error"]
    inspected = json.loads(run_cli("inspect", newest_checkpoint, "--format", "json").stdout)["checkpoints"][0]
    assert f"transformers < 4.50.0: resume fails: {before['error']}" in inspected["fails_on"], "inspect quotes it"

    out = tmp_path / "fixed"
    code, stdout, _ = run_cli("fix", newest_checkpoint, "--out", out, "--target-transformers", "4.44.2", "--quiet")
    assert code == 0, stdout
    assert "0005_trainer_state_for_target" in stdout and "transformers 4.44.2" in stdout
    after = run_old(out / "trainer_state.json")
    assert "error" not in after, after
    original = json.loads((newest_checkpoint / "trainer_state.json").read_text())
    del original["best_global_step"]
    assert after["state"] == original, "every value 4.44.2 can hold is kept as it was"


def test_default_target_is_the_installed_release_and_leaves_older_files_alone(tmp_path):
    plan = json.loads(run_cli("fix", CHECKPOINT, "--dry-run", "--format", "json").stdout)["checkpoints"][0]
    assert "0005_trainer_state_for_target" not in plan["migrations"]
    assert "trainer_state.json" not in [f["name"] for f in plan["files_rewritten"]]


def test_an_older_target_drops_only_what_it_cannot_read(tmp_path):
    result = run_cli("fix", CHECKPOINT, "--dry-run", "--format", "json", "--target-transformers", "4.38.2")
    entry = json.loads(result.stdout)["checkpoints"][0]
    (rewrite,) = [f for f in entry["files_rewritten"] if f["name"] == "trainer_state.json"]
    assert [d.split("=", 1)[0] for d in rewrite["dropped"]] == ["stateful_callbacks"]
    assert "4.38.2" in rewrite["reason"]


def test_a_target_that_is_not_a_version_is_a_usage_error():
    result = run_cli("fix", CHECKPOINT, "--dry-run", "--target-transformers", "banana")
    assert result.exit_code == 2 and "not a version" in result.stderr
