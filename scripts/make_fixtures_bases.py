"""Build REAL broken checkpoints of base models the main fixtures do not cover, with peft 0.12.0.

Same layout and rules as ``scripts/make_fixtures.py`` (whose helpers this imports): tiny models from
``AutoConfig.for_model``, trained a few steps by ``transformers.Trainer`` under peft 0.12.0 +
transformers 4.44.2, the real checkpoints kept with the base model saved before ``get_peft_model``
and the trained model's reference logits. What is new here is the model inputs: image models take
``pixel_values``, audio models ``input_values``; ``reference.safetensors`` holds whichever inputs the
model takes (``input_ids`` + ``attention_mask``, or ``pixel_values``, or ``input_values``) beside
``logits/<checkpoint-N>`` (question answering: start and end logits stacked on the last axis).

Cases (``--list``):

* ``vit_image_cls``: ViT image classification, ``all-linear``, no task_type (peft has no image task type):
  the classifier is LoRA-only (with ``modules_to_save=["classifier"]`` peft 0.12 does not double-wrap it).
* ``wav2vec2_audio_cls``: Wav2Vec2 audio classification, ``all-linear``, no task_type: its two head modules
  ``projector`` and ``classifier`` are LoRA-only (their base weights are only in ``base/``).
* ``opt_no_architectures``: OPT sequence classification (SEQ_CLS, ``all-linear``: ``score`` double-wrapped)
  whose ``base/config.json`` is the one ``AutoConfig`` writes: no ``architectures``.
* ``phi_seq_cls``: Phi sequence classification (SEQ_CLS, ``all-linear``: ``score`` double-wrapped).
* ``albert_qa``: ALBERT question answering (QUESTION_ANS, ``all-linear``: ``qa_outputs`` double-wrapped).

Run::

    .venv-peft012/bin/python scripts/make_fixtures_bases.py            # all cases -> tests/fixtures_bases/
    .venv-peft012/bin/python scripts/make_fixtures_bases.py vit_image_cls --out /tmp/fx
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (re-executes this script with PYTHONHASHSEED=0, as make_fixtures does)
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VIT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_channels=3,
)
WAV2VEC2 = dict(
    vocab_size=32,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_stride=(5, 2),
    conv_kernel=(10, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    classifier_proj_size=16,
    mask_time_prob=0.0,  # no SpecAugment: no masked_spec_embed parameter, deterministic training
    layerdrop=0.0,
)
OPT = dict(
    vocab_size=128,
    hidden_size=32,
    word_embed_proj_dim=32,
    ffn_dim=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
PHI = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ALBERT = dict(
    vocab_size=128,
    embedding_size=16,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
)
AUDIO_SAMPLES = 400  # 79 then 39 frames through the two convolutions above

IMAGE = "AutoModelForImageClassification"
AUDIO = "AutoModelForAudioClassification"
QA = "AutoModelForQuestionAnswering"


def lora(**kwargs):
    return dict(target_modules=mf.ALL_LINEAR, r=4, lora_alpha=8, lora_dropout=0.0, **kwargs)


CASES = {
    "vit_image_cls": mf.case(
        "vit",
        VIT,
        auto_class=IMAGE,
        lora=lora(),
        shape="lora_only",
        heads=["classifier"],
        notes="ViT image classification, all-linear, no task_type (peft has no image task type): classifier LoRA-only",
    ),
    "wav2vec2_audio_cls": mf.case(
        "wav2vec2",
        WAV2VEC2,
        auto_class=AUDIO,
        lora=lora(),
        shape="lora_only",
        heads=["projector", "classifier"],
        lr=2e-2,  # mean-pooled audio frames move the head slowly: a larger step makes it measurable
        max_steps=4,
        save_steps=4,
        notes="Wav2Vec2 audio classification, all-linear, no task_type: projector + classifier LoRA-only",
    ),
    "opt_no_architectures": mf.case(
        "opt",
        OPT,
        lora=mf.seq_cls_all_linear(),
        notes="OPT sequence classification, SEQ_CLS all-linear (score double-wrapped); base config.json as "
        "AutoConfig writes it: no architectures",
    ),
    "phi_seq_cls": mf.case("phi", PHI, lora=mf.seq_cls_all_linear(), notes="Phi, SEQ_CLS all-linear"),
    "albert_qa": mf.case(
        "albert",
        ALBERT,
        auto_class=QA,
        lora=lora(task_type="QUESTION_ANS"),
        heads=["qa_outputs"],
        num_labels=2,
        notes="ALBERT question answering, QUESTION_ANS all-linear: qa_outputs double-wrapped",
    ),
}
NO_ARCHITECTURES = {"opt_no_architectures"}


def make_inputs(spec, cfg, gen, n):
    """The model's own inputs for ``n`` examples: token ids, images or raw audio (fixed generator)."""
    if spec["auto_class"] == IMAGE:
        return {"pixel_values": torch.randn(n, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)}
    if spec["auto_class"] == AUDIO:
        return {"input_values": torch.randn(n, AUDIO_SAMPLES, generator=gen)}
    ids = mf.make_ids(gen, n, cfg.vocab_size, spec["eos_at_end"])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_labels(spec, gen, n):
    if spec["auto_class"] == QA:
        return {
            "start_positions": torch.randint(0, mf.SEQ_LEN, (n,), generator=gen),
            "end_positions": torch.randint(0, mf.SEQ_LEN, (n,), generator=gen),
        }
    return {"labels": torch.randint(0, spec["num_labels"], (n,), generator=gen, dtype=torch.int64)}


