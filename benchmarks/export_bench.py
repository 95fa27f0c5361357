"""Benchmark ``ckpt-migrate export`` against peft's ``merge_and_unload`` + ``save_pretrained``, and a durable copy.

A synthetic Llama-style sequence-classification base of a few GB (``--blocks``, hidden 2048, fp32,
sharded safetensors + index, written by ``safetensors.torch.save_file`` shard by shard) and a
peft-0.12 double-wrapped adapter for it (``synth.generate``, r=16) are generated once under ``--work``.
Then two comparisons, each in ``--pairs`` alternating pairs (page cache warm, or dropped with ``--cache cold``):

* ``ckpt-migrate export CKPT --out DST --base-model BASE --quiet`` (repairs in memory, folds, streams)
  vs ``cp -r BASE DST && sync DST/*`` (the bytes of the base model, made durable): target <= 2.5x;
* the same export vs the naive way: ``fix`` first (not timed), then load base + repaired adapter with
  transformers/peft, ``merge_and_unload()``, ``save_pretrained``, everything in memory: target export at least
  2x faster (ratio <= 0.5) with a quarter of its peak RSS.

Each side: median of the per-pair ratios and their min-max, CPU-seconds (user+sys) and peak RSS (GNU time).
Both outputs are compared tensor for tensor at the end.
Run: ``.venv/bin/python benchmarks/export_bench.py [--blocks 8] [--pairs 7] [--cache warm|cold]``.
Nothing here imports ckpt_migrate (it is run as a command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import runner
import synth
from runner import Pairs, Result

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


def paired(tool: str, reference: str, commands: dict, outs: dict, pairs: int, cold: bool, warm: list) -> Pairs:
    results = [Result(name, shlex.join(str(a) for a in commands[name])) for name in (tool, reference)]
    for index in range(pairs):
        for result in results:
            shutil.rmtree(outs[result.command], ignore_errors=True)
            runner.settle(cold, warm)
            log_dir = outs[result.command].parent
            stdout, stderr = log_dir / f"{result.command}.stdout", log_dir / f"{result.command}.stderr"
            run = runner.spawn_measured([str(a) for a in commands[result.command]], stdout, stderr)
            if run.exit_code != 0:
                raise SystemExit(f"{result.command} failed:\n{stderr.read_text()[-2000:]}")
            result.runs.append(run)
            runner.log(
                f"  [pair {index + 1}/{pairs}] {result.command:7s} {run.wall_s:7.2f} s "
                f"{run.user_s + run.sys_s:6.2f} CPU-s {run.peak_rss_mb:7.1f} MB load {run.load_avg:.2f}"
            )
    return Pairs(*results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=7, help="alternating pairs per comparison (default 7, min 5)")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work" / "export")
    args = parser.parse_args()
    if args.pairs < 5:
        parser.error("--pairs must be at least 5")
    base = args.work / f"base-L{args.blocks}"
    if not base.is_dir():
        write_base(base, args.blocks)
    spec = synth.Spec(blocks=args.blocks, hidden=HIDDEN, intermediate=INTERMEDIATE, r=R, lora_alpha=32, optimizer=False)
    checkpoint = synth.generate(args.work, spec, log=lambda m: None)
    bin_dir = Path(sys.executable).parent
    repaired = args.work / f"repaired-L{args.blocks}"
    if not repaired.is_dir():
        fix = [bin_dir / "ckpt-migrate", "fix", checkpoint, "--out", repaired, "--quiet"]
        subprocess.run(fix, check=True, stdout=subprocess.DEVNULL)
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
    load_start = runner.load_averages()
    warm = [base, checkpoint, repaired]
    comparisons = [
        paired("export", "copy", commands, outs, args.pairs, args.cache == "cold", warm),
        paired("export", "naive", commands, outs, args.pairs, args.cache == "cold", warm),
    ]
    print(
        f"base model {size / 2**30:.2f} GiB ({args.blocks} layers, hidden {HIDDEN}, fp32), adapter r={R}, "
        f"cache {args.cache}, {args.pairs} alternating pairs per comparison; load average at start {load_start}, "
        f"at end {runner.load_averages()}\n"
    )
    print(
        "| export vs | pairs | median of per-pair ratios | min-max | wall s export / ref | CPU-s export / ref "
        "| peak RSS MB export / ref | RSS ratio | load avg before runs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for pair in comparisons:
        tool, ref = pair.tool, pair.reference
        low, high = pair.load_range
        print(
            f"| {ref.command} | {len(pair.ratios)} | {pair.median_ratio:.2f}x | {min(pair.ratios):.2f}-"
            f"{max(pair.ratios):.2f} | {tool.median_s:.2f} / {ref.median_s:.2f} | {tool.median_cpu_s:.2f} / "
            f"{ref.median_cpu_s:.2f} | {tool.peak_rss_mb:.0f} / {ref.peak_rss_mb:.0f} | "
            f"{tool.peak_rss_mb / ref.peak_rss_mb:.2f} | {low:.2f}-{high:.2f} |"
        )
    print(
        "\nPer-pair ratios: "
        + "; ".join(f"export/{p.reference.command}: " + ", ".join(f"{r:.2f}" for r in p.ratios) for p in comparisons)
    )
    copy, naive = comparisons
    print("\n| target | measured | result |\n|---|---:|---|")
    for target, measured, ok in (
        ("export <= 2.5x copy of the base (median of per-pair ratios)", copy.median_ratio, copy.median_ratio <= 2.5),
        (
            "export at least 2x faster than the naive merge (ratio <= 0.5)",
            naive.median_ratio,
            naive.median_ratio <= 0.5,
        ),
        (
            "export peak RSS <= a quarter of the naive merge's",
            naive.tool.peak_rss_mb / naive.reference.peak_rss_mb,
            naive.tool.peak_rss_mb <= 0.25 * naive.reference.peak_rss_mb,
        ),
    ):
        print(f"| {target} | {measured:.2f} | {'PASS' if ok else 'MISS'} |")
    print(f"\nexport vs naive output: {compare(outs['export'], outs['naive'])}")
    print("\nTo reproduce:\n\n```\n$ " + shlex.join(["python", "benchmarks/export_bench.py", *sys.argv[1:]]))
    for name in ("export", "copy", "naive"):
        print(shlex.join(str(a) for a in commands[name]))
    print("```")


if __name__ == "__main__":
    main()
