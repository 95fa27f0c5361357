"""Load a (repaired) adapter with the installed peft onto a base model whose head is deliberately
random, and compare its logits with the trained model's reference logits.

Runs in-process in the test venv, or as a script in another venv (peft 0.12)::

    python tests/logits_check.py CASE_DIR ADAPTER_DIR CHECKPOINT_NAME [...]  # prints {adapter: error}
    python tests/logits_check.py --adapters CASE_DIR CHECKPOINT_DIR CHECKPOINT_NAME [...]  # see adapter_errors
    python tests/logits_check.py --merged CASE_DIR MODEL_DIR CHECKPOINT_NAME [...]  # see merged_error
    python tests/logits_check.py A B C --merged D E F  # a flag switches the check for the triples after it

As a script it also names the peft and transformers releases that answered, on stderr (``stack_versions``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _base_with_random_head(case_dir: Path):
    import torch
    import transformers

    case = json.loads((case_dir / "case.json").read_text())
    dtype = getattr(torch, case["dtype"])
    auto_class = getattr(transformers, case["auto_class"])
    base = auto_class.from_pretrained(case_dir / "base", torch_dtype=dtype)
    generator = torch.Generator().manual_seed(987654)
    with torch.no_grad():
        for head in case["heads"]:
            for param in base.get_submodule(head).parameters():
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))
    return base


#: The model inputs a reference file may hold (text: input_ids + attention_mask; images; raw audio; filterbanks).
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "input_values", "input_features")


def _logits(model, reference):
    """The model's logits on the reference inputs; question answering: start and end logits stacked last."""
    import torch

    with torch.no_grad():
        out = model(**{key: reference[key] for key in MODEL_INPUTS if key in reference})
    if getattr(out, "logits", None) is None:
        return torch.stack([out.start_logits, out.end_logits], dim=-1).float()
    return out.logits.float()


def max_logit_error(
    case_dir: str | Path, adapter_dir: str | Path, checkpoint: str, reference_key: str | None = None
) -> float:
    """``reference_key``: which reference logits to compare with (default ``logits/<checkpoint>``)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    case_dir = Path(case_dir)
    model = PeftModel.from_pretrained(_base_with_random_head(case_dir), str(adapter_dir)).eval()
    reference = load_file(case_dir / "reference.safetensors")
    return (_logits(model, reference) - reference[reference_key or f"logits/{checkpoint}"]).abs().max().item()


def merged_error(case_dir: str | Path, model_dir: str | Path, checkpoint: str) -> float:
    """A merged (exported) model loaded by plain transformers as the case's Auto class, against the trained logits."""
    import transformers
    from safetensors.torch import load_file

    case_dir = Path(case_dir)
    auto_class = getattr(transformers, json.loads((case_dir / "case.json").read_text())["auto_class"])
    model = auto_class.from_pretrained(str(model_dir)).eval()
    reference = load_file(case_dir / "reference.safetensors")
    return (_logits(model, reference) - reference[f"logits/{checkpoint}"]).abs().max().item()


def adapter_errors(
    case_dir: str | Path, checkpoint_dir: str | Path, checkpoint: str
) -> dict[str, dict[str, float | None]]:
    """Every adapter of a checkpoint (case.json "adapters": name -> directory; else the one at the top), loaded as
    people do, against its trained logits (``logits/<checkpoint>/<adapter>``, else ``logits/<checkpoint>``):
    ``{adapter: {"alone": error, "together": error}}``, the error None where peft failed to load it.

    alone: ``PeftModel.from_pretrained(base, DIR/<dir>, adapter_name=<adapter>)``; together: the first adapter so,
    the others with ``load_adapter(DIR/<dir>, adapter_name=...)``, then ``set_adapter(<adapter>)``.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    case_dir, checkpoint_dir = Path(case_dir), Path(checkpoint_dir)
    adapters = json.loads((case_dir / "case.json").read_text()).get("adapters") or {"default": "."}
    reference = load_file(case_dir / "reference.safetensors")

    def error(model, name: str) -> float:
        expected = reference.get(f"logits/{checkpoint}/{name}", reference.get(f"logits/{checkpoint}"))
        return (_logits(model.eval(), reference) - expected).abs().max().item()

    errors: dict[str, dict[str, float | None]] = {name: {"alone": None, "together": None} for name in adapters}
    for name, where in adapters.items():
        try:
            model = PeftModel.from_pretrained(_base_with_random_head(case_dir), str(checkpoint_dir / where), name)
            errors[name]["alone"] = error(model, name)
        except Exception:  # noqa: BLE001 -- peft refusing the adapter is a result
            pass
    (first, first_dir), *others = adapters.items()
    try:
        together = PeftModel.from_pretrained(_base_with_random_head(case_dir), str(checkpoint_dir / first_dir), first)
        for name, where in others:
            together.load_adapter(str(checkpoint_dir / where), adapter_name=name)
        for name in adapters:
            together.set_adapter(name)
            errors[name]["together"] = error(together, name)
    except Exception:  # noqa: BLE001
        pass
    return errors


def stack_versions(stderr: str) -> tuple[str, str]:
    """(peft, transformers) releases a run of this script as a program reported on its stderr."""
    line = next(line for line in stderr.splitlines() if line.startswith("logits_check: peft "))
    _, _, peft, _, transformers = line.split()
    return peft, transformers


def errors_in(python: str, triples: list[tuple[str | Path, str | Path, str]]) -> dict[str, float]:
    """:func:`max_logit_error` of each (case dir, adapter dir, checkpoint) run by another interpreter (peft 0.12):
    adapter dir -> error. Fails when that interpreter does (peft refusing an adapter included)."""
    import subprocess

    args = [str(a) for triple in triples for a in triple]
    result = subprocess.run([python, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_reproduced(cases: list[Path], outputs: dict[str, Path], checkpoint: str, python: str | None = None) -> None:
    """Each case's repaired adapter (``outputs[case name]``) gives its trained logits within the case's tolerance,
    loaded by the installed peft (``python`` None) or by that interpreter's (peft 0.12); prints each error."""
    if python is None:
        errors = {str(outputs[c.name]): max_logit_error(c, outputs[c.name], checkpoint) for c in cases}
    else:
        errors = errors_in(python, [(case, outputs[case.name], checkpoint) for case in cases])
    for case in cases:
        error = errors[str(outputs[case.name])]
        print(f"{case.name}: max |logit error| {error:.3g} ({'installed peft' if python is None else python})")
        tolerance = json.loads((case / "case.json").read_text())["tolerance"]
        assert error <= tolerance, (case.name, error)


CHECKS = {"--adapter": max_logit_error, "--adapters": adapter_errors, "--merged": merged_error}

if __name__ == "__main__":
    # Arguments come in triples, so one interpreter start checks many checkpoints; a flag switches the check for
    # the triples after it (the first ones: --adapter's unless a flag comes first).
    check, errors, args = max_logit_error, {}, sys.argv[1:]
    while args:
        if args[0] in CHECKS:
            check, args = CHECKS[args[0]], args[1:]
            continue
        (case, adapter, name), args = args[:3], args[3:]
        errors[adapter] = check(case, adapter, name)
    import peft
    import transformers

    # which stack answered, on stderr (stdout's last line stays the errors): no second interpreter start to ask
    print(f"logits_check: peft {peft.__version__} transformers {transformers.__version__}", file=sys.stderr)
    print(json.dumps(errors))
