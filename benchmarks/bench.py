#!/usr/bin/env python
"""Benchmark ``ckpt-migrate`` on a synthetic, full-size double-wrapped LoRA checkpoint (issue #4).

    python benchmarks/bench.py                    # 128 Llama-7B layers, r=64, fp32: 2.39 GiB adapter
    python benchmarks/bench.py --size-gb 1.0      # or --blocks N
    python benchmarks/bench.py --blocks 2 --repeat 5 --json tiny.json

The checkpoint (adapter_model.safetensors, adapter_config.json, a torch.save'd AdamW optimizer.pt of
~2x the adapter, trainer_state.json, small Trainer files) is generated once into --work
(default <repo>/bench-work, gitignored) and reused. Then, interleaved, --repeat times each:

    cp+sync   cp -r SRC DST && sync DST/*           (copy, then fsync every copied file)
    fix       ckpt-migrate fix SRC --out DST --quiet
    dry-run   ckpt-migrate fix SRC --dry-run --format json
    naive     python benchmarks/naive_fix.py SRC DST (load_file everything, fold, save_file, copy)
    help      ckpt-migrate --help

Before every run all dirty data is synced and, when /proc/sys/vm/drop_caches is writable (root), the
page cache is dropped (--cache cold, the default then); --cache warm keeps it. Wall time is measured
around spawn..exit; peak RSS is the command's ru_maxrss as GNU time reports it (for the cp+sync shell,
the largest of sh, cp and sync).
Every DST is deleted after its run, except the last fix and naive outputs, which are compared tensor
by tensor (names, dtypes, shapes, bytes) before being deleted.

Afterwards the dry run is timed on this checkpoint and on a tiny one (--scaling-blocks, default 2
layers), alternating (--scaling-repeat rounds), to show whether its time and memory grow with size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synth  # noqa: E402
from compare import compare_checkpoints  # noqa: E402

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
TARGETS = {
    "fix_time_ratio": 1.5,  # fix wall <= 1.5 x cp+sync
    "fix_peak_rss_mb": 600.0,  # fix peak RSS < 600 MB
    "dry_run_s": 1.5,  # dry run < 1.5 s
    "help_s": 0.5,  # --help < 0.5 s
}
ALL_COMMANDS = ("cp+sync", "fix", "dry-run", "naive", "help")
WRITES = {"cp+sync", "fix", "naive"}
MB = 2**20


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    user_s: float
    sys_s: float


@dataclass
class Result:
    command: str
    argv: str
    runs: list[Run] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_rss_mb(self) -> float:
        return max(r.peak_rss_mb for r in self.runs)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(r.user_s + r.sys_s for r in self.runs)

    @property
    def ok(self) -> bool:
        return all(r.exit_code == 0 for r in self.runs)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine / environment


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def settle(cold: bool) -> None:
    """Flush dirty data (deleted outputs included) and, for cold runs, empty the page cache."""
    os.sync()
    if cold:
        with open(DROP_CACHES, "w") as handle:
            handle.write("3\n")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _mount_of(path: Path) -> tuple[str, str]:
    best = ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mountpoint, fstype = line.split()[:3]
        if str(path).startswith(mountpoint) and len(mountpoint) >= len(best[2]):
            best = (device, fstype, mountpoint)
    return best[0], best[1]


def _git_state() -> str:
    """The commit measured, and whether the working tree had uncommitted changes to the tool."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "ckpt_migrate", "migrations"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return f"{head}{' + uncommitted changes in ckpt_migrate/ or migrations/' if dirty else ''}"


def machine_info(work: Path) -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    usage = shutil.disk_usage(work)
    device, fstype = _mount_of(work.resolve())
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "ram_gib": round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1),
        "disk": f"{device} ({fstype}) {usage.total / 2**30:.0f} GiB, {usage.free / 2**30:.0f} GiB free",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "safetensors": _version("safetensors"),
        "ckpt_migrate": _version("ckpt-migrate"),
        "git": _git_state(),
        "load_avg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
    }


