"""Migration 0011 on real peft 0.12 LoKr checkpoints whose alpha is not their rank: peft 0.12 trained kron(w1, w2)
unscaled, peft >= 0.14 multiplies it by alpha/r. With alpha = r the repaired adapters reproduce the trained logits
under the newest peft and under peft 0.12 (scripts/make_fixtures_shapes.py, scripts/make_fixtures.py --tuners)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TUNER_FIXTURES, load_case, old_python, run_cli
from logits_check import assert_reproduced, max_logit_error
from packaging.version import Version

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.peft_layout import lycoris_lookup
from ckpt_migrate.core.plan import Options
from ckpt_migrate.core.tuners import TUNERS, math_differs, tuner_modules
from ckpt_migrate.formats.checkpoint import load_state
from ckpt_migrate.migrations import m0007_fold_double_wrapped_tuner_head as m0007
from ckpt_migrate.migrations import m0011_lokr_alpha_equals_rank as m0011

SHAPES = Path(__file__).parent / "fixtures_shapes"
CASES = {  # case dir -> the migrations fix runs on it
    SHAPES / "lokr_opt_clean_head": ["0004_portable_rng_state", "0011_lokr_alpha_equals_rank"],
    SHAPES / "lokr_phi_patterns": [
        "0003_drop_stale_optimizer",
        "0004_portable_rng_state",
        "0007_fold_double_wrapped_tuner_head",
        "0011_lokr_alpha_equals_rank",
    ],
    TUNER_FIXTURES / "lokr_llama_scaled": [
        "0003_drop_stale_optimizer",
        "0004_portable_rng_state",
        "0007_fold_double_wrapped_tuner_head",
        "0011_lokr_alpha_equals_rank",
    ],
}
CHECKPOINT = "checkpoint-2"


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("m0011")
    outputs = {}
    for case, migrations in CASES.items():
        code, out, err = run_cli("fix", case / "run", "--out", root / case.name, "--format", "json", "--quiet")
        assert code == 0, err
        assert json.loads(out)["checkpoints"][0]["migrations"] == migrations
        outputs[case.name] = root / case.name / CHECKPOINT
    return outputs


def test_the_fixtures_are_real_pre_0_14_lokr_adapters_whose_alpha_is_not_their_rank():
    for case in CASES:
        meta = load_case(case)
        config = load_state(case / "run" / CHECKPOINT).config
        assert meta["peft_version"] == "0.12.0" and meta["saved_peft_type"] == "LOKR"
        assert "rank_dropout_scale" not in config  # peft < 0.14 wrote it
        modules = tuner_modules(load_state(case / "run" / CHECKPOINT), TUNERS["LOKR"])
        assert any(a != r for r, a in (lycoris_lookup(config, m, "alpha", legacy=True) for m in modules))
        assert math_differs(TUNERS["LOKR"], config, Version("0.21.2")) is not None


def test_repaired_lokr_reproduces_the_trained_logits_with_the_newest_peft(fixed):
    assert_reproduced(list(CASES), fixed, CHECKPOINT)


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_repaired_lokr_reproduces_the_trained_logits_with_peft_0_12(fixed):
    assert_reproduced(list(CASES), fixed, CHECKPOINT, old_python())


def test_without_the_rewrite_the_newest_peft_computes_another_model():
    """The healthy-headed original loads in the newest peft with no error and the wrong logits: the silent failure."""
    case = SHAPES / "lokr_opt_clean_head"
    error = max_logit_error(case, case / "run" / CHECKPOINT, CHECKPOINT)
    assert error > 20 * load_case(case)["tolerance"], error  # measured 1.1e-2


def test_the_rewrite_sets_every_alpha_to_its_rank_under_both_pattern_rules_and_keeps_every_rank():
    state = load_state(SHAPES / "lokr_phi_patterns" / "run" / CHECKPOINT)
    before = state.clone()
    context = Context(source=before, base_model=None, options=Options())
    assert m0011.detect(state, context) and not m0007.detect(state, context)  # 0007 waits for the rewrite
    m0011.plan(state, context)
    assert not state.unrecoverable
    assert state.config["alpha"] == state.config["r"] == 4
    assert state.config["alpha_pattern"] == state.config["rank_pattern"] == {"fc1": 2}
    for module in tuner_modules(state, TUNERS["LOKR"]):
        rank = lycoris_lookup(before.config, module, "alpha", legacy=True)[0]
        for legacy in (True, False):
            assert lycoris_lookup(state.config, module, "alpha", legacy) == (rank, rank), (module, legacy)
    assert state.tensors == before.tensors and not state.trainable_parameters_changed
    assert not m0011.detect(state, context) and m0007.detect(state, context)
    m0007.plan(state, context)
    assert not state.unrecoverable  # the refusal "across peft 0.14" no longer applies


def test_not_detected_on_its_output_nor_on_an_adapter_peft_0_14_or_later_wrote(fixed):
    from ckpt_migrate.planner import plan_checkpoint

    for case in CASES:
        assert plan_checkpoint(fixed[case.name]).status == "clean"
    config = load_state(TUNER_FIXTURES / "lokr_llama_scaled" / "run" / CHECKPOINT).config
    assert m0011.failures(load_state(TUNER_FIXTURES / "lokr_llama_scaled" / "run" / CHECKPOINT))
    newer = load_state(TUNER_FIXTURES / "lokr_llama_scaled" / "run" / CHECKPOINT)
    newer.config = {**config, "rank_dropout_scale": False}  # the key every peft >= 0.14 writes: it scaled in training
    assert not m0011.detect(newer, Context(source=newer, base_model=None, options=Options()))


def test_inspect_says_where_the_original_fails():
    code, out, _ = run_cli("inspect", SHAPES / "lokr_opt_clean_head" / "run")
    assert code == 3, out
    assert "peft >= 0.14: loads, but multiplies every LoKr delta by alpha/r (alpha 2, r 4)" in out
