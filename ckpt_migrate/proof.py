"""The static proof: before the tool says "repaired", the output adapter is shown to load into the target model.

No weights are read. The target model is built on the meta device from the base's ``config.json``; the
repaired adapter config goes through the installed peft's own config class and injection
(``get_peft_model``, which adds a task's head to modules_to_save as loading does), and the planned output
tensors -- names, shapes and dtypes from the plan, as meta tensors -- through peft's own
``set_peft_model_state_dict`` (its key renames, transformers-5 conversions and shape checks included).
Three things are established:

(a) peft builds the config and injects it (an empty ``target_modules``, a target the model lacks: peft's own error);
(b) every planned adapter tensor lands on a parameter of the same shape, and every tensor peft would save for this
    config (``get_peft_model_state_dict``) is planned;
(c) every other parameter on the forward path is in the base model's safetensors (header names, mapped to
    parameter names by transformers' own checkpoint-key renaming; tied weights count once) or loaded from the
    adapter: none is left to random initialisation.

A failure names its cause: the base model when the adapter's tensors do not fit its module names or shapes (the
wrong architecture or size; exit 5), else the adapter (exit 4). Only the ``prove_*``
functions import torch, transformers and peft; :data:`CHECKS` and :class:`Proof` are plain data for dry runs.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpt_migrate.core.errors import CkptMigrateError, UnreadableInputError, UnrecoverableError
from ckpt_migrate.core.peft_layout import PREFIX, head_root
from ckpt_migrate.core.text import describe_exception, listed

if TYPE_CHECKING:
    from ckpt_migrate.core.plan import CheckpointPlan, CheckpointState
    from ckpt_migrate.formats.base_model import BaseModel

PROVEN, FAILED, NOT_RUN, PLANNED = "proven", "failed", "not run", "will run"
#: ``fix`` checks the output numerically (``verify``) without being asked when the base's safetensors are at most
#: this large: two loads of the base plus the source's own logits stay within seconds and a few GB.
AUTO_VERIFY_MAX_BYTES = 10**9
CAUSE_ADAPTER, CAUSE_BASE = "adapter", "base"

#: What a passed proof establishes, in the order it is checked (the dry run shows these as what will be checked).
CHECKS = (
    "the adapter config builds and injects with the installed peft's own code",
    "every adapter tensor lands on a parameter of the same shape, and every tensor the config implies is present",
    "every other parameter on the forward path is in the base model's weights: none is left random",
)
#: Segments of an adapter tensor name that start the tuner's own part (the module it adapts comes before).
_TUNER_SEGMENTS = re.compile(
    r"\.(lora_[A-Za-z_]+|modules_to_save|original_module|base_layer|hada_\w+|lokr_\w+|ia3_l|oft_\w+|boft_\w+|"
    r"vera_\w+|fourierft_\w+|hra_\w+|ln_tuning_layers|poly_\w+|adaption_\w+|ranknum)(\.|$)"
)
_WRAPPERS = re.compile(r"\.(modules_to_save|original_module|base_layer)\.")
_SHAPE = r"(?:torch\.Size\()?\[?([\d, ]*)\]?\)?"
_SIZE_MISMATCH = re.compile(
    rf"size mismatch for ([^:\s]+): copying a param with shape {_SHAPE} from checkpoint, the shape in current model is "
    rf"{_SHAPE}"
)


@dataclass(frozen=True)
class Proof:
    """What the static proof established about one checkpoint's output adapter(s), and how.

    ``state``: proven, failed, or not run (no base model at hand, or its config builds no model). ``cause`` of a
    failure: ``"adapter"`` (exit 4) or ``"base"`` (exit 5).
    """

    state: str
    established: tuple[str, ...] = ()
    how: str = ""
    reason: str = ""
    cause: str = ""
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.state == PROVEN

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "established": list(self.established),
            "how": self.how,
            "reason": self.reason or None,
            "cause": self.cause or None,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def error(self, where: Any = None, what: str = "static proof failed, nothing written") -> CkptMigrateError:
        """The refusal of a failed proof: exit 5 when the base does not fit, else exit 4."""
        cls = UnreadableInputError if self.cause == CAUSE_BASE else UnrecoverableError
        return cls(f"{what}: {self.reason}", where)


def not_run(reason: str) -> Proof:
    return Proof(NOT_RUN, reason=reason)


def planned(base: BaseModel | None, target_transformers: str | None = None) -> Proof:
    """What a dry run promises: the proof that will run before publishing (or why none can)."""
    if base is None:
        return not_run("no base model at hand (pass --base-model): the output would be written but not proven")
    if untestable_target(target_transformers) is not None:
        return not_run(f"{untestable_target(target_transformers)}: the output would be written but not proven")
    how = (
        f"before publishing, with the installed peft on the model {base.directory / 'config.json'} describes, "
        "built on the meta device (no weights read)"
    )
    return Proof(PLANNED, CHECKS, how)


def base_weights_bytes(base: BaseModel) -> int:
    """Bytes of the base's safetensors files (what ``verify`` loads, twice)."""
    return sum(path.stat().st_size for path in base.directory.glob("*.safetensors") if path.is_file())


