"""Issue 22: a user's first hour, at a real terminal.

The CLI runs under a pseudo-terminal (``pty``), as it does for a person: progress bars must reach 100% of the right
total; Ctrl-C at any moment (mid-import, mid-write) must exit 130 with one line and leave nothing behind; a run
killed with SIGKILL leaves its staging directory, which the next run writing beside it removes (and a live run's
it keeps).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, tree_digest

from ckpt_migrate.core.errors import EXIT_INTERRUPTED, EXIT_OK

CASE = FIXTURES / "llama_score"
SRC = CASE / "run" / "checkpoint-2"
BASE = CASE / "base"
STAGING_MARK = ".ckpt-migrate-staging-"
INTERRUPTED = "ckpt-migrate: interrupted; nothing was published"

#: The CLI, with a hook: ``FIRST_HOUR_READY`` names a file created, and the process paused, when the moment named by
#: ``FIRST_HOUR_AT`` comes: ``import`` (transformers' lazy import of the Llama config; the interrupt is then
#: re-raised as the ``ModuleNotFoundError: Could not import module 'LlamaConfig'`` users saw, with no exception
#: chain left to tell), ``parsing`` (click parsing ``fix``'s options: click turns an interrupt there into "Aborted!"
#: and exit 1 unless told not to), or ``staged`` (the output fully staged, not yet renamed into place). Nothing in
#: the package is changed.
HOOKED_CLI = """
import os, signal, sys, time
from pathlib import Path

at, ready = os.environ.get("FIRST_HOUR_AT"), os.environ.get("FIRST_HOUR_READY")

def arrived():
    Path(ready).write_text(str(os.getpid()))
    time.sleep(120)

class Trip:
    def find_spec(self, name, path=None, target=None):
        if at == "import" and name == "transformers.models.llama.configuration_llama":
            interrupted = False
            try:
                arrived()
            except KeyboardInterrupt:
                interrupted = True
            if interrupted:  # outside the except block: no __context__
                raise ModuleNotFoundError("Could not import module 'LlamaConfig'")
        return None

sys.meta_path.insert(0, Trip())
if at == "parsing":
    import click
    _parse_args = click.Command.parse_args
    def parse_args(self, ctx, args):
        if self.name == "fix":
            arrived()
        return _parse_args(self, ctx, args)
    click.Command.parse_args = parse_args
if at == "staged":
    import ckpt_migrate.execute.publish as publish
    _fsync_tree = publish.fsync_tree
    def fsync_tree(path):
        _fsync_tree(path)
        arrived()
    publish.fsync_tree = fsync_tree
sys.argv[0] = "ckpt-migrate"
from ckpt_migrate.interrupts import entry_point
entry_point()
"""


class Terminal:
    """A CLI process whose stderr (and stdin) is a 120x40 pseudo-terminal; stdout is a pipe.

    Both are drained from the start on threads, so several terminals run side by side (two CPUs: the runs that
    import torch overlap) without a full terminal buffer ever pausing one."""

    def __init__(self, args: list[str], *, hook: str | None = None, ready: Path | None = None):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "FIRST_HOUR_AT": hook or "", "FIRST_HOUR_READY": str(ready or "")}
        command = [sys.executable, "-c", HOOKED_CLI] if hook else [sys.executable, "-m", "ckpt_migrate"]
        self.proc = subprocess.Popen(
            [*command, *map(str, args)],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.close(slave)
        self.master, self.started, self.ready = master, time.monotonic(), ready
        self._screen: list[bytes] = []
        self._readers = [
            threading.Thread(target=self._read_terminal, daemon=True),
            threading.Thread(target=self.proc.stdout.read, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_terminal(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every writer of the terminal has exited
                return
            if not data:
                return
            self._screen.append(data)

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        """Wait for the exit; (exit code, everything written to the terminal)."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        os.close(self.master)
        return code, b"".join(self._screen).decode(errors="replace")


def _wait_for(ready: Path, terminal: Terminal) -> None:
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert terminal.proc.poll() is None, "the CLI exited before the moment to interrupt it"
        assert time.monotonic() < deadline, "the CLI never reached the moment to interrupt it"
        time.sleep(0.02)