class Examples(torch.utils.data.Dataset):
    def __init__(self, inputs, labels):
        self.columns = {**inputs, **labels}

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def output_logits(out):
    if getattr(out, "logits", None) is not None:
        return out.logits
    return torch.stack([out.start_logits, out.end_logits], dim=-1)


@torch.no_grad()
def logits_of(model, inputs):
    was_training = model.training
    model.eval()
    out = output_logits(model(**inputs)).float().clone()
    if was_training:
        model.train()
    return out


@torch.no_grad()
def head_reset_logits(peft_model, heads, inputs):
    """The trained model with its head(s) as initialised (wrappers and LoRA inside them disabled), on a copy."""
    twin = copy.deepcopy(peft_model)
    for head in heads:
        for sub in mf.get_module(twin.base_model.model, head).modules():
            if isinstance(sub, (ModulesToSaveWrapper, BaseTunerLayer)):
                sub._disable_adapters = True
    return logits_of(twin, inputs)


class RefCallback(transformers.TrainerCallback):
    def __init__(self, inputs):
        self.inputs = inputs
        self.logits = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.logits[f"checkpoint-{state.global_step}"] = logits_of(model, self.inputs)


def train(spec, peft_model, dataset, cb):
    args = mf._training_arguments(
        output_dir="run",
        overwrite_output_dir=True,
        max_steps=spec["max_steps"],
        save_strategy="steps",
        save_steps=spec["save_steps"],
        save_safetensors=spec["save_safetensors"],
        per_device_train_batch_size=mf.TRAIN_BATCH,
        learning_rate=spec["lr"],
        lr_scheduler_type=spec["lr_scheduler_type"],
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=mf.SEED,
        data_seed=mf.SEED,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **{mf.EVAL_STRATEGY: "no"},
    )
    transformers.Trainer(model=peft_model, args=args, train_dataset=dataset, callbacks=[cb]).train()