# --------------------------------------------------------------------------- running children


GNU_TIME = "/usr/bin/time"
#: Fallback when GNU time is missing: a fresh, small Python that spawns the command and reports wait4's rusage.
LAUNCHER = (
    "import os,sys\n"
    "pid=os.posix_spawnp(sys.argv[2],sys.argv[2:],os.environ)\n"
    "_,st,ru=os.wait4(pid,0)\n"
    "code=os.waitstatus_to_exitcode(st)\n"
    "open(sys.argv[1],'w').write(f'{ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime} {code}\\n')\n"
    "sys.exit(code if code>=0 else 128-code)\n"
)


def measuring_prefix(rusage_file: Path) -> list[str]:
    """Wrap a command so its own peak RSS is reported.

    wait4's ru_maxrss for a direct child of this process is useless: on exec Linux records the
    hiwater RSS of the parent's address space (vfork/posix_spawn share it; fork copies it), so
    every child would "peak" at this benchmark's own size. A freshly exec'd small wrapper (GNU
    time, ~2 MB) forks the command instead, and reports the rusage wait4 gives it for that child.
    """
    if os.access(GNU_TIME, os.X_OK):
        return [GNU_TIME, "-o", str(rusage_file), "-f", "%M %U %S %x"]
    return [sys.executable, "-S", "-c", LAUNCHER, str(rusage_file)]


def spawn_measured(argv: list[str], stdout: Path, stderr: Path) -> Run:
    """Run ``argv`` (stdin /dev/null, output to files); wall time here, rusage from the wrapper."""
    rusage_file = stdout.with_suffix(".rusage")
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(stdout), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
        (os.POSIX_SPAWN_OPEN, 2, str(stderr), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    ]
    full = measuring_prefix(rusage_file) + argv
    started = time.perf_counter()
    pid = os.posix_spawnp(full[0], full, os.environ, file_actions=actions)
    os.waitpid(pid, 0)
    wall = time.perf_counter() - started
    # GNU time prefixes "Command exited with non-zero status N" on failure: the numbers are the last line.
    maxrss_kb, user, system, code = rusage_file.read_text().split("\n")[-2].split()
    return Run(round(wall, 4), round(int(maxrss_kb) / 1024, 1), int(code), float(user), float(system))


def command_lines(name: str, src: Path, dst: Path, ckpt: str, sync_mode: str) -> list[str]:
    if name == "cp+sync":
        sync = "sync -f" if sync_mode == "fs" else "sync"
        source, target = shlex.quote(str(src)), shlex.quote(str(dst))
        return ["sh", "-c", f"cp -r {source} {target} && {sync} {target}/*"]
    if name == "fix":
        return [ckpt, "fix", str(src), "--out", str(dst), "--quiet"]
    if name == "dry-run":
        return [ckpt, "fix", str(src), "--dry-run", "--format", "json"]
    if name == "naive":
        return [sys.executable, str(HERE / "naive_fix.py"), str(src), str(dst)]
    if name == "help":
        return [ckpt, "--help"]
    raise ValueError(name)


