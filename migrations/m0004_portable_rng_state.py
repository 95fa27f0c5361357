"""Rewrite Trainer RNG states so a resume restores them under numpy 1 and numpy 2 alike.

``rng_state.pth`` (``rng_state_<rank>.pth`` in distributed runs) pickles ``np.random.get_state()``,
whose key array names ``numpy.core.multiarray._reconstruct`` (numpy 1) or
``numpy._core.multiarray._reconstruct`` (numpy 2). With torch >= 2.6 ``torch.load`` defaults to
``weights_only=True`` and Trainer's resume fails with "Unsupported global: GLOBAL
numpy.core.multiarray._reconstruct was not an allowed global by default" (or the ``numpy._core``
name under numpy 1). The file is rewritten with the key as a list of ints; every state is kept
exactly. Detection scans only the small pickle's opcodes; nothing in the file is executed.
"""

from __future__ import annotations

from ckpt_migrate.plan import CheckpointState, FileRewrite
from ckpt_migrate.rng_state import check_rng_state, is_rng_state_file, references_numpy_core

ID = "0004_portable_rng_state"
SUMMARY = "Rewrite rng_state*.pth without numpy globals, so Trainer resumes under numpy 1 and numpy 2"
CAUSED_BY = (
    "numpy 2.0 renamed numpy.core to numpy._core (numpy#24634), so the pickled ndarray global's name "
    "depends on the numpy major; torch 2.6.0 made torch.load default to weights_only=True (its release notes), "
    "which refuses any global not allow-listed by that exact name"
)

REWRITE_KIND = "portable_rng_state"
REWRITE_REASON = "numpy RNG key stored as a list of ints instead of a numpy.core/numpy._core ndarray pickle"


def _targets(state: CheckpointState) -> list[str]:
    return [
        name
        for name in sorted(state.files)
        if is_rng_state_file(name) and references_numpy_core(state.source_dir / name)
    ]


def detect(state: CheckpointState) -> bool:
    return bool(_targets(state))


def plan(state: CheckpointState) -> None:
    for name in _targets(state):
        # Validates the whole pickle (no execution, no tensor data): an unexpected global such as
        # os.system raises UnreadableInputError here, so a dry run already refuses the file.
        found = check_rng_state(state.source_dir / name)
        numpy_globals = [g for g in found["globals"] if g.startswith("numpy")]
        state.rewrite_file(name, FileRewrite(REWRITE_KIND, REWRITE_REASON, {"numpy_globals": numpy_globals}))
