#!/usr/bin/env python
"""The naive repair a user would write by hand: load everything, fold the head with torch, save everything.

    python benchmarks/naive_fix.py SRC DST

SRC is one checkpoint directory whose LoRA-wrapped head was double-wrapped by peft <= 0.12 (``score``
saved as ``base_layer.weight`` + ``lora_A/B`` + ``modules_to_save``/``original_module`` duplicates).
DST (created) receives what ``ckpt-migrate fix`` writes, minus its manifest:

* ``adapter_model.safetensors`` loaded whole with ``safetensors.torch.load_file``; each head's weight
  folded as ``W + alpha/r * B @ A`` (float64, cast back, like ckpt-migrate), every other head tensor
  dropped, saved whole with ``safetensors.torch.save_file`` (metadata ``{"format": "pt"}``);
* ``adapter_config.json`` with the head moved out of ``target_modules`` into ``modules_to_save``;
* ``optimizer.pt`` dropped (its parameter groups no longer match), every other file copied.

Written files are fsynced (ckpt-migrate fsyncs too) unless ``--no-fsync``. Used by bench.py as the
baseline for time, memory and output equality; it handles only the double-wrapped layout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
STALE = {"optimizer.pt"}
WRAPPERS = (".modules_to_save.", ".original_module.")


def wrapped_heads(names) -> set[str]:
    heads = set()
    for name in names:
        inner = name[len(PREFIX) :]
        for wrapper in WRAPPERS:
            if wrapper in inner and (".lora_A" in inner or ".lora_B" in inner):
                heads.add(inner.split(wrapper, 1)[0])
    return heads


def fold_heads(tensors: dict[str, torch.Tensor], config: dict) -> list[str]:
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    heads = sorted(wrapped_heads(tensors))
    for head in heads:
        stem = f"{PREFIX}{head}."
        weight = tensors[f"{stem}base_layer.weight"]
        lora_a, lora_b = tensors[f"{stem}lora_A.weight"], tensors[f"{stem}lora_B.weight"]
        folded = (weight.double() + scale * (lora_b.double() @ lora_a.double())).to(weight.dtype)
        bias = tensors.get(f"{stem}base_layer.bias")
        for name in [n for n in tensors if n.startswith(stem)]:
            del tensors[name]
        tensors[f"{stem}weight"] = folded.contiguous()
        if bias is not None:
            tensors[f"{stem}bias"] = bias
    return heads


def fix_config(config: dict, heads: list[str]) -> dict:
    config = dict(config)
    targets = config.get("target_modules")
    if isinstance(targets, list):
        config["target_modules"] = [t for t in targets if t not in heads]
    modules_to_save = list(config.get("modules_to_save") or [])
    config["modules_to_save"] = modules_to_save + [h for h in heads if not any(h.endswith(m) for m in modules_to_save)]
    return config


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync the written files")
    args = parser.parse_args()
    args.dst.mkdir(parents=True)
    config = json.loads((args.src / CONFIG).read_text())
    tensors = load_file(args.src / WEIGHTS)
    heads = fold_heads(tensors, config)
    if not heads:
        raise SystemExit(f"{args.src}: no double-wrapped head found")
    save_file(tensors, args.dst / WEIGHTS, metadata={"format": "pt"})
    del tensors
    (args.dst / CONFIG).write_text(json.dumps(fix_config(config, heads), indent=2, sort_keys=True))
    for path in sorted(args.src.iterdir()):
        if path.is_file() and path.name not in {WEIGHTS, CONFIG} | STALE:
            shutil.copyfile(path, args.dst / path.name)
    if not args.no_fsync:
        for path in args.dst.iterdir():
            fsync_path(path)
        fsync_path(args.dst)


if __name__ == "__main__":
    main()
