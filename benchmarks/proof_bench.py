#!/usr/bin/env python
"""What the static proof costs on a 7B-shaped adapter, alone and inside ``fix`` (where it overlaps the copy).

    python benchmarks/proof_bench.py                  # Llama-2-7B shapes (32 layers, 4096/11008), r=64, fp32
    python benchmarks/proof_bench.py --repeat 5 --work /tmp/proof-bench

The checkpoint is synth.py's peft-0.12 double-wrapped adapter (stateless optimizer). The proof needs a base
model whose safetensors header lists every weight of the architecture; reading no weights, it never touches their
bytes, so the base here is a sparse file: a real header of all LlamaForSequenceClassification weights (float16,
13.5 GB apparent size) over a hole (a few KB on disk).

1. ``alone``: a fresh Python plans the checkpoint, imports torch/transformers/peft, then runs the proof; wall
   times of each phase, and peak RSS (ru_maxrss) before and after the proof, so the proof's own memory is the
   difference. A second proof of the same layout (the next checkpoint of a run) shows the cache.
2. ``fix``: ``ckpt-migrate fix SRC --out DST --no-verify --quiet`` with ``--base-model`` (the proof runs on a
   thread beside the copies) and without (no proof, nothing claimed), interleaved, wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import runner  # noqa: E402
import synth  # noqa: E402

ALONE = r"""
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.planner import plan_checkpoint
base = BaseModel.open(sys.argv[2])
plan = plan_checkpoint(Path(sys.argv[1]), ".", base)
t1 = time.perf_counter()
import peft, torch, transformers  # noqa: E401,F401 - what any proof pays once per process
t2 = time.perf_counter()
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from ckpt_migrate.proof import prove_plan
proof = prove_plan(plan, base)
t3 = time.perf_counter()
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
again = prove_plan(plan, base)
t4 = time.perf_counter()
print(json.dumps({"state": proof.state, "reason": proof.reason, "plan_s": t1 - t0, "imports_s": t2 - t1,
                  "proof_s": t3 - t2, "cached_proof_s": t4 - t3, "rss_before_proof_kb": rss_before,
                  "rss_after_proof_kb": rss_after, "tensors": len(plan.after.tensors)}))
"""


def full_base(work: Path, spec: synth.Spec) -> Path:
    """A base directory whose model.safetensors header lists every weight of the 7B-shaped model, data sparse."""
    base = work / f"base-full-{spec.key}"
    if (base / "model.safetensors").is_file():
        return base
    import torch
    import transformers

    checkpoint = synth.generate(work, spec)
    base.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(synth.base_dir(checkpoint) / "config.json", base / "config.json")
    config = transformers.AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = transformers.LlamaForSequenceClassification(config)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in model.state_dict().items():
        size = 2 * math.prod(tensor.shape)
        header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(base / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.truncate(8 + len(raw) + offset)  # a hole: the proof reads headers only
    return base


def alone(checkpoint: Path, base: Path, repeat: int) -> list[dict]:
    runs = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", ALONE, str(checkpoint), str(base)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        runner.log(f"alone: {runs[-1]}")
    return runs


def in_fix(checkpoint: Path, base: Path, work: Path, repeat: int, tool: str) -> dict[str, list]:
    results: dict[str, list] = {"with proof": [], "without proof": []}
    for index in range(repeat):
        order = ["with proof", "without proof"]
        for name in order[index % 2 :] + order[: index % 2]:
            out = work / "fix-out"
            shutil.rmtree(out, ignore_errors=True)
            argv = [tool, "fix", str(checkpoint), "--out", str(out), "--no-verify", "--quiet", "--format", "json"]
            argv += ["--base-model", str(base)] if name == "with proof" else []
            rusage = work / "fix.rusage"
            started = time.perf_counter()
            done = subprocess.run(runner.measuring_prefix(rusage) + argv, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr}")
            entry = json.loads(done.stdout)["checkpoints"][0]
            peak_kb = int(rusage.read_text().split()[0])
            results[name].append(
                {
                    "wall_s": wall,
                    "peak_mb": peak_kb / 1024,
                    "status": entry["status"],
                    "proof_s": (entry["proof"] or {}).get("seconds"),
                }
            )
            runner.log(f"fix {name}: {results[name][-1]}")
    shutil.rmtree(work / "fix-out", ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=runner.REPO / "bench-work")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=32, help="layers (Llama-2-7B: 32)")
    parser.add_argument("--ckpt-migrate", default=str(Path(sys.executable).parent / "ckpt-migrate"))
    args = parser.parse_args()
    spec = synth.Spec(blocks=args.blocks, optimizer="small")
    checkpoint = synth.generate(args.work, spec)
    base = full_base(args.work, spec)
    runs = alone(checkpoint, base, args.repeat)
    fixes = in_fix(checkpoint, base, args.work, args.repeat, args.ckpt_migrate)

    def median(values: list[float]) -> float:
        return statistics.median(values)

    print(
        f"\n7B-shaped adapter: {args.blocks} layers, r={spec.r}, {synth.adapter_bytes(spec) / 2**30:.2f} GiB, "
        f"{runs[0]['tensors']} output tensors; {args.repeat} runs, medians"
    )
    print(
        f"  proof alone:      {median([r['proof_s'] for r in runs]):.2f} s (imports before it: "
        f"{median([r['imports_s'] for r in runs]):.2f} s; cached for the next checkpoint: "
        f"{median([r['cached_proof_s'] for r in runs]) * 1000:.0f} ms), state {runs[0]['state']}"
    )
    added = [(r["rss_after_proof_kb"] - r["rss_before_proof_kb"]) / 1024 for r in runs]
    print(
        f"  proof peak memory: +{median(added):.0f} MB over the process after imports "
        f"({median([r['rss_before_proof_kb'] for r in runs]) / 1024:.0f} MB)"
    )
    for name, values in fixes.items():
        print(
            f"  fix {name}: {median([v['wall_s'] for v in values]):.2f} s wall, "
            f"{median([v['peak_mb'] for v in values]):.0f} MB peak, status {values[0]['status']}"
        )


if __name__ == "__main__":
    main()
