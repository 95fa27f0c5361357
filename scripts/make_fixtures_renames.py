"""Build REAL peft 0.12.0 / transformers 4.44.2 checkpoints of models whose modules transformers 5.x renamed.

transformers 5.x renamed ViT's attention and MLP modules (``vit.encoder.layer.N.attention.attention.query`` is
``vit.layers.N.attention.q_proj`` there; ``scripts/sweep_module_renames.py`` lists the others, DINOv2 among
them): an adapter trained on 4.x targets modules a 5.x model does not have. These cases are what migration
m0012 repairs. Same layout as ``scripts/make_fixtures.py`` (whose helpers this imports), but image models: the
reference inputs are ``pixel_values``::

    <out>/<case>/case.json, base/, run/checkpoint-N/, reference.safetensors (pixel_values, logits/<checkpoint-N>)

Run with peft 0.12.0 + transformers 4.44.2 (asserted)::

    .venv-peft012/bin/python scripts/make_fixtures_renames.py            # all cases -> tests/fixtures_renames/
    .venv-peft012/bin/python scripts/make_fixtures_renames.py vit_all_linear --out /tmp/fx
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (re-executes this script with PYTHONHASHSEED=0, as it does itself)
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForImageClassification  # noqa: E402

IMAGE = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
    num_channels=3,
)
DINOV2 = dict(IMAGE, mlp_ratio=2)

CASES = {
    "vit_all_linear": dict(
        arch="vit",
        cfg=IMAGE,
        lora=dict(target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.0),
        heads=["classifier"],
        shape="lora_only",
        notes="ViT, all-linear without task_type (peft has none for images) or modules_to_save: the head gets LoRA "
        "only and its base weights are never saved (peft#2027's other shape, migration 0002); every body "
        "Linear (attention.attention.query/key/value, attention.output.dense, intermediate.dense, output.dense) "
        "is one transformers 5.x renamed",
    ),
    "dinov2_query_value": dict(
        arch="dinov2",
        cfg=DINOV2,
        lora=dict(
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            rank_pattern={"value": 2},
        ),
        heads=["classifier"],
        shape="clean",
        notes="DINOv2, the usual recipe: LoRA on query/value (rank 2 on value by rank_pattern), the head in "
        "modules_to_save; transformers 5.x renamed attention.attention.query/value to attention.q_proj/v_proj",
    ),
}
NUM_LABELS = 3
MAX_STEPS = 2
LR = 2e-2


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, pixel_values, labels):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self):
        return self.pixel_values.shape[0]

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


@torch.no_grad()
def logits_of(model, pixel_values):
    was_training = model.training
    model.eval()
    out = model(pixel_values=pixel_values).logits.float().clone()
    model.train(was_training)
    return out


@torch.no_grad()
def head_reset_logits(peft_model, heads, pixel_values):
    """mf.head_reset_logits for pixel inputs: the trained model with its head(s) back at their init state."""
    twin = copy.deepcopy(peft_model)
    for head in heads:
        for sub in mf.get_module(twin.base_model.model, head).modules():
            if isinstance(sub, (mf.ModulesToSaveWrapper, mf.BaseTunerLayer)):
                sub._disable_adapters = True
    return logits_of(twin, pixel_values)


class RefCallback(transformers.TrainerCallback):
    def __init__(self, pixel_values):
        self.pixel_values, self.logits = pixel_values, {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.logits[f"checkpoint-{state.global_step}"] = logits_of(model, self.pixel_values)


def build(name, spec, out_root):
    print(f"\n=== {name} ({spec['arch']}) ===", flush=True)
    case_dir = os.path.join(out_root, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    torch.manual_seed(mf.SEED)
    transformers.set_seed(mf.SEED)
    config = AutoConfig.for_model(spec["arch"], num_labels=NUM_LABELS, **spec["cfg"])
    model = AutoModelForImageClassification.from_config(config).eval()
    gen = torch.Generator().manual_seed(mf.SEED + 1)
    shape = (config.num_channels, config.image_size, config.image_size)
    ref_pixels = torch.randn((mf.REF_BATCH, *shape), generator=gen)
    train_pixels = torch.randn((mf.N_TRAIN, *shape), generator=gen)
    labels = torch.randint(0, NUM_LABELS, (mf.N_TRAIN,), generator=gen)
    init_logits = logits_of(model, ref_pixels)
    model.save_pretrained(os.path.join(case_dir, "base"), safe_serialization=True)

    peft_model = get_peft_model(model, peft.LoraConfig(**copy.deepcopy(spec["lora"])))
    head_modules = mf.head_lora_modules(peft_model, spec["heads"])
    assert bool(head_modules) == (spec["shape"] == "lora_only"), head_modules
    cb = RefCallback(ref_pixels)
    args = mf._training_arguments(
        output_dir="run",
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=MAX_STEPS,
        per_device_train_batch_size=mf.TRAIN_BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        seed=mf.SEED,
        data_seed=mf.SEED,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **{mf.EVAL_STRATEGY: "no"},
    )
    cwd = os.getcwd()
    os.chdir(case_dir)  # relative paths in training_args.bin
    try:
        transformers.Trainer(
            model=peft_model, args=args, train_dataset=ImageDataset(train_pixels, labels), callbacks=[cb]
        ).train()
    finally:
        os.chdir(cwd)
    run_dir = os.path.join(case_dir, "run")
    for entry in os.listdir(run_dir):
        if not entry.startswith("checkpoint-"):
            path = os.path.join(run_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    checkpoints = sorted(os.listdir(run_dir))
    assert checkpoints == sorted(cb.logits), (checkpoints, list(cb.logits))

    final = logits_of(peft_model, ref_pixels)
    assert torch.equal(final, cb.logits[checkpoints[-1]])
    moved = (final - init_logits).abs().max().item()
    head_moved = (final - head_reset_logits(peft_model, spec["heads"], ref_pixels)).abs().max()
    print(f"  max|trained - init| = {moved:.4g}; max|trained - trained with init head| = {head_moved.item():.4g}")
    assert moved > 2e-3 and head_moved > 2e-3, "training did not move the logits (or the head) measurably"

    ref = {"pixel_values": ref_pixels.contiguous(), **{f"logits/{c}": cb.logits[c].contiguous() for c in checkpoints}}
    save_file(ref, os.path.join(case_dir, "reference.safetensors"), metadata={"format": "pt"})
    saved = json.load(open(os.path.join(run_dir, checkpoints[-1], "adapter_config.json")))
    meta = {
        "arch": spec["arch"],
        "auto_class": "AutoModelForImageClassification",
        "dtype": "float32",
        "shape": spec["shape"],
        "head_in_base": True,
        "heads": spec["heads"],
        "head_lora_modules": head_modules,
        "modules_to_save": spec["lora"].get("modules_to_save"),
        "num_labels": NUM_LABELS,
        "lora_config": spec["lora"],
        "inputs": "pixel_values",
        "training": {"max_steps": MAX_STEPS, "learning_rate": LR, "n_train": mf.N_TRAIN, "seed": mf.SEED},
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "tolerance": 1e-4,
        "checkpoints": checkpoints,
        "adapter_file": "adapter_model.safetensors",
        "notes": spec["notes"],
        "sanity": {
            "max_abs_diff_trained_vs_init_model": moved,
            "max_abs_diff_trained_vs_trained_with_init_head": head_moved.item(),
            "saved_target_modules": saved.get("target_modules"),
            "saved_rank_pattern": saved.get("rank_pattern"),
        },
    }
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="case names (default: all)")
    ap.add_argument("--out", default=os.path.join(mf.REPO_ROOT, "tests", "fixtures_renames"))
    a = ap.parse_args(argv)
    assert mf.INSTALLED_STACK == mf.BUGGY_STACK, f"need {mf.BUGGY_STACK}, installed {mf.INSTALLED_STACK}"
    torch.use_deterministic_algorithms(True)
    for name in a.cases or list(CASES):
        build(name, CASES[name], os.path.abspath(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