def validate(name: str, run: Run, dst: Path, stdout: Path, stderr: Path) -> None:
    """Fail loudly if a command did not do its job (a fast failure is not a fast success)."""
    problem = None
    if run.exit_code != 0:
        problem = f"exit code {run.exit_code}"
    elif name in WRITES and not (dst / synth.WEIGHTS).is_file():
        problem = f"{dst / synth.WEIGHTS} was not written"
    elif name == "dry-run":
        report = json.loads(stdout.read_text())
        statuses = [c["status"] for c in report["checkpoints"]]
        if statuses != ["repairable"]:
            problem = f"dry run reported {statuses}"
    elif name == "help" and "Usage:" not in stdout.read_text():
        problem = "no usage text"
    if problem:
        tail = stderr.read_text()[-2000:]
        raise SystemExit(f"{name} failed: {problem}\n--- stderr tail ---\n{tail}")


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def benchmark(
    jobs: dict[str, tuple[str, Path]],
    work: Path,
    repeat: int,
    cold: bool,
    ckpt: str,
    sync_mode: str,
    keep_last: set[str],
) -> tuple[dict[str, Result], dict[str, Path]]:
    """Run every job (key -> (command name, source)) once per round, ``repeat`` rounds, interleaved."""
    runs_dir = work / "runs"
    remove(runs_dir)
    runs_dir.mkdir(parents=True)
    results = {
        key: Result(name, shlex.join(command_lines(name, src, runs_dir / "DST", ckpt, sync_mode)))
        for key, (name, src) in jobs.items()
    }
    kept: dict[str, Path] = {}
    for index in range(repeat):
        for key, (name, src) in jobs.items():
            dst = runs_dir / f"{key}-{index}"
            stdout, stderr = runs_dir / f"{key}.stdout", runs_dir / f"{key}.stderr"
            remove(dst)
            settle(cold)
            run = spawn_measured(command_lines(name, src, dst, ckpt, sync_mode), stdout, stderr)
            validate(name, run, dst, stdout, stderr)
            results[key].runs.append(run)
            log(f"  [{index + 1}/{repeat}] {key:12s} {run.wall_s:8.3f} s  {run.peak_rss_mb:8.1f} MB")
            if key in keep_last and index == repeat - 1:
                kept[key] = dst
            else:
                remove(dst)
    return results, kept


# --------------------------------------------------------------------------- reporting


def paired_ratio(result: Result, reference: Result) -> float:
    """Median over rounds of result/reference in the same round: robust to a disk that drifts between rounds."""
    return statistics.median(r.wall_s / c.wall_s for r, c in zip(result.runs, reference.runs, strict=True))


def verdicts(results: dict[str, Result]) -> list[dict]:
    """Each target with its measured value and PASS/FAIL (or n/a when a command was not run)."""
    out = []

    def add(target: str, command: str, measured: float | None, limit: float, unit: str, strict: bool) -> None:
        if measured is None:
            out.append({"target": target, "command": command, "measured": None, "limit": limit, "result": "n/a"})
            return
        passed = measured < limit if strict else measured <= limit
        out.append(
            {
                "target": target,
                "command": command,
                "measured": round(measured, 3),
                "unit": unit,
                "limit": limit,
                "result": "PASS" if passed else "FAIL",
            }
        )

    cp, fix = results.get("cp+sync"), results.get("fix")
    add(
        "fix <= 1.5x cp+sync (ratio of medians)",
        "fix",
        fix.median_s / cp.median_s if fix and cp else None,
        TARGETS["fix_time_ratio"],
        "x",
        False,
    )
    add(
        "fix <= 1.5x cp+sync (median of per-round ratios)",
        "fix",
        paired_ratio(fix, cp) if fix and cp else None,
        TARGETS["fix_time_ratio"],
        "x",
        False,
    )
    add("fix peak RSS < 600 MB", "fix", fix.peak_rss_mb if fix else None, TARGETS["fix_peak_rss_mb"], "MB", True)
    dry, helps = results.get("dry-run"), results.get("help")
    add("dry-run < 1.5 s", "dry-run", dry.median_s if dry else None, TARGETS["dry_run_s"], "s", True)
    add("--help < 0.5 s", "help", helps.median_s if helps else None, TARGETS["help_s"], "s", True)
    return out


LABELS = {
    "cp+sync": "`cp -r SRC DST && sync DST/*`",
    "fix": "`ckpt-migrate fix SRC --out DST --quiet`",
    "dry-run": "`ckpt-migrate fix SRC --dry-run --format json`",
    "naive": "`naive_fix.py SRC DST`",
    "help": "`ckpt-migrate --help`",
}


