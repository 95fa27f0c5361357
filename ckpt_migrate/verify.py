"""Check that a LoRA checkpoint loads into a working model with the installed transformers and peft.

Works on any LoRA checkpoint, repaired by this tool or not:

* the adapter must load with ``PeftModel.from_pretrained`` onto the base model (the Auto class is
  chosen from the base ``config.json`` ``architectures``, else from the adapter's ``task_type``);
* every adapter tensor must be used, and every LoRA / modules_to_save tensor the config implies
  must be present;
* nothing on the forward path may be left to random initialisation: the model is loaded twice
  under different torch seeds and the logits on fixed random token ids compared; parameters that
  differ between the two loads are reported as random;
* with ``source_dir`` (the broken original), the source's own function is computed independently
  of the fold -- base model + body LoRA through peft, every LoRA-wrapped head computed unmerged as
  ``W x + b + s * B (A x)`` (DoRA: ``m / ||W + s B A||_row * (W x + s B A x) + b``) -- and the
  checkpoint's logits must agree with it within the dtype tolerance (fp32 1e-4, bf16/fp16 1e-2).

Only :func:`verify_checkpoint` imports torch, transformers and peft.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckpt_migrate.checkpoint import SAFETENSORS_WEIGHTS, load_bin_tensors, load_state, read_json_object
from ckpt_migrate.errors import EXIT_VERIFY_FAILED, UnreadableInputError
from ckpt_migrate.peft_layout import (
    LORA_KINDS,
    PREFIX,
    WRAPPER_SEGMENTS,
    head_root,
    lora_scale,
    parse_lora_key,
    rank_and_alpha,
    strip_prefix,
    wrapper_root,
)
from ckpt_migrate.plan import CheckpointState

#: Suggested exit code of ``ckpt-migrate verify`` (and ``fix --verify``) when the verdict is a failure.

SEEDS = (1234, 98765)
INPUT_SEED = 20240917
BATCH = 2
SEQ_LEN = 16
#: Allowed max |logit difference| against the source, by model dtype.
TOLERANCES = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
#: Two loads count as identical when their logits differ by at most this fraction of the tolerance.
REPRODUCIBLE_FRACTION = 0.01
_MAX_LISTED = 8

_HEAD_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
)
_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


@dataclass
class VerifyResult:
    """The verdict on one checkpoint. ``ok`` is true exactly when ``reasons`` is empty."""

    ok: bool
    reasons: list[str]
    max_logit_diff_between_loads: float
    random_parameters: list[str]
    unused_tensors: list[str]
    missing_tensors: list[str]
    max_logit_diff_vs_source: float | None
    notes: list[str] = field(default_factory=list)
    checkpoint: str = ""
    base_model: str = ""
    source: str | None = None
    model_class: str = ""
    dtype: str = ""
    tolerance: float = 0.0
    peft_version: str = ""
    transformers_version: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else EXIT_VERIFY_FAILED

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (non-finite numbers become ``None``)."""
        data = asdict(self)
        for key in ("max_logit_diff_between_loads", "max_logit_diff_vs_source"):
            value = data[key]
            if value is not None and not math.isfinite(value):
                data[key] = None
        return data

    def render_text(self) -> str:
        """A short verdict: OK/FAILED, the reasons, and the numbers."""
        head = "OK" if self.ok else "FAILED"
        lines = [f"{head}: {self.checkpoint} on base model {self.base_model} ({self.model_class}, {self.dtype})"]
        lines += [f"  - {reason}" for reason in self.reasons]
        between = self.max_logit_diff_between_loads
        if math.isfinite(between):
            lines.append(f"  max |logit diff| between two loads (seeds {SEEDS[0]}, {SEEDS[1]}): {between:.3g}")
        else:
            lines.append("  max |logit diff| between two loads: not measured")
        if self.source is not None:
            if self.max_logit_diff_vs_source is None:
                lines.append(f"  vs source {self.source}: not checked")
            else:
                lines.append(
                    f"  max |logit diff| vs source {self.source}: {self.max_logit_diff_vs_source:.3g} "
                    f"(tolerance {self.tolerance:g})"
                )
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  (transformers {self.transformers_version}, peft {self.peft_version})")
        return "\n".join(lines)


