"""No output is ever called "repaired" or exact that ``verify`` fails.

Every adapter fixture (peft 0.12 fixtures, tuners, layouts, held-out architectures, older releases) is repaired by
``fix`` with its base model (numeric verification off, so the words come from the static proof and the repair's
formula alone), then ``verify`` -- two real loads by the installed peft and a comparison with the source's own
logits -- judges every adapter written. The report's words must agree with the verdict.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES, HELDOUT, LAYOUTS, OLD_STACK, TUNER_FIXTURES, case_dirs, load_case

from ckpt_migrate import fix, verify
from ckpt_migrate.render import to_dict

NEWER_FIXTURES = [FIXTURES.parent / f"fixtures_{kind}" for kind in ("shapes", "bases", "renames")]
CASES = [
    c
    for root in (FIXTURES, TUNER_FIXTURES, LAYOUTS, HELDOUT, OLD_STACK, *NEWER_FIXTURES)
    for c in case_dirs(root)
    if load_case(c)["shape"] != "full"  # a full fine-tune holds no adapter
]


def _adapter_places(output: Path) -> list[str]:
    """The adapters of a written checkpoint: "." at its top, else/also each subfolder holding one."""
    places = ["."] if (output / "adapter_config.json").is_file() else []
    return places + sorted(p.parent.name for p in output.glob("*/adapter_config.json"))


@pytest.mark.parametrize("case_dir", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_words_agree_with_verify(case_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(case_dir / "run", src)
    base = case_dir / "base"
    report = fix(src, tmp_path / "out", base_model=base, progress=False, verify=False)
    data = to_dict(report)
    for entry, result in zip(data["checkpoints"], report.checkpoints, strict=True):
        words = json.dumps(entry)
        if entry["status"] not in ("repaired", "written"):  # refused or clean: nothing written, nothing claimed
            assert result.output is None
            assert entry["reproduces"] is None and "exactly" not in words
            continue
        # a base model was at hand: every written output was proven, and so may be called repaired
        assert entry["status"] == "repaired" and entry["proof"]["state"] == "proven", entry["proof"]
        claim = entry["reproduces"]
        assert claim["shown"] in ("by construction", "no")
        assert claim["shown"] == "no" or not entry["losses"]
        for place in _adapter_places(result.output):
            verdict = verify(result.output / place, base, source=result.source / place)
            # "repaired" promises the output loads with nothing random and every tensor used: verify agrees
            assert verdict.ok, (place, verdict.reasons)
            if claim["shown"] == "by construction":  # exact by its formula: equal to the source's own logits
                assert verdict.max_logit_diff_vs_source is not None, verdict.notes
                assert verdict.max_logit_diff_vs_source <= verdict.tolerance
            else:
                assert claim["check_with"].startswith("ckpt-migrate verify ")


def test_auto_verify_shows_it_numerically_and_the_words_say_so(tmp_path: Path) -> None:
    case_dir = FIXTURES / "bart_lora_only_head"  # a head rebuilt from the base: exact only numerically
    shutil.copytree(case_dir / "run", tmp_path / "src")
    report = fix(tmp_path / "src", tmp_path / "out", base_model=case_dir / "base", progress=False)
    (entry,) = to_dict(report)["checkpoints"]
    assert entry["status"] == "repaired" and entry["verification"]["ok"] is True
    assert entry["reproduces"]["shown"] == "numerically" and entry["reproduces"]["check_with"] is None
    assert entry["verification"]["max_logit_diff_vs_source"] <= entry["verification"]["tolerance"]
