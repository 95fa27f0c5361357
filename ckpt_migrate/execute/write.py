"""Write one planned checkpoint into an empty directory: copies, rewrites, the new adapter, the manifest."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckpt_migrate import __version__
from ckpt_migrate.core.errors import OutputError
from ckpt_migrate.core.migration import RewritingMigration
from ckpt_migrate.core.plan import CheckpointPlan
from ckpt_migrate.execute.tensors import TensorReader, output_tensors
from ckpt_migrate.formats import files
from ckpt_migrate.formats.adapter import ADAPTER_CONFIG, MANIFEST
from ckpt_migrate.formats.files import OnBytes
from ckpt_migrate.formats.safetensors import read_header, write_safetensors

METADATA_KEY = "ckpt_migrate"


def rewrite_file(name: str, plan: CheckpointPlan, target: Path) -> None:
    """Write a file a migration rewrites (rather than copies), with that migration's ``write``."""
    from ckpt_migrate.migrations import by_id

    rewrite = plan.after.rewritten_files[name]
    migration = by_id(rewrite.migration)
    if not isinstance(migration, RewritingMigration):
        raise TypeError(f"migration {rewrite.migration} planned a rewrite of {name} but has no write()")
    migration.write(rewrite, plan.before.source_dir / name, target / name)


def _inputs_by_handling(plan: CheckpointPlan) -> tuple[list[str], list[str], list[str]]:
    """Source files split into (copied byte for byte, read to be rewritten, dropped unread)."""
    before, after = plan.before, plan.after
    adapter = {p + name for p, a in plan.rewritten_adapters for name in (ADAPTER_CONFIG, a.before.weights_file)}
    read_to_rewrite = adapter | {MANIFEST} | set(after.rewritten_files)
    copied = [n for n in sorted(before.files) if n in after.files and n not in read_to_rewrite]
    rewritten = [n for n in sorted(before.files) if n in read_to_rewrite]
    dropped = [n for n in sorted(before.files) if n not in after.files and n not in read_to_rewrite]
    return copied, rewritten, dropped


def bytes_to_process(plan: CheckpointPlan) -> int:
    """Progress total: copied files once, rewritten inputs hashed, the new adapter weights written."""
    copied, rewritten, _ = _inputs_by_handling(plan)
    files = plan.before.files
    written = sum(files[p + a.before.weights_file] for p, a in plan.rewritten_adapters)
    return sum(files[n] for n in copied) + sum(files[n] for n in rewritten) + written


def _thread_safe(on_bytes: OnBytes | None) -> OnBytes | None:
    if on_bytes is None:
        return None
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            on_bytes(n)

    return update


def write_checkpoint(plan: CheckpointPlan, target: Path, on_bytes: OnBytes | None = None) -> dict[str, Any]:
    """Write the repaired checkpoint described by ``plan`` into the empty directory ``target``.

    Files that are dropped are never read. Inputs that are rewritten rather than copied are hashed
    on a second thread while the output is written (hashlib releases the GIL), so the manifest's
    sha256 of inputs costs no extra wall time on a multi-core machine.
    """
    before, after = plan.before, plan.after
    progress = _thread_safe(on_bytes)
    copied, rewritten, dropped = _inputs_by_handling(plan)
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = {name: pool.submit(files.sha256_file, before.source_dir / name, progress) for name in rewritten}
        for name in copied:
            inputs[name] = outputs[name] = files.copy_file(before.source_dir / name, target / name, progress)
        for name in sorted(after.rewritten_files):
            rewrite_file(name, plan, target)
            outputs[name] = files.sha256_file(target / name)
        for prefix, adapter in plan.rewritten_adapters:
            (target / prefix).mkdir(exist_ok=True)
            outputs.update({prefix + n: d for n, d in _write_adapter(adapter, target / prefix, progress).items()})
        inputs.update({name: future.result() for name, future in pending.items()})
    manifest = {
        "tool": "ckpt-migrate",
        "tool_version": __version__,
        "migrations_applied": after.applied,
        "migrations_run": list(plan.migrations),
        "source": str(before.source_dir.resolve()),
        "files_removed": dict(sorted(after.dropped_files.items())),
        "inputs_sha256": dict(sorted(inputs.items())),
        "inputs_not_read_bytes": {name: before.files[name] for name in dropped},
        "outputs_sha256": dict(sorted(outputs.items())),
        "warnings": plan.warnings,
        "losses": plan.losses,
    }
    if plan.adapters:
        manifest["adapters"] = {
            a.relative: {"migrations_applied": a.after.applied, "migrations_run": list(a.migrations)}
            for a in plan.adapters
        }
    files.write_new(target / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    verify_written(plan, target)
    return manifest


def _write_adapter(plan: CheckpointPlan, target: Path, progress: OnBytes | None) -> dict[str, str]:
    """The new adapter weights (copied, folded) and config; their sha256 by file name."""
    after = plan.after
    reader = TensorReader(plan)
    metadata = reader.source_metadata
    record = {"migrations_applied": after.applied, "tool_version": __version__}
    metadata[METADATA_KEY] = json.dumps(record, sort_keys=True)
    tensors = output_tensors(plan, reader)
    config_text = json.dumps(after.config, indent=2, sort_keys=True)
    return {
        after.weights_file: write_safetensors(target / after.weights_file, tensors, metadata, progress),
        ADAPTER_CONFIG: files.write_new(target / ADAPTER_CONFIG, config_text.encode("utf-8")),
    }


def verify_written(plan: CheckpointPlan, target: Path) -> None:
    """Re-read what was written and check it is what the plan said, before it is published."""
    adapters = plan.rewritten_adapters
    expected = set(plan.after.files) | set(plan.after.rewritten_files) | {MANIFEST}
    expected |= {p + name for p, a in adapters for name in (a.after.weights_file, ADAPTER_CONFIG)}
    present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    matches = present == expected
    for prefix, adapter in adapters if matches else []:
        header = read_header(target / prefix / adapter.after.weights_file)
        written = {name: (info.shape, info.dtype) for name, info in header.tensors.items()}
        planned = {name: (t.shape, t.dtype) for name, t in adapter.after.tensors.items()}
        config = json.loads((target / prefix / ADAPTER_CONFIG).read_text())
        matches = matches and written == planned and config == adapter.after.config
    if not matches:
        raise OutputError("written checkpoint does not match the plan; nothing was published", target)