def _lines(screen: str) -> list[str]:
    """What a person sees: each carriage return redraws its line; ANSI cursor moves dropped."""
    screen = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen)
    return [part.strip() for part in re.split(r"[\r\n]", screen) if part.strip()]


def _bars(screen: str) -> list[tuple[str, int, str, str]]:
    """Every drawn bar: (label, percent, done, total) as tqdm prints them."""
    found = re.findall(r"^(.*?):\s+(\d+)%\|.*?\|\s*([\d.]+\w?)/([\d.]+\w?) \[", "\n".join(_lines(screen)), re.M)
    return [(label, int(percent), done, total) for label, percent, done, total in found]


def _staging(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if STAGING_MARK in p.name)


def _size(n: int) -> str:
    from tqdm import tqdm

    return tqdm.format_sizeof(n, divisor=1024)


# ---------------------------------------------------------------- progress


def test_bars_end_at_100_percent_of_the_right_total(tmp_path: Path):
    from ckpt_migrate.api import export, fix
    from ckpt_migrate.execute.export import output_bytes
    from ckpt_migrate.execute.write import bytes_to_process

    fixing = Terminal(["fix", SRC, "--out", tmp_path / "fixed", "--no-verify"])
    exporting = Terminal(["export", SRC, "--out", tmp_path / "merged", "--base-model", BASE])

    (planned,) = fix(SRC, tmp_path / "dry", base_model=BASE, dry_run=True).checkpoints
    code, screen = fixing.finish()
    assert code == EXIT_OK, screen
    bars = _bars(screen)
    assert bars and {label for label, *_ in bars} == {"checkpoint-2"}, bars  # named after the checkpoint, not "."
    assert {total for *_, total in bars} == {_size(bytes_to_process(planned.plan))}
    assert bars[-1][1:3] == (100, bars[-1][3]), bars[-1]
    assert all(percent <= 100 for _, percent, _, _ in bars)

    merged = export(SRC, tmp_path / "dry-export", base_model=BASE, dry_run=True).export
    expected = 2 * sum(output_bytes(t, merged.cast_to) for t in merged.tensors)  # written, then read back to hash
    code, screen = exporting.finish()
    assert code == EXIT_OK, screen
    bars = _bars(screen)
    assert bars and {total for *_, total in bars} == {_size(expected)}, bars
    assert bars[-1][1:3] == (100, bars[-1][3]) and all(percent <= 100 for _, percent, _, _ in bars)


def test_verify_names_each_probe_as_a_phase_of_its_own(tmp_path: Path, monkeypatch):
    """`verify` and `fix --verify` sat silent for 23-36 s: each probe (the static proof, each of the two loads, the
    source's own logits) is a phase, named when it passes a second, and none with --quiet (progress=False)."""
    from ckpt_migrate import progress
    from ckpt_migrate.api import fix, verify

    seen: list[tuple[str, bool | None]] = []
    real_phase = progress.phase

    def recording_phase(text: str, wanted: bool | None):
        seen.append((text, wanted))
        return real_phase(text, wanted)

    monkeypatch.setattr(progress, "phase", recording_phase)
    probes = [
        "importing torch, transformers and peft",
        "static proof: building the model on the meta device",
        "loading it on the base model, seed 1 of 2",
        "loading it on the base model, seed 2 of 2",
        "computing the source's own logits, its head unmerged",
    ]
    report = fix(SRC, tmp_path / "fixed", base_model=BASE, verify=True, progress=True)
    assert report.exit_code == EXIT_OK and report.checkpoints[0].verification["ok"]
    assert [text for text, wanted in seen if text.startswith("verify ") and wanted] == [
        f"verify checkpoint-2: {probe}" for probe in probes
    ], seen

    seen.clear()
    assert verify(tmp_path / "fixed", BASE, source=SRC, progress=True).ok
    assert seen == [(f"verify fixed: {probe}", True) for probe in probes], seen
    seen.clear()
    assert verify(tmp_path / "fixed", BASE, source=SRC, progress=False).ok
    assert seen and all(wanted is False for _, wanted in seen), seen  # --quiet: every phase silent


