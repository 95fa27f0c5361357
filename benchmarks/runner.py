"""Running benchmark commands: the page cache (warm or dropped), the machine, and one measured child.

Nothing here imports ckpt_migrate: the benchmark must not share code with the tool it measures.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
REPO = Path(__file__).resolve().parent.parent
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


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    user_s: float
    sys_s: float
    load_avg: float  # 1-minute load average just before the run


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


@dataclass
class Pairs:
    """A tool and a reference run alternately on the same bytes (tool, reference, tool, reference, ...): the
    per-pair ratio cancels what drifts between pairs (disk, page-cache reclaim, other jobs)."""

    tool: Result
    reference: Result

    @property
    def ratios(self) -> list[float]:
        return [t.wall_s / r.wall_s for t, r in zip(self.tool.runs, self.reference.runs, strict=True)]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def load_range(self) -> tuple[float, float]:
        loads = [r.load_avg for r in self.tool.runs + self.reference.runs]
        return min(loads), max(loads)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def load_averages() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- page cache


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def settle(cold: bool, warm_paths: list[Path]) -> None:
    """Flush dirty data (earlier outputs included); then empty the page cache (cold) or read the
    inputs once so that every byte of them is cached (warm)."""
    os.sync()
    if cold:
        with open(DROP_CACHES, "w") as handle:
            handle.write("3\n")
        return
    buffer = bytearray(8 * 2**20)
    for root in warm_paths:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(path, "rb", buffering=0) as handle:
                for start, end in _data_extents(handle.fileno()):
                    handle.seek(start)
                    while start < end and (n := handle.readinto(memoryview(buffer)[: min(len(buffer), end - start)])):
                        start += n


def _data_extents(fd: int) -> list[tuple[int, int]]:
    """The byte ranges of a file that hold data: all of it, but for the holes of a sparse file (the synthetic
    base's body, tens of GB of zeros no command reads)."""
    size, extents, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        offset = end
    return extents


# --------------------------------------------------------------------------- machine


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
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "ckpt_migrate", "migrations"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    suffix = " + uncommitted changes in ckpt_migrate/ or migrations/" if dirty.stdout.strip() else ""
    return head.stdout.strip() + suffix


def machine_info(work: Path) -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
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
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "ckpt_migrate": _version("ckpt-migrate"),
        "git": _git_state(),
        "load_avg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def byte_compile_tool() -> None:
    """Compile the tool's modules to ``__pycache__`` once, as ``pip install`` does: an editable install run with
    PYTHONDONTWRITEBYTECODE set would otherwise compile every module on every run (0.1-0.3 s each time)."""
    for package in ("ckpt_migrate", "migrations"):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / package)], check=True)


# --------------------------------------------------------------------------- one measured child


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
    load = load_average()
    started = time.perf_counter()
    pid = os.posix_spawnp(full[0], full, os.environ, file_actions=actions)
    os.waitpid(pid, 0)
    wall = time.perf_counter() - started
    # GNU time prefixes "Command exited with non-zero status N" on failure: the numbers are the last line.
    maxrss_kb, user, system, code = rusage_file.read_text().split("\n")[-2].split()
    return Run(round(wall, 4), round(int(maxrss_kb) / 1024, 1), int(code), float(user), float(system), load)


def imported_modules(argv: list[str], cwd: Path | None = None) -> set[str]:
    """The modules a Python command imports: ``argv`` is ``[python, ...]``, run once with ``-X importtime`` in
    ``cwd`` (``python -m`` puts it first on ``sys.path``: not a checkout whose code would shadow the installed)."""
    run = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, cwd=cwd)
    lines = [line for line in run.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[-1].strip() for line in lines}


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