def reproduction(plan: CheckpointPlan, proof: Proof | None, verification: dict[str, Any] | None) -> dict[str, Any]:
    """Whether the output was shown to reproduce the trained model, and how: ``{"shown": .., "text": ..}``.

    ``"numerically"``: ``verify`` compared its logits with the source's own (computed unmerged by peft);
    ``"by construction"``: the static proof passed and every tensor is a byte copy of the source adapter or a
    LoRA fold computed in float64 (rounded once to the stored dtype); ``"no"`` otherwise, saying what is missing.
    """
    if plan.losses:
        return {"shown": "no", "text": "lossy: trained values were never saved (see the losses)"}
    adapters = [verification] + list((verification or {}).get("adapters", {}).values()) if verification else []
    if (
        verification
        and verification.get("ok")
        and all(a.get("max_logit_diff_vs_source") is not None for a in adapters if a)
    ):
        diff = max(a["max_logit_diff_vs_source"] for a in adapters if a)
        return {
            "shown": "numerically",
            "text": f"max |logit diff| {diff:.3g} against the source checkpoint computed unmerged by peft "
            f"(tolerance {verification.get('tolerance', 0):g}, {verification.get('dtype') or 'as stored'}), "
            "two loads under different seeds identical",
        }
    missing = []
    if proof is None or not proof.passed:
        missing.append("the static proof did not run" + (f" ({proof.reason})" if proof and proof.reason else ""))
    why_not = why_not_by_construction(plan)
    if not missing and why_not is None:
        folds = any(t.source.kind == "fold" for _, a in _adapters(plan) for t in a.after.tensors.values())
        how = " or LoRA folds W + s*B@A computed in float64 and rounded once to the stored dtype" if folds else ""
        return {
            "shown": "by construction",
            "text": f"every output tensor is a byte copy of the source adapter{how}, and the static proof placed "
            "each on the parameter it trained",
        }
    if why_not:
        missing.append(why_not)
    if verification is None:
        missing.append("not compared numerically (verify did not run)")
    elif not verification.get("ok"):
        missing.append("verify failed")
    else:
        missing.append("verify could not compute the source's own logits")
    return {"shown": "no", "text": "; ".join(missing)}


def _adapters(plan: CheckpointPlan) -> list[tuple[str, CheckpointPlan]]:
    return [("", plan)] + [(f"{a.relative}/", a) for a in plan.adapters]


#: Migrations that keep tensors as byte copies but change what they compute or where they go: the proof shows each
#: lands on a parameter of its shape, not that it is the right one, so exactness is left to ``verify``.
_REWRITES_OF_MEANING = {
    "0011_lokr_alpha_equals_rank": "the LoKr scaling was rewritten (alpha = r, 0011): equal to the trained delta by "
    "the formula of each peft release, not by the bytes",
    "0012_module_renames_for_target": "tensors were moved to renamed modules (0012): the proof shows each fits a "
    "parameter of its shape, not that it is the one it trained",
}