def build(name, spec, out_root):
    print(f"\n=== {name} ({spec['arch']}, {spec['auto_class']}) ===", flush=True)
    case_dir = os.path.join(out_root, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    base_dir, run_dir = os.path.join(case_dir, "base"), os.path.join(case_dir, "run")
    torch.manual_seed(mf.SEED)
    transformers.set_seed(mf.SEED)
    cfg = transformers.AutoConfig.for_model(spec["arch"], num_labels=spec["num_labels"], **spec["cfg"])
    model = getattr(transformers, spec["auto_class"]).from_config(cfg).eval()

    gen = torch.Generator().manual_seed(mf.SEED + 1)
    ref_inputs = make_inputs(spec, cfg, gen, mf.REF_BATCH)
    dataset = Examples(make_inputs(spec, cfg, gen, mf.N_TRAIN), make_labels(spec, gen, mf.N_TRAIN))
    init_logits = logits_of(model, ref_inputs)

    model.save_pretrained(base_dir, safe_serialization=True)
    if name in NO_ARCHITECTURES:
        cfg.save_pretrained(base_dir)  # the config as AutoConfig writes it: no architectures
        assert "architectures" not in json.load(open(os.path.join(base_dir, "config.json")))

    lora_kwargs = copy.deepcopy(spec["lora"])
    peft_model = get_peft_model(model, peft.LoraConfig(**copy.deepcopy(lora_kwargs)))
    peft_model.print_trainable_parameters()
    hlm = mf.head_lora_modules(peft_model, spec["heads"])
    mts = peft_model.peft_config["default"].modules_to_save
    print(f"  modules_to_save={mts}  head LoRA modules={hlm}")
    assert hlm, "expected the head to be LoRA-wrapped (the bug being reproduced)"

    cb = RefCallback(ref_inputs)
    cwd = os.getcwd()
    os.chdir(case_dir)
    try:
        train(spec, peft_model, dataset, cb)
    finally:
        os.chdir(cwd)
    for entry in os.listdir(run_dir):
        if not entry.startswith("checkpoint-"):
            path = os.path.join(run_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    checkpoints = sorted(os.listdir(run_dir), key=lambda s: int(s.split("-")[1]))
    assert checkpoints == sorted(cb.logits, key=lambda s: int(s.split("-")[1])), (checkpoints, list(cb.logits))

    tol = 1e-4
    final = logits_of(peft_model, ref_inputs)
    assert torch.equal(final, cb.logits[checkpoints[-1]]), "final logits != logits captured at the last save"
    diff_vs_init = (final - init_logits).abs().max().item()
    diff_vs_head_reset = (final - head_reset_logits(peft_model, spec["heads"], ref_inputs)).abs().max().item()
    print(f"  max|trained - init| = {diff_vs_init:.4g}; with the init head: {diff_vs_head_reset:.4g}")
    assert diff_vs_init > 20 * tol and diff_vs_head_reset > 20 * tol, "training did not move the head measurably"

    last = os.path.join(run_dir, checkpoints[-1])
    saved = mf.load_adapter(last)
    head_keys = sorted(k for k in saved if mf.is_head_key(k, spec["heads"]))
    print("  head keys:\n" + "\n".join(f"    {k} {tuple(saved[k].shape)}" for k in head_keys))
    saved_cfg = json.load(open(os.path.join(last, "adapter_config.json")))

    reference = {k: v.contiguous() for k, v in ref_inputs.items()}
    reference.update({f"logits/{ck}": cb.logits[ck].float().contiguous() for ck in checkpoints})
    save_file(reference, os.path.join(case_dir, "reference.safetensors"), metadata={"format": "pt"})
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
        "lora_config": lora_kwargs,
        "base_has_architectures": name not in NO_ARCHITECTURES,
        "inputs": sorted(ref_inputs),
        "training": {
            "max_steps": spec["max_steps"],
            "save_steps": spec["save_steps"],
            "learning_rate": spec["lr"],
            "per_device_train_batch_size": mf.TRAIN_BATCH,
            "n_train": mf.N_TRAIN,
            "seed": mf.SEED,
        },
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "tolerance": tol,
        "checkpoints": checkpoints,
        "adapter_file": os.path.basename(mf.adapter_file(last)),
        "notes": spec["notes"],
        "sanity": {
            "max_abs_diff_trained_vs_init_model": diff_vs_init,
            "max_abs_diff_trained_vs_trained_with_init_head": diff_vs_head_reset,
            "head_keys": head_keys,
            "saved_target_modules": saved_cfg.get("target_modules"),
            "saved_modules_to_save": saved_cfg.get("modules_to_save"),
            "saved_task_type": saved_cfg.get("task_type"),
        },
    }
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="case names (default: all)")
    ap.add_argument("--out", default=os.path.join(mf.REPO_ROOT, "tests", "fixtures_bases"))
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for name, spec in CASES.items():
            print(f"{name:24s} {spec['notes']}")
        return 0
    unknown = [n for n in a.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    assert mf.INSTALLED_STACK == mf.BUGGY_STACK, f"need {mf.BUGGY_STACK}, got {mf.INSTALLED_STACK}"
    torch.use_deterministic_algorithms(True)
    for name in a.cases or list(CASES):
        build(name, CASES[name], os.path.abspath(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
