"""Build small, REAL broken PEFT LoRA checkpoints with the buggy peft 0.12.0.

peft <= 0.12 with ``target_modules="all-linear"`` and ``task_type`` SEQ_CLS /
TOKEN_CLS LoRA-wraps the classification head *and* puts it in
``modules_to_save`` (huggingface/peft#2027), producing "double wrapped" keys
such as ``base_model.model.score.modules_to_save.lora_A.weight``.  Some cases
here also produce a head that is only LoRA-wrapped ("lora_only"), e.g. BART's
``classification_head.out_proj`` hit by an explicit target list, or a LoRA
config without ``task_type``.

This script trains tiny randomly initialised models for a couple of steps with
``transformers.Trainer`` and keeps the real Trainer checkpoints.

How to run
----------
It MUST be run with peft 0.12.0 / transformers 4.44.2 (it asserts this)::

    ./scripts/setup.sh --with-peft012     # creates .venv-peft012 (peft 0.12.0, transformers 4.44.2, numpy<2)

    .venv-peft012/bin/python scripts/make_fixtures.py                 # all cases -> tests/fixtures/
    .venv-peft012/bin/python scripts/make_fixtures.py llama_score     # only the named case(s)
    .venv-peft012/bin/python scripts/make_fixtures.py --heldout       # held-out cases -> tests/heldout/
    .venv-peft012/bin/python scripts/make_fixtures.py --layouts       # other layouts -> tests/fixtures_layouts/
    .venv-peft012/bin/python scripts/make_fixtures.py --tuners        # other tuners -> tests/fixtures_tuners/
    .venv-peft012/bin/python scripts/make_fixtures.py --out /tmp/fx   # write elsewhere
    .venv-peft012/bin/python scripts/make_fixtures.py --list          # list case names

``--old-stack`` builds the cases of ``OLD_STACK_CASES`` into ``tests/fixtures_old_stack/``. Each of them
names the peft/transformers releases that must write it; a run builds those of the named (or all) cases
whose releases are the installed ones and skips the rest, so run it once per venv (torch 2.13.0 CPU
first, then ``numpy<2``, then the pins)::

    /work/venvs/peft082/bin/python  scripts/make_fixtures.py --old-stack   # peft 0.8.2  + transformers 4.38.2
    /work/venvs/peft0100/bin/python scripts/make_fixtures.py --old-stack   # peft 0.10.0 + transformers 4.40.2
    .venv-peft012/bin/python        scripts/make_fixtures.py --old-stack   # full fine-tune case (no peft)

Old-stack case.json files also record ``numpy_version`` and ``accelerate_version`` (transformers 4.38.2
needs accelerate < 1.0: accelerate 1.x rejects its ``dispatch_batches`` argument; 0.28.0 is used).
``shape`` there may also be "clean" (the head is only in modules_to_save, no LoRA on it: a healthy
adapter) or "full" (plain full fine-tune, no peft: the checkpoint holds model.safetensors;
``peft_version`` is null).

No network access is needed (models are built with ``AutoConfig.for_model`` +
``from_config``).  The script is deterministic (fixed seeds) and idempotent:
``<out>/<case>/`` is deleted and rewritten for each case it builds.

Layout of each case::

    <out>/<case>/
      case.json               # description of the case (arch, dtype, shape, heads, lora kwargs, ...)
      base/                   # base model save_pretrained() BEFORE get_peft_model (what --base-model gets)
      run/checkpoint-N/       # real transformers.Trainer checkpoint(s)
      reference.safetensors   # input_ids, attention_mask, logits/<checkpoint-N> (float32)

case.json fields: arch, auto_class, dtype, shape ("double_wrapped" | "lora_only"),
head_in_base, heads (top-level head module paths, as they appear in the model,
e.g. "score", "classifier", "classification_head"), head_lora_modules (the
Linear modules inside the heads that got LoRA), modules_to_save (what peft put
into modules_to_save), lora_config (kwargs passed to LoraConfig), num_labels,
peft_version, transformers_version, tolerance, checkpoints, sanity (numbers
showing the head really moved during training).

``--tuners`` cases use another peft method (LoHa, LoKr, AdaLoRA, IA3, VeRA, BOFT, HRA, FourierFT, LN
Tuning, OFT, Poly: every tuner of peft 0.12 that accepts ``all-linear``): their case.json has ``tuner``
(the peft config class), ``tuner_config`` (its kwargs) and ``saved_peft_type`` instead of
``lora_config``; ``head_lora_modules`` lists the head modules carrying the tuner, and
``sanity.head_lora_layer_params`` the tuner layer's own hyperparameters (r, alpha, scaling, ...).
Poly's router needs ``task_ids``: training alternates tasks 0/1, the reference logits are task 0's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys

# peft stores all-linear target_modules as a set -> pin the hash seed so adapter_config.json is byte-reproducible
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))

import inspect  # noqa: E402
import re  # noqa: E402

import accelerate  # noqa: E402
import numpy  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# tests/fixtures and tests/heldout MUST be written by peft 0.12.0 / transformers 4.44.2 (checked in main());
# the old-stack cases each name the releases that write them.
BUGGY_STACK = {"peft": "0.12.0", "transformers": "4.44.2"}
INSTALLED_STACK = {"peft": peft.__version__, "transformers": transformers.__version__}

from peft import get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1234
SEQ_LEN = 12
REF_BATCH = 4
N_TRAIN = 16
TRAIN_BATCH = 4
LR = 5e-3

ALL_LINEAR = "all-linear"
BART_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# ----------------------------------------------------------------------------
# tiny model configs
# ----------------------------------------------------------------------------

LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MISTRAL = dict(LLAMA, sliding_window=None)
QWEN2 = dict(LLAMA)
ROBERTA = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
BERT = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
)
DISTILBERT = dict(
    vocab_size=128,
    dim=32,
    n_layers=1,
    n_heads=4,
    hidden_dim=64,
    max_position_embeddings=64,
    pad_token_id=0,
)
BART = dict(
    vocab_size=128,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
)
GPT2 = dict(
    vocab_size=128,
    n_embd=32,
    n_layer=1,
    n_head=4,
    n_positions=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ELECTRA = dict(
    vocab_size=128,
    embedding_size=16,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
)
DEBERTA_V2 = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
)

#: Keys only the --layouts cases set (absent from every other case, so those build exactly as before):
#: adapter_name (get_peft_model's), second_adapter ({"name", "lora"}: added with add_adapter and trained in a
#: second phase), adam_epsilon, lossy_bias (bias="lora_only": also record the logits with the unsaved biases
#: put back), builder ("accelerate": a plain accelerate loop with Accelerator.save_state instead of Trainer).
LAYOUT_KEYS = {"adapter_name", "second_adapter", "adam_epsilon", "lossy_bias", "builder"}

SEQ = "AutoModelForSequenceClassification"
TOK = "AutoModelForTokenClassification"
AUTO_CLASSES = {SEQ: AutoModelForSequenceClassification, TOK: AutoModelForTokenClassification}


def case(
    arch,
    cfg,
    auto_class=SEQ,
    lora=None,
    shape="double_wrapped",
    heads=("score",),
    dtype="float32",
    num_labels=3,
    max_steps=2,
    save_steps=2,
    save_safetensors=True,
    head_in_base=True,
    eos_at_end=False,
    autocast_adapter_dtype=True,
    lr=LR,
    notes="",
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    tuner="LoraConfig",
    **old_stack,
):
    assert set(old_stack) <= {"stack", "keep_checkpoints"} | LAYOUT_KEYS, old_stack
    return dict(
        **old_stack,
        tuner=tuner,
        lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        arch=arch,
        cfg=cfg,
        auto_class=auto_class,
        lora=lora,
        shape=shape,
        heads=list(heads),
        dtype=dtype,
        num_labels=num_labels,
        max_steps=max_steps,
        save_steps=save_steps,
        save_safetensors=save_safetensors,
        head_in_base=head_in_base,
        eos_at_end=eos_at_end,
        autocast_adapter_dtype=autocast_adapter_dtype,
        lr=lr,
        notes=notes,
    )


def seq_cls_all_linear(**extra):
    return dict(task_type="SEQ_CLS", target_modules=ALL_LINEAR, r=4, lora_alpha=8, lora_dropout=0.0, **extra)


def tok_cls_all_linear(**extra):
    return dict(task_type="TOKEN_CLS", target_modules=ALL_LINEAR, r=4, lora_alpha=8, lora_dropout=0.0, **extra)


CASES = {
    "bert_resume": case(
        "bert",
        BERT,
        lora=seq_cls_all_linear(),
        heads=["classifier"],
        max_steps=8,
        save_steps=4,
        lr_scheduler_type="linear",
        warmup_steps=2,
        weight_decay=0.01,
        notes="mid-run checkpoint with a linear schedule, warmup and weight decay (bias in the no-decay group): "
        "for resume tests",
    ),
    "llama_score": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        max_steps=4,
        save_steps=2,
        notes="decoder `score` head (no bias); two checkpoints",
    ),
    "roberta_nested": case(
        "roberta",
        ROBERTA,
        lora=seq_cls_all_linear(),
        heads=["classifier"],
        notes="nested head classifier.dense + classifier.out_proj; whole `classifier` in modules_to_save",
    ),
    "distilbert_two_heads": case(
        "distilbert",
        DISTILBERT,
        lora=seq_cls_all_linear(),
        heads=["pre_classifier", "classifier"],
        notes="pre_classifier and classifier both end with 'classifier' -> both double wrapped",
    ),
    "mistral_bf16": case(
        "mistral",
        MISTRAL,
        lora=seq_cls_all_linear(),
        dtype="bfloat16",
        autocast_adapter_dtype=False,
        lr=2e-2,
        notes="model and adapter in bfloat16 (get_peft_model(..., autocast_adapter_dtype=False))",
    ),
    "bert_bin": case(
        "bert",
        BERT,
        lora=seq_cls_all_linear(),
        heads=["classifier"],
        save_safetensors=False,
        notes="Trainer save_safetensors=False -> adapter_model.bin; bert.pooler.dense also gets (plain) LoRA",
    ),
    "llama_rslora_pattern": case(
        "llama",
        LLAMA,
        lora=dict(
            task_type="SEQ_CLS",
            target_modules=ALL_LINEAR,
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            use_rslora=True,
            rank_pattern={"score": 2},
            alpha_pattern={"score": 5},
        ),
        notes="use_rslora + rank_pattern/alpha_pattern for score (see sanity.head_lora_ranks for what applied)",
    ),
    "llama_dora": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(use_dora=True),
        notes="DoRA: keys include lora_magnitude_vector",
    ),
    "bert_token_cls": case(
        "bert",
        BERT,
        auto_class=TOK,
        lora=tok_cls_all_linear(),
        heads=["classifier"],
        num_labels=5,
        notes="token classification, per-token labels",
    ),
    "bart_lora_only_head": case(
        "bart",
        BART,
        lora=dict(task_type="SEQ_CLS", target_modules=BART_TARGETS, r=4, lora_alpha=8, lora_dropout=0.0),
        shape="lora_only",
        heads=["classification_head"],
        eos_at_end=True,
        lr=3e-2,
        notes="explicit target list hits classification_head.out_proj with LoRA only; 'classification_head' is "
        "not matched by modules_to_save ['classifier','score'] so classification_head.dense stays frozen",
    ),
    "bart_lora_only_head_nobase": case(
        "bart",
        BART,
        lora=dict(task_type="SEQ_CLS", target_modules=BART_TARGETS, r=4, lora_alpha=8, lora_dropout=0.0),
        shape="lora_only",
        heads=["classification_head"],
        eos_at_end=True,
        head_in_base=False,
        lr=3e-2,
        notes="same as bart_lora_only_head but base/ has no classification_head.* tensors (like facebook/bart-base)",
    ),
    "llama_no_task_type": case(
        "llama",
        LLAMA,
        lora=dict(target_modules=ALL_LINEAR, r=4, lora_alpha=8, lora_dropout=0.0),
        shape="lora_only",
        notes="no task_type -> plain PeftModel; score gets LoRA only (not in modules_to_save)",
    ),
}

HELDOUT_CASES = {
    "gpt2_score": case(
        "gpt2",
        GPT2,
        lora=seq_cls_all_linear(),
        notes="GPT2 body uses Conv1D (fan_in_fan_out); score is nn.Linear",
    ),
    "electra_nested": case(
        "electra",
        ELECTRA,
        lora=seq_cls_all_linear(),
        heads=["classifier"],
        notes="ElectraClassificationHead classifier.dense + classifier.out_proj; embeddings_project also LoRA",
    ),
    "deberta_v2_pooler": case(
        "deberta-v2",
        DEBERTA_V2,
        lora=seq_cls_all_linear(),
        heads=["classifier"],
        notes="classifier double wrapped; pooler.dense gets plain LoRA only",
    ),
    "qwen2_token_cls": case(
        "qwen2",
        QWEN2,
        auto_class=TOK,
        lora=tok_cls_all_linear(),
        num_labels=5,
        notes="decoder token classification, score head",
    ),
    "roberta_token_cls": case(
        "roberta",
        ROBERTA,
        auto_class=TOK,
        lora=tok_cls_all_linear(),
        heads=["classifier"],
        num_labels=5,
        notes="token classification, classifier Linear head",
    ),
}


def seq_cls_tuner(**extra):
    return dict(task_type="SEQ_CLS", target_modules=ALL_LINEAR, **extra)


# Other tuners of peft 0.12 (--tuners, default out tests/fixtures_tuners/): every one of them accepts
# target_modules="all-linear" and double-wraps the head like LoRA (huggingface/peft#2027).
TUNER_CASES = {
    "loha_llama_score": case(
        "llama",
        LLAMA,
        tuner="LoHaConfig",
        lora=seq_cls_tuner(r=4, alpha=8),
        notes="LoHa: score.hada_w1_a/b, hada_w2_a/b (+ modules_to_save/original_module copies)",
    ),
    "lokr_bert_classifier": case(
        "bert",
        BERT,
        tuner="LoKrConfig",
        lora=seq_cls_tuner(r=4, alpha=4),
        heads=["classifier"],
        notes="LoKr with alpha == r: peft <= 0.13 computes kron(w1, w2), peft >= 0.14 (alpha/r) * kron(w1, w2): "
        "the same here",
    ),
    "lokr_llama_scaled": case(
        "llama",
        LLAMA,
        tuner="LoKrConfig",
        lora=seq_cls_tuner(r=4, alpha=8),
        notes="LoKr with alpha != r: peft 0.12 ignores alpha, peft >= 0.14 scales the delta by alpha/r (body, head): "
        "no repair reproduces it on peft >= 0.14 (refused there)",
    ),
    "adalora_roberta_nested": case(
        "roberta",
        ROBERTA,
        tuner="AdaLoraConfig",
        lora=seq_cls_tuner(init_r=4, target_r=2, lora_alpha=8, tinit=0, tfinal=1, deltaT=1, total_step=4),
        heads=["classifier"],
        max_steps=4,
        save_steps=2,
        notes="AdaLoRA trained by a plain Trainer (peft 0.12's update_and_allocate cannot run on a double-wrapped "
        "head: the frozen original_module copy has no grad, TypeError in update_ipt), so rank_pattern stays null; "
        "nested head classifier.dense + classifier.out_proj; lora_A/B/E and the trained copy's ranknum",
    ),
    "ia3_bert_token_cls": case(
        "bert",
        BERT,
        auto_class=TOK,
        tuner="IA3Config",
        lora=dict(task_type="TOKEN_CLS", target_modules=ALL_LINEAR),
        heads=["classifier"],
        num_labels=5,
        lr=2e-2,
        notes="IA3 token classification: classifier is not a feedforward module, so ia3_l scales its output, bias "
        "included",
    ),
    "vera_llama_score": case(
        "llama",
        LLAMA,
        tuner="VeraConfig",
        lora=seq_cls_tuner(r=4),
        lr=2e-2,
        notes="VeRA: score.vera_lambda_b/d, the head copy's own vera_A/vera_B and the shared base_model.vera_A/B",
    ),
    "boft_bert_classifier": case(
        "bert",
        BERT,
        tuner="BOFTConfig",
        lora=seq_cls_tuner(boft_block_size=4),
        heads=["classifier"],
        notes="BOFT: classifier.boft_R, boft_s and the boft_P permutation buffer",
    ),
    "hra_llama_score": case(
        "llama",
        LLAMA,
        tuner="HRAConfig",
        lora=seq_cls_tuner(r=4),
        notes="HRA: score.hra_u (Householder reflections of the input space)",
    ),
    "fourierft_bert_classifier": case(
        "bert",
        BERT,
        tuner="FourierFTConfig",
        lora=seq_cls_tuner(n_frequency=16, scaling=10.0),
        heads=["classifier"],
        notes="FourierFT: classifier.fourierft_spectrum; the spectrum's locations come from random_loc_seed",
    ),
    "ln_tuning_llama_score": case(
        "llama",
        LLAMA,
        tuner="LNTuningConfig",
        lora=dict(task_type="SEQ_CLS", target_modules=ALL_LINEAR),
        notes="LN Tuning on all-linear: every Linear gets a trainable copy (ln_tuning_layers), the head included",
    ),
    "oft_bert_classifier": case(
        "bert",
        BERT,
        tuner="OFTConfig",
        lora=seq_cls_tuner(r=4),
        heads=["classifier"],
        notes="OFT of peft <= 0.13 (oft_r): peft >= 0.14 refuses such adapters (OFT was reparametrised)",
    ),
    "poly_llama_score": case(
        "llama",
        LLAMA,
        tuner="PolyConfig",
        lora=seq_cls_tuner(r=4, n_tasks=2, n_skills=2),
        notes="Poly: the router mixes LoRA skills per example by task_ids (training: tasks 0/1 alternating; "
        "reference logits: task 0): a head with no single weight",
    ),
    # The LoRA-only head of bart_lora_only_head with other tuners (migration 0010): classification_head is not in
    # the SEQ_CLS modules_to_save defaults, so the explicit target list gives its out_proj the tuner only.
    "loha_bart_tuner_only_head": case(
        "bart",
        BART,
        tuner="LoHaConfig",
        lora=dict(task_type="SEQ_CLS", target_modules=BART_TARGETS, r=4, alpha=8),
        shape="lora_only",
        heads=["classification_head"],
        eos_at_end=True,
        lr=3e-2,
        notes="LoHa on classification_head.out_proj only (hada_*), the head's base weights never saved",
    ),
    "ia3_bart_tuner_only_head": case(
        "bart",
        BART,
        tuner="IA3Config",
        lora=dict(task_type="SEQ_CLS", target_modules=BART_TARGETS, feedforward_modules=["fc2"]),
        shape="lora_only",
        heads=["classification_head"],
        eos_at_end=True,
        lr=3e-1,
        notes="IA3 on classification_head.out_proj only (ia3_l scales its output, bias included), the head's base "
        "weights never saved",
    ),
    "lokr_bart_tuner_only_head_nobase": case(
        "bart",
        BART,
        tuner="LoKrConfig",
        lora=dict(task_type="SEQ_CLS", target_modules=BART_TARGETS, r=4, alpha=4),
        shape="lora_only",
        heads=["classification_head"],
        eos_at_end=True,
        head_in_base=False,
        lr=3e-2,
        notes="LoKr on classification_head.out_proj only, and base/ without classification_head.* (like "
        "facebook/bart-base): the trained head cannot be rebuilt",
    ),
}

# Cases written by OTHER releases (--old-stack, default out tests/fixtures_old_stack/). "stack" names the
# peft/transformers versions that must write the case; peft=None means a full fine-tune without peft.
PEFT082 = {"peft": "0.8.2", "transformers": "4.38.2"}
PEFT090 = {"peft": "0.9.0", "transformers": "4.38.2"}
PEFT0100 = {"peft": "0.10.0", "transformers": "4.40.2"}
PEFT0111 = {"peft": "0.11.1", "transformers": "4.42.4"}
LLAMA_NOT_HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OLD_STACK_CASES = {
    "llama_score_peft082": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        max_steps=4,
        save_steps=2,
        stack=PEFT082,
        notes="as llama_score, written by peft 0.8.2 / transformers 4.38.2 (trainer_state.json has no "
        "stateful_callbacks)",
    ),
    "llama_clean_peft082": case(
        "llama",
        LLAMA,
        lora=dict(task_type="SEQ_CLS", target_modules=LLAMA_NOT_HEAD, r=4, lora_alpha=8, lora_dropout=0.0),
        shape="clean",
        max_steps=4,
        save_steps=2,
        stack=PEFT082,
        notes="healthy adapter (head only in modules_to_save, no LoRA on it) written by peft 0.8.2 / "
        "transformers 4.38.2 (no stateful_callbacks in trainer_state.json): loads under any peft; resuming it "
        "under transformers >= 4.45 raises KeyError: 'TrainerControl' at the first save",
    ),
    "bert_classifier_peft090": case(
        "bert",
        BERT,
        lora=seq_cls_all_linear(),
        heads=["classifier"],
        max_steps=4,
        save_steps=2,
        stack=PEFT090,
        notes="bert classifier double wrapped, written by peft 0.9.0 / transformers 4.38.2",
    ),
    "bert_classifier_peft0100": case(
        "bert",
        BERT,
        lora=seq_cls_all_linear(),
        heads=["classifier"],
        max_steps=4,
        save_steps=2,
        stack=PEFT0100,
        notes="bert classifier double wrapped, written by peft 0.10.0 / transformers 4.40.2 (bert.pooler.dense "
        "gets plain LoRA)",
    ),
    "llama_score_peft0111": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        max_steps=4,
        save_steps=2,
        stack=PEFT0111,
        notes="as llama_score, written by peft 0.11.1 / transformers 4.42.4",
    ),
    "bart_lora_only_head_newest": case(
        "bart",
        BART,
        lora=dict(task_type="SEQ_CLS", target_modules=BART_TARGETS, r=4, lora_alpha=8, lora_dropout=0.0),
        shape="lora_only",
        heads=["classification_head"],
        eos_at_end=True,
        lr=3e-2,
        max_steps=4,
        save_steps=2,
        stack={"peft": "0.21.2", "transformers": "5.24.0"},
        notes="as bart_lora_only_head, written by TODAY's peft 0.21.2 / transformers 5.24.0 / numpy 2: current peft "
        "still LoRA-wraps classification_head.out_proj without saving the head; to be resumed on peft 0.12.0 / "
        "transformers 4.44.2 / numpy 1 after fix --base-model --target-peft 0.12.0 --target-transformers 4.44.2",
    ),
    "llama_full_finetune": case(
        "llama",
        LLAMA,
        lora=None,
        shape="full",
        max_steps=3,
        save_steps=2,
        keep_checkpoints=["checkpoint-2"],
        stack={"peft": None, "transformers": "4.44.2"},
        notes="plain full fine-tune (AutoModelForSequenceClassification, no peft) with Trainer save_safetensors: "
        "model.safetensors + optimizer.pt + scheduler.pt + rng_state.pth + trainer_state.json; only the mid-run "
        "checkpoint-2 of a max_steps=3 run is kept (as if the run died before its final save), so resuming it "
        "trains one more step and saves",
    ),
}

# Layouts beyond one default adapter written by Trainer (--layouts, default out tests/fixtures_layouts/), all
# written by peft 0.12.0 / transformers 4.44.2 like tests/fixtures. case.json of these cases also has "adapters"
# (adapter name -> its directory inside a checkpoint) and "active_adapter"; reference.safetensors also holds
# logits/<checkpoint>/<adapter> for every adapter (the trained model after set_adapter(adapter)).
TASK_B = dict(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, lora_dropout=0.0)
LAYOUT_CASES = {
    "llama_named_adapter": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        adapter_name="task_a",
        notes="get_peft_model(..., adapter_name='task_a'): Trainer's checkpoint holds the adapter in task_a/ and the "
        "optimizer/scheduler/rng/trainer state beside it",
    ),
    "llama_two_adapters": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        second_adapter={"name": "task_b", "lora": TASK_B},
        notes="default (all-linear, head double wrapped) trained first; then add_adapter('task_b', q/v + score in "
        "modules_to_save), set_adapter('task_b') and a second Trainer run: its checkpoint holds default at the top "
        "and task_b/, whose head copy carries default's LoRA (keys score.lora_A.default.weight)",
    ),
    "llama_two_named_adapters": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        adapter_name="task_a",
        second_adapter={"name": "task_b", "lora": TASK_B},
        notes="as llama_two_adapters with the first adapter named task_a: both adapters in subfolders, task_b's "
        "head copy carries task_a's LoRA (keys score.lora_A.task_a.weight)",
    ),
    "bert_lora_only_bias": case(
        "bert",
        BERT,
        lora=seq_cls_all_linear(bias="lora_only"),
        heads=["classifier"],
        lr=2e-2,
        lossy_bias=True,
        notes="bias='lora_only': peft 0.12 trains the biases of every LoRA-wrapped Linear but saves none of them "
        "(it looks for <m>.bias, the tensor is <m>.base_layer.bias; huggingface/peft#3306). reference also holds "
        "logits_unsaved_biases_reset/<checkpoint>: the trained model with those biases put back to their initial "
        "values, which is the best any repair can give",
    ),
    "boft_bert_boft_only_bias": case(
        "bert",
        BERT,
        tuner="BOFTConfig",
        lora=seq_cls_tuner(boft_block_size=4, bias="boft_only"),
        heads=["classifier"],
        lr=2e-2,
        lossy_bias=True,
        notes="BOFT bias='boft_only': peft 0.12 trains the biases of every BOFT-wrapped Linear and, like LoRA's "
        "lora_only, looks for <m>.bias when saving: none saved (the double-wrapped head's copy keeps its own)",
    ),
    "vera_roberta_vera_only_bias": case(
        "roberta",
        ROBERTA,
        tuner="VeraConfig",
        lora=seq_cls_tuner(r=4, bias="vera_only"),
        heads=["classifier"],
        lr=2e-2,
        lossy_bias=True,
        notes="VeRA bias='vera_only': peft 0.12 trains the biases of every VeRA-wrapped Linear and saves only "
        "vera_lambda_* and the projections: none of them saved",
    ),
    "llama_fp16": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        dtype="float16",
        autocast_adapter_dtype=False,
        adam_epsilon=1e-4,
        notes="model and adapter in float16 (model in half precision on CPU; adam_epsilon raised from 1e-8, which "
        "underflows in float16)",
    ),
    "llama_accelerate_state": case(
        "llama",
        LLAMA,
        lora=seq_cls_all_linear(),
        builder="accelerate",
        notes="no Trainer: a plain accelerate loop (Accelerator(cpu=True), AdamW, constant LambdaLR) whose checkpoint "
        "is accelerator.save_state(dir) (model.safetensors = the whole PeftModel state, optimizer.bin, scheduler.bin, "
        "random_states_0.pkl) plus peft_model.save_pretrained(dir)",
    ),
}

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def make_ids(gen, n, vocab, eos_at_end, eos_id=2):
    # ids in [3, vocab) never hit pad/bos/eos (0, 1, 2 in every config here)
    ids = torch.randint(3, vocab, (n, SEQ_LEN), generator=gen, dtype=torch.int64)
    if eos_at_end:
        ids[:, -1] = eos_id
    return ids


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids, labels, task_ids=None):
        self.input_ids = input_ids
        self.labels = labels
        self.task_ids = task_ids

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones_like(self.input_ids[i]),
            "labels": self.labels[i],
            **({} if self.task_ids is None else {"task_ids": self.task_ids[i]}),
        }


@torch.no_grad()
def logits_of(model, input_ids, **extra):
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra).logits.float().clone()
    if was_training:
        model.train()
    return out


def get_module(model, path):
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


@torch.no_grad()
def head_reset_logits(peft_model, heads, input_ids, **extra):
    """Logits of the trained model with the head(s) put back to their init state.

    Done on a deep copy: ModulesToSaveWrappers fall back to original_module (never trained) and
    LoRA layers inside heads are disabled. This is what you'd get if a migration dropped the head.
    """
    m = copy.deepcopy(peft_model)
    inner = m.base_model.model
    for h in heads:
        mod = get_module(inner, h)
        for sub in mod.modules():
            if isinstance(sub, (ModulesToSaveWrapper, BaseTunerLayer)):
                sub._disable_adapters = True
    return logits_of(m, input_ids, **extra)


class RefCallback(TrainerCallback):
    def __init__(self, input_ids, **extra):
        self.input_ids = input_ids
        self.extra = extra  # Poly: the task_ids its router needs
        self.logits = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.logits[f"checkpoint-{state.global_step}"] = logits_of(model, self.input_ids, **self.extra)


def head_lora_modules(peft_model, heads):
    """Names (relative to the transformers model) of LoRA layers that sit inside the head modules,
    ignoring the copies in ModulesToSaveWrapper (original_module / modules_to_save)."""
    out = []
    inner = peft_model.base_model.model
    for name, mod in inner.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        clean = re.sub(r"\.modules_to_save\.[^.]+", "", name.replace(".original_module", ""))
        if any(clean == h or clean.startswith(h + ".") for h in heads) and clean not in out:
            out.append(clean)
    return out


def tuner_layer_params(layer):
    """The per-adapter hyperparameters a non-LoRA tuner layer holds (r, alpha, scaling, ...), JSON-ready."""
    params = {}
    for name in getattr(layer, "other_param_names", ()):
        value = getattr(layer, name, None)
        value = value["default"] if hasattr(value, "keys") and "default" in value.keys() else None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, str)):
            params[name] = value
    return params


def is_head_key(key, heads):
    k = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
    return any(k == h or k.startswith(h + ".") for h in heads)


def adapter_dir(ckpt_dir, adapter="default"):
    """Where peft's save_pretrained puts an adapter: the directory itself for "default", else a subfolder."""
    return ckpt_dir if adapter == "default" else os.path.join(ckpt_dir, adapter)


