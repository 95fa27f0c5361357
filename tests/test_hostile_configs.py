"""Issue #5, inconsistent metadata: adapter_config.json, the manifest, and tensors that contradict the config.

Each is refused with one clean line (see ``assert_refused`` in tests/hostile_helpers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_helpers import (
    CONFIG,
    HEAD,
    WEIGHTS,
    A,
    B,
    W,
    Workspace,
    assert_refused,
    bart_workspace,
    edit_json,
    edit_tensors,
    make_workspace,
    zero_bytes,
)

from ckpt_migrate.core.errors import EXIT_UNREADABLE

# ---------------------------------------------------------------- adapter_config.json


def _config(edit):
    def apply(ws: Workspace) -> None:
        edit_json(ws.src / CONFIG, edit)

    return apply


def _config_text(text: bytes):
    def apply(ws: Workspace) -> None:
        (ws.src / CONFIG).write_bytes(text)

    return apply


CONFIG_CASES = {
    "invalid_json": (_config_text(b'{"peft_type": "LORA", "r": 4,'), "invalid JSON"),
    "not_utf8": (_config_text(b'{"peft_type": "\xff"}'), "cannot read"),
    "not_an_object": (_config_text(b'["LORA", 4]'), "expected a JSON object"),
    "integer_too_long_to_parse": (_config_text(b'{"r": ' + b"4" * 5000 + b"}"), "invalid JSON"),
    "peft_type_ia3": (_config(lambda c: c.update(peft_type="IA3")), "holds LORA tensors and none of its own"),
    "peft_type_missing": (_config(lambda c: c.pop("peft_type")), "peft_type is None"),
    "r_missing": (_config(lambda c: c.pop("r")), "missing required field 'r'"),
    "r_string": (_config(lambda c: c.update(r="4")), "field 'r'"),
    "r_zero": (_config(lambda c: c.update(r=0)), "field 'r'"),
    "r_bool": (_config(lambda c: c.update(r=True)), "field 'r'"),
    "r_float": (_config(lambda c: c.update(r=4.0)), "field 'r'"),
    "lora_alpha_string": (_config(lambda c: c.update(lora_alpha="8")), "field 'lora_alpha'"),
    "lora_alpha_nan": (_config_text(b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'), "field 'lora_alpha'"),
    "lora_alpha_infinite": (_config_text(b'{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999}'), "'lora_alpha'"),
    "target_modules_int": (_config(lambda c: c.update(target_modules=7)), "field 'target_modules'"),
    "target_modules_list_of_ints": (_config(lambda c: c.update(target_modules=[1, 2])), "'target_modules'"),
    "target_modules_bad_regex": (_config(lambda c: c.update(target_modules="(q_proj")), "'target_modules'"),
    "modules_to_save_string": (_config(lambda c: c.update(modules_to_save="score")), "'modules_to_save'"),
    "modules_to_save_dict": (_config(lambda c: c.update(modules_to_save={"score": 1})), "'modules_to_save'"),
    "rank_pattern_list": (_config(lambda c: c.update(rank_pattern=["score"])), "'rank_pattern'"),
    "rank_pattern_string_rank": (_config(lambda c: c.update(rank_pattern={"score": "4"})), "'rank_pattern'"),
    "rank_pattern_bad_regex": (_config(lambda c: c.update(rank_pattern={"sc(ore": 4})), "'rank_pattern'"),
    "alpha_pattern_string_alpha": (_config(lambda c: c.update(alpha_pattern={"score": "8"})), "'alpha_pattern'"),
    "alpha_pattern_bad_regex": (_config(lambda c: c.update(alpha_pattern={"[score": 8})), "'alpha_pattern'"),
    "use_rslora_string": (_config(lambda c: c.update(use_rslora="yes")), "'use_rslora'"),
    "fan_in_fan_out_int": (_config(lambda c: c.update(fan_in_fan_out=1)), "'fan_in_fan_out'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_broken_adapter_config_is_refused(ws: Workspace, case: str):
    edit, problem = CONFIG_CASES[case]
    edit(ws)
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / CONFIG), problem)


def test_missing_adapter_config_is_refused(ws: Workspace):
    (ws.src / CONFIG).unlink()
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / CONFIG), "missing")


def test_run_dir_whose_checkpoint_has_adapter_weights_but_no_config_is_refused(ws: Workspace):
    (ws.src / CONFIG).unlink()
    run = ws.src.parent
    ws.src = run
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(run / "checkpoint-2" / CONFIG), "missing")


def test_directory_that_is_no_checkpoint_is_refused(ws: Workspace):
    for name in ("adapter_model.safetensors", CONFIG, "trainer_state.json"):
        (ws.src / name).unlink()
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src), "no adapter_config.json or trainer_state.json")


# ---------------------------------------------------------------- the manifest


def test_manifest_with_wrong_types_is_refused(ws: Workspace):
    (ws.src / "ckpt_migrate_manifest.json").write_text(json.dumps({"migrations_applied": 5}))
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, "ckpt_migrate_manifest.json", "migrations_applied")


# ---------------------------------------------------------------- tensors inconsistent with the config


def _tensors(edit):
    def apply(ws: Workspace) -> None:
        edit_tensors(ws.src / WEIGHTS, edit)

    return apply


TENSOR_CASES = {
    "head_lora_A_without_lora_B": (_tensors(lambda t: t.pop(B)), "has no lora_B tensor"),
    "head_lora_B_without_lora_A": (_tensors(lambda t: t.pop(A)), "has no lora_A tensor"),
    "head_rank_not_r": (_config(lambda c: c.update(r=8)), "lora_A has rank 4 but the config (r/rank_pattern) gives 8"),
    "head_rank_not_rank_pattern": (
        _config(lambda c: c.update(rank_pattern={"score": 2})),
        "lora_A has rank 4 but the config (r/rank_pattern) gives 2",
    ),
    "head_shapes_do_not_compose": (
        _tensors(lambda t: t.update({B: zero_bytes("F32", [5, 4])})),
        "does not compose with the weight (3, 32)",
    ),
    "head_factors_rank_mismatch": (
        _tensors(lambda t: t.update({B: zero_bytes("F32", [3, 2])})),
        "does not compose",
    ),
    "head_lora_A_scalar": (_tensors(lambda t: t.update({A: zero_bytes("F32", [])})), "expected a matrix"),
    "head_lora_A_integer_dtype": (
        _tensors(lambda t: t.update({A: zero_bytes("I32", [4, 32])})),
        "non-floating-point dtype I32",
    ),
    "double_wrapped_head_without_trained_weight": (_tensors(lambda t: t.pop(W)), "trained weight"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_adapter_tensors_inconsistent_with_config_are_refused(ws: Workspace, case: str):
    edit, problem = TENSOR_CASES[case]
    edit(ws)
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / WEIGHTS), problem)


def test_dora_magnitude_of_wrong_shape_is_refused(tmp_path: Path):
    ws = make_workspace(tmp_path, "llama_dora")
    edit_tensors(ws.src / WEIGHTS, lambda t: t.update({f"{HEAD}.lora_magnitude_vector.weight": zero_bytes("F32", [5])}))
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / WEIGHTS), "DoRA magnitude shape")


def test_lora_only_head_not_composing_with_base_weight_is_refused(tmp_path: Path):
    ws = bart_workspace(tmp_path)
    name = "base_model.model.classification_head.out_proj.lora_B.weight"
    edit_tensors(ws.src / WEIGHTS, lambda t: t.update({name: zero_bytes("F32", [7, 4])}))
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / WEIGHTS), "does not compose")
