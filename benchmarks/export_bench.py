"""Benchmark ``ckpt-migrate export`` against peft's ``merge_and_unload`` + ``save_pretrained``, and a durable copy.

A synthetic Llama-style sequence-classification base of a few GB (``--blocks``, hidden 2048, fp32,
sharded safetensors + index, written by ``safetensors.torch.save_file`` shard by shard) and a
peft-0.12 double-wrapped adapter for it (``synth.generate``, r=16) are generated once under ``--work``.
Then, interleaved, median of ``--repeat`` (page cache warm, or dropped with ``--cache cold`` as root):

* ``cp -r BASE DST && sync`` — the bytes of the base model, made durable;
* ``ckpt-migrate export CKPT --out DST --base-model BASE --quiet`` — repairs in memory, folds, streams;
* the naive way: ``fix`` first (not timed), then load base + repaired adapter with transformers/peft,
  ``merge_and_unload()``, ``save_pretrained`` — everything in memory.

Peak RSS comes from GNU ``time -f %M``. Both outputs are compared tensor for tensor at the end.
Run: ``.venv/bin/python benchmarks/export_bench.py [--blocks 8] [--repeat 3] [--cache warm|cold]``.
Nothing here imports ckpt_migrate (it is run as a command).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import runner
import synth

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, VOCAB, R = 2048, 5504, 32000, 16
NAIVE = """
import sys, torch, transformers
from peft import PeftModel
base = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def write_base(directory: Path, blocks: int) -> None:
    """A LlamaForSequenceClassification checkpoint with random fp32 weights, one shard per 4 layers."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.for_model(
        "llama",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=blocks,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=VOCAB,
        num_labels=3,
        pad_token_id=0,
        architectures=["LlamaForSequenceClassification"],
    )
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.02

    groups = [["model.embed_tokens.weight", "model.norm.weight", "score.weight"]]
    groups += [[f"model.layers.{n}" for n in range(s, min(s + 4, blocks))] for s in range(0, blocks, 4)]
    weight_map, total = {}, 0
    for index, group in enumerate(groups, 1):
        tensors = {}
        if index == 1:
            tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN)}
            tensors["score.weight"] = rand(3, HIDDEN)
        else:
            for layer in group:
                for module, fin, fout in synth.body_modules(
                    replace(synth.Spec(), blocks=1, hidden=HIDDEN, intermediate=INTERMEDIATE)
                ):
                    name = module.replace("model.layers.0", layer)
                    tensors[f"{name}.weight"] = rand(fout, fin)
                tensors[f"{layer}.input_layernorm.weight"] = torch.ones(HIDDEN)
                tensors[f"{layer}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.numel() * 4 for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json))


def timed(argv: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command; ``out`` is removed first."""
    shutil.rmtree(out, ignore_errors=True)
    rusage = out.parent / f".{out.name}.rss"
    started = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rusage), *argv], check=True, capture_output=True)
    wall = time.perf_counter() - started
    return wall, int(rusage.read_text().split()[-1]) / 1024


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def compare(a: Path, b: Path) -> str:
    from safetensors import safe_open

    def tensors(directory: Path) -> dict:
        out = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys()})
        return out

    x, y = tensors(a), tensors(b)
    if set(x) != set(y):
        return f"different tensor names: {sorted(set(x) ^ set(y))[:4]}"
    worst = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    return f"{len(x)} tensors, max |difference| {worst:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work" / "export")
    args = parser.parse_args()
    base = args.work / f"base-L{args.blocks}"
    if not base.is_dir():
        write_base(base, args.blocks)
    spec = synth.Spec(blocks=args.blocks, hidden=HIDDEN, intermediate=INTERMEDIATE, r=R, lora_alpha=32, optimizer=False)
    checkpoint = synth.generate(args.work, spec, log=lambda m: None)
    bin_dir = Path(sys.executable).parent
    repaired = args.work / f"repaired-L{args.blocks}"
    if not repaired.is_dir():
        subprocess.run([bin_dir / "ckpt-migrate", "fix", checkpoint, "--out", repaired, "--quiet"], check=True)
    size = sum(p.stat().st_size for p in base.iterdir())
    outs = {name: args.work / f"out-{name}" for name in ("copy", "export", "naive")}
    commands = {
        "copy": ["sh", "-c", f"cp -r {base} {outs['copy']} && sync {outs['copy']}/*"],
        "export": [
            bin_dir / "ckpt-migrate",
            "export",
            checkpoint,
            "--out",
            outs["export"],
            "--base-model",
            base,
            "--quiet",
        ],
        "naive": [sys.executable, "-c", NAIVE, base, repaired, outs["naive"]],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for index in range(args.repeat):
        for name, argv in runner.rotated(list(commands.items()), index):
            if args.cache == "cold":
                drop_caches()
            runs[name].append(timed([str(a) for a in argv], outs[name]))
    load = os.getloadavg()
    copy_median = statistics.median(w for w, _ in runs["copy"])
    print(
        f"base model {size / 2**30:.2f} GiB ({args.blocks} layers, hidden {HIDDEN}, fp32), adapter r={R}, "
        f"cache {args.cache}, {args.repeat} rounds, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    print("| command | median wall s | vs durable copy | peak RSS MB | runs (s) |\n|---|---:|---:|---:|---|")
    for name, results in runs.items():
        walls = [w for w, _ in results]
        median = statistics.median(walls)
        print(
            f"| {name} | {median:.2f} | {median / copy_median:.2f}x | {max(r for _, r in results):.0f} | "
            f"{', '.join(f'{w:.2f}' for w in walls)} |"
        )
    print(f"\nexport vs naive output: {compare(outs['export'], outs['naive'])}")


if __name__ == "__main__":
    main()
