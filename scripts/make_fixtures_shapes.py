"""Build REAL peft 0.12.0 checkpoints of adapter shapes seen outside the other fixtures (issue 20).

- ``headonly_opt_score``: ``target_modules=["score"]`` with ``task_type`` SEQ_CLS: the head is the only LoRA
  target and also in ``modules_to_save`` (double-wrapped), so the body carries no LoRA at all.
- ``pissa_phi_score`` / ``olora_gpt_neox_score``: ``init_lora_weights="pissa"`` / ``"olora"`` with all-linear on
  a sequence-classification model: peft's init rewrites every targeted base weight (W - s * B0 @ A0) before
  training, and the head is double-wrapped as well.
- ``pissa_opt_no_task_type``: PiSSA without ``task_type``: a LoRA-only head whose base weight the init rewrote.
- ``lokr_phi_patterns`` / ``lokr_opt_clean_head``: LoKr with alpha != r (per module through rank_pattern /
  alpha_pattern; and with a healthy head), which peft >= 0.14 scales by alpha/r where 0.12 did not (migration 0011).

Architectures none of the other fixtures use (OPT, Phi, GPT-NeoX). Every case is built by
``scripts/make_fixtures.py``'s own ``build_case`` (same data, seeds, layout, case.json, reference logits), so
this script only adds the case table. It MUST run with peft 0.12.0 + transformers 4.44.2::

    .venv-peft012/bin/python scripts/make_fixtures_shapes.py                  # all cases -> tests/fixtures_shapes/
    .venv-peft012/bin/python scripts/make_fixtures_shapes.py pissa_phi_score  # only the named case(s)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_fixtures  # noqa: E402  (re-executes this script with PYTHONHASHSEED=0, as make_fixtures does itself)
from make_fixtures import ALL_LINEAR, REPO_ROOT, build_case, case  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)
OPT = dict(COMMON, ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)
PHI = dict(COMMON, intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT_NEOX = dict(COMMON, intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def seq_cls(target_modules, **extra):
    # r=2 < num_labels=3: PiSSA/OLoRA take the first r singular (QR) directions of every weight, the head's too
    return dict(task_type="SEQ_CLS", target_modules=target_modules, r=2, lora_alpha=4, lora_dropout=0.0, **extra)


def seq_cls_lokr(target_modules, **extra):
    return dict(task_type="SEQ_CLS", target_modules=target_modules, r=4, **extra)


SHAPE_CASES = {
    "headonly_opt_score": case(
        "opt",
        OPT,
        lora=seq_cls(["score"]),
        notes="the head is the only LoRA target (and in modules_to_save: SEQ_CLS): no body LoRA, so an adapter "
        "without its head targets nothing",
    ),
    "pissa_phi_score": case(
        "phi",
        PHI,
        lora=seq_cls(ALL_LINEAR, init_lora_weights="pissa"),
        notes="PiSSA: every targeted base weight (head included) became W - s * B0 @ A0 (full SVD) before training",
    ),
    "olora_gpt_neox_score": case(
        "gpt_neox",
        GPT_NEOX,
        lora=seq_cls(ALL_LINEAR, init_lora_weights="olora"),
        notes="OLoRA: every targeted base weight (head included) became W - s * Q_r @ R_r (QR) before training",
    ),
    "pissa_opt_no_task_type": case(
        "opt",
        OPT,
        lora=dict(target_modules=ALL_LINEAR, r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights="pissa"),
        shape="lora_only",
        notes="PiSSA without task_type: score carries LoRA only (its base weight never saved) and PiSSA rewrote it "
        "too, so --base-model's score.weight is not what training ran on: the init must be replayed",
    ),
    "lokr_phi_patterns": case(
        "phi",
        PHI,
        tuner="LoKrConfig",
        lora=seq_cls_lokr(ALL_LINEAR, alpha=8, rank_pattern={"fc1": 2}, alpha_pattern={"fc2": 2, "q_proj": 16}),
        notes="LoKr, alpha != r per module (rank_pattern/alpha_pattern): peft 0.12 ignores alpha, peft >= 0.14 "
        "scales each delta by its alpha/r; the head is double-wrapped too",
    ),
    "lokr_opt_clean_head": case(
        "opt",
        OPT,
        tuner="LoKrConfig",
        lora=seq_cls_lokr(["q_proj", "v_proj", "fc1", "fc2"], alpha=2),
        shape="clean",
        notes="LoKr, alpha != r, head only in modules_to_save (healthy head): the alpha/r scaling of peft >= 0.14 "
        "is its only problem",
    ),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="case names to build (default: all)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "tests", "fixtures_shapes"))
    a = ap.parse_args(argv)
    names = a.cases or list(SHAPE_CASES)
    unknown = [n for n in names if n not in SHAPE_CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(SHAPE_CASES)}")
    for package, version in make_fixtures.BUGGY_STACK.items():
        installed = make_fixtures.INSTALLED_STACK[package]
        assert installed == version, f"need {package}=={version} (the buggy release), got {installed}"
    os.makedirs(a.out, exist_ok=True)
    make_fixtures.torch.use_deterministic_algorithms(True)
    for name in names:
        build_case(name, SHAPE_CASES[name], os.path.abspath(a.out))
    print(f"\nbuilt {len(names)} case(s) into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