def markdown_table(results: dict[str, Result], checks: list[dict], sync_mode: str) -> str:
    cp = results.get("cp+sync")
    by_command: dict[str, list[str]] = {}
    for check in checks:
        if check["result"] != "n/a":
            by_command.setdefault(check["command"], []).append(f"{check['result']} ({check['target']})")
    lines = [
        "| command | median wall s | ratio vs cp+sync | peak RSS MB | median CPU s (user+sys) | runs (s) | target |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, result in results.items():
        label = LABELS[name]
        if name == "cp+sync" and sync_mode == "fs":
            label = label.replace("sync DST", "sync -f DST")
        ratio = f"{result.median_s / cp.median_s:.2f}x" if cp else "-"
        runs = ", ".join(f"{r.wall_s:.2f}" for r in result.runs)
        lines.append(
            f"| {label} | {result.median_s:.3f} | {ratio} | {result.peak_rss_mb:.0f} | "
            f"{result.median_cpu_s:.2f} | {runs} | "
            f"{'; '.join(by_command.get(name, ['-']))} |"
        )
    return "\n".join(lines)


def comparison_lines(comparison: dict) -> str:
    yes = lambda v: "yes" if v else "NO"  # noqa: E731
    lines = [
        f"- tensor names equal: {yes(comparison['same_names'])} ({comparison['tensor_count'][0]} tensors)",
        f"- dtypes and shapes equal: {yes(comparison['same_dtypes_and_shapes'])}",
        f"- values equal (tensor bytes identical): {yes(comparison['same_values'])}"
        + (
            f"; differing: {comparison['tensors_with_different_bytes'][:5]} max|diff| {comparison['max_abs_diff']}"
            if comparison["tensors_with_different_bytes"]
            else ""
        ),
        f"- same tensor order and offsets in the header: {yes(comparison['same_data_layout'])}",
        f"- data section byte-identical: {yes(comparison['data_section_byte_identical'])}",
        f"- adapter_model.safetensors byte-identical: {yes(comparison['file_byte_identical'])}"
        + (
            ""
            if comparison["file_byte_identical"]
            else f" (identical apart from __metadata__: {yes(comparison['byte_identical_except_metadata'])}; "
            f"tool metadata keys {sorted(comparison['metadata_tool'] or {})}, "
            f"naive {sorted(comparison['metadata_naive'] or {})})"
        ),
        f"- adapter_config.json equal (parsed): {yes(comparison['adapter_config_equal'])}",
        f"- (informational) other files byte-identical: {yes(comparison['other_files_identical'])}"
        + (f" (differ: {comparison['other_files_differ']})" if comparison["other_files_differ"] else "")
        + f"; only in tool output: {comparison['files_only_in_tool']}; only in naive output: "
        f"{comparison['files_only_in_naive']}",
    ]
    return "\n".join(lines)


def scaling_check(full: Result, tiny: Result, full_bytes: int, tiny_bytes: int) -> dict:
    """Does the dry run get slower or bigger with the checkpoint? (Noise allowance: 0.05 s / 25 %, 5 MB / 10 %.)"""
    time_growth = full.median_s - tiny.median_s
    rss_growth = full.peak_rss_mb - tiny.peak_rss_mb
    return {
        "tiny_adapter_bytes": tiny_bytes,
        "full_adapter_bytes": full_bytes,
        "tiny": {"median_s": tiny.median_s, "peak_rss_mb": tiny.peak_rss_mb, "runs": [asdict(r) for r in tiny.runs]},
        "full": {"median_s": full.median_s, "peak_rss_mb": full.peak_rss_mb, "runs": [asdict(r) for r in full.runs]},
        "time_grows": time_growth > max(0.05, 0.25 * tiny.median_s),
        "rss_grows": rss_growth > max(5.0, 0.10 * tiny.peak_rss_mb),
    }


def scaling_table(scaling: dict) -> str:
    tiny, full = scaling["tiny"], scaling["full"]

    def row_text(key: str, row: dict) -> str:
        runs = ", ".join(f"{r['wall_s']:.2f}" for r in row["runs"])
        size = f"{scaling[f'{key}_adapter_bytes'] / MB:,.1f} MiB adapter"
        return f"| {size} | {row['median_s']:.3f} | {row['peak_rss_mb']:.1f} | {runs} |"

    return "\n".join(
        [
            "| dry run on | median wall s | peak RSS MB | runs (s) |",
            "|---|---:|---:|---|",
            *(row_text(k, row) for k, row in (("tiny", tiny), ("full", full))),
            "",
            f"Dry-run time grows with size: {'YES' if scaling['time_grows'] else 'no'} "
            f"({full['median_s'] - tiny['median_s']:+.3f} s); "
            f"peak RSS grows with size: {'YES' if scaling['rss_grows'] else 'no'} "
            f"({full['peak_rss_mb'] - tiny['peak_rss_mb']:+.1f} MB)",
        ]
    )


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size-gb", type=float, help="adapter size in GiB (rounded to whole layers)")
    size.add_argument("--blocks", type=int, help="number of transformer layers (default 128 = 2.39 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command, interleaved (default 3)")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work", help="cache and scratch directory")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    parser.add_argument(
        "--cache",
        choices=["cold", "warm"],
        help="drop the page cache before each run (cold; default when possible) or not (warm)",
    )
    parser.add_argument(
        "--sync-mode",
        choices=["files", "fs"],
        default="files",
        help="baseline sync: fsync the copied files (sync DST/*) or the whole fs (sync -f DST/*)",
    )
    parser.add_argument("--commands", default=",".join(ALL_COMMANDS), help=f"subset of {','.join(ALL_COMMANDS)}")
    parser.add_argument("--scaling-blocks", type=int, default=2, help="tiny size for the scaling check (0: skip)")
    parser.add_argument("--scaling-repeat", type=int, default=5, help="rounds of the scaling check (default 5)")
    parser.add_argument("--no-optimizer", action="store_true", help="generate no optimizer.pt")
    parser.add_argument("--no-compare", action="store_true", help="skip the tool-vs-naive output comparison")
    parser.add_argument(
        "--ckpt-migrate",
        default=str(Path(sys.executable).parent / "ckpt-migrate"),
        help="ckpt-migrate executable (default: the one beside this Python)",
    )
    args = parser.parse_args()

    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    if unknown := set(commands) - set(ALL_COMMANDS):
        parser.error(f"unknown commands {sorted(unknown)}")
    base = synth.Spec(optimizer=not args.no_optimizer)
    blocks = args.blocks or (synth.blocks_for_size(args.size_gb, base) if args.size_gb else base.blocks)
    spec = replace(base, blocks=blocks)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    droppable = can_drop_caches()
    cache = args.cache or ("cold" if droppable else "warm")
    if cache == "cold" and not droppable:
        parser.error(f"--cache cold needs a writable {DROP_CACHES} (run as root)")
    machine = machine_info(work)
    synth.check_layout_matches_fixture()

    # Disk: the source, plus a full copy (cp+sync), plus the two outputs kept for the comparison.
    src = synth.generate(work, spec, log=log)
    src_bytes = sum(p.stat().st_size for p in src.iterdir())
    need = src_bytes + 2 * synth.adapter_bytes(spec) + 256 * MB
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"need {need / 2**30:.1f} GiB free in {work} for the runs")

    log(f"benchmarking {src} ({src_bytes / 2**30:.2f} GiB), cache {cache}, repeat {args.repeat}")
    keep = set() if args.no_compare else {"fix", "naive"} & set(commands)
    jobs = {name: (name, src) for name in commands}
    results, kept = benchmark(
        jobs, work, args.repeat, cache == "cold", args.ckpt_migrate, args.sync_mode, keep if len(keep) == 2 else set()
    )
    comparison = None
    if len(kept) == 2:
        log("comparing the ckpt-migrate and naive outputs ...")
        comparison = compare_checkpoints(kept["fix"], kept["naive"])
        for path in kept.values():
            remove(path)

    scaling = None
    if args.scaling_blocks and args.scaling_blocks != spec.blocks:
        tiny_spec = replace(spec, blocks=args.scaling_blocks)
        tiny_src = synth.generate(work, tiny_spec, log=log)
        rounds = max(args.repeat, args.scaling_repeat)
        log(f"scaling check: dry run on {src} and {tiny_src}, alternating, {rounds} rounds")
        pair, _ = benchmark(
            {"dry-run-full": ("dry-run", src), "dry-run-tiny": ("dry-run", tiny_src)},
            work,
            rounds,
            cache == "cold",
            args.ckpt_migrate,
            args.sync_mode,
            set(),
        )
        scaling = scaling_check(
            pair["dry-run-full"], pair["dry-run-tiny"], synth.adapter_bytes(spec), synth.adapter_bytes(tiny_spec)
        )
    remove(work / "runs")

    checks = verdicts(results)
    files = {p.name: p.stat().st_size for p in sorted(src.iterdir())}
    print(
        f"## ckpt-migrate benchmark: {spec.blocks} layers, adapter {synth.adapter_bytes(spec) / 2**30:.2f} GiB, "
        f"checkpoint {src_bytes / 2**30:.2f} GiB"
    )
    print()
    print(
        f"- machine: {machine['cpu']}, {machine['nproc']} CPUs, {machine['ram_gib']} GiB RAM, disk "
        f"{machine['disk']}, Linux {machine['kernel']}"
    )
    print(
        f"- software: Python {machine['python']}, torch {machine['torch']}, safetensors {machine['safetensors']}, "
        f"ckpt-migrate {machine['ckpt_migrate']} (git {machine['git']}); load average at start "
        f"{' '.join(machine['load_avg_at_start'])}"
        + (
            "; PYTHONDONTWRITEBYTECODE is set (modules without a __pycache__ are compiled on every run)"
            if machine["PYTHONDONTWRITEBYTECODE"]
            else ""
        )
    )
    print("- checkpoint files: " + ", ".join(f"{k} {v / MB:,.1f} MiB" for k, v in files.items()))
    cache_note = (
        "dropped before every run (sync; echo 3 > /proc/sys/vm/drop_caches)"
        if cache == "cold"
        else ("warm (not dropped)")
    )
    print(
        f"- page cache: {cache_note}; median of {args.repeat} interleaved runs; "
        "peak RSS = max over the runs of the command's ru_maxrss (GNU time)"
    )
    print()
    print(markdown_table(results, checks, args.sync_mode))
    print()
    print("| target | measured | result |")
    print("|---|---:|---|")
    for check in checks:
        measured = "-" if check["measured"] is None else f"{check['measured']:.3f} {check.get('unit', '')}"
        print(f"| {check['target']} | {measured} | {check['result']} |")
    if comparison is not None:
        print()
        print(f"Output check, ckpt-migrate vs naive_fix.py: {'EQUAL' if comparison['equal'] else 'DIFFERENT'}")
        print(comparison_lines(comparison))
    if scaling is not None:
        print()
        print(
            f"Scaling check: dry run on the {spec.blocks}-layer and a {args.scaling_blocks}-layer checkpoint, "
            "alternating:"
        )
        print()
        print(scaling_table(scaling))
    if args.json:
        payload = {
            "spec": asdict(spec),
            "adapter_bytes": synth.adapter_bytes(spec),
            "checkpoint_bytes": src_bytes,
            "files": files,
            "machine": machine,
            "cache": cache,
            "repeat": args.repeat,
            "sync_mode": args.sync_mode,
            "results": {
                name: {
                    "argv": r.argv,
                    "median_s": r.median_s,
                    "peak_rss_mb": r.peak_rss_mb,
                    "runs": [asdict(run) for run in r.runs],
                }
                for name, r in results.items()
            },
            "targets": checks,
            "comparison": comparison,
            "scaling": scaling,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
