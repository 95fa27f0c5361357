"""Resume a Trainer run from a (repaired) checkpoint for a few steps and report what was restored.

Runs in the test venv or, as a script, in another one (peft 0.12 / transformers 4.44 / numpy 1)::

    python tests/resume_check.py CASE_DIR CHECKPOINT_DIR   # prints JSON
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def resume(case_dir: str | Path, checkpoint_dir: str | Path) -> dict:
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback, TrainingArguments

    case_dir, checkpoint_dir = Path(case_dir), Path(checkpoint_dir)
    case = json.loads((case_dir / "case.json").read_text())
    training = case["training"]
    base = getattr(transformers, case["auto_class"]).from_pretrained(case_dir / "base")
    model = PeftModel.from_pretrained(base, str(checkpoint_dir), is_trainable=True)
    input_ids = load_file(case_dir / "reference.safetensors")["input_ids"]
    generator = torch.Generator().manual_seed(0)
    n_labels = case["num_labels"]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = input_ids[i % len(input_ids)]
            return {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(n_labels, (), generator=generator),
            }

    seen: dict = {"learning_rates": [], "steps": []}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            group = optimizer.param_groups[0]
            first = group["params"][0]
            moments = optimizer.state.get(first, {})
            seen["first_decay_param_exp_avg"] = moments["exp_avg"].flatten()[:8].tolist() if moments else None
            seen["group_sizes"] = [len(g["params"]) for g in optimizer.param_groups]
            seen["global_step_at_start"] = state.global_step

        def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            seen["learning_rates"].append(lr_scheduler.get_last_lr()[0])

        def on_step_end(self, args, state, control, **kwargs):
            seen["steps"].append(state.global_step)

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=training["max_steps"],
            learning_rate=training["learning_rate"],
            lr_scheduler_type=training.get("lr_scheduler_type", "constant"),
            warmup_steps=training.get("warmup_steps", 0),
            weight_decay=training.get("weight_decay", 0.0),
            per_device_train_batch_size=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Probe()])
        trainer.train(resume_from_checkpoint=str(checkpoint_dir))
    return seen


if __name__ == "__main__":
    print(json.dumps(resume(sys.argv[1], sys.argv[2])))
