#!/usr/bin/env python
"""Benchmark ``ckpt-migrate`` against a durable copy of the same bytes, in alternating pairs, on synthetic checkpoints.

    python benchmarks/bench.py --blocks 64           # 64 Llama-7B layers, r=64, fp32: 1.20 GiB adapter
    python benchmarks/bench.py                       # 128 layers: 2.39 GiB
    python benchmarks/bench.py --blocks 8 --pairs 5 --suites adapter

Checkpoints of the same peft-0.12 double-wrapped adapter are generated once into --work (default
<repo>/bench-work, gitignored) and reused (see synth.py):

    adapter  the adapter, a small (stateless) optimizer.pt, the Trainer's small files, no rng_state.pth
    trainer  the same with the fixture's rng_state.pth (a numpy-1 pickle: fix rewrites it, without torch since 0004
             pickles it itself)
    big      the trainer checkpoint with an AdamW optimizer.pt of ~2x the adapter, and a base model config

Every wall-time figure is the median of per-pair ratios over --pairs alternating pairs (tool, reference, tool,
reference, ... on the same source, page cache warm), with the min-max of those ratios, each side's CPU seconds
(user+sys) and peak RSS (GNU time), and the 1-minute load average before each run:

    adapter:  fix (--quiet)             vs  cp -r SRC DST && sync DST/*
              fix                       vs  python benchmarks/naive_fix.py SRC DST (load all, fold, save_file)
    trainer:  fix                       vs  cp -r + sync
    big:      fix --optimizer remap     vs  cp -r + sync

and, run alone --pairs times: the dry run (and whether it imports torch), ``--help``, ``python -c "import
torch"``. Whether ``fix`` imports torch is read from one extra run under ``-X importtime``. Before every run all
dirty data is synced, then every input file is read once (warm), or the page cache is dropped (--cache cold, root).
The last fix/naive outputs are compared tensor by tensor, the last remap output against what the generator knows
its source holds. Finally the dry run is paired on this and a tiny checkpoint, to show whether it grows with size.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import runner  # noqa: E402
import synth  # noqa: E402
from compare import compare_checkpoints, compare_remap  # noqa: E402
from runner import Pairs, Result, log, remove  # noqa: E402

#: suite -> (spec changes, (tool, reference) pairs, commands run alone)
SUITES = {
    "adapter": ({"optimizer": "small", "rng_state": False}, [("fix", "cp+sync"), ("fix", "naive")], ["dry-run"]),
    "trainer": ({"optimizer": "small"}, [("fix", "cp+sync")], []),
    "big": ({}, [("remap", "cp+sync")], []),
}
ALONE = ["help", "import-torch"]  # run alone once per benchmark, on the first suite's checkpoint
WRITES = {"cp+sync", "fix", "remap", "naive"}


def command_line(name: str, src: Path, dst: Path, ckpt: str) -> list[str]:
    if name == "cp+sync":
        return ["sh", "-c", f"cp -r {shlex.quote(str(src))} {shlex.quote(str(dst))} && sync {shlex.quote(str(dst))}/*"]
    if name == "fix":
        return [ckpt, "fix", str(src), "--out", str(dst), "--quiet"]
    if name == "remap":
        base = synth.base_dir(src)
        return [ckpt, "fix", str(src), "--out", str(dst), "--quiet", "--optimizer", "remap", "--base-model", str(base)]
    if name == "dry-run":
        return [ckpt, "fix", str(src), "--dry-run", "--format", "json"]
    if name == "naive":
        return [sys.executable, str(HERE / "naive_fix.py"), str(src), str(dst)]
    if name == "help":
        return [ckpt, "--help"]
    if name == "import-torch":
        return [sys.executable, "-c", "import torch"]
    raise ValueError(name)


def as_python(argv: list[str], ckpt: str) -> list[str]:
    """The same command run as ``python -m ckpt_migrate`` (to ask which modules it imports), with the interpreter of
    the ``ckpt`` script (its ``#!`` line): ``--ckpt-migrate`` of another install measures that install's code."""
    return [tool_python(ckpt), "-m", "ckpt_migrate", *argv[1:]] if argv[0] == ckpt else argv


def tool_python(ckpt: str) -> str:
    try:
        with open(ckpt, "rb") as script:
            first = script.readline().decode(errors="replace").strip()
    except OSError:
        return sys.executable
    return first[2:].strip() if first.startswith("#!") and Path(first[2:].strip()).is_file() else sys.executable


def validate(name: str, code: int, dst: Path, stdout: Path, stderr: Path) -> None:
    """Fail loudly if a command did not do its job (a fast failure is not a fast success)."""
    problem = None
    if code != 0:
        problem = f"exit code {code}"
    elif name in WRITES and not (dst / synth.WEIGHTS).is_file():
        problem = f"{dst / synth.WEIGHTS} was not written"
    elif name == "remap":
        manifest = json.loads((dst / "ckpt_migrate_manifest.json").read_text())
        if "optimizer.pt" not in manifest["outputs_sha256"]:
            problem = f"optimizer.pt was not remapped (warnings: {manifest['warnings']})"
    elif name == "dry-run":
        statuses = [c["status"] for c in json.loads(stdout.read_text())["checkpoints"]]
        problem = None if statuses == ["repairable"] else f"dry run reported {statuses}"
    elif name == "help" and "Usage:" not in stdout.read_text():
        problem = "no usage text"
    if problem:
        raise SystemExit(f"{name} failed: {problem}\n--- stderr tail ---\n{stderr.read_text()[-2000:]}")


def _measure(name: str, src: Path, dst: Path, ckpt: str, cold: bool, warm_paths: list[Path], tag: str) -> runner.Run:
    stdout, stderr = dst.parent / f"{name}.stdout", dst.parent / f"{name}.stderr"
    runner.settle(cold, warm_paths)
    run = runner.spawn_measured(command_line(name, src, dst, ckpt), stdout, stderr)
    validate(name, run.exit_code, dst, stdout, stderr)
    cpu = run.user_s + run.sys_s
    log(f"  [{tag}] {name:12s} {run.wall_s:7.2f} s {cpu:6.2f} CPU-s {run.peak_rss_mb:7.1f} MB load {run.load_avg:.2f}")
    return run


def _warm_paths(*sources: Path) -> list[Path]:
    return sorted({path for src in sources for path in (src, synth.base_dir(src))})


def paired(
    tool: str, reference: str, sources: tuple[Path, Path], work: Path, pairs: int, cold: bool, ckpt: str, keep: bool
) -> tuple[Pairs, dict[str, Path]]:
    """``pairs`` alternating runs: tool, reference, tool, reference, ... (each on its source; outputs removed)."""
    runs_dir = work / "runs"
    remove(runs_dir)
    runs_dir.mkdir(parents=True)
    names = (tool, reference)
    results = [
        Result(n, shlex.join(command_line(n, s, runs_dir / "DST", ckpt))) for n, s in zip(names, sources, strict=True)
    ]
    kept: dict[str, Path] = {}
    for index in range(pairs):
        for name, src, result in zip(names, sources, results, strict=True):
            dst = runs_dir / f"{name}-{index}"
            tag = f"pair {index + 1}/{pairs}"
            result.runs.append(_measure(name, src, dst, ckpt, cold, _warm_paths(*sources), tag))
            if keep and index == pairs - 1 and name in WRITES:
                kept[name] = dst
            else:
                remove(dst)
    return Pairs(*results), kept


def alone(name: str, src: Path, work: Path, runs: int, cold: bool, ckpt: str) -> Result:
    runs_dir = work / "runs"
    remove(runs_dir)
    runs_dir.mkdir(parents=True)
    result = Result(name, shlex.join(command_line(name, src, runs_dir / "DST", ckpt)))
    for index in range(runs):
        result.runs.append(_measure(name, src, runs_dir / "DST", ckpt, cold, _warm_paths(src), f"{index + 1}/{runs}"))
    return result


def imports_torch(name: str, src: Path, work: Path, ckpt: str) -> bool:
    """One extra (untimed) run of the command under ``-X importtime``: did it import torch?"""
    dst = work / "runs" / "imports"
    remove(dst)
    modules = runner.imported_modules(as_python(command_line(name, src, dst, ckpt), ckpt), cwd=work)
    remove(dst)
    return any(m == "torch" or m.startswith("torch.") for m in modules)  # the CLI may exit before "torch" completes


def hash_cost(path: Path) -> dict:
    """What the manifest's sha256 costs per byte here: one warm sha256 of ``path`` read as the tool reads it
    (through read-only maps, ``digests.hash_mapped``), timed in this process, CPU included."""
    import hashlib
    import os
    import resource

    from ckpt_migrate.formats.digests import hash_mapped

    runner.settle(False, [path])
    digest, before, started = hashlib.sha256(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        hash_mapped(handle.fileno(), digest, 0, os.fstat(handle.fileno()).st_size)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    size = path.stat().st_size
    return {"bytes": size, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "load_avg": runner.load_average()}


def scaling_check(pair: Pairs, full_bytes: int, tiny_bytes: int) -> dict:
    """Does the dry run get slower or bigger with the checkpoint? (Noise allowance: 0.05 s / 25 %, 5 MB / 10 %.)"""
    full, tiny = pair.tool, pair.reference
    return {
        "tiny_adapter_bytes": tiny_bytes,
        "full_adapter_bytes": full_bytes,
        "tiny": {"median_s": tiny.median_s, "peak_rss_mb": tiny.peak_rss_mb, "runs": [asdict(r) for r in tiny.runs]},
        "full": {"median_s": full.median_s, "peak_rss_mb": full.peak_rss_mb, "runs": [asdict(r) for r in full.runs]},
        "median_ratio": pair.median_ratio,
        "time_grows": full.median_s - tiny.median_s > max(0.05, 0.25 * tiny.median_s),
        "rss_grows": full.peak_rss_mb - tiny.peak_rss_mb > max(5.0, 0.10 * tiny.peak_rss_mb),
    }


def _pairs_json(pair: Pairs) -> dict:
    return {
        "tool": pair.tool.command,
        "reference": pair.reference.command,
        "tool_argv": pair.tool.argv,
        "reference_argv": pair.reference.argv,
        "ratios": [round(r, 4) for r in pair.ratios],
        "median_ratio": round(pair.median_ratio, 4),
        "tool_runs": [asdict(r) for r in pair.tool.runs],
        "reference_runs": [asdict(r) for r in pair.reference.runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--blocks", type=int, default=synth.Spec().blocks, help="transformer layers (default 128 = 2.39 GiB; 64 = 1.20)"
    )
    parser.add_argument("--pairs", type=int, default=7, help="alternating pairs per comparison (default 7, min 5)")
    parser.add_argument("--work", type=Path, default=runner.REPO / "bench-work", help="cache and scratch directory")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm", help="page cache before each run")
    parser.add_argument("--suites", default="adapter,trainer,big", help="comma-separated subset of " + ",".join(SUITES))
    parser.add_argument(
        "--scaling-blocks", type=int, default=2, help="tiny size for the dry-run scaling check (0: skip)"
    )
    parser.add_argument("--ckpt-migrate", default=str(Path(sys.executable).parent / "ckpt-migrate"))
    args = parser.parse_args()
    if args.pairs < 5:
        parser.error("--pairs must be at least 5")
    if args.cache == "cold" and not runner.can_drop_caches():
        parser.error(f"--cache cold needs a writable {runner.DROP_CACHES} (run as root)")
    cold, ckpt = args.cache == "cold", args.ckpt_migrate
    suites = [s for s in args.suites.split(",") if s]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runner.byte_compile_tool()
    machine = runner.machine_info(work)
    synth.check_layout_matches_fixture()
    specs = {suite: replace(synth.Spec(), blocks=args.blocks, **SUITES[suite][0]) for suite in suites}
    sources = {suite: synth.generate(work, specs[suite], log=log) for suite in suites}

    comparisons: list[tuple[str, Pairs]] = []
    alone_results: dict[str, tuple[Result, bool | None]] = {}
    checks: dict[str, dict] = {}
    torch_in: dict[str, bool] = {}
    for suite in suites:
        src = sources[suite]
        for tool, reference in SUITES[suite][1]:
            log(f"{suite}: {tool} vs {reference} ({src}), {args.pairs} alternating pairs, {args.cache} cache")
            pair, kept = paired(tool, reference, (src, src), work, args.pairs, cold, ckpt, keep=True)
            comparisons.append((suite, pair))
            if {"fix", "naive"} <= kept.keys():
                log("comparing the fix and naive outputs ...")
                checks["fix-vs-naive"] = compare_checkpoints(kept["fix"], kept["naive"])
            if "remap" in kept:
                log("checking the remapped optimizer.pt ...")
                checks["remap"] = compare_remap(kept["remap"], src, 2 * len(synth.body_modules(specs[suite])))
            for path in kept.values():
                remove(path)
        for tool in {t for t, _ in SUITES[suite][1]}:
            torch_in[f"{tool} ({suite})"] = imports_torch(tool, src, work, ckpt)
        for name in SUITES[suite][2]:
            log(f"{suite}: {name} alone, {args.pairs} runs")
            alone_results[name] = (alone(name, src, work, args.pairs, cold, ckpt), imports_torch(name, src, work, ckpt))
    first = sources[suites[0]]
    for name in ALONE:
        log(f"{name} alone, {args.pairs} runs")
        alone_results[name] = (alone(name, first, work, args.pairs, cold, ckpt), None)

    scaling = None
    if args.scaling_blocks and args.scaling_blocks != args.blocks:
        tiny_spec = replace(specs[suites[0]], blocks=args.scaling_blocks)
        tiny_src = synth.generate(work, tiny_spec, log=log)
        log(f"scaling check: dry run on {first} and {tiny_src}, alternating")
        pair, _ = paired("dry-run", "dry-run", (first, tiny_src), work, args.pairs, cold, ckpt, keep=False)
        scaling = scaling_check(pair, synth.adapter_bytes(specs[suites[0]]), synth.adapter_bytes(tiny_spec))
    remove(work / "runs")
    hashing = hash_cost(first / synth.WEIGHTS)
    targets = report.verdicts(comparisons, alone_results, torch_in)
    print_report(machine, specs, sources, args, comparisons, alone_results, torch_in, targets, checks, scaling, hashing)
    if args.json:
        payload = {
            "argv": sys.argv,
            "specs": {k: asdict(v) for k, v in specs.items()},
            "files": {
                suite: {p.name: p.stat().st_size for p in sorted(src.iterdir())} for suite, src in sources.items()
            },
            "machine": machine,
            "pairs": args.pairs,
            "cache": args.cache,
            "comparisons": [{"suite": suite, **_pairs_json(pair)} for suite, pair in comparisons],
            "alone": {
                name: {"argv": r.argv, "imports_torch": t, "runs": [asdict(x) for x in r.runs]}
                for name, (r, t) in alone_results.items()
            },
            "imports_torch": torch_in,
            "targets": targets,
            "output_checks": checks,
            "scaling": scaling,
            "hash_cost": hashing,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")


def print_report(
    machine, specs, sources, args, comparisons, alone_results, torch_in, targets, checks, scaling, hashing
):
    spec = next(iter(specs.values()))
    gib = synth.adapter_bytes(spec) / 2**30
    print(f"## ckpt-migrate benchmark: {spec.blocks} layers, adapter {gib:.2f} GiB, {args.cache} page cache")
    print()
    print(
        f"- machine: {machine['cpu']}, {machine['nproc']} CPUs, {machine['ram_gib']} GiB RAM, "
        f"disk {machine['disk']}, Linux {machine['kernel']}"
    )
    print(
        f"- software: Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"safetensors {machine['safetensors']}, ckpt-migrate {machine['ckpt_migrate']} (git {machine['git']}); "
        f"load average at start {' '.join(machine['load_avg_at_start'])}, at end {runner.load_averages()}"
    )
    for suite, src in sources.items():
        files = ", ".join(f"{p.name} {p.stat().st_size / 2**20:,.1f} MiB" for p in sorted(src.iterdir()))
        print(f"- {suite} checkpoint ({src}): {files}")
    print(
        f"- {args.pairs} alternating pairs per comparison (tool, reference, tool, reference, ...); ratio = median of "
        "the per-pair ratios tool/reference, with their min-max; CPU-s = user+sys (median); peak RSS = max over the "
        "runs (GNU time)"
    )
    print("\n### Paired comparisons\n")
    print(report.pairs_table(comparisons))
    print("\n### Run alone\n")
    print(report.alone_table(alone_results))
    print(
        "\nImports torch (one extra run under `python -X importtime`): "
        + ", ".join(f"{name}: {'yes' if imported else 'no'}" for name, imported in torch_in.items())
    )
    print("\n### Targets (issue 23; warm cache)\n")
    print(report.targets_table(targets))
    if "fix-vs-naive" in checks:
        verdict = "EQUAL" if checks["fix-vs-naive"]["equal"] else "DIFFERENT"
        print(f"\nOutput check, ckpt-migrate fix vs naive_fix.py: {verdict}\n")
        print(report.adapter_comparison(checks["fix-vs-naive"]))
    if "remap" in checks:
        verdict = "AS EXPECTED" if checks["remap"]["equal"] else "NOT AS EXPECTED"
        print(f"\nOutput check, remapped optimizer.pt vs its source: {verdict}\n")
        print(report.optimizer_comparison(checks["remap"]))
    size = hashing["bytes"] / 2**30
    print(
        f"\nCost of one sha256 pass here (warm sha256 of the {size:.2f} GiB adapter through maps, as the tool reads "
        f"it, one thread, load {hashing['load_avg']:.2f}): {hashing['wall_s']:.2f} s wall, {hashing['cpu_s']:.2f} s "
        f"CPU ({size / hashing['cpu_s']:.2f} GiB per CPU-second)"
    )
    if scaling is not None:
        print("\nScaling check: dry run on the full and a tiny checkpoint, alternating pairs, warm cache:\n")
        print(report.scaling_table(scaling))
    print("\n### To reproduce\n")
    print("```")
    print("$ " + shlex.join(["python", "benchmarks/bench.py", *sys.argv[1:]]))
    print("# the commands it times (DST removed after each run):")
    seen = set()
    for _, pair in comparisons:
        for result in (pair.tool, pair.reference):
            if result.argv not in seen:
                seen.add(result.argv)
                print(result.argv)
    for result, _ in alone_results.values():
        print(result.argv)
    print("```")


if __name__ == "__main__":
    main()
