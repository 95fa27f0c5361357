"""Write one planned checkpoint into an empty directory: copies, rewrites, the new adapter, the manifest."""

from __future__ import annotations

import importlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_migrate import __version__
from ckpt_migrate.core.errors import CkptMigrateError, OutputError, UnreadableInputError
from ckpt_migrate.core.migration import RewritingMigration
from ckpt_migrate.core.plan import CheckpointPlan, OptimizerPolicy, Options, SourceKind
from ckpt_migrate.execute.tensors import TensorReader, numpy_folds, output_tensors
from ckpt_migrate.formats import files
from ckpt_migrate.formats.adapter import ADAPTER_CONFIG, BIN_WEIGHTS, MANIFEST, SAFETENSORS_WEIGHTS
from ckpt_migrate.formats.digests import Hashes, OnBytes
from ckpt_migrate.formats.safetensors import read_header, write_safetensors
from ckpt_migrate.formats.trainer_files import rewritten_adapter_files
from ckpt_migrate.progress import Budget

METADATA_KEY = "ckpt_migrate"


def rewrite_file(
    name: str, plan: CheckpointPlan, target: Path, on_bytes: OnBytes | None = None
) -> Callable[[], str] | None:
    """Write a file a migration rewrites (rather than copies), with that migration's ``write``: what gives
    the sha256 of the file written when the migration hashes it while writing it, else None."""
    from ckpt_migrate.migrations import by_id

    rewrite = plan.after.rewritten_files[name]
    migration = by_id(rewrite.migration)
    if not isinstance(migration, RewritingMigration):
        raise TypeError(f"migration {rewrite.migration} planned a rewrite of {name} but has no write()")
    return migration.write(rewrite, plan.before.source_dir / name, target / name, on_bytes)


def _inputs_by_handling(plan: CheckpointPlan) -> tuple[list[str], list[str], list[str]]:
    """Source files split into (copied byte for byte, read to be rewritten, dropped unread)."""
    before, after = plan.before, plan.after
    read_to_rewrite = rewritten_adapter_files(plan) | {MANIFEST} | set(after.rewritten_files)
    copied = [n for n in sorted(before.files) if n in after.files and n not in read_to_rewrite]
    rewritten = [n for n in sorted(before.files) if n in read_to_rewrite]
    dropped = [n for n in sorted(before.files) if n not in after.files and n not in read_to_rewrite]
    return copied, rewritten, dropped


def bytes_to_process(plan: CheckpointPlan) -> int:
    """Progress total: every input read is hashed, every output written and hashed (the new adapter
    and rewritten files counted at their source's size)."""
    copied, rewritten, _ = _inputs_by_handling(plan)
    files = plan.before.files
    weights = sum(files[p + a.before.weights_file] for p, a in plan.rewritten_adapters if a.weights_changed)
    rewrites = sum(files.get(n, 0) for n in plan.after.rewritten_files)
    return sum(files[n] for n in copied + rewritten) + 2 * sum(files[n] for n in copied) + 2 * weights + rewrites


def _thread_safe(on_bytes: OnBytes | None) -> OnBytes | None:
    if on_bytes is None:
        return None
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            on_bytes(n)

    return update


def needs_torch(plan: CheckpointPlan) -> bool:
    """Whether writing the plan imports torch: a rewritten pickle (but an RNG state), a ``.bin`` adapter, a
    migration's ``compute``,
    or a fold numpy cannot do (a LoRA fold of safetensors tensors is computed with numpy, see fold_numpy.py)."""
    from ckpt_migrate.migrations.m0004_portable_rng_state import ID as PORTABLE_RNG_STATE

    # a rewritten pickle imports torch, but an RNG state (pickled without it, see m0004)
    rewrites = plan.after.rewritten_files.items()
    if any(not name.endswith(".json") and r.migration != PORTABLE_RNG_STATE for name, r in rewrites):
        return True
    for _, adapter in plan.rewritten_adapters:
        tensors = adapter.after.tensors.values()
        if any(t.source.kind is SourceKind.COMPUTED for t in tensors):
            return True
        folds = [t for t in tensors if t.source.kind is SourceKind.FOLD]
        if folds and adapter.before.weights_file != SAFETENSORS_WEIGHTS:
            return True  # torch loads a .bin adapter
        if folds:
            reader = TensorReader.of(adapter)
            if not all(numpy_folds(reader, t) for t in folds):
                return True
    return False


def _import_torch_meanwhile(plan: CheckpointPlan) -> threading.Thread | None:
    """When the plan needs torch (:func:`needs_torch`), start importing it (seconds) while the kernel copies and
    the hashes run; whoever imports it next waits for this import instead of starting anew."""
    if "torch" in sys.modules or not needs_torch(plan):
        return None
    thread = threading.Thread(target=importlib.import_module, args=("torch",), name="import torch")
    thread.start()
    return thread


