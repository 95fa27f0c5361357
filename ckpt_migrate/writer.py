"""Execute a plan: compute folded tensors, stream everything else, publish atomically.

Output is written into a staging directory beside the target, fsynced, verified against the plan,
then renamed into place, so the target either holds a complete checkpoint or does not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckpt_migrate import __version__
from ckpt_migrate.checkpoint import ADAPTER_CONFIG, MANIFEST, SAFETENSORS_WEIGHTS, load_bin_tensors
from ckpt_migrate.errors import OutputError
from ckpt_migrate.plan import CheckpointPlan, FileRewrite, PlannedTensor
from ckpt_migrate.safetensors_io import COPY_CHUNK_BYTES, CopyFrom, OutputTensor, read_header, write_safetensors

STAGING_MARK = ".ckpt-migrate-staging-"
METADATA_KEY = "ckpt_migrate"
OnBytes = Callable[[int], None]


def _dtype(name: str):
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        # every dtype read_header accepts must be foldable/convertible, or a fold dies with a KeyError
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E4M3": torch.float8_e4m3fn,
    }[name]


def tensor_bytes(tensor) -> bytes:
    """The little-endian bytes safetensors stores for ``tensor`` (works for bfloat16 too)."""
    return tensor.contiguous().reshape(-1).view(_dtype("U8")).numpy().tobytes()


def _from_bytes(raw: bytes, dtype: str, shape: tuple[int, ...]):
    import torch

    if not raw:
        return torch.empty(shape, dtype=_dtype(dtype))
    return torch.frombuffer(bytearray(raw), dtype=_dtype(dtype)).reshape(shape)


class TensorReader:
    """Reads the few tensors a fold needs: from the adapter or the base model, never whole files."""

    def __init__(self, plan: CheckpointPlan):
        self.plan = plan
        source_weights = plan.before.source_dir / plan.before.weights_file
        self._bin = load_bin_tensors(source_weights) if plan.before.weights_file != SAFETENSORS_WEIGHTS else None
        self._header = read_header(source_weights) if self._bin is None else None

    @property
    def source_metadata(self) -> dict[str, str]:
        return dict(self._header.metadata) if self._header is not None else {"format": "pt"}

    def adapter(self, name: str):
        if self._bin is not None:
            return self._bin[name]
        info = self._header.tensors[name]
        return _from_bytes(self._header.read_bytes(name), info.dtype, info.shape)

    def base(self, name: str):
        header, info = self.plan.after.base_model.locate(name)
        return _from_bytes(header.read_bytes(name), info.dtype, info.shape)

    def copy_source(self, tensor: PlannedTensor) -> bytes | CopyFrom:
        """Where an output tensor that is not computed gets its bytes."""
        source = tensor.source
        if source.kind == "base":
            header, info = self.plan.after.base_model.locate(source.tensor)
            return CopyFrom(header.path, header.data_start + info.begin, info.nbytes)
        if self._bin is not None:
            return tensor_bytes(self._bin[source.tensor])
        info = self._header.tensors[source.tensor]
        return CopyFrom(self._header.path, self._header.data_start + info.begin, info.nbytes)


def fold(reader: TensorReader, tensor: PlannedTensor):
    """``W + s * B @ A`` (with DoRA, rows rescaled to the learned magnitude), in float64, cast back."""
    import torch

    source = tensor.source
    weight = reader.base(source.tensor) if source.weight_kind == "base" else reader.adapter(source.tensor)
    out_in = weight.double().T if source.fan_in_fan_out else weight.double()
    lora_a, lora_b = reader.adapter(source.lora_A).double(), reader.adapter(source.lora_B).double()
    merged = out_in + source.scale * (lora_b @ lora_a)
    if source.magnitude:
        magnitude = reader.adapter(source.magnitude).double().reshape(-1)
        merged = (magnitude / torch.linalg.norm(merged, dim=1))[:, None] * merged
    if source.fan_in_fan_out:
        merged = merged.T
    return merged.to(weight.dtype)


def _output_tensors(plan: CheckpointPlan, reader: TensorReader) -> list[OutputTensor]:
    outputs = []
    for tensor in plan.after.tensors.values():
        data = tensor_bytes(fold(reader, tensor)) if tensor.source.kind == "fold" else reader.copy_source(tensor)
        outputs.append(OutputTensor(tensor.name, tensor.dtype, tensor.shape, data))
    return outputs


def sha256_file(path: Path, on_bytes: OnBytes | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def copy_file(source: Path, target: Path, on_bytes: OnBytes | None = None) -> str:
    """Copy a file's bytes (never interpreting them), fsync it, and return its sha256."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(COPY_CHUNK_BYTES):
            dst.write(chunk)
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _write_text(path: Path, text: str) -> str:
    data = text.encode("utf-8")
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def rewrite_file(rewrite: FileRewrite, source: Path, target: Path) -> None:
    """Write a file a migration rewrites (rather than copies), by the rewrite's kind."""
    if rewrite.kind == "optimizer_remap":
        from ckpt_migrate.optimizer_remap import write_remapped

        write_remapped(source, target, rewrite)
    elif rewrite.kind == "portable_rng_state":
        from ckpt_migrate.rng_state import write_portable_rng_state

        write_portable_rng_state(source, target, rewrite)
    else:
        raise ValueError(f"no writer for file rewrite kind {rewrite.kind!r}")


