"""Load a (repaired) adapter with the installed peft onto a base model whose head is deliberately
random, and compare its logits with the trained model's reference logits.

Runs in-process in the test venv, or as a script in another venv (peft 0.12)::

    python tests/logits_check.py CASE_DIR ADAPTER_DIR CHECKPOINT_NAME [...]  # prints {adapter: error}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def max_logit_error(case_dir: str | Path, adapter_dir: str | Path, checkpoint: str) -> float:
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    case_dir = Path(case_dir)
    case = json.loads((case_dir / "case.json").read_text())
    dtype = getattr(torch, case["dtype"])
    auto_class = getattr(transformers, case["auto_class"])
    base = auto_class.from_pretrained(case_dir / "base", torch_dtype=dtype)
    generator = torch.Generator().manual_seed(987654)
    with torch.no_grad():
        for head in case["heads"]:
            for param in base.get_submodule(head).parameters():
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    reference = load_file(case_dir / "reference.safetensors")
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    return (logits.float() - reference[f"logits/{checkpoint}"]).abs().max().item()


if __name__ == "__main__":
    # Arguments come in triples, so one interpreter start checks many checkpoints.
    args = sys.argv[1:]
    triples = [args[i : i + 3] for i in range(0, len(args), 3)]
    print(json.dumps({adapter: max_logit_error(case, adapter, name) for case, adapter, name in triples}))
