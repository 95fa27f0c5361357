"""Probing a loaded model: fixed inputs, logits row by row, and which parameters the forward pass used."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckpt_migrate.core.peft_layout import short_name
from ckpt_migrate.verification.result import AUDIO_FRAMES, AUDIO_SAMPLES, BATCH, INPUT_SEED, SEQ_LEN


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


def probe_inputs(model: Any) -> dict[str, Any]:
    """Seeded inputs of the kind the model reads (``model.main_input_name``), ``BATCH`` examples.

    Token ids avoid special tokens; images are ``num_channels x image_size x image_size``; raw audio
    (``input_values``) is ``AUDIO_SAMPLES`` long; filterbank features (``input_features``) take the shape the
    config gives (Whisper's mel bins x twice its source positions, AST's frames x mel bins).
    """
    import torch

    from ckpt_migrate.core.errors import UnreadableInputError

    name = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(INPUT_SEED)
    if name == "input_ids":
        return {"input_ids": _token_ids(model, generator)}
    shape = _tensor_input_shape(name, model.config)
    if shape is None:
        raise UnreadableInputError(
            f"verify cannot build probe inputs {name!r} for {type(model).__name__} from its config"
        )
    dtype = getattr(model, "dtype", torch.float32)
    return {name: torch.randn((BATCH, *shape), generator=generator).to(dtype)}


def _tensor_input_shape(name: str, config: Any) -> tuple[int, ...] | None:
    """One example's shape of an image or audio input, from the model's config."""

    def number(*keys: str) -> int | None:
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                return int(value[0])
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    if name == "pixel_values":
        channels, size = number("num_channels") or 3, getattr(config, "image_size", None)
        if isinstance(size, int):
            return channels, size, size
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return channels, int(size[0]), int(size[1])
        return None
    if name == "input_values":
        return (AUDIO_SAMPLES,)
    if name == "input_features":
        mels = number("num_mel_bins", "feature_size", "input_feat_per_channel")
        positions, frames = number("max_source_positions"), number("max_length")
        if mels and positions:  # Whisper: (mel bins, 2 x positions)
            return mels, 2 * positions
        if mels and frames:  # AST: (frames, mel bins)
            return frames, mels
        return (AUDIO_FRAMES, mels) if mels else None
    return None


def _token_ids(model: Any, generator: Any) -> Any:
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
    ids = allowed[torch.randint(0, len(allowed), (BATCH, length), generator=generator)]
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if getattr(config, "is_encoder_decoder", False) and isinstance(eos, int):
        ids[:, -1] = eos  # BART/T5 classification heads pool the <eos> position
    return ids


def logits(model: Any, inputs: Any) -> Any:
    """Logits for each example separately (decoder classifiers without a pad token refuse batches).

    ``inputs``: what :func:`probe_inputs` gives (a tensor alone is token ids); token ids get an all-ones
    attention mask.
    """
    import torch

    inputs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
    rows = []
    with torch.no_grad():
        for index in range(len(next(iter(inputs.values())))):
            row = {key: value[index : index + 1] for key, value in inputs.items()}
            if "input_ids" in row and "attention_mask" not in row:
                row["attention_mask"] = torch.ones_like(row["input_ids"])
            out = model(**row)
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


def probe(model: Any, inputs: Any) -> Probe:
    """Logits, a fingerprint of every parameter/buffer, and which of them the forward pass used."""
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, _i, _o: called.add(id(mod))) for m in model.modules()]
    try:
        values = logits(model, inputs)
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