def adapter_file(ckpt_dir):
    for fn in ("adapter_model.safetensors", "adapter_model.bin"):
        p = os.path.join(ckpt_dir, fn)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"no adapter file in {ckpt_dir}")


def load_adapter(ckpt_dir):
    p = adapter_file(ckpt_dir)
    if p.endswith(".safetensors"):
        return load_file(p)
    return torch.load(p, map_location="cpu", weights_only=True)


# transformers < 4.41 names TrainingArguments.eval_strategy evaluation_strategy
EVAL_STRATEGY = "eval_strategy"
if EVAL_STRATEGY not in inspect.signature(TrainingArguments).parameters:
    EVAL_STRATEGY = "evaluation_strategy"


def _training_arguments(**kwargs):
    """TrainingArguments without the keywords this transformers release no longer has (5.x: logging_dir, ...)."""
    known = inspect.signature(TrainingArguments).parameters
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in known})


def _train(spec, peft_model, train_ids, labels, cb, task_ids=None):
    if spec.get("builder") == "accelerate":
        return _train_accelerate(spec, peft_model, train_ids, labels, cb)
    args = _training_arguments(
        output_dir="run",
        logging_dir=os.path.join("run", "logs"),
        overwrite_output_dir=True,
        max_steps=spec["max_steps"],
        save_strategy="steps",
        save_steps=spec["save_steps"],
        save_safetensors=spec["save_safetensors"],
        per_device_train_batch_size=TRAIN_BATCH,
        learning_rate=spec["lr"],
        lr_scheduler_type=spec["lr_scheduler_type"],
        warmup_steps=spec["warmup_steps"],
        weight_decay=spec["weight_decay"],
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **{EVAL_STRATEGY: "no"},
        **({"adam_epsilon": spec["adam_epsilon"]} if "adam_epsilon" in spec else {}),
    )
    dataset = TinyDataset(train_ids, labels, task_ids)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, callbacks=[cb])
    trainer.train()


