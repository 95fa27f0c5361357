"""Migration 0006: an adapter_config.json written by today's peft, made loadable by peft 0.12 or refused.

The old side runs peft 0.12.0's own ``LoraConfig.from_pretrained`` in the old interpreter
(CKPT_MIGRATE_OLD_PYTHON); the key table is checked against the dataclasses of both installed
releases, so it cannot drift silently when peft moves on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import peft
import pytest
from conftest import FIXTURES, old_python, run_cli
from packaging.version import Version
from peft import LoraConfig

from ckpt_migrate.migrations import m0006_adapter_config_for_target as m0006

CHECKPOINT = FIXTURES / "llama_score" / "run" / "checkpoint-2"
OLD_LOAD = """
import dataclasses, json, sys, peft
from peft import LoraConfig
fields = {f.name: repr(f.default) for f in dataclasses.fields(LoraConfig)}
try:
    config = LoraConfig.from_pretrained(sys.argv[1])
    values = {k: v for k, v in config.to_dict().items()}
    plain = lambda o: sorted(o) if isinstance(o, set) else str(o)
    print(json.dumps({"version": peft.__version__, "fields": fields, "config": values}, default=plain))
except Exception as exc:
    print(json.dumps({"version": peft.__version__, "fields": fields, "error": f"{type(exc).__name__}: {exc}"}))
"""


def run_old(directory: Path) -> dict:
    python = old_python()
    if python is None:
        pytest.skip("no peft 0.12 interpreter: set CKPT_MIGRATE_OLD_PYTHON")
    proc = subprocess.run([python, "-c", OLD_LOAD, str(directory)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_table(version: str, defaults: dict[str, str]) -> None:
    for key, default in defaults.items():
        if key in m0006.KNOWN_SINCE_0_7:
            continue
        assert key in m0006.KEY_INTRODUCED, f"LoraConfig.{key} of peft {version} is missing from the table"
        since, table_default = m0006.KEY_INTRODUCED[key]
        assert Version(since) <= Version(version), key
        if key not in m0006.METADATA_ONLY and default != "<factory>":
            assert default == repr(table_default), (key, default, table_default)


def field_defaults(cls) -> dict[str, str]:
    return {
        f.name: "<factory>" if f.default is dataclasses.MISSING else repr(f.default) for f in dataclasses.fields(cls)
    }


def newest_config_checkpoint(tmp_path: Path, **overrides) -> Path:
    """The llama_score checkpoint with its adapter_config.json as the installed peft writes the same config."""
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(CHECKPOINT, checkpoint)
    old = json.loads((CHECKPOINT / "adapter_config.json").read_text())
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    config = LoraConfig(**{k: v for k, v in old.items() if k in known and k != "peft_type"}, **overrides)
    (checkpoint / "adapter_config.json").unlink()
    config.save_pretrained(str(checkpoint))
    return checkpoint


def test_the_table_matches_the_installed_peft():
    check_table(peft.__version__, field_defaults(LoraConfig))


def test_newest_config_is_refused_by_peft_0_12_and_loads_after_the_migration(tmp_path):
    checkpoint = newest_config_checkpoint(tmp_path)
    before = run_old(checkpoint)
    assert before["version"] == "0.12.0"
    check_table(before["version"], before["fields"])
    assert before["error"].startswith("TypeError: LoraConfig.__init__() got an unexpected keyword argument")
    inspected = json.loads(run_cli("inspect", checkpoint, "--format", "json").stdout)["checkpoints"][0]
    (line,) = [f for f in inspected["fails_on"] if f.startswith("peft < 0.14.0: ")]
    assert line.startswith("peft < 0.14.0: TypeError: LoraConfig.__init__() got an unexpected keyword argument")

    out = tmp_path / "fixed"
    code, stdout, _ = run_cli("fix", checkpoint, "--out", out, "--target-peft", "0.12.0", "--quiet")
    assert code == 0, stdout
    assert "0006_adapter_config_for_target" in stdout and "peft 0.12.0" in stdout
    after = run_old(out)
    assert "error" not in after, after
    written = json.loads((out / "adapter_config.json").read_text())
    meaning = ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
    assert {k: after["config"][k] for k in meaning} == {k: written[k] for k in meaning}
    assert sorted(after["config"]["target_modules"]) == sorted(written["target_modules"])


def test_a_key_that_changes_the_model_is_refused_with_nothing_written(tmp_path):
    checkpoint = newest_config_checkpoint(tmp_path, lora_bias=True)
    out = tmp_path / "fixed"
    code, stdout, stderr = run_cli("fix", checkpoint, "--out", out, "--target-peft", "0.12.0", "--quiet")
    assert code == 4 and not out.exists()
    assert "lora_bias=true" in stderr and "peft >= 0.14.0" in stderr


def test_default_target_is_the_installed_peft_and_leaves_old_configs_alone():
    plan = json.loads(run_cli("fix", CHECKPOINT, "--dry-run", "--format", "json").stdout)["checkpoints"][0]
    assert "0006_adapter_config_for_target" not in plan["migrations"]
    assert set(plan["config_changes"]) == {"target_modules"}  # the head's own move, nothing for a target
