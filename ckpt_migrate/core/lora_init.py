"""LoRA inits (``init_lora_weights``) that rewrite the base weights, as data: which a merge can replay.

PiSSA and OLoRA replace every targeted base weight ``W`` by ``W - s * B0 @ A0`` (``B0``, ``A0`` from ``W``'s SVD /
QR) before training, and peft saves only ``A``/``B``: the trained model is ``W_res + s * B @ A``, not ``W + s * B @
A``. peft re-runs the init when it loads such an adapter (so an adapter stays right); a merge into the base model
must re-run it too, which :mod:`ckpt_migrate.migrations._tuner_merge` does with the installed peft's own layer. Read
from the peft 0.12.0 and 0.21.2 wheels (``tuners/lora/layer.py``: ``update_layer``, ``pissa_init``,
``olora_init``): on an ``nn.Linear`` without ``fan_in_fan_out`` both compute the same residual, in float32.
"""

from __future__ import annotations

from typing import Any

#: Inits that leave the base weight as it was (the trained model is W + s * B @ A), besides True and False.
BASE_KEPT = frozenset({"gaussian", "eva", "orthogonal", "mica"})
#: Deterministic inits computed from the base weight alone: replayed by the installed peft's layer before a merge.
REPLAYED = frozenset({"pissa", "olora"})
#: Inits that rewrite the base weight from what the checkpoint does not hold (prefix -> what is missing).
_MISSING = {
    "pissa_niter_": "a randomised SVD (torch.svd_lowrank) whose random draw was never saved",
    "corda": "the covariance of training activations (preprocess_corda), which no checkpoint holds",
    "lora_ga": "gradients of training batches (preprocess_loraga), which no checkpoint holds",
}


def init_of(config: dict[str, Any]) -> Any:
    """The adapter's ``init_lora_weights`` (peft's default: True)."""
    return config.get("init_lora_weights", True)


def rewrites_base(config: dict[str, Any]) -> bool:
    """Whether the LoRA init replaced the targeted base weights before training (anything not known to keep them)."""
    init = init_of(config)
    return config.get("peft_type", "LORA") == "LORA" and not (isinstance(init, bool) or init in BASE_KEPT)


def is_replayed(config: dict[str, Any]) -> bool:
    """Whether a merge re-runs the init (PiSSA, OLoRA) before adding ``s * B @ A``."""
    return rewrites_base(config) and init_of(config) in REPLAYED


def replay_refusal(config: dict[str, Any]) -> str | None:
    """Why the base weights training ran on cannot be rebuilt here for a merge, if so."""
    if not rewrites_base(config) or is_replayed(config):
        return None
    init = init_of(config)
    missing = next((why for prefix, why in _MISSING.items() if str(init).startswith(prefix)), None)
    if init == "loftq":
        missing = "LoftQ's quantisation of them (loftq_config), which this tool does not replay"
    what = f"from {missing}" if missing else "in a way this tool does not know"
    return f"init_lora_weights={init!r} rewrote every LoRA-targeted base weight before training {what}"


def reload_refusal(config: dict[str, Any]) -> str | None:
    """Why peft, re-running the init when it loads the adapter, does not rebuild the base weights training ran on."""
    init = str(init_of(config))
    if config.get("peft_type", "LORA") != "LORA" or not any(init.startswith(p) for p in _MISSING):
        return None
    return (
        f"{replay_refusal(config)}: peft re-runs that init whenever it loads the adapter and gets other base "
        "weights, so no repaired adapter (nor the original) computes the trained model"
    )