def _train_accelerate(spec, peft_model, train_ids, labels, cb):
    """A plain accelerate loop; every save_steps: accelerator.save_state(run/checkpoint-N) + save_pretrained."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=spec["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loader = torch.utils.data.DataLoader(
        TinyDataset(train_ids, labels),
        batch_size=TRAIN_BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(peft_model, optimizer, loader, scheduler)
    model.train()
    step = 0
    while step < spec["max_steps"]:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % spec["save_steps"] == 0:
                out = os.path.join("run", f"checkpoint-{step}")
                accelerator.save_state(out)
                accelerator.unwrap_model(model).save_pretrained(out)
                cb.logits[f"checkpoint-{step}"] = logits_of(model, cb.input_ids)
            if step >= spec["max_steps"]:
                break


class AdapterRefCallback(RefCallback):
    """Also the logits of every adapter at each save (on a copy: set_adapter changes what is trainable)."""

    def __init__(self, input_ids, adapters):
        super().__init__(input_ids)
        self.adapters = adapters
        self.adapter_logits = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        super().on_save(args, state, control, model=model, **kwargs)
        self.adapter_logits[f"checkpoint-{state.global_step}"] = adapter_logits(model, self.adapters, self.input_ids)


def adapter_logits(peft_model, adapters, input_ids):
    logits = {}
    for adapter in adapters:
        twin = copy.deepcopy(peft_model)
        twin.set_adapter(adapter)
        logits[adapter] = logits_of(twin, input_ids)
    return logits


@torch.no_grad()
def unsaved_biases_reset_logits(peft_model, base_dir, input_ids):
    """(logits of the trained model with the biases bias='lora_only' trained but peft 0.12 never saved put back to
    their initial values, {bias name: max |trained - initial|})."""
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    twin = copy.deepcopy(peft_model)
    moved = {}
    for name, module in twin.base_model.model.named_modules():
        if not isinstance(module, BaseTunerLayer) or "original_module" in name or "modules_to_save" in name:
            continue
        bias = module.get_base_layer().bias
        if bias is None or not bias.requires_grad or f"{name}.bias" not in base:
            continue
        initial = base[f"{name}.bias"].to(bias.dtype)
        moved[f"{name}.bias"] = (bias - initial).abs().max().item()
        bias.copy_(initial)
    return logits_of(twin, input_ids), moved


# ----------------------------------------------------------------------------
# building one case
# ----------------------------------------------------------------------------


def build_case(name, spec, out_root):
    print(f"\n=== {name} ({spec['arch']}, {spec['auto_class']}, {spec['dtype']}) ===", flush=True)
    case_dir = os.path.join(out_root, name)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    base_dir = os.path.join(case_dir, "base")
    run_dir = os.path.join(case_dir, "run")

    torch.manual_seed(SEED)
    transformers.set_seed(SEED)
    dtype = getattr(torch, spec["dtype"])
    cfg = AutoConfig.for_model(spec["arch"], num_labels=spec["num_labels"], **spec["cfg"])
    auto_cls = AUTO_CLASSES[spec["auto_class"]]
    model = auto_cls.from_config(cfg, torch_dtype=dtype)
    model.eval()

    # reference inputs and training data (fixed generator, independent of the model init RNG)
    gen = torch.Generator().manual_seed(SEED + 1)
    vocab = cfg.vocab_size
    ref_ids = make_ids(gen, REF_BATCH, vocab, spec["eos_at_end"])
    train_ids = make_ids(gen, N_TRAIN, vocab, spec["eos_at_end"])
    if spec["auto_class"] == TOK:
        labels = torch.randint(0, spec["num_labels"], (N_TRAIN, SEQ_LEN), generator=gen, dtype=torch.int64)
    else:
        labels = torch.randint(0, spec["num_labels"], (N_TRAIN,), generator=gen, dtype=torch.int64)

    init_logits = logits_of(model, ref_ids)

    # --- base/ : the model before get_peft_model
    model.save_pretrained(base_dir, safe_serialization=True)
    if not spec["head_in_base"]:
        st_path = os.path.join(base_dir, "model.safetensors")
        sd = load_file(st_path)
        dropped = [k for k in sd if is_head_key(k, spec["heads"])]
        assert dropped, f"no head tensors found to drop in {st_path}"
        for k in dropped:
            del sd[k]
        save_file(sd, st_path, metadata={"format": "pt"})
        print(f"  removed from base/model.safetensors: {dropped}")

    # --- peft model
    lora_kwargs = copy.deepcopy(spec["lora"])
    is_lora = spec["tuner"] == "LoraConfig"
    lora_config = getattr(peft, spec["tuner"])(**copy.deepcopy(lora_kwargs))
    get_peft_model_kwargs = {"autocast_adapter_dtype": spec["autocast_adapter_dtype"]}
    if "autocast_adapter_dtype" not in inspect.signature(get_peft_model).parameters:  # peft < 0.12
        assert spec["autocast_adapter_dtype"] and spec["dtype"] == "float32", "this peft cannot keep bf16 adapters"
        get_peft_model_kwargs = {}
    if "adapter_name" in spec:
        get_peft_model_kwargs["adapter_name"] = spec["adapter_name"]
    first = spec.get("adapter_name", "default")
    adapters = [first] + ([spec["second_adapter"]["name"]] if "second_adapter" in spec else [])
    layout = bool(LAYOUT_KEYS & set(spec))
    peft_model = get_peft_model(model, lora_config, **get_peft_model_kwargs)
    peft_model.print_trainable_parameters()
    mts = peft_model.peft_config[first].modules_to_save
    if mts is None and "stack" in spec:  # peft < 0.11 keeps the SEQ_CLS defaults on the PeftModel, not the config
        mts = list(getattr(peft_model, "modules_to_save", None) or []) or None
    hlm = head_lora_modules(peft_model, spec["heads"])
    head_lora_params = {}
    for n_, m_ in peft_model.base_model.model.named_modules():
        if isinstance(m_, BaseTunerLayer) and hasattr(m_, "scaling") and "original_module" not in n_:
            clean = n_.replace(f".modules_to_save.{first}", "")
            if clean in hlm:
                head_lora_params[clean] = (
                    {"r": m_.r[first], "scaling": m_.scaling[first], "lora_alpha": m_.lora_alpha[first]}
                    if is_lora
                    else tuner_layer_params(m_)
                )
    print(f"  modules_to_save={mts}  head LoRA modules={hlm}  head LoRA r/scaling={head_lora_params}")
    if spec["shape"] == "clean":
        assert not hlm and set(spec["heads"]) <= set(mts or []), (hlm, mts)
    else:
        assert hlm, "expected the head to be LoRA-wrapped (that's the bug being reproduced)"

    # --- train with the real Trainer (Poly routes every example by its task id: task 0 for the reference)
    poly_tasks = lora_kwargs.get("n_tasks") if spec["tuner"] == "PolyConfig" else None
    extra = {"task_ids": torch.zeros(REF_BATCH, dtype=torch.int64)} if poly_tasks else {}
    cb = AdapterRefCallback(ref_ids, adapters) if layout else RefCallback(ref_ids, **extra)
    # run the Trainer from inside the case dir so that paths stored in training_args.bin are relative ("run")
    cwd = os.getcwd()
    os.chdir(case_dir)
    try:
        if "second_adapter" in spec:  # first train the first adapter (its checkpoints are not kept), then the second
            _train(spec, peft_model, train_ids, labels, TrainerCallback())
            shutil.rmtree("run")
            second = spec["second_adapter"]
            peft_model.add_adapter(second["name"], peft.LoraConfig(**copy.deepcopy(second["lora"])))
            peft_model.set_adapter(second["name"])
            peft_model.print_trainable_parameters()
        _train(spec, peft_model, train_ids, labels, cb, torch.arange(N_TRAIN) % poly_tasks if poly_tasks else None)
    finally:
        os.chdir(cwd)

    # keep only checkpoint-* under run/
    for entry in os.listdir(run_dir):
        if not entry.startswith("checkpoint-"):
            p = os.path.join(run_dir, entry)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    checkpoints = sorted(os.listdir(run_dir), key=lambda s: int(s.split("-")[1]))
    assert checkpoints == sorted(cb.logits, key=lambda s: int(s.split("-")[1])), (checkpoints, cb.logits.keys())

    # --- sanity: the head really moved
    tol = {"bfloat16": 1e-2, "float16": 1e-2}.get(spec["dtype"], 1e-4)
    final_logits = logits_of(peft_model, ref_ids, **extra)
    assert torch.equal(final_logits, cb.logits[checkpoints[-1]]), "final logits != logits captured at last save"
    reset_logits = head_reset_logits(peft_model, spec["heads"], ref_ids, **extra)
    diff_vs_init = (final_logits - init_logits).abs().max().item()
    diff_vs_head_reset = (final_logits - reset_logits).abs().max().item()
    print(
        f"  max|trained - init model| = {diff_vs_init:.4g}; max|trained - trained-with-init-head| = "
        f"{diff_vs_head_reset:.4g} (tolerance {tol})"
    )
    assert diff_vs_init > 20 * tol, "training did not move logits measurably"
    assert diff_vs_head_reset > 20 * tol, "the head did not move measurably"

    # --- print head-related adapter keys per checkpoint
    head_keys = {}
    head_ranks = {}
    head_dtypes = {}
    for ck in checkpoints:
        for adapter in adapters[:-1]:
            extra = load_adapter(adapter_dir(os.path.join(run_dir, ck), adapter))
            print(f"  {ck} adapter {adapter}: {len(extra)} tensors; head keys:")
            print("\n".join(f"    {k}" for k in sorted(extra) if is_head_key(k, spec["heads"])))
        ckdir = adapter_dir(os.path.join(run_dir, ck), adapters[-1])
        sd = load_adapter(ckdir)
        print(f"  {ck}/{os.path.basename(adapter_file(ckdir))}: {len(sd)} tensors; head keys:")
        hk = {}
        for k in sorted(sd):
            if is_head_key(k, spec["heads"]):
                t = sd[k]
                print(f"    {k:80s} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
                hk[k] = list(t.shape)
                if ck == checkpoints[-1]:
                    head_dtypes[k] = str(t.dtype).replace("torch.", "")
                if k.endswith("lora_A.weight") and ck == checkpoints[-1]:
                    head_ranks[k] = t.shape[0]
        head_keys[ck] = hk
    last_adapter_dir = adapter_dir(os.path.join(run_dir, checkpoints[-1]), adapters[-1])
    saved_cfg = json.load(open(os.path.join(last_adapter_dir, "adapter_config.json")))

    # --- reference.safetensors
    ref = {"input_ids": ref_ids.contiguous(), "attention_mask": torch.ones_like(ref_ids)}
    for ck in checkpoints:
        ref[f"logits/{ck}"] = cb.logits[ck].float().contiguous()
    if layout:
        for ck in checkpoints:
            # the accelerate builder captures no per-adapter logits: computed at the end (it saves once)
            logits = cb.adapter_logits.get(ck) or adapter_logits(peft_model, adapters, ref_ids)
            assert torch.equal(logits[adapters[-1]], cb.logits[ck]), "active adapter's logits differ from the model's"
            ref.update({f"logits/{ck}/{adapter}": value.float().contiguous() for adapter, value in logits.items()})
    lost = {}
    if spec.get("lossy_bias"):
        assert len(checkpoints) == 1, "the unsaved biases are measured on the final model only"
        reset, lost = unsaved_biases_reset_logits(peft_model, base_dir, ref_ids)
        loss = (reset - final_logits).abs().max().item()
        bias = spec["lora"].get("bias")
        print(f"  unsaved biases ({bias}): {len(lost)}; max|trained - trained with them reset| = {loss:.4g}")
        assert lost and loss > 20 * tol, "the unsaved biases did not move the logits measurably"
        ref[f"logits_unsaved_biases_reset/{checkpoints[-1]}"] = reset.float().contiguous()
    save_file(ref, os.path.join(case_dir, "reference.safetensors"), metadata={"format": "pt"})

    # --- case.json
    meta = {
        "arch": spec["arch"],
        "auto_class": spec["auto_class"],
        "dtype": spec["dtype"],
        "shape": spec["shape"],
        "head_in_base": spec["head_in_base"],
        "heads": spec["heads"],
        "head_lora_modules": hlm,
        "modules_to_save": mts,
        "num_labels": spec["num_labels"],
        **({"lora_config": lora_kwargs} if is_lora else {"tuner": spec["tuner"], "tuner_config": lora_kwargs}),
        **({} if is_lora else {"saved_peft_type": saved_cfg.get("peft_type")}),
        "get_peft_model_kwargs": get_peft_model_kwargs,
        "training": {
            "max_steps": spec["max_steps"],
            "save_steps": spec["save_steps"],
            "learning_rate": spec["lr"],
            "lr_scheduler_type": spec["lr_scheduler_type"],
            "warmup_steps": spec["warmup_steps"],
            "weight_decay": spec["weight_decay"],
            "per_device_train_batch_size": TRAIN_BATCH,
            "n_train": N_TRAIN,
            "seq_len": SEQ_LEN,
            "save_safetensors": spec["save_safetensors"],
            "seed": SEED,
        },
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        **(
            {"numpy_version": numpy.__version__, "accelerate_version": accelerate.__version__}
            if "stack" in spec
            else {}
        ),
        "tolerance": tol,
        "checkpoints": checkpoints,
        "adapter_file": os.path.basename(adapter_file(last_adapter_dir)),
        **(
            {
                "adapters": {adapter: os.path.relpath(adapter_dir(".", adapter)) for adapter in adapters},
                "active_adapter": adapters[-1],
                "builder": spec.get("builder", "trainer"),
            }
            if layout
            else {}
        ),
        **({"unsaved_biases_max_change": lost} if lost else {}),
        "notes": spec["notes"],
        "sanity": {
            "max_abs_diff_trained_vs_init_model": diff_vs_init,
            "max_abs_diff_trained_vs_trained_with_init_head": diff_vs_head_reset,
            "head_lora_A_ranks": head_ranks,
            "head_lora_layer_params": head_lora_params,
            "head_tensor_dtypes": head_dtypes,
            "saved_target_modules": saved_cfg.get("target_modules"),
            "saved_rank_pattern": saved_cfg.get("rank_pattern"),
            "saved_alpha_pattern": saved_cfg.get("alpha_pattern"),
            **({"saved_modules_to_save": saved_cfg.get("modules_to_save")} if "stack" in spec else {}),
        },
    }
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")
    return meta


def build_full_case(name, spec, out_root):
    """A plain full fine-tune (no peft): same data, seeds and layout as build_case; the checkpoints hold
    model.safetensors (or pytorch_model.bin) instead of an adapter."""
    print(f"\n=== {name} (full fine-tune: {spec['arch']}, {spec['auto_class']}, {spec['dtype']}) ===", flush=True)
    case_dir = os.path.join(out_root, name)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    base_dir = os.path.join(case_dir, "base")
    run_dir = os.path.join(case_dir, "run")

    torch.manual_seed(SEED)
    transformers.set_seed(SEED)
    cfg = AutoConfig.for_model(spec["arch"], num_labels=spec["num_labels"], **spec["cfg"])
    model = AUTO_CLASSES[spec["auto_class"]].from_config(cfg, torch_dtype=getattr(torch, spec["dtype"]))
    model.eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    ref_ids = make_ids(gen, REF_BATCH, cfg.vocab_size, spec["eos_at_end"])
    train_ids = make_ids(gen, N_TRAIN, cfg.vocab_size, spec["eos_at_end"])
    if spec["auto_class"] == TOK:
        labels = torch.randint(0, spec["num_labels"], (N_TRAIN, SEQ_LEN), generator=gen, dtype=torch.int64)
    else:
        labels = torch.randint(0, spec["num_labels"], (N_TRAIN,), generator=gen, dtype=torch.int64)
    init_logits = logits_of(model, ref_ids)
    init_head = {k: v.clone() for k, v in model.state_dict().items() if is_head_key(k, spec["heads"])}
    model.save_pretrained(base_dir, safe_serialization=True)

    cb = RefCallback(ref_ids)
    cwd = os.getcwd()
    os.chdir(case_dir)
    try:
        _train(spec, model, train_ids, labels, cb)
    finally:
        os.chdir(cwd)
    for entry in os.listdir(run_dir):
        if not entry.startswith("checkpoint-") or entry not in spec.get("keep_checkpoints", [entry]):
            p = os.path.join(run_dir, entry)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            cb.logits.pop(entry, None)
    checkpoints = sorted(os.listdir(run_dir), key=lambda s: int(s.split("-")[1]))
    assert checkpoints == sorted(cb.logits, key=lambda s: int(s.split("-")[1])), (checkpoints, cb.logits.keys())

    # the saved weights reproduce the logits captured at save time (the run may go on after the last save)
    tol = 1e-2 if spec["dtype"] == "bfloat16" else 1e-4
    for ck in checkpoints:
        saved = AUTO_CLASSES[spec["auto_class"]].from_pretrained(os.path.join(run_dir, ck), torch_dtype=model.dtype)
        assert torch.equal(logits_of(saved, ref_ids), cb.logits[ck]), f"{ck}: reloaded logits != logits at save"
    final_logits = cb.logits[checkpoints[-1]]
    saved.load_state_dict(init_head, strict=False)
    diff_vs_init = (final_logits - init_logits).abs().max().item()
    diff_vs_head_reset = (final_logits - logits_of(saved, ref_ids)).abs().max().item()
    print(
        f"  max|trained - init| = {diff_vs_init:.4g}; max|trained - trained-with-init-head| = {diff_vs_head_reset:.4g}"
    )
    assert diff_vs_init > 20 * tol and diff_vs_head_reset > 20 * tol, "training did not move the logits/head"

    weights = {}
    for ck in checkpoints:
        ckdir = os.path.join(run_dir, ck)
        weights[ck] = sorted(f for f in os.listdir(ckdir) if f.startswith(("model", "pytorch_model")))
        print(f"  {ck}: {sorted(os.listdir(ckdir))}")
    ref = {"input_ids": ref_ids.contiguous(), "attention_mask": torch.ones_like(ref_ids)}
    for ck in checkpoints:
        ref[f"logits/{ck}"] = cb.logits[ck].float().contiguous()
    save_file(ref, os.path.join(case_dir, "reference.safetensors"), metadata={"format": "pt"})
    meta = {
        "arch": spec["arch"],
        "auto_class": spec["auto_class"],
        "dtype": spec["dtype"],
        "shape": spec["shape"],
        "head_in_base": spec["head_in_base"],
        "heads": spec["heads"],
        "head_lora_modules": [],
        "modules_to_save": None,
        "num_labels": spec["num_labels"],
        "lora_config": None,
        "training": {
            "max_steps": spec["max_steps"],
            "save_steps": spec["save_steps"],
            "learning_rate": spec["lr"],
            "lr_scheduler_type": spec["lr_scheduler_type"],
            "warmup_steps": spec["warmup_steps"],
            "weight_decay": spec["weight_decay"],
            "per_device_train_batch_size": TRAIN_BATCH,
            "n_train": N_TRAIN,
            "seq_len": SEQ_LEN,
            "save_safetensors": spec["save_safetensors"],
            "seed": SEED,
        },
        "peft_version": None,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "accelerate_version": accelerate.__version__,
        "tolerance": tol,
        "checkpoints": checkpoints,
        "weights_files": weights,
        "notes": spec["notes"],
        "sanity": {
            "max_abs_diff_trained_vs_init_model": diff_vs_init,
            "max_abs_diff_trained_vs_trained_with_init_head": diff_vs_head_reset,
        },
    }
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")
    return meta


def stack_matches(spec):
    """Whether the installed releases are the ones that must write this case."""
    want = spec.get("stack", BUGGY_STACK)
    return all(want[k] is None or want[k] == INSTALLED_STACK[k] for k in want)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="case names to build (default: all of the selected set)")
    ap.add_argument("--heldout", action="store_true", help="build the held-out cases (default out: tests/heldout)")
    ap.add_argument(
        "--old-stack",
        action="store_true",
        help="build the cases written by other releases (default out: tests/fixtures_old_stack); only those whose "
        "releases are installed",
    )
    ap.add_argument(
        "--layouts",
        action="store_true",
        help="build the cases of other layouts (named/several adapters, lossy bias, fp16, accelerate state; default "
        "out: tests/fixtures_layouts)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output dir (default tests/fixtures; tests/heldout with --heldout; tests/fixtures_old_stack with "
        "--old-stack; tests/fixtures_layouts with --layouts; tests/fixtures_tuners with --tuners)",
    )
    ap.add_argument(
        "--tuners", action="store_true", help="build the non-LoRA tuner cases (default out: tests/fixtures_tuners)"
    )
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    a = ap.parse_args(argv)

    if a.heldout + a.old_stack + a.layouts + a.tuners > 1:
        ap.error("--heldout, --old-stack, --layouts and --tuners exclude each other")
    table = OLD_STACK_CASES if a.old_stack else HELDOUT_CASES if a.heldout else CASES
    table = LAYOUT_CASES if a.layouts else TUNER_CASES if a.tuners else table
    if a.list:
        for n, s in table.items():
            print(f"{n:28s} {s['notes']}")
        return 0
    default_out = "fixtures_old_stack" if a.old_stack else "heldout" if a.heldout else "fixtures"
    default_out = "fixtures_layouts" if a.layouts else "fixtures_tuners" if a.tuners else default_out
    out = os.path.abspath(a.out or os.path.join(REPO_ROOT, "tests", default_out))
    names = a.cases or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(table)}")
    if not a.old_stack:
        assert peft.__version__ == "0.12.0", f"need peft==0.12.0 (the buggy version), got {peft.__version__}"
        assert transformers.__version__ == "4.44.2", f"need transformers==4.44.2, got {transformers.__version__}"
    else:
        skipped = [n for n in names if not stack_matches(table[n])]
        for n in skipped:
            print(f"skipping {n}: written by {table[n]['stack']}, installed {INSTALLED_STACK}")
        if a.cases and skipped:
            ap.error(f"case(s) {skipped} need other releases than the installed {INSTALLED_STACK}")
        names = [n for n in names if n not in skipped]
    os.makedirs(out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    failed = {}
    for n in names:
        try:
            (build_full_case if table[n]["shape"] == "full" else build_case)(n, table[n], out)
        except Exception as e:  # report and go on with the other cases
            import traceback

            traceback.print_exc()
            failed[n] = f"{type(e).__name__}: {e}"
            shutil.rmtree(os.path.join(out, n), ignore_errors=True)
    print(f"\nbuilt {len(names) - len(failed)}/{len(names)} case(s) into {out}")
    for n, msg in failed.items():
        print(f"  FAILED {n}: {msg}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