def verify_checkpoint(
    checkpoint_dir: str | Path,
    base_model_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
) -> VerifyResult:
    """Load ``checkpoint_dir`` onto ``base_model_dir`` with the installed peft and judge it.

    Raises :class:`~ckpt_migrate.errors.UnreadableInputError` for inputs that cannot be read
    (missing directories, invalid configs, a base model transformers cannot load); everything
    wrong with the checkpoint itself is a failed verdict with its reasons.

    >>> verify_checkpoint("fixed/checkpoint-500", "bart-base", source_dir="run/checkpoint-500").ok  # doctest: +SKIP
    True
    """
    checkpoint = _adapter_dir(checkpoint_dir, "checkpoint")
    base_dir = Path(base_model_dir)
    if not base_dir.is_dir():
        raise UnreadableInputError("base model directory not found", base_dir)
    base_config = read_json_object(base_dir / "config.json")
    state = load_state(checkpoint)
    source = _adapter_dir(source_dir, "source") if source_dir is not None else None
    source_state = load_state(source) if source is not None else None
    auto_name = choose_auto_class(base_config, state.config, base_dir / "config.json")

    import peft
    import transformers

    result = VerifyResult(
        ok=False,
        reasons=[],
        max_logit_diff_between_loads=math.nan,
        random_parameters=[],
        unused_tensors=[],
        missing_tensors=[],
        max_logit_diff_vs_source=None,
        checkpoint=str(checkpoint),
        base_model=str(base_dir),
        source=str(source) if source is not None else None,
        model_class=auto_name,
        peft_version=peft.__version__,
        transformers_version=transformers.__version__,
    )
    with _quiet(), _preserved_rng():
        _run_checks(result, checkpoint, state, base_dir, auto_name, source, source_state)
    result.ok = not result.reasons
    return result


def compute_source_logits(source_dir: str | Path, base_model_dir: str | Path, input_ids: Any) -> tuple[Any, str]:
    """A checkpoint's own logits on ``input_ids``, every LoRA-wrapped head computed unmerged.

    Returns ``(logits, "")``, or ``(None, why)`` when the source's function cannot be computed
    independently (e.g. its head base weights are random). ``verify_checkpoint(..., source_dir=)``
    compares against exactly this.
    """
    source = _adapter_dir(source_dir, "source")
    base_dir = Path(base_model_dir)
    if not base_dir.is_dir():
        raise UnreadableInputError("base model directory not found", base_dir)
    state = load_state(source)
    auto_name = choose_auto_class(read_json_object(base_dir / "config.json"), state.config, base_dir / "config.json")
    with _quiet(), _preserved_rng():
        return _source_logits(source, state, base_dir, auto_name, input_ids)


def choose_auto_class(base_config: dict[str, Any], adapter_config: dict[str, Any], where: Path | None = None) -> str:
    """The transformers Auto class for the base: from ``architectures``, else the adapter's ``task_type``."""
    architectures = base_config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise UnreadableInputError("'architectures' must be a list of class names", where)
    for architecture in architectures:
        for suffix, auto_name in _HEAD_CLASSES:
            if architecture.endswith(suffix):
                return auto_name
    task_type = adapter_config.get("task_type")
    if task_type in _TASK_CLASSES:
        return _TASK_CLASSES[task_type]
    raise UnreadableInputError(
        f"cannot tell which model to load: architectures {architectures} has no sequence/token classification or "
        f"question answering class and the adapter's task_type is {task_type!r}",
        where,
    )


# --------------------------------------------------------------------------- inputs and environment


