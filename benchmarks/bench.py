#!/usr/bin/env python
"""Benchmark ``ckpt-migrate`` against a durable copy of the same bytes, on synthetic full-size checkpoints.

    python benchmarks/bench.py                       # 128 Llama-7B layers, r=64, fp32: 2.39 GiB adapter
    python benchmarks/bench.py --blocks 8 --repeat 2 # smaller
    python benchmarks/bench.py --cache warm --json results.json

Two checkpoints of the same peft-0.12 double-wrapped adapter are generated once into --work
(default <repo>/bench-work, gitignored) and reused (see synth.py):

    small   the adapter + a small (stateless) optimizer.pt: fix drops it, cp copies it, a few KB;
    big     the adapter + an AdamW optimizer.pt of ~2x the adapter, and a base model config.

Then, for each page-cache mode (--cache, default: cold and warm when root can drop caches, else warm),
--repeat rounds, each running every command of a suite once, interleaved (each round starting one command later):

    small:  cp+sync  cp -r SRC DST && sync DST/*           (copy, then fsync every copied file)
            fix      ckpt-migrate fix SRC --out DST --quiet (--optimizer drop, the default)
            naive    python benchmarks/naive_fix.py SRC DST (load_file everything, fold, save_file, copy)
            dry-run  ckpt-migrate fix SRC --dry-run --format json
            help     ckpt-migrate --help
    big:    cp+sync  the same copy, optimizer included
            remap    ckpt-migrate fix SRC --out DST --quiet --optimizer remap --base-model BASE

Before every run all dirty data is synced; cold: the page cache is then dropped; warm: every input file
is read once first. Wall time is measured around spawn..exit; peak RSS and CPU times come from GNU time
(for the cp+sync shell, the largest of sh, cp and sync); the 1-minute load average before each run is
recorded. The last fix/naive outputs are compared tensor by tensor, the last remap output against what
the generator knows its source holds. Finally the dry run is timed on this and a tiny checkpoint,
alternating, to show whether its time and memory grow with size.
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
from runner import Result, log, remove  # noqa: E402

SUITES = {"small": ("cp+sync", "fix", "naive", "dry-run", "help"), "big": ("cp+sync", "remap")}
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
    raise ValueError(name)


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


def benchmark(
    jobs: dict[str, tuple[str, Path]], work: Path, repeat: int, cold: bool, ckpt: str, keep_last: set[str]
) -> tuple[dict[str, Result], dict[str, Path]]:
    """Run every job (key -> (command, source)) once per round, ``repeat`` rounds, interleaved."""
    runs_dir = work / "runs"
    remove(runs_dir)
    runs_dir.mkdir(parents=True)
    results = {
        key: Result(name, shlex.join(command_line(name, src, runs_dir / "DST", ckpt)))
        for key, (name, src) in jobs.items()
    }
    warm_paths = sorted({path for _, src in jobs.values() for path in (src, synth.base_dir(src))})
    kept: dict[str, Path] = {}
    for index in range(repeat):
        for key, (name, src) in runner.rotated(list(jobs.items()), index):
            dst = runs_dir / f"{key}-{index}"
            stdout, stderr = runs_dir / f"{key}.stdout", runs_dir / f"{key}.stderr"
            runner.settle(cold, warm_paths)
            run = runner.spawn_measured(command_line(name, src, dst, ckpt), stdout, stderr)
            validate(name, run.exit_code, dst, stdout, stderr)
            results[key].runs.append(run)
            measured = f"{run.wall_s:7.2f} s {run.peak_rss_mb:7.1f} MB load {run.load_avg:.2f}"
            log(f"  [{index + 1}/{repeat}] {key:8s} {measured}")
            if key in keep_last and index == repeat - 1:
                kept[key] = dst
            else:
                remove(dst)
    return results, kept


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


def scaling_check(full: Result, tiny: Result, full_bytes: int, tiny_bytes: int) -> dict:
    """Does the dry run get slower or bigger with the checkpoint? (Noise allowance: 0.05 s / 25 %, 5 MB / 10 %.)"""
    return {
        "tiny_adapter_bytes": tiny_bytes,
        "full_adapter_bytes": full_bytes,
        "tiny": {"median_s": tiny.median_s, "peak_rss_mb": tiny.peak_rss_mb, "runs": [asdict(r) for r in tiny.runs]},
        "full": {"median_s": full.median_s, "peak_rss_mb": full.peak_rss_mb, "runs": [asdict(r) for r in full.runs]},
        "time_grows": full.median_s - tiny.median_s > max(0.05, 0.25 * tiny.median_s),
        "rss_grows": full.peak_rss_mb - tiny.peak_rss_mb > max(5.0, 0.10 * tiny.peak_rss_mb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--blocks", type=int, default=synth.Spec().blocks, help="transformer layers (default 128 = 2.39 GiB)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per suite and cache mode (default 3)")
    parser.add_argument("--work", type=Path, default=runner.REPO / "bench-work", help="cache and scratch directory")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    parser.add_argument("--cache", help="comma-separated: cold (needs root), warm; default both when possible")
    parser.add_argument("--suites", default="small,big", help="comma-separated subset of small,big")
    parser.add_argument(
        "--scaling-blocks", type=int, default=2, help="tiny size for the dry-run scaling check (0: skip)"
    )
    parser.add_argument("--scaling-repeat", type=int, default=5, help="rounds of the scaling check (default 5)")
    parser.add_argument("--ckpt-migrate", default=str(Path(sys.executable).parent / "ckpt-migrate"))
    args = parser.parse_args()

    droppable = runner.can_drop_caches()
    caches = (args.cache or ("cold,warm" if droppable else "warm")).split(",")
    if "cold" in caches and not droppable:
        parser.error(f"--cache cold needs a writable {runner.DROP_CACHES} (run as root)")
    suites = [s for s in args.suites.split(",") if s]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runner.byte_compile_tool()
    machine = runner.machine_info(work)
    synth.check_layout_matches_fixture()
    specs = {
        "small": replace(synth.Spec(), blocks=args.blocks, optimizer="small"),
        "big": replace(synth.Spec(), blocks=args.blocks),
    }
    sources = {suite: synth.generate(work, specs[suite], log=log) for suite in suites}

    results: dict[str, dict[str, dict[str, Result]]] = {}
    comparisons: dict[str, dict] = {}
    for cache in caches:
        for suite in suites:
            src = sources[suite]
            log(f"suite {suite} ({src}), cache {cache}, {args.repeat} rounds")
            keep = {"fix", "naive", "remap"} if cache == caches[-1] else set()
            jobs = {name: (name, src) for name in SUITES[suite]}
            results.setdefault(suite, {})[cache], kept = benchmark(
                jobs, work, args.repeat, cache == "cold", args.ckpt_migrate, keep
            )
            if "fix" in kept and "naive" in kept:
                log("comparing the fix and naive outputs ...")
                comparisons["fix-vs-naive"] = compare_checkpoints(kept["fix"], kept["naive"])
            if "remap" in kept:
                log("checking the remapped optimizer.pt ...")
                body = 2 * len(synth.body_modules(specs["big"]))
                comparisons["remap"] = compare_remap(kept["remap"], src, body)
            for path in kept.values():
                remove(path)

    scaling = None
    if args.scaling_blocks and "small" in suites and args.scaling_blocks != args.blocks:
        tiny_spec = replace(specs["small"], blocks=args.scaling_blocks)
        tiny_src = synth.generate(work, tiny_spec, log=log)
        log(f"scaling check: dry run on {sources['small']} and {tiny_src}, alternating")
        jobs = {"dry-run-full": ("dry-run", sources["small"]), "dry-run-tiny": ("dry-run", tiny_src)}
        pair, _ = benchmark(jobs, work, args.scaling_repeat, False, args.ckpt_migrate, set())
        scaling = scaling_check(
            pair["dry-run-full"],
            pair["dry-run-tiny"],
            synth.adapter_bytes(specs["small"]),
            synth.adapter_bytes(tiny_spec),
        )
    remove(work / "runs")
    hashing = hash_cost(next(iter(sources.values())) / synth.WEIGHTS)
    checks = report.verdicts(results)
    print_report(machine, specs, sources, caches, args.repeat, results, checks, comparisons, scaling, hashing)
    if args.json:
        payload = {
            "specs": {k: asdict(v) for k, v in specs.items()},
            "files": {
                suite: {p.name: p.stat().st_size for p in sorted(src.iterdir())} for suite, src in sources.items()
            },
            "machine": machine,
            "repeat": args.repeat,
            "results": {
                suite: {
                    cache: {
                        name: {
                            "argv": r.argv,
                            "median_s": r.median_s,
                            "peak_rss_mb": r.peak_rss_mb,
                            "runs": [asdict(x) for x in r.runs],
                        }
                        for name, r in by_name.items()
                    }
                    for cache, by_name in by_cache.items()
                }
                for suite, by_cache in results.items()
            },
            "targets": checks,
            "comparisons": comparisons,
            "scaling": scaling,
            "hash_cost": hashing,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")


def print_report(machine, specs, sources, caches, repeat, results, checks, comparisons, scaling, hashing) -> None:
    spec = next(iter(specs.values()))
    print(f"## ckpt-migrate benchmark: {spec.blocks} layers, adapter {synth.adapter_bytes(spec) / 2**30:.2f} GiB")
    print()
    print(
        f"- machine: {machine['cpu']}, {machine['nproc']} CPUs, {machine['ram_gib']} GiB RAM, "
        f"disk {machine['disk']}, Linux {machine['kernel']}"
    )
    print(
        f"- software: Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"safetensors {machine['safetensors']}, ckpt-migrate {machine['ckpt_migrate']} (git {machine['git']}); "
        f"load average at start {' '.join(machine['load_avg_at_start'])}"
    )
    for suite, src in sources.items():
        files = ", ".join(f"{p.name} {p.stat().st_size / 2**20:,.1f} MiB" for p in sorted(src.iterdir()))
        print(f"- {suite} checkpoint: {files}")
    print(
        f"- median of {repeat} interleaved rounds; peak RSS = max over the runs of the command's ru_maxrss (GNU time)"
    )
    for suite, by_cache in results.items():
        for cache in caches:
            note = "dropped before every run" if cache == "cold" else "warm: every input read once before every run"
            print(f"\n### {suite} checkpoint, page cache {note}\n")
            print(report.results_table(by_cache[cache]))
    print("\n### Targets (warm cache, as the issue defines them)\n")
    print(report.targets_table(checks))
    print()
    print("\n".join(report.TODO_ROWS))
    if "fix-vs-naive" in comparisons:
        verdict = "EQUAL" if comparisons["fix-vs-naive"]["equal"] else "DIFFERENT"
        print(f"\nOutput check, ckpt-migrate fix vs naive_fix.py: {verdict}\n")
        print(report.adapter_comparison(comparisons["fix-vs-naive"]))
    if "remap" in comparisons:
        verdict = "AS EXPECTED" if comparisons["remap"]["equal"] else "NOT AS EXPECTED"
        print(f"\nOutput check, remapped optimizer.pt vs its source: {verdict}\n")
        print(report.optimizer_comparison(comparisons["remap"]))
    gib = hashing["bytes"] / 2**30
    print(
        f"\nCost of one sha256 pass here (warm sha256 of the {gib:.2f} GiB adapter through maps, as the tool reads "
        f"it, one thread, "
        f"load {hashing['load_avg']:.2f}): {hashing['wall_s']:.2f} s wall, {hashing['cpu_s']:.2f} s CPU "
        f"({gib / hashing['cpu_s']:.2f} GiB per CPU-second)"
    )
    if scaling is not None:
        print("\nScaling check: dry run on the full and a tiny checkpoint, alternating, warm cache:\n")
        print(report.scaling_table(scaling))


if __name__ == "__main__":
    main()