def _inputs_by_handling(plan: CheckpointPlan) -> tuple[list[str], list[str], list[str]]:
    """Source files split into (copied byte for byte, read to be rewritten, dropped unread)."""
    before, after = plan.before, plan.after
    read_to_rewrite = {ADAPTER_CONFIG, before.weights_file, MANIFEST} | set(after.rewritten_files)
    copied = [n for n in sorted(before.files) if n in after.files and n not in read_to_rewrite]
    rewritten = [n for n in sorted(before.files) if n in read_to_rewrite]
    dropped = [n for n in sorted(before.files) if n not in after.files and n not in read_to_rewrite]
    return copied, rewritten, dropped


def bytes_to_process(plan: CheckpointPlan) -> int:
    """Progress total: copied files once, rewritten inputs hashed, the new adapter weights written."""
    copied, rewritten, _ = _inputs_by_handling(plan)
    files = plan.before.files
    return sum(files[n] for n in copied) + sum(files[n] for n in rewritten) + files[plan.before.weights_file]


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
        pending = {name: pool.submit(sha256_file, before.source_dir / name, progress) for name in rewritten}
        for name in copied:
            inputs[name] = outputs[name] = copy_file(before.source_dir / name, target / name, progress)
        for name, rewrite in sorted(after.rewritten_files.items()):
            rewrite_file(rewrite, before.source_dir / name, target / name)
            outputs[name] = sha256_file(target / name)
        reader = TensorReader(plan)
        metadata = reader.source_metadata
        record = {"migrations_applied": after.applied, "tool_version": __version__}
        metadata[METADATA_KEY] = json.dumps(record, sort_keys=True)
        outputs[after.weights_file] = write_safetensors(
            target / after.weights_file, _output_tensors(plan, reader), metadata, progress
        )
        config_text = json.dumps(after.config, indent=2, sort_keys=True)
        outputs[ADAPTER_CONFIG] = _write_text(target / ADAPTER_CONFIG, config_text)
        inputs.update({name: future.result() for name, future in pending.items()})
    manifest = {
        "tool": "ckpt-migrate",
        "tool_version": __version__,
        "migrations_applied": after.applied,
        "migrations_run": plan.migrations,
        "source": str(before.source_dir.resolve()),
        "files_removed": dict(sorted(after.dropped_files.items())),
        "inputs_sha256": dict(sorted(inputs.items())),
        "inputs_not_read_bytes": {name: before.files[name] for name in dropped},
        "outputs_sha256": dict(sorted(outputs.items())),
        "warnings": after.warnings,
    }
    _write_text(target / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    verify_written(plan, target)
    return manifest


def verify_written(plan: CheckpointPlan, target: Path) -> None:
    """Re-read what was written and check it is what the plan said, before it is published."""
    header = read_header(target / plan.after.weights_file)
    written = {name: (info.shape, info.dtype) for name, info in header.tensors.items()}
    planned = {name: (t.shape, t.dtype) for name, t in plan.after.tensors.items()}
    config = json.loads((target / ADAPTER_CONFIG).read_text())
    if written != planned or config != plan.after.config:
        raise OutputError("written checkpoint does not match the plan; nothing was published", target)


def fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging directories a killed earlier run left beside ``out``."""
    removed = []
    prefix = f".{out.name}{STAGING_MARK}"
    for candidate in out.parent.iterdir():  # not glob(): --out names may contain [, * or ?
        pid_text = candidate.name[len(prefix) :]
        if not candidate.name.startswith(prefix) or not pid_text.isdigit():
            continue
        # our own pid cannot own a staging dir yet: it was left by an earlier process that had this pid
        if candidate.is_dir() and (int(pid_text) == os.getpid() or not _pid_alive(int(pid_text))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def earlier_batch_output(src: Path, out: Path) -> set[str]:
    """Checkpoints an earlier ``fix`` of the run directory ``src`` already published into ``out``.

    Non-empty only when every entry of ``out`` is such a checkpoint (its manifest names the same
    source), so a repeated batch adds the new checkpoints and never touches anything else.
    """
    done: set[str] = set()
    try:
        entries = list(out.iterdir()) if out.is_dir() else []
    except OSError:
        return set()
    for entry in entries:
        manifest = entry / MANIFEST
        try:
            source = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
        except (OSError, ValueError, AttributeError):
            return set()
        if not entry.is_dir() or source is None or Path(source) != (src / entry.name).resolve():
            return set()
        done.add(entry.name)
    return done


def check_output_target(src: Path, out: Path, allow_earlier_batch: bool = False) -> None:
    """Refuse an output that would overwrite data or land inside the source.

    With ``allow_earlier_batch``, ``out`` may hold checkpoints an earlier batch run published.
    """
    try:
        src_resolved, out_resolved = src.resolve(), out.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise OutputError(f"cannot resolve the path ({exc})", out) from exc
    if out_resolved == src_resolved or out_resolved.is_relative_to(src_resolved):
        raise OutputError("--out must not be the source or inside it", out)
    if src_resolved.is_relative_to(out_resolved):
        raise OutputError("--out must not contain the source", out)
    try:
        occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError as exc:
        raise OutputError(f"cannot inspect the output directory: {exc.strerror or exc}", out) from exc
    if occupied and not (allow_earlier_batch and earlier_batch_output(src, out)):
        raise OutputError("--out exists and is not an empty directory; refusing to overwrite", out)
    if not out_resolved.parent.is_dir():
        problem = "is not a directory" if out_resolved.parent.exists() else "does not exist"
        raise OutputError(f"parent directory {problem}", out_resolved.parent)
    if not os.access(out_resolved.parent, os.W_OK):
        raise OutputError("parent directory is not writable", out_resolved.parent)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success fsync and rename it to ``out``, else remove it.

    If ``out`` is a non-empty directory (an earlier batch's output), each staged entry is renamed
    into it instead; entries are never replaced.
    """
    out = out.resolve()
    remove_stale_staging(out)
    staging = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create staging directory: {exc.strerror}", staging) from exc
    try:
        yield staging
        fsync_tree(staging)
        if out.is_dir() and any(out.iterdir()):
            for entry in sorted(staging.iterdir()):
                if (out / entry.name).exists():
                    raise OutputError("already exists; refusing to overwrite", out / entry.name)
                os.rename(entry, out / entry.name)
            staging.rmdir()
        else:
            os.rename(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"writing failed: {exc.strerror or exc}", exc.filename or out) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Published: --out is complete. Making the rename durable is best effort; failing it must not report
    # "nothing was published" nor remove anything.
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
