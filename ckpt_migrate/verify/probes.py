"""Probing a loaded model: fixed inputs, logits row by row, and which parameters the forward pass used."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckpt_migrate.core.peft_layout import short_name
from ckpt_migrate.verify.result import BATCH, INPUT_SEED, SEQ_LEN


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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
def preserved_rng() -> Iterator[None]:
    import torch

    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def probe_inputs(model: Any) -> Any:
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


def logits(model: Any, input_ids: Any) -> Any:
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
class Probe:
    logits: Any
    fingerprints: dict[str, str]
    on_path: set[str]


def probe(model: Any, input_ids: Any) -> Probe:
    """Logits, a fingerprint of every parameter/buffer, and which of them the forward pass used."""
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, _i, _o: called.add(id(mod))) for m in model.modules()]
    try:
        values = logits(model, input_ids)
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
                names[key] = short_name(f"{module_name}.{attr}" if module_name else attr)
                fingerprints[names[key]] = _fingerprint(tensor)
            if id(module) in called:
                on_path_ids.add(key)
    return Probe(values, fingerprints, {names[k] for k in on_path_ids})