def write_checkpoint(
    plan: CheckpointPlan, target: Path, on_bytes: OnBytes | None = None, hashes: Hashes | None = None
) -> dict[str, Any]:
    """Write the repaired checkpoint described by ``plan`` into the empty directory ``target``.

    Files that are dropped are never read (a hash started ahead for one is abandoned). Unchanged bytes
    are copied by the kernel, so the sha256 of the manifest needs reads of its own: inputs are hashed on
    ``hashes``' threads (the caller may have started them while planning), outputs from the file itself
    while it is written (or, for a file a migration rewrote, right after), all overlapping the copies and
    fsyncs. A copied file whose output hash differs from its input hash changed while it was copied:
    nothing is published.
    """
    own = hashes is None
    hashes = Hashes() if hashes is None else hashes
    try:
        return _write_checkpoint(plan, target, _thread_safe(on_bytes), hashes)
    except BaseException:
        hashes.forget_under(plan.before.source_dir)
        hashes.forget_under(target)
        raise
    finally:
        if own:
            hashes.close()


def _write_checkpoint(plan: CheckpointPlan, target: Path, progress: OnBytes | None, hashes: Hashes) -> dict[str, Any]:
    before, after = plan.before, plan.after
    source = before.source_dir
    copied, rewritten, dropped = _inputs_by_handling(plan)
    for name in dropped:
        hashes.forget(source / name)
    for name in copied + rewritten:
        hashes.start(source / name, progress)
    importing = _import_torch_meanwhile(plan)
    outputs: dict[str, str] = {}
    hashed_while_written: dict[str, Callable[[], str]] = {}
    # what a rewrite writes and hashes differs from the estimate bytes_to_process counts: held to it exactly
    budgets: dict[str, Budget] = {}
    for size, kind, name in _largest_first(plan, copied):
        if kind == "copy":
            outputs[name] = files.copy_file(source / name, target / name, progress)
        elif kind == "rewrite":
            budgets[name] = Budget(progress, size)
            digest = rewrite_file(name, plan, target, budgets[name])
            if digest is None:
                hashes.start(target / name, budgets[name])
            else:
                hashed_while_written[name] = digest
        else:  # an adapter, at the top ("") or in a subfolder ("task_b/")
            adapter = dict(plan.rewritten_adapters)[name]
            budgets[name] = Budget(progress, 2 * size if adapter.weights_changed else 0)
            (target / name).mkdir(exist_ok=True)
            outputs.update({name + n: d for n, d in _write_adapter(adapter, target / name, budgets[name]).items()})
    inputs = {name: hashes.result(source / name, progress) for name in copied + rewritten}
    outputs.update({name: digest() for name, digest in hashed_while_written.items()})
    outputs.update(
        {name: hashes.result(target / name, budgets.get(name)) for name in after.rewritten_files if name not in outputs}
    )
    for budget in budgets.values():
        budget.finish()
    if importing is not None:
        importing.join()
    for name in copied:
        if inputs[name] != outputs[name]:
            raise UnreadableInputError("changed while it was copied (sha256 of source and copy differ)", source / name)
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


def _largest_first(plan: CheckpointPlan, copied: list[str]) -> list[tuple[int, str, str]]:
    """(source size, kind, name) of every file to write, largest first: the big writes start while torch is
    still being imported (the fold, at the adapter's end, waits for it), and the hash of a big rewritten
    file (computed after it is written) overlaps the writes that follow."""
    sizes = plan.before.files
    jobs = [(sizes.get(name, 0), "rewrite", name) for name in sorted(plan.after.rewritten_files)]
    jobs += [(sizes[name], "copy", name) for name in copied]
    for prefix, adapter in plan.rewritten_adapters:
        jobs.append((sizes.get(prefix + (adapter.before.weights_file or ""), 0), "adapter", prefix))
    return sorted(jobs, key=lambda job: -job[0])


def _write_adapter(plan: CheckpointPlan, target: Path, progress: OnBytes | None) -> dict[str, str]:
    """Of the adapter's weights (tensors copied, folded) and config, the ones that change; their sha256 by file name.

    The other is in the checkpoint's byte-for-byte copies."""
    after = plan.after
    written: dict[str, str] = {}
    if plan.config_changed:
        config_text = json.dumps(after.config, indent=2, sort_keys=True)
        written[ADAPTER_CONFIG] = files.write_new(target / ADAPTER_CONFIG, config_text.encode("utf-8"))
    if plan.weights_changed:
        reader = TensorReader.of(plan)
        metadata = reader.source_metadata
        record = {"migrations_applied": after.applied, "tool_version": __version__}
        metadata[METADATA_KEY] = json.dumps(record, sort_keys=True)
        tensors = output_tensors(plan.after.tensors.values(), reader)
        phase = reader.source_data_start
        written[after.weights_file] = write_safetensors(target / after.weights_file, tensors, metadata, progress, phase)
    return written


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


def hash_ahead(src: Path, options: Options, hashes: Hashes) -> None:
    """Start hashing (for the manifest) the big inputs a repair surely reads: the adapter weights, and
    ``optimizer.pt`` when it is to be remapped. The hashes run while the checkpoints are planned; those of
    checkpoints that are not written, or of files that end up dropped, are abandoned."""
    from ckpt_migrate.formats.checkpoint import find_checkpoints
    from ckpt_migrate.migrations.m0003_drop_stale_optimizer import OPTIMIZER_FILE

    names = [SAFETENSORS_WEIGHTS, BIN_WEIGHTS] + [OPTIMIZER_FILE] * (options.optimizer is OptimizerPolicy.REMAP)
    try:
        relatives = find_checkpoints(src)
    except CkptMigrateError:
        return  # planning reports it
    for relative in relatives:
        for name in names:
            if (src / relative / name).is_file():
                hashes.start(src / relative / name)
