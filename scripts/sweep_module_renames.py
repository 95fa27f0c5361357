"""Which module paths of a model change between transformers 4.44.2 and the installed 5.x: the facts behind m0012.

Two steps, one per venv (tiny models from ``AutoConfig.for_model``, no hub access)::

    .venv-peft012/bin/python scripts/sweep_module_renames.py dump /tmp/modules-4.json   # transformers 4.44.2
    .venv/bin/python         scripts/sweep_module_renames.py dump /tmp/modules-5.json   # transformers 5.x
    .venv/bin/python         scripts/sweep_module_renames.py compare /tmp/modules-4.json /tmp/modules-5.json

``dump`` builds, for every model type both releases know, the first task model of
:data:`TASK_CLASSES` the type has (else the base model), and records its ``nn.Linear`` module paths (what
``all-linear`` targets) and parameter names. ``compare`` (under 5.x) renames each 4.x parameter name the way
transformers 5.x loads a 4.x checkpoint (``get_model_conversion_mapping`` + ``rename_source_key``, the code
migration m0012 calls) and prints, per model type, the Linear paths that changed and whether transformers' own
renaming reaches every 5.x name (``exact``), leaves some unmapped, or needs tensor operations (``converter``).
"""

from __future__ import annotations

import json
import sys
import warnings

TASK_CLASSES = (
    "AutoModelForImageClassification",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModel",
)
#: Tiny sizes, applied only to attributes the default config has.
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 37,
    "image_size": 32,
    "patch_size": 8,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 37,
    "decoder_ffn_dim": 37,
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 32,
    "num_layers": 2,
    "num_heads": 4,
    "dim": 32,
    "hidden_dim": 37,
    "n_layers": 2,
    "n_heads": 4,
}


def _tiny_model(model_type: str):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    overrides = {k: v for k, v in TINY.items() if hasattr(config, k) and isinstance(getattr(config, k), int)}
    config = transformers.AutoConfig.for_model(model_type, **overrides)
    for name in TASK_CLASSES:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            try:
                with torch.device("meta"):
                    return name, auto.from_config(config)
            except (RuntimeError, NotImplementedError):  # some 4.x inits compute on their weights: build on the CPU
                return name, auto.from_config(config)
    raise LookupError("no task class")


def dump(out: str) -> None:
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    result = {"transformers": transformers.__version__, "models": {}}
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        try:
            task, model = _tiny_model(model_type)
        except Exception as exc:  # noqa: BLE001 - many configs need more than tiny sizes; recorded, not fatal
            result["models"][model_type] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            continue
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        result["models"][model_type] = {
            "task": task,
            "class": type(model).__name__,
            "linear": linear,
            "params": list(model.state_dict()),
        }
        print(model_type, type(model).__name__, len(linear), file=sys.stderr)
    with open(out, "w") as f:
        json.dump(result, f)


def renamer(model):
    """key -> (5.x key, converter source pattern or None), as transformers 5.x renames a checkpoint key at load."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    return lambda key: rename_source_key(key, renamings, converters, model.base_model_prefix, meta)


def compare(old_path: str, new_path: str) -> None:
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    old, new = json.load(open(old_path)), json.load(open(new_path))
    summary = {}
    for model_type, before in sorted(old["models"].items()):
        after = new["models"].get(model_type)
        if "error" in before or not after or "error" in after or before["class"] != after["class"]:
            continue
        gone = sorted(set(before["linear"]) - set(after["linear"]))
        renamed_params = not set(before["params"]) <= set(after["params"])  # 5.x may build more layers
        if not gone and not renamed_params:
            continue
        _, model = _tiny_model(model_type)
        rename = renamer(model)
        moved, unmapped, converted = {}, [], []
        for path in gone:
            new_key, converter = rename(f"{path}.weight")
            if converter is not None:
                converted.append(path)
            elif new_key.removesuffix(".weight") in after["linear"]:
                moved[path] = new_key.removesuffix(".weight")
            else:
                unmapped.append(path)
        params_reached = {rename(k)[0] for k in before["params"]} >= set(after["params"])
        verdict = "converter" if converted else "unmapped" if unmapped else "exact" if params_reached else "partial"
        summary[model_type] = {"class": before["class"], "verdict": verdict, "linear_gone": len(gone)}
        example = dict(list(moved.items())[:3])
        print(f"{model_type:24s} {before['class']:40s} {verdict:9s} gone={len(gone):3d} e.g. {example}")
        if unmapped or converted:
            print(f"    unmapped={unmapped[:4]} converter={converted[:4]}")
    unchanged = sorted(
        t
        for t, b in old["models"].items()
        if "error" not in b
        and t in new["models"]
        and "error" not in new["models"][t]
        and t not in summary
        and b["class"] == new["models"][t]["class"]
    )
    renamed = sorted(t for t, v in summary.items() if v["linear_gone"])
    # the gate tables of migrations/m0012_module_renames_for_target.py
    print(f"UNCHANGED = frozenset({unchanged!r})")
    print(f"RENAMED = frozenset({renamed!r})")


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
    else:
        compare(sys.argv[2], sys.argv[3])