# ---------------------------------------------------------------- Ctrl-C


def _assert_interrupted(code: int, screen: str, tmp_path: Path, digest: dict[str, str]) -> None:
    assert code == EXIT_INTERRUPTED, screen
    assert "Traceback" not in screen and "internal error" not in screen, screen
    lines = _lines(screen)
    assert lines[-1] == INTERRUPTED and lines.count(INTERRUPTED) == 1, lines
    assert not [line for line in lines if "error" in line], lines
    assert not (tmp_path / "out").exists() and _staging(tmp_path) == []
    assert tree_digest(SRC) == digest


def test_ctrl_c_at_chosen_moments(tmp_path: Path):
    """Mid-import of transformers on the main thread (export's static proof: the interrupt surfaces wrapped in a
    ModuleNotFoundError), while click parses the command line, and with fix's output fully staged but not yet
    published. The three runs go side by side, each in a directory of its own."""
    digest = tree_digest(SRC)
    runs = {}
    for command, moment in [("export", "import"), ("fix", "parsing"), ("fix", "staged")]:
        where = tmp_path / f"{command}-{moment}"
        where.mkdir()
        args = [command, SRC, "--out", where / "out", "--base-model", BASE] + ["--no-verify"] * (command == "fix")
        runs[where] = Terminal(args, hook=moment, ready=where / "ready")
    for where, terminal in runs.items():
        _wait_for(terminal.ready, terminal)
        if where.name.endswith("staged"):
            assert _staging(where), "the hook fires with the output staged"
        terminal.proc.send_signal(signal.SIGINT)
    for where, terminal in runs.items():
        code, screen = terminal.finish()
        _assert_interrupted(code, screen, where, digest)