def why_not_by_construction(plan: CheckpointPlan) -> str | None:
    """Why the output's values are not the trained ones by their formula alone, or None."""
    for _, adapter in _adapters(plan):
        for migration, why in _REWRITES_OF_MEANING.items():  # byte copies whose meaning a config or name change moved
            if migration in adapter.migrations:
                return why
        for tensor in adapter.after.tensors.values():
            source = tensor.source
            if source.base_file is not None:
                return "head weights come from the base model: right only if they are those training started from"
            if source.kind == "computed":
                return f"{tensor.name} is computed ({source.formula or source.migration}), not a copy or LoRA fold"
    return None


def verify_command(output: Any, base: Any, source: Any) -> str:
    return f"ckpt-migrate verify {output} --base-model {base or 'BASE'} --source {source}"


@dataclass
class _Cache:
    """Proofs by (base, config, tensor layout): the checkpoints of one run share theirs."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    proofs: dict[str, Proof] = field(default_factory=dict)


_CACHE = _Cache()


def _layout_key(state: CheckpointState, base: BaseModel) -> str:
    tensors = sorted((t.name, t.shape, t.dtype) for t in state.tensors.values())
    return json.dumps([str(base.directory.resolve()), state.config, tensors], sort_keys=True, default=str)


def import_before_writing(plans: list[CheckpointPlan]) -> None:
    """Import peft now when a writer will import it too (a tuner merge computes tensors with peft's layers).

    Two threads importing peft at once can meet its modules half-initialised (peft.mapping and peft.utils import
    each other, and a submodule import does not wait for its package), so the proof thread may import it alone
    only when the writer does not need it; torch alone (folds) is safe to import on both.
    """
    tensors = [t for p in plans for _, a in _adapters(p) for t in a.after.tensors.values()]
    if any(t.source.kind == "computed" for t in tensors):
        import peft  # noqa: F401


def prove_plan(plan: CheckpointPlan, base: BaseModel | None) -> Proof:
    """The static proof of every adapter ``plan`` writes (the top one, each subfolder's), combined."""
    if base is None:
        return not_run("no base model at hand (pass --base-model)")
    states = ([("", plan.after)] if plan.after.weights_file else []) + [
        (f"{a.relative}/", a.after) for a in plan.adapters if a.after.weights_file
    ]
    return _prove_all(states, base)


def prove_published(directory: Any, base: BaseModel | None) -> Proof:
    """The static proof of every adapter a checkpoint directory holds, as its files are (an earlier run's output:
    called repaired only once what it published passes, whatever that run's options were)."""
    from ckpt_migrate.formats.checkpoint import load_state, load_subfolder_adapters

    if base is None:
        return not_run("no base model at hand (pass --base-model)")
    top = load_state(directory)
    subfolders = load_subfolder_adapters(directory)
    states = ([("", top)] if top.weights_file else []) + [(f"{n}/", s) for n, s in sorted(subfolders.items())]
    return _prove_all(states, base)


def _prove_all(states: list[tuple[str, CheckpointState]], base: BaseModel) -> Proof:
    if not states:
        return not_run("no adapter in the output")
    proofs = [(prefix, prove_adapter(state, base)) for prefix, state in states]
    for prefix, proof in proofs:
        if not proof.passed:
            reason = f"adapter {prefix.rstrip('/')}: {proof.reason}" if prefix else proof.reason
            return Proof(proof.state, proof.established, proof.how, reason, proof.cause, proof.notes, proof.seconds)
    notes = tuple(f"{p.rstrip('/')}: {n}" if p else n for p, proof in proofs for n in proof.notes)
    seconds = sum(proof.seconds for _, proof in proofs)
    return Proof(PROVEN, CHECKS, proofs[0][1].how, notes=notes, seconds=seconds)


def prove_adapter(state: CheckpointState, base: BaseModel, merged: bool = False) -> Proof:
    """The static proof of one adapter (config and planned tensors) on ``base``; cached by layout.

    ``merged``: the adapter is merged into the base (``export``), never loaded as one, so a config that targets
    nothing but its modules_to_save (a head-only adapter) is proven with peft's own placeholder target.
    """
    key = _layout_key(state, base) + str(merged)
    with _CACHE.lock:
        cached = _CACHE.proofs.get(key)
    if cached is not None:
        return cached
    start = time.perf_counter()
    try:
        proof = _prove(state, base, merged)
    except CkptMigrateError:
        raise
    except Exception as exc:  # noqa: BLE001 - a proof that cannot run proves nothing; it must not crash the repair
        proof = not_run(f"the static proof could not run: {describe_exception(exc, 200)}")
    proof = Proof(
        proof.state, proof.established, proof.how, proof.reason, proof.cause, proof.notes, time.perf_counter() - start
    )
    with _CACHE.lock:
        _CACHE.proofs[key] = proof
    return proof


def _failed(cause: str, reason: str, how: str, established: tuple[str, ...] = ()) -> Proof:
    return Proof(FAILED, established, how, reason, cause)


def _prove(state: CheckpointState, base: BaseModel, merged: bool = False) -> Proof:
    # peft first, whole: it imports transformers' Auto classes, and the writer (a tuner merge) may import peft on
    # another thread meanwhile; while one thread imports peft the other waits for it, instead of meeting a
    # half-imported transformers.
    import peft
    import torch
    import transformers

    try:
        model = base.meta_model(state.config, state.tensors)
    except UnreadableInputError as exc:
        return not_run(f"the target model cannot be built from the base's config: {exc.message}")

    arch = type(model).__name__
    how = (
        f"peft {peft.__version__} injection and loading on {arch} built on the meta device from "
        f"{base.directory / 'config.json'} (transformers {transformers.__version__}); no weights read"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _prove_on(state, base, model, how, peft, torch, merged)


def _config_to_prove(config: dict[str, Any], merged: bool) -> dict[str, Any]:
    """A deep copy (peft's task classes extend the config's lists in place); for a merge, an empty target list
    becomes peft's own placeholder (``DUMMY_TARGET_MODULES``, peft >= 0.13), which injects modules_to_save only."""
    config = copy.deepcopy(config)
    if merged and not config.get("target_modules"):
        from peft.utils import constants

        config["target_modules"] = getattr(constants, "DUMMY_TARGET_MODULES", config.get("target_modules"))
    return config


def untestable_target(target_transformers: str | None) -> str | None:
    """Why the installed transformers cannot stand in for the target release in the proof, or None.

    Majors name modules differently (ViT's ``attention.attention.query`` became ``attention.q_proj`` in 5.x), and
    the proof builds the installed release's model: an output for another major is not proven here.
    """
    from importlib.metadata import version

    from packaging.version import Version

    installed = version("transformers")
    if target_transformers is None or Version(target_transformers).major == Version(installed).major:
        return None
    return (
        f"the output targets transformers {target_transformers} and the proof can only build the installed "
        f"{installed}'s model, whose module names differ between majors: check it with `ckpt-migrate verify` "
        f"under transformers {target_transformers}"
    )


def _inject_anew(base: BaseModel, state: CheckpointState, peft: Any, config: Any) -> Any:
    """Injection into a fresh meta model with the adapter layers built on the CPU: a tuner whose initialisation
    reads values (BOFT calls ``.item()``) cannot build them on the meta device. peft moves them to the meta
    device of the layers they adapt."""
    return peft.get_peft_model(base.meta_model(state.config, state.tensors), config)


def _prove_on(
    state: CheckpointState, base: BaseModel, model: Any, how: str, peft: Any, torch: Any, merged: bool = False
) -> Proof:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ckpt_migrate.formats.dtypes import to_torch

    arch = type(model).__name__
    model_keys = set(model.state_dict())
    # (a) the config, by the installed peft's own class (unknown keys dropped as PeftConfig.from_pretrained does)
    try:
        # a deep copy: peft's task classes extend the config's lists (modules_to_save) in place
        config = peft.PeftConfig.from_peft_type(**_config_to_prove(state.config, merged))
        config.inference_mode = True
    except Exception as exc:  # noqa: BLE001 - any refusal by peft is the verdict
        return _failed(
            CAUSE_ADAPTER, f"peft {peft.__version__} rejects the adapter config: {describe_exception(exc, 200)}", how
        )
    misfits = misfitting_tensors(model, state)
    if misfits:
        return _base_misfit(misfits, arch, how)
    try:
        try:
            peft_model = _inject(peft, torch, model, config)
        except Exception as exc:  # noqa: BLE001
            if "meta" not in str(exc):
                raise
            config = peft.PeftConfig.from_peft_type(**_config_to_prove(state.config, merged))
            peft_model = _inject_anew(base, state, peft, config)
    except Exception as exc:  # noqa: BLE001
        return _failed(
            CAUSE_ADAPTER,
            f"peft {peft.__version__} cannot inject the adapter into {arch}: {describe_exception(exc, 200)}",
            how,
        )
    # (b) the planned tensors through peft's own loading, as meta tensors of the planned shapes
    tensors = {t.name: torch.empty(t.shape, dtype=to_torch(t.dtype), device="meta") for t in state.tensors.values()}
    try:
        loaded = set_peft_model_state_dict(peft_model, tensors, low_cpu_mem_usage=True)
    except Exception as exc:  # noqa: BLE001 - peft's refusal (a size mismatch, a missing modules_to_save key)
        mismatched = _SIZE_MISMATCH.findall(str(exc)) if isinstance(exc, RuntimeError) else []
        if not mismatched:
            return _failed(
                CAUSE_ADAPTER, f"peft cannot load the adapter tensors: {describe_exception(exc, 200)}", how, CHECKS[:1]
            )
        shown = [f"{name} ({theirs}) vs ({ours})" for name, theirs, ours in mismatched]
        return _failed(
            CAUSE_BASE,
            f"{len(mismatched)} adapter tensors do not fit {arch}'s shapes (a base of "
            f"another size?): {listed(shown, 3)}",
            how,
            CHECKS[:1],
        )
    adapter_params = {n for n, _ in peft_model.named_parameters(remove_duplicate=False)} - set(loaded.missing_keys)
    buffers = {n for n, _ in peft_model.named_buffers(remove_duplicate=False)}
    unused = sorted(k for k in loaded.unexpected_keys if k not in buffers)
    derived = sorted(set(loaded.unexpected_keys) - set(unused))
    if unused:
        return _failed(
            CAUSE_ADAPTER,
            f"{len(unused)} adapter tensors are not used by peft on {arch}: {listed(unused, 3)}",
            how,
            CHECKS[:1],
        )
    implied = set(get_peft_model_state_dict(peft_model, adapter_name="default", save_embedding_layers=False))
    missing = sorted(implied - set(tensors))
    from_base = _base_parameter_names(model_keys, base, model)
    notes = [f"buffers peft derives itself were planned as tensors: {listed(derived, 3)}"] if derived else []
    # a trained tensor peft saves under a base layer's name (bias="lora_only") loads the base's value when absent
    lost = [n for n in missing if ".base_layer." in n and _plain(n) in from_base]
    if lost and state.losses:
        notes.append(f"recorded as lost (--allow-lossy), loaded from the base model instead: {listed(lost, 3)}")
        missing = [n for n in missing if n not in lost]
    if missing:
        where = " (peft would load the base model's values there, not the trained ones)" if lost else ""
        return _failed(
            CAUSE_ADAPTER,
            f"{len(missing)} tensors the adapter config implies are not in the output{where}: {listed(missing, 3)}",
            how,
            CHECKS[:1],
        )
    # (c) every other parameter on the forward path: from the base weights or the adapter
    unloaded = _unloaded_parameters(peft_model, adapter_params, from_base)
    if unloaded:  # a LoRA-only head or projector whose base weights exist nowhere, or an incomplete base
        modules = sorted({head_root(n) or n.rpartition(".")[0] for n in unloaded})
        return _failed(
            CAUSE_ADAPTER,
            f"{listed(modules, 3)} would be random on every load: {len(unloaded)} "
            f"weights ({listed(unloaded, 3)}) are in neither the base model nor the adapter",
            how,
            CHECKS[:2],
        )
    return Proof(PROVEN, CHECKS, how, notes=tuple(notes))


def _inject(peft: Any, torch: Any, model: Any, config: Any) -> Any:
    """peft's own injection (the PeftModel class of the config's task, as loading picks it), adapters on meta.

    Not ``low_cpu_mem_usage=True``: peft then patches ``nn.Module.register_parameter`` process-wide, and the
    proof runs on a thread beside the writer's own torch work. torch's device context is per thread.
    """
    with torch.device("meta"):
        return peft.get_peft_model(model, config)


def _base_misfit(misfits: list[str], arch: str, how: str) -> Proof:
    return _failed(
        CAUSE_BASE,
        f"the base model ({arch}) does not fit the adapter, the wrong architecture or size? "
        f"{len(misfits)} adapter tensors name modules it lacks or other shapes: {listed(misfits, 3)}",
        how,
    )


def misfitting_tensors(model: Any, state: CheckpointState) -> list[str]:
    """Adapter tensors whose module the model lacks, or whose full weight has another shape than the model's.

    Header-level facts only (names and shapes), so that a failure is blamed on the base model only when the
    adapter's own tensors say it was trained on another one.
    """
    modules = dict(model.named_modules())
    params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for tensor in state.tensors.values():
        if not tensor.name.startswith(PREFIX):
            continue  # a tensor of the tuner itself (VeRA's shared vera_A/vera_B), not of a module of the model
        # the module a wrapper holds a copy of: judged as that module (a double-wrapped head's LoRA, peft <= 0.12)
        name = _WRAPPERS.sub(".", tensor.name.removeprefix(PREFIX))
        match = _TUNER_SEGMENTS.search(name)
        module = name[: match.start()] if match else name.rpartition(".")[0]
        if module and module not in modules:
            out.append(tensor.name)
            continue
        kind = match.group(1) if match else None
        weight = params.get(f"{module}.weight" if module else "weight")
        if kind is None:
            leaf = name.rpartition(".")[2]
            full = f"{module}.{leaf}" if module else leaf
            if full in params and params[full] != tuple(tensor.shape):
                out.append(f"{tensor.name} {tuple(tensor.shape)} vs {params[full]}")
        elif kind in ("lora_A", "lora_B") and weight is not None and len(weight) == len(tensor.shape) == 2:
            # lora_A is (r, in), lora_B (out, r); a weight is (out, in), or (in, out) for a transposed Conv1D
            size = tensor.shape[1] if kind == "lora_A" else tensor.shape[0]
            if size not in weight:
                out.append(f"{tensor.name} {tuple(tensor.shape)} vs {module}.weight {weight}")
    return out


def _base_parameter_names(model_keys: set[str], base: BaseModel, model: Any) -> set[str]:
    """The model's parameter names the base's safetensors provide, by transformers' own key renaming."""
    names = base.tensor_names()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: keys as saved, with or without the base model's prefix
        prefix = getattr(model, "base_model_prefix", "")
        return {n for k in names for n in (k, f"{prefix}.{k}", k.removeprefix(f"{prefix}.")) if n in model_keys}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = model.base_model_prefix
    found = set()
    for key in names:
        renamed, _ = rename_source_key(key, renamings, converters, prefix, dict.fromkeys(model_keys, True))
        if renamed not in model_keys and key in model_keys:
            renamed = key
        found.add(renamed)
    return found & model_keys


def _plain(name: str) -> str:
    """A peft model's parameter name as the base model names it."""
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def _unloaded_parameters(peft_model: Any, from_adapter: set[str], from_base: set[str]) -> list[str]:
    """Parameters on the forward path that neither file provides, by the base model's names (tied: once)."""
    groups: dict[int, list[str]] = {}
    for name, param in peft_model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    adapter = ".default"
    out = []
    for names in groups.values():
        if any(n in from_adapter for n in names):
            continue
        if any(f"{adapter}." in n or n.endswith(adapter) or ".original_module." in n for n in names):
            continue  # adapter parameters are (b)'s; a modules_to_save wrapper's original is off the forward path
        plain = [_plain(n) for n in names]
        if not any(n in from_base for n in plain):
            out.append(plain[0])
    return sorted(out)
