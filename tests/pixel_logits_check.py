"""tests/logits_check.py for image models (``pixel_values`` inputs): load an adapter with the installed peft onto the
case's base model with its head deliberately random and compare the logits with the trained reference.

Runs in-process, or as a script in another venv (peft 0.12); prints ``{adapter: error or "Type: message"}``::

    python tests/pixel_logits_check.py CASE_DIR ADAPTER_DIR CHECKPOINT_NAME [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load_base(case_dir: Path):
    """The base model as the installed transformers loads it (5.x renames a 4.x checkpoint's keys on the way)."""
    import torch
    import transformers

    case = json.loads((case_dir / "case.json").read_text())
    base, info = getattr(transformers, case["auto_class"]).from_pretrained(case_dir / "base", output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not any(k.startswith(h + ".") for h in case["heads"])]
    assert not missing and not info["unexpected_keys"], (missing, info["unexpected_keys"])
    generator = torch.Generator().manual_seed(987654)
    with torch.no_grad():
        for head in case["heads"]:
            for param in base.get_submodule(head).parameters():
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))
    return base.eval()


def max_logit_error(case_dir: str | Path, adapter_dir: str | Path, checkpoint: str) -> float:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    case_dir = Path(case_dir)
    model = PeftModel.from_pretrained(load_base(case_dir), str(adapter_dir)).eval()
    reference = load_file(case_dir / "reference.safetensors")
    with torch.no_grad():
        logits = model(pixel_values=reference["pixel_values"]).logits.float()
    return (logits - reference[f"logits/{checkpoint}"]).abs().max().item()


def outcome(case_dir: str | Path, adapter_dir: str | Path, checkpoint: str) -> float | str:
    """The error, or what peft raised (a refusal is a result here)."""
    try:
        return max_logit_error(case_dir, adapter_dir, checkpoint)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


if __name__ == "__main__":
    args = sys.argv[1:]
    triples = [args[i : i + 3] for i in range(0, len(args), 3)]
    print(json.dumps({adapter: outcome(case, adapter, name) for case, adapter, name in triples}))
