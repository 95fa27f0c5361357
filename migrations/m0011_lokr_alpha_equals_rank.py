"""Make a LoKr adapter written before peft 0.14 compute its trained delta in every release: alpha = r.

peft <= 0.13's LoKr layer adds ``kron(w1, w2)`` and never reads ``alpha`` (``scaling = alpha / r`` is stored,
unused); peft 0.14 started multiplying the delta by ``alpha / r`` (``make_kron(w1, w2, self.scaling[...])``). A
config whose alpha is not its rank therefore trained one model and loads as another on peft >= 0.14, silently
(the logits move; measured 7.8e-03 on ``tests/fixtures_tuners/lokr_llama_scaled``). Setting every alpha to its
rank (``alpha = r``, ``alpha_pattern`` = the entries of ``rank_pattern`` in the same order, so both pattern rules
pick the same key) makes ``alpha / r`` exactly 1: peft >= 0.14 then computes ``kron(w1, w2)`` as the producer did,
and peft <= 0.13 is unaffected (it ignores alpha). Ranks, tensors and the trainable parameters do not change.

Migrations 0007 and 0010 (folding LoKr heads) wait for this rewrite (their ``detect`` is false while it is
pending), so their refusal of LoKr "across peft 0.14" no longer applies to such checkpoints.
"""

from __future__ import annotations

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.peft_layout import lycoris_lookup
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.core.tuners import TUNERS, lokr_alpha_rewrite_pending, tuner_modules

ID = "0011_lokr_alpha_equals_rank"
SUMMARY = "Set a pre-0.14 LoKr adapter's alpha to its rank, so peft >= 0.14 (scaling by alpha/r) computes it as trained"
CAUSED_BY = "peft 0.14.0 began scaling the LoKr delta by alpha/r (huggingface/peft#2180); peft <= 0.13 ignored alpha"
CHANGES_TRAINABLE_PARAMETERS = False


def detect(state: CheckpointState, context: Context) -> bool:
    return lokr_alpha_rewrite_pending(state.config)


def _per_module(config: dict, modules: list[str]) -> dict[str, tuple[tuple[int, float], tuple[int, float]]]:
    """module -> ((r, alpha) by peft <= 0.14's pattern rule, (r, alpha) by peft >= 0.15's)."""
    return {m: tuple(lycoris_lookup(config, m, "alpha", legacy) for legacy in (True, False)) for m in modules}


def plan(state: CheckpointState, context: Context) -> None:
    config = state.config
    modules = sorted(tuner_modules(state, TUNERS["LOKR"]))
    # The producer (< 0.14, no exclude_modules key) looked ranks up by the legacy rule: they must stay the same.
    ranks = {m: lycoris_lookup(config, m, "alpha", legacy=True)[0] for m in modules}
    old_alphas = sorted({str(lycoris_lookup(config, m, "alpha", legacy=True)[1]) for m in modules})
    rank_pattern = dict(config.get("rank_pattern") or {})
    config["alpha"] = config["r"]
    config["alpha_pattern"] = dict(rank_pattern)
    after = _per_module(config, modules)
    wrong = [m for m, rules in after.items() if any(r != ranks[m] or alpha != r for r, alpha in rules)]
    if wrong:  # unreachable with alpha_pattern == rank_pattern; kept so the claim below is checked, not assumed
        state.unrecoverable.append(f"LoKr modules {', '.join(wrong)}: alpha = r cannot be set for both pattern rules")
        return
    state.warn(
        f"adapter_config.json: LoKr alpha set to its rank r (alpha was {', '.join(old_alphas)}; alpha_pattern now "
        "mirrors rank_pattern): peft < 0.14, which wrote this adapter, ignores alpha, and peft >= 0.14 multiplies "
        "the delta by alpha/r, now exactly 1, so both compute the trained model"
    )


def failures(state: CheckpointState) -> list[str]:
    if not lokr_alpha_rewrite_pending(state.config):
        return []
    return [
        f"peft >= 0.14: loads, but multiplies every LoKr delta by alpha/r (alpha {state.config.get('alpha')}, r "
        f"{state.config.get('r')}), which peft < 0.14 that trained it never did: the logits change"
    ]
