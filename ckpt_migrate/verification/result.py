"""The verdict of ``verify`` as plain data, and the constants that define the probe."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt_migrate.core.errors import EXIT_OK, EXIT_VERIFY_FAILED

SEEDS = (1234, 98765)
INPUT_SEED = 20240917
BATCH = 2
SEQ_LEN = 16
#: Probe length of raw audio (``input_values``: a quarter second at 16 kHz) and of filterbank frames.
AUDIO_SAMPLES = 4000
AUDIO_FRAMES = 64
#: Allowed max |logit difference| against the source, by model dtype.
TOLERANCES = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
#: Two loads count as identical when their logits differ by at most this fraction of the tolerance.
REPRODUCIBLE_FRACTION = 0.01


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
    #: What the checked directory's manifest says an --allow-lossy repair lost: ``ok`` then means it equals its
    #: source as saved, not the trained model.
    losses: list[str] = field(default_factory=list)
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
        return EXIT_OK if self.ok else EXIT_VERIFY_FAILED

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (non-finite numbers become ``None``)."""
        data = asdict(self)
        for key in ("max_logit_diff_between_loads", "max_logit_diff_vs_source"):
            value = data[key]
            if value is not None and not math.isfinite(value):
                data[key] = None
        return data