def _adapter_dir(path: str | Path, what: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise UnreadableInputError(f"{what} directory not found", directory)
    if not directory.is_dir():
        raise UnreadableInputError(f"{what} is not a directory (expected an adapter checkpoint directory)", directory)
    return directory


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers/peft chatter (progress bars, missing-key warnings); restore it afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    import torch

    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and exc.args:
        text = repr(exc.args[0])
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _short(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _load_base(base_dir: Path, auto_name: str, seed: int) -> tuple[Any, set[str]]:
    """The base model (weights as saved, eval mode) and the names transformers had to initialise."""
    import torch
    import transformers

    torch.manual_seed(seed)
    auto_class = getattr(transformers, auto_name)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model, info = auto_class.from_pretrained(str(base_dir), output_loading_info=True, **{dtype_kw: "auto"})
    except Exception as exc:  # noqa: BLE001 - any failure to load the base is an input problem
        raise UnreadableInputError(
            f"transformers {transformers.__version__} cannot load it as {auto_name}: {_one_line(exc)}", base_dir
        ) from exc
    return model.eval(), set(info.get("missing_keys") or [])


def _probe_inputs(model: Any) -> Any:
    """Seeded random token ids (``BATCH x SEQ_LEN``), inside the vocabulary, avoiding special tokens."""
    import torch

    config = model.config
    vocab = model.get_input_embeddings().num_embeddings
    if isinstance(getattr(config, "vocab_size", None), int):
        vocab = min(vocab, config.vocab_size)
    special: set[int] = set()
    for attr in (
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "cls_token_id",
        "decoder_start_token_id",
        "unk_token_id",
        "mask_token_id",
    ):
        value = getattr(config, attr, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int):
                special.add(item)
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    length = SEQ_LEN
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 8:
        length = min(length, positions - 4)
    generator = torch.Generator().manual_seed(INPUT_SEED)
    ids = allowed[torch.randint(0, len(allowed), (BATCH, length), generator=generator)]
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if getattr(config, "is_encoder_decoder", False) and isinstance(eos, int):
        ids[:, -1] = eos  # BART/T5 classification heads pool the <eos> position
    return ids


def _logits(model: Any, input_ids: Any) -> Any:
    """Logits for each row separately (decoder classifiers without a pad token refuse batches)."""
    import torch

    rows = []
    with torch.no_grad():
        for row in input_ids:
            ids = row.unsqueeze(0)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            if getattr(out, "logits", None) is not None:
                value = out.logits
            elif getattr(out, "start_logits", None) is not None:
                value = torch.stack([out.start_logits, out.end_logits], dim=-1)
            else:
                value = next(v for v in out.to_tuple() if isinstance(v, torch.Tensor))
            rows.append(value.detach().float().cpu())
    return torch.cat(rows)


def _fingerprint(tensor: Any) -> str:
    """Shape, dtype, sum, sum of squares and a few values: equal for equal tensors, different for re-inits."""
    import torch

    with torch.no_grad():
        flat = tensor.detach().reshape(-1)
        values = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        stats = (values.sum().item(), torch.dot(values, values).item(), values[:4].tolist(), values[-4:].tolist())
    return repr((tuple(tensor.shape), str(tensor.dtype), stats))


@dataclass
class _Probe:
    logits: Any
    fingerprints: dict[str, str]
    on_path: set[str]


def _probe(model: Any, input_ids: Any) -> _Probe:
    """Logits, a fingerprint of every parameter/buffer, and which of them the forward pass used."""
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, _i, _o: called.add(id(mod))) for m in model.modules()]
    try:
        logits = _logits(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    names: dict[int, str] = {}
    on_path_ids: set[int] = set()
    fingerprints: dict[str, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None:
                continue
            key = id(tensor)
            if key not in names:
                names[key] = _short(f"{module_name}.{attr}" if module_name else attr)
                fingerprints[names[key]] = _fingerprint(tensor)
            if id(module) in called:
                on_path_ids.add(key)
    return _Probe(logits, fingerprints, {names[k] for k in on_path_ids})


# --------------------------------------------------------------------------- the checks


def _explain_load_failure(exc: BaseException, state: CheckpointState, result: VerifyResult) -> str:
    import peft

    reason = f"the adapter does not load with peft {peft.__version__}: {_one_line(exc)}"
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and exc.args[0].startswith(PREFIX):
        result.missing_tensors.append(exc.args[0])
        reason += f" (the adapter file has no {exc.args[0]}, which its modules_to_save entry requires)"
    wrapped = sorted({root for k in state.tensors if (p := parse_lora_key(k)) and (root := wrapper_root(p.module))})
    if wrapped:
        reason += (
            f"; {', '.join(wrapped)} {'was' if len(wrapped) == 1 else 'were'} saved wrapped by both LoRA and "
            "modules_to_save (peft <= 0.12, huggingface/peft#2027): repair it with `ckpt-migrate fix`"
        )
    return reason


def _adapter_name_free(key: str, adapter: str) -> str:
    """A loaded state-dict key as the adapter file names it (adapter name and wrapper copy removed)."""
    key = key.replace(f".modules_to_save.{adapter}.", ".")
    key = key.replace(f".{adapter}.", ".")
    return key[: -len(adapter) - 1] if key.endswith(f".{adapter}") else key


def _head_note(problem: Any) -> str:
    if problem.kind == "lora":
        return (
            f"head {problem.head!r} carries LoRA (on {', '.join(problem.names)}) over frozen weights the adapter "
            "does not save: it is right only with a base holding exactly the head weights training started from; "
            "`ckpt-migrate fix --base-model` folds them into the adapter"
        )
    return problem.message


def _key_check(model: Any, checkpoint: Path, result: VerifyResult) -> None:
    """Unused and missing adapter tensors, as peft's own loading sees them."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    adapter = "default"
    weights = load_peft_weights(str(checkpoint), device="cpu")
    try:
        loaded = set_peft_model_state_dict(model, dict(weights), adapter_name=adapter)  # same values again
    except Exception as exc:  # noqa: BLE001 - from_pretrained just did the same; report, do not crash
        result.reasons.append(f"reloading the adapter tensors failed: {_one_line(exc)}")
        return
    for key in loaded.unexpected_keys:
        name = _adapter_name_free(key, adapter)
        result.unused_tensors.append(name if name in weights else key)
    for key in loaded.missing_keys:
        if f".{adapter}" in key and ("lora_" in key or ".modules_to_save." in key):
            result.missing_tensors.append(_adapter_name_free(key, adapter))
    saved = set(get_peft_model_state_dict(model, adapter_name=adapter))
    stray = sorted(k for k in set(weights) - saved - set(result.unused_tensors) if not any(s in k for s in LORA_KINDS))
    if stray:
        result.notes.append(
            f"adapter tensors {_listed(stray)} were loaded into base-model parameters the adapter config does not "
            "declare (peft would not save them again)"
        )


def _run_checks(
    result: VerifyResult,
    checkpoint: Path,
    state: CheckpointState,
    base_dir: Path,
    auto_name: str,
    source: Path | None,
    source_state: CheckpointState | None,
) -> None:
    from peft import PeftModel

    from ckpt_migrate.guard import find_head_problems

    probes: list[_Probe] = []
    input_ids = None
    for index, seed in enumerate(SEEDS):
        base, _ = _load_base(base_dir, auto_name, seed)
        if input_ids is None:
            input_ids = _probe_inputs(base)
            dtype = str(base.dtype).replace("torch.", "")
            result.dtype = dtype
            result.tolerance = TOLERANCES.get(dtype, 1e-4)
        try:
            model = PeftModel.from_pretrained(base, str(checkpoint)).eval()
        except Exception as exc:  # noqa: BLE001 - a load failure is the verdict, not a crash
            result.reasons.append(_explain_load_failure(exc, state, result))
            if source is not None:
                result.notes.append("not compared with the source: the checkpoint does not load")
            return
        if index == 0:
            _key_check(model, checkpoint, result)
            try:
                for problem in find_head_problems(model, base_model_dir=base_dir):
                    # A LoRA-carrying head is the broken shape itself (reproducible only with this exact base).
                    (result.reasons if problem.kind == "lora" else result.notes).append(_head_note(problem))
            except Exception as exc:  # noqa: BLE001 - the guard is advisory here
                result.notes.append(f"head check skipped: {_one_line(exc)}")
        probes.append(_probe(model, input_ids))
        del model, base

    first, second = probes
    between = (first.logits - second.logits).abs().max().item() if first.logits.numel() else 0.0
    result.max_logit_diff_between_loads = between
    differing = sorted(n for n in first.fingerprints if first.fingerprints[n] != second.fingerprints.get(n))
    on_path = [n for n in differing if n in first.on_path or n in second.on_path]
    reproducible = between <= result.tolerance * REPRODUCIBLE_FRACTION
    if on_path or not reproducible:
        result.random_parameters = on_path or differing
        listed = _listed(result.random_parameters) if result.random_parameters else "none identified"
        result.reasons.append(
            f"random parameters found: two loads under different seeds differ (max |logit diff| {between:.3g}); "
            f"re-initialised on every load: {listed}"
        )
    elif differing:
        result.notes.append(f"parameters off the forward path differ between loads (harmless): {_listed(differing)}")
    if result.unused_tensors:
        result.reasons.append(f"adapter tensors not used by the model: {_listed(result.unused_tensors)}")
    if result.missing_tensors:
        result.reasons.append(f"tensors the adapter config implies are missing: {_listed(result.missing_tensors)}")

    if source is not None and source_state is not None:
        source_logits, why = _source_logits(source, source_state, base_dir, auto_name, input_ids)
        if source_logits is None:
            result.notes.append(f"not independently checked against the source: {why}")
        else:
            diff = (first.logits - source_logits).abs().max().item()
            result.max_logit_diff_vs_source = diff
            if not diff <= result.tolerance:
                result.reasons.append(
                    f"logits differ from the source checkpoint's by {diff:.3g} (tolerance {result.tolerance:g})"
                )


# --------------------------------------------------------------------------- the source, computed unmerged


def _unmerged_module_class() -> type:
    import torch
    import torch.nn.functional as F

    class UnmergedLoraLinear(torch.nn.Module):
        """``W x + b + s * B (A x)``, or DoRA's ``m / ||W + s B A||_row * (W x + s B (A x)) + b``."""

        def __init__(self, weight, bias, lora_a, lora_b, scale, magnitude=None):
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.register_buffer("lora_A", lora_a)
            self.register_buffer("lora_B", lora_b)
            self.register_buffer("magnitude", magnitude)
            self.scale = float(scale)

        def forward(self, x):
            dtype = x.dtype
            h = x.float()
            base = F.linear(h, self.weight.float())
            lora = F.linear(F.linear(h, self.lora_A.float()), self.lora_B.float()) * self.scale
            if self.magnitude is None:
                out = base + lora
            else:
                merged = self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
                norm = torch.linalg.norm(merged, dim=1)
                out = (self.magnitude.float().reshape(-1) / norm) * (base + lora)
            if self.bias is not None:
                out = out + self.bias.float()
            return out.to(dtype)

    return UnmergedLoraLinear


def _read_tensors(state: CheckpointState) -> dict[str, Any]:
    path = state.source_dir / state.weights_file
    if state.weights_file == SAFETENSORS_WEIGHTS:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise UnreadableInputError(f"cannot read tensors ({_one_line(exc)})", path) from exc
    return load_bin_tensors(path)


@dataclass
class _SourceParts:
    body: dict[str, Any] = field(default_factory=dict)  # file key -> tensor, loaded through peft
    unmerged: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> {lora kind: tensor}
    base_layer: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> {param: tensor}
    plain: dict[str, Any] = field(default_factory=dict)  # model param name -> tensor
    ignored: list[str] = field(default_factory=list)


def _split_source(tensors: dict[str, Any]) -> _SourceParts:
    """Body LoRA (through peft), LoRA of heads and wrapped modules (unmerged), full tensors (assigned)."""
    parts = _SourceParts()
    wrapped = {wrapper_root(parsed.module) for k in tensors if (parsed := parse_lora_key(k))} - {None}

    def unmerged(module: str) -> bool:
        return head_root(module) is not None or any(module == r or module.startswith(r + ".") for r in wrapped)

    for name, tensor in tensors.items():
        inner = strip_prefix(name)
        if inner is None:
            parts.ignored.append(name)
            continue
        parsed = parse_lora_key(name)
        if parsed is not None:
            if wrapper_root(parsed.module) is not None:
                continue  # peft 0.12 duplicates inside original_module / modules_to_save
            if unmerged(parsed.module):
                parts.unmerged.setdefault(parsed.module, {})[parsed.kind] = tensor
            else:
                parts.body[name] = tensor
            continue
        segments = inner.split(".")
        if any(seg in WRAPPER_SEGMENTS for seg in segments[1:]):
            continue
        if "base_layer" in segments:
            index = segments.index("base_layer")
            module, param = ".".join(segments[:index]), ".".join(segments[index + 1 :])
            parts.base_layer.setdefault(module, {})[param] = tensor
        else:
            parts.plain[inner] = tensor
    for module in list(parts.base_layer):
        if module not in parts.unmerged:  # e.g. bias="all": a full tensor of a body module
            for param, tensor in parts.base_layer.pop(module).items():
                parts.plain[f"{module}.{param}"] = tensor
    return parts


def _model_tensor(model: Any, name: str) -> Any:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    return module._parameters.get(attr, module._buffers.get(attr))


def _source_logits(
    source: Path, state: CheckpointState, base_dir: Path, auto_name: str, input_ids: Any
) -> tuple[Any, str]:
    """The broken source's own logits, computed without the fold, or ``(None, why not)``."""
    import torch

    parts = _split_source(_read_tensors(state))
    if parts.ignored:
        return None, f"source tensors outside {PREFIX}*: {_listed(parts.ignored)}"
    for module, kinds in parts.unmerged.items():
        unsupported = set(kinds) - {"lora_A", "lora_B", "lora_magnitude_vector"}
        if unsupported or not {"lora_A", "lora_B"} <= set(kinds):
            return None, f"head module {module!r} carries LoRA tensors {sorted(kinds)} (only Linear LoRA/DoRA heads)"
    base, uninitialised = _load_base(base_dir, auto_name, SEEDS[0] + 1)
    with torch.no_grad():
        for name, tensor in parts.plain.items():
            target = _model_tensor(base, name)
            if target is None:
                return None, f"source tensor {PREFIX}{name} has no counterpart in the base model"
            if tuple(target.shape) != tuple(tensor.shape):
                shapes = f"{tuple(tensor.shape)}, the model's {tuple(target.shape)}"
                return None, f"source tensor {PREFIX}{name} has shape {shapes}"
            target.copy_(tensor.to(target.dtype))
            uninitialised.discard(name)
    unmerged_class = _unmerged_module_class()
    for module, kinds in sorted(parts.unmerged.items()):
        try:
            original = base.get_submodule(module)
        except AttributeError:
            return None, f"source head module {module!r} does not exist in the base model"
        own = parts.base_layer.get(module, {})
        weight = own.get("weight")
        if weight is None:
            if f"{module}.weight" in uninitialised or not isinstance(getattr(original, "weight", None), torch.Tensor):
                return None, (
                    f"the source's head weight {module}.weight is neither in the source adapter nor in the base "
                    "checkpoint: the source's own head is random, there is nothing to compare with"
                )
            weight = original.weight.detach().clone()
        bias = own.get("bias")
        if bias is None and isinstance(getattr(original, "bias", None), torch.Tensor):
            bias = original.bias.detach().clone()
            if f"{module}.bias" in uninitialised and bool(bias.abs().max() > 0):  # a zero init is no accident
                return None, f"the source's head bias {module}.bias is in neither the source adapter nor the base"
        lora_a, lora_b = kinds["lora_A"], kinds["lora_B"]
        if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
            return None, f"head module {module!r} is not a Linear layer"
        if tuple(weight.shape) == (lora_a.shape[1], lora_b.shape[0]) != (lora_b.shape[0], lora_a.shape[1]):
            weight = weight.t().contiguous()  # Conv1D-style (fan_in_fan_out) layout
        if tuple(weight.shape) != (lora_b.shape[0], lora_a.shape[1]) or lora_a.shape[0] != lora_b.shape[1]:
            return (
                None,
                f"head module {module!r}: lora_B {tuple(lora_b.shape)} @ lora_A {tuple(lora_a.shape)} "
                f"does not compose with its weight {tuple(weight.shape)}",
            )
        replacement = unmerged_class(
            weight, bias, lora_a, lora_b, lora_scale(state.config, module), kinds.get("lora_magnitude_vector")
        )
        parent_name, _, child = module.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, replacement)
    model = base
    if parts.body:
        model, why = _with_body_lora(base, source, state, parts.body)
        if model is None:
            return None, why
    return _logits(model.eval(), input_ids), ""


def _with_body_lora(base: Any, source: Path, state: CheckpointState, body: dict[str, Any]) -> tuple[Any, str]:
    """``base`` with the source's body LoRA, through peft, every module's r and alpha spelt out."""
    import dataclasses

    from peft import LoraConfig, PeftModel
    from peft.utils import set_peft_model_state_dict

    modules = sorted({parsed.module for k in body if (parsed := parse_lora_key(k))})
    try:
        config = LoraConfig.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001
        return None, f"peft cannot read the source adapter config: {_one_line(exc)}"
    ranks = {re.escape(m): rank_and_alpha(state.config, m) for m in modules}
    config = dataclasses.replace(
        config,
        task_type=None,
        target_modules=modules,
        modules_to_save=None,
        bias="none",
        rank_pattern={k: v[0] for k, v in ranks.items()},
        alpha_pattern={k: v[1] for k, v in ranks.items()},
        inference_mode=True,
    )
    try:
        model = PeftModel(base, config)
        loaded = set_peft_model_state_dict(model, body)
    except Exception as exc:  # noqa: BLE001
        return None, f"the source's body LoRA does not load: {_one_line(exc)}"
    missing = [k for k in loaded.missing_keys if "lora_" in k and ".default" in k]
    if loaded.unexpected_keys or missing:
        return None, f"the source's body LoRA does not load cleanly ({_listed(loaded.unexpected_keys + missing)})"
    return model, ""
