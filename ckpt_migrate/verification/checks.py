"""The checks ``verify`` runs on a loaded checkpoint, each adding reasons (failures) or notes to the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt_migrate.core.peft_layout import LORA_KINDS, PREFIX, parse_lora_key, wrapper_root
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.core.text import describe_exception, listed
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.progress import step
from ckpt_migrate.verification.probes import Probe, probe, probe_inputs
from ckpt_migrate.verification.result import REPRODUCIBLE_FRACTION, SEEDS, TOLERANCES, VerifyResult
from ckpt_migrate.verification.source import source_logits


def _explain_load_failure(exc: BaseException, state: CheckpointState, result: VerifyResult) -> str:
    import peft

    reason = f"the adapter does not load with peft {peft.__version__}: {describe_exception(exc)}"
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

    from ckpt_migrate.execute.derived_buffers import derived_buffer

    adapter = "default"
    weights = load_peft_weights(str(checkpoint), device="cpu")
    try:
        loaded = set_peft_model_state_dict(model, dict(weights), adapter_name=adapter)  # same values again
    except Exception as exc:  # noqa: BLE001 - from_pretrained just did the same; report, do not crash
        result.reasons.append(f"reloading the adapter tensors failed: {describe_exception(exc)}")
        return
    derived = []
    for key in loaded.unexpected_keys:
        name = _adapter_name_free(key, adapter)
        if name in weights and derived_buffer(model, name, weights[name]):
            derived.append(name)
            continue
        result.unused_tensors.append(name if name in weights else key)
    if derived:
        result.notes.append(
            f"adapter tensors {listed(derived)} are buffers this peft derives itself and does not save; the saved "
            "values are the derived ones"
        )
    for key in loaded.missing_keys:
        if f".{adapter}" in key and ("lora_" in key or ".modules_to_save." in key):
            result.missing_tensors.append(_adapter_name_free(key, adapter))
    saved = set(get_peft_model_state_dict(model, adapter_name=adapter))
    stray = sorted(
        k
        for k in set(weights) - saved - set(result.unused_tensors) - set(derived)
        if not any(s in k for s in LORA_KINDS)
    )
    if stray:
        result.notes.append(
            f"adapter tensors {listed(stray)} were loaded into base-model parameters the adapter config does not "
            "declare (peft would not save them again)"
        )


def run_checks(
    result: VerifyResult,
    checkpoint: Path,
    state: CheckpointState,
    base: BaseModel,
    auto_name: str,
    source: Path | None,
    source_state: CheckpointState | None,
) -> None:
    from peft import PeftModel

    from ckpt_migrate.guard import find_head_problems

    probes: list[Probe] = []
    inputs = None
    for index, seed in enumerate(SEEDS):
        with step(f"loading it on the base model, seed {index + 1} of {len(SEEDS)}"):
            model_base, _ = base.load(auto_name, seed)
            if inputs is None:
                inputs = probe_inputs(model_base)
                dtype = str(model_base.dtype).replace("torch.", "")
                result.dtype = dtype
                result.tolerance = TOLERANCES.get(dtype, 1e-4)
            try:
                model = PeftModel.from_pretrained(model_base, str(checkpoint)).eval()
            except Exception as exc:  # noqa: BLE001 - a load failure is the verdict, not a crash
                result.reasons.append(_explain_load_failure(exc, state, result))
                if source is not None:
                    result.notes.append("not compared with the source: the checkpoint does not load")
                return
            if index == 0:
                _key_check(model, checkpoint, result)
                try:
                    for problem in find_head_problems(model, base_model_dir=base.directory):
                        # A LoRA-carrying head is the broken shape itself (reproducible only with this exact base).
                        (result.reasons if problem.kind == "lora" else result.notes).append(_head_note(problem))
                except Exception as exc:  # noqa: BLE001 - the guard is advisory here
                    result.notes.append(f"head check skipped: {describe_exception(exc)}")
            probes.append(probe(model, inputs))
            del model, model_base

    _judge(result, probes)
    if result.unused_tensors:
        result.reasons.append(f"adapter tensors not used by the model: {listed(result.unused_tensors)}")
    if result.missing_tensors:
        result.reasons.append(f"tensors the adapter config implies are missing: {listed(result.missing_tensors)}")
    if source is not None and source_state is not None:
        _compare_with_source(result, probes[0], source, source_state, base, auto_name, inputs, merged=False)


def run_merged_checks(
    result: VerifyResult,
    merged: BaseModel,
    base: BaseModel,
    auto_name: str,
    source: Path | None,
    source_state: CheckpointState | None,
) -> None:
    """A model written by ``export``: loads with plain transformers, nothing random, the source's logits."""
    probes: list[Probe] = []
    inputs = None
    for index, seed in enumerate(SEEDS):
        with step(f"loading the merged model, seed {index + 1} of {len(SEEDS)}"):
            model, _ = merged.load(auto_name, seed)
            if inputs is None:
                inputs = probe_inputs(model)
                result.dtype = str(model.dtype).replace("torch.", "")
                result.tolerance = TOLERANCES.get(result.dtype, 1e-4)
            probes.append(probe(model, inputs))
            del model
    _judge(result, probes)
    if source is not None and source_state is not None:
        _compare_with_source(result, probes[0], source, source_state, base, auto_name, inputs, merged=True)


def _judge(result: VerifyResult, probes: list[Probe]) -> None:
    """Two loads under different seeds must agree: what differs on the forward path was left random."""
    first, second = probes
    between = (first.logits - second.logits).abs().max().item() if first.logits.numel() else 0.0
    result.max_logit_diff_between_loads = between
    differing = sorted(n for n in first.fingerprints if first.fingerprints[n] != second.fingerprints.get(n))
    on_path = [n for n in differing if n in first.on_path or n in second.on_path]
    reproducible = between <= result.tolerance * REPRODUCIBLE_FRACTION
    if on_path or not reproducible:
        result.random_parameters = on_path or differing
        shown = listed(result.random_parameters) if result.random_parameters else "none identified"
        result.reasons.append(
            f"random parameters found: two loads under different seeds differ (max |logit diff| {between:.3g}); "
            f"re-initialised on every load: {shown}"
        )
    elif differing:
        result.notes.append(f"parameters off the forward path differ between loads (harmless): {listed(differing)}")


def _compare_with_source(
    result: VerifyResult,
    first: Probe,
    source: Path,
    source_state: CheckpointState,
    base: BaseModel,
    auto_name: str,
    inputs: Any,
    merged: bool,
) -> None:
    with step("computing the source's own logits, its head unmerged"):
        expected, why = source_logits(source, source_state, base, auto_name, inputs, merged=merged)
    if expected is None:
        result.notes.append(f"not independently checked against the source: {why}")
        return
    if why:
        result.notes.append(why)
    diff = (first.logits - expected).abs().max().item()
    result.max_logit_diff_vs_source = diff
    if not diff <= result.tolerance:
        result.reasons.append(
            f"logits differ from the source checkpoint's by {diff:.3g} (tolerance {result.tolerance:g})"
        )
