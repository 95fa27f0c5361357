"""Resume a Trainer run from a (repaired) checkpoint for a few steps and report what was restored.

Runs in the test venv or, as a script, in another one (peft 0.12 / transformers 4.44 / numpy 1)::

    python tests/resume_check.py CASE_DIR CHECKPOINT_DIR [EXTRA_STEPS]  # prints JSON
    python tests/resume_check.py --each CASE_DIR CHECKPOINT_DIR EXTRA_STEPS [...]  # a JSON list, one start
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def resume(case_dir: str | Path, checkpoint_dir: str | Path, extra_steps: int | None = None) -> dict:
    """Resume for the case's remaining steps, or, with ``extra_steps``, that many more steps then a save.

    A checkpoint without an adapter (a full fine-tune) is loaded as the model itself; a case with "adapters" loads
    each of them (as people do: from_pretrained, then load_adapter) and trains the case's active adapter.
    """
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback, TrainingArguments

    case_dir, checkpoint_dir = Path(case_dir), Path(checkpoint_dir)
    case = json.loads((case_dir / "case.json").read_text())
    training = case["training"]
    auto_class = getattr(transformers, case["auto_class"])
    adapters = case.get("adapters")  # several or named adapters (tests/fixtures_layouts): name -> directory
    if adapters:
        active = case["active_adapter"]
        (first, where), *others = adapters.items()
        base = auto_class.from_pretrained(case_dir / "base")
        model = PeftModel.from_pretrained(base, str(checkpoint_dir / where), first, is_trainable=first == active)
        for name, where in others:
            model.load_adapter(str(checkpoint_dir / where), name, is_trainable=name == active)
        model.set_adapter(active)
    elif (checkpoint_dir / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(
            auto_class.from_pretrained(case_dir / "base"), str(checkpoint_dir), is_trainable=True
        )
    else:
        model = auto_class.from_pretrained(checkpoint_dir)
    start = json.loads((checkpoint_dir / "trainer_state.json").read_text())["global_step"]
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
            max_steps=start + extra_steps if extra_steps else training["max_steps"],
            learning_rate=training["learning_rate"],
            lr_scheduler_type=training.get("lr_scheduler_type", "constant"),
            warmup_steps=training.get("warmup_steps", 0),
            weight_decay=training.get("weight_decay", 0.0),
            per_device_train_batch_size=4,
            save_strategy="steps" if extra_steps else "no",
            save_steps=extra_steps or 500,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Probe()])
        trainer.train(resume_from_checkpoint=str(checkpoint_dir))
        saved = sorted(Path(output_dir).glob("checkpoint-*"))
        seen["saved"] = [p.name for p in saved]
        if saved:
            state = json.loads((saved[-1] / "trainer_state.json").read_text())
            seen["saved_global_step"] = state["global_step"]
    import numpy

    seen["versions"] = {"transformers": transformers.__version__, "numpy": numpy.__version__}
    return seen


def _resumed(case_dir: str, checkpoint_dir: str, extra_steps: int | None) -> dict:
    try:
        return resume(case_dir, checkpoint_dir, extra_steps)
    except Exception as exc:  # the error is the result a test asserts on
        return {"error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    if sys.argv[1] == "--each":  # one interpreter start for several: a list of the results, in order
        args = sys.argv[2:]
        print(json.dumps([_resumed(args[i], args[i + 1], int(args[i + 2])) for i in range(0, len(args), 3)]))
    else:
        print(json.dumps(_resumed(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)))