def _wait_for_sigint_handler(pid: int, timeout: float = 30.0) -> None:
    """Until our entry point's handler is in place: the first thing it does. A signal before that meets the
    interpreter's start-up, which no code of ours runs in (on a loaded machine, 100+ ms). SigCgt (in /proc) shows
    SIGINT caught from Python's own start-up on, so SIGTERM, which Python leaves alone and our handler takes (right
    after SIGINT), tells ours."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)
    raise AssertionError("the SIGINT handler was never installed")


@pytest.mark.parametrize("after", [0.15, 0.4, 1.5])
def test_ctrl_c_while_starting_up(tmp_path: Path, after: float):
    """Ctrl-C soon after the command is typed: while click, ckpt_migrate and the planner are being imported."""
    digest = tree_digest(SRC)
    terminal = Terminal(["fix", SRC, "--out", tmp_path / "out", "--base-model", BASE, "--no-verify"])
    _wait_for_sigint_handler(terminal.proc.pid)  # before it, the interpreter is still starting: Python's own default
    time.sleep(max(0.0, after - (time.monotonic() - terminal.started)))
    assert terminal.proc.poll() is None, "the run ended before the interrupt"
    terminal.proc.send_signal(signal.SIGINT)
    code, screen = terminal.finish()
    _assert_interrupted(code, screen, tmp_path, digest)


# ---------------------------------------------------------------- SIGKILL


def test_killed_fix_and_export_are_cleaned_up_by_the_next_run_beside_them(tmp_path: Path):
    runs = {}  # side by side: a fix and an export to kill, and a live run whose staging directory must survive
    for command, name in [("fix", "fixed"), ("export", "merged"), ("fix", "live")]:
        # fix without a base model: no static proof, so no transformers and peft to import (6 s of CPU) before
        # the output is staged; what is killed is the same staging directory
        args = [command, SRC, "--out", tmp_path / name, "--quiet"] + ["--base-model", BASE] * (command == "export")
        args += ["--no-verify"] if command == "fix" else []
        runs[name] = Terminal(args, hook="staged", ready=tmp_path / f"ready-{name}")
    for terminal in runs.values():
        _wait_for(terminal.ready, terminal)
    staged = {name: [p for p in _staging(tmp_path) if p.name.startswith(f".{name}.")] for name in runs}
    assert all(len(found) == 1 for found in staged.values()), staged
    live = runs.pop("live")
    try:
        for name, terminal in runs.items():
            terminal.proc.kill()
            assert terminal.finish()[0] == -signal.SIGKILL
            assert not (tmp_path / name).exists()
        left = sorted(p for found in staged.values() for p in found)
        assert _staging(tmp_path) == left, "each killed run left its staging directory (and the live run has its own)"

        code, screen = Terminal(["fix", SRC, "--out", tmp_path / "next", "--quiet", "--no-verify"]).finish()
        assert code == EXIT_OK, screen
        assert (tmp_path / "next" / "adapter_model.safetensors").is_file()
        assert _staging(tmp_path) == staged["live"], "dead runs' staging removed, the live run's kept"
    finally:
        live.proc.kill()
        live.finish()


# ---------------------------------------------------------------- messages and outputs


def test_one_wording_per_condition_across_commands(tmp_path: Path):
    """A fumbled --base-model reads the same in every command (exit 5); an --out whose parent is missing is refused
    as cp and rsync refuse it (exit 6, naming the parent); --verify with no base model at hand is a usage error."""
    from conftest import run_cli

    missing, a_file = tmp_path / "no-such-base", SRC / "README.md"
    wordings = [
        (missing, "base model not found: no such directory"),
        (a_file, "base model is a file, not a model directory"),
    ]
    for base, wording in wordings:
        runs = [
            run_cli("fix", SRC, "--dry-run", "--base-model", base),
            run_cli("export", SRC, "--dry-run", "--base-model", base),
            run_cli("inspect", SRC, "--base-model", base),
            run_cli("verify", SRC, "--base-model", base),
        ]
        assert [(code, stderr.strip()) for code, _, stderr in runs] == [
            (5, f"ckpt-migrate: error: {base}: {wording}" + (" (nor a Hub id in the cache)" if base == missing else ""))
        ] * 4

    parent = tmp_path / "missing-parent"
    for command in ["fix", "export"]:
        code, _, stderr = run_cli(command, SRC, "--out", parent / "out", "--base-model", BASE)
        assert code == 6 and f"{parent}: the parent of --out does not exist" in stderr, stderr
        assert not parent.exists()

    bare = tmp_path / "no-base-named"
    shutil.copytree(FIXTURES / "distilbert_two_heads" / "run" / "checkpoint-2", bare)
    code, _, stderr = run_cli("fix", bare, "--out", tmp_path / "out", "--verify")
    assert code == 2 and "--verify needs a base model" in stderr and not (tmp_path / "out").exists()


def test_unchanged_adapter_files_are_copied_byte_for_byte(tmp_path: Path):
    """Only rng_state.pth and trainer_state.json need a change here: the adapter is copied, not rewritten to carry
    migration ids (the manifest records them), and reported as copied."""
    from ckpt_migrate.api import fix

    src = Path(__file__).parent / "fixtures_old_stack" / "llama_clean_peft082" / "run" / "checkpoint-2"
    (result,) = fix(src, tmp_path / "out", verify=False, progress=False).checkpoints
    out = tmp_path / "out"
    for name in ["adapter_model.safetensors", "adapter_config.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    from ckpt_migrate.formats.trainer_files import file_verdicts

    verdicts = {name: verdict.value for name, _, verdict, _ in file_verdicts(result.plan)}
    assert verdicts["adapter_model.safetensors"] == verdicts["adapter_config.json"] == "copied"
    manifest = json.loads((out / "ckpt_migrate_manifest.json").read_text())
    assert manifest["migrations_applied"] == list(result.plan.migrations)


def test_what_can_be_trained_on_says_retraining_is_preferred(tmp_path: Path):
    from conftest import run_cli

    from ckpt_migrate.api import load

    code, stdout, _ = run_cli("export", SRC, "--out", tmp_path / "merged", "--base-model", BASE, "--quiet")
    assert code == 0 and "WARNING: retraining is preferred" in stdout
    with pytest.warns(UserWarning, match="retraining is preferred"):
        load(BASE, SRC, is_trainable=True)
