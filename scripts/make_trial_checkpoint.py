"""Write a real broken checkpoint of a ~110M-parameter Llama classifier, for trying the tool by hand.

The same recipe as ``scripts/make_fixtures.py`` (``build_case``: peft 0.12.0 + transformers 4.44.2, Trainer,
``target_modules="all-linear"``, ``task_type="SEQ_CLS"``, the trained model's reference logits), at a size a user
meets: hidden 768, 12 layers, a 32k vocabulary, LoRA r=16 (the 0.43 GB base and a 0.2 GB checkpoint are too large
to commit). Run it with the buggy release::

    .venv-peft012/bin/python scripts/make_trial_checkpoint.py /tmp/trial

and then ``ckpt-migrate fix /tmp/trial/llama110m/run/checkpoint-4 --out ... --base-model /tmp/trial/llama110m/base``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402

LLAMA_110M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=128,
    pad_token_id=0,
)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[0] + "\nusage: make_trial_checkpoint.py OUT_DIR", file=sys.stderr)
        return 2
    spec = mf.case(
        "llama",
        LLAMA_110M,
        lora=dict(task_type="SEQ_CLS", target_modules=mf.ALL_LINEAR, r=16, lora_alpha=32, lora_dropout=0.0),
        max_steps=4,
        save_steps=4,
        lr=1e-3,
        notes="110M-parameter Llama classifier for the by-hand trial (issue #22)",
    )
    mf.build_case("llama110m", spec, str(Path(argv[0]).resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
