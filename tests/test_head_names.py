"""The head list covers every task head transformers has: each sequence/token/image/audio classification and
question answering class, built without weights from its default config, has no top-level module with parameters
outside its backbone that ``HEAD_NAMES`` misses (e.g. the ``projector`` of audio classifiers)."""

from __future__ import annotations

import warnings

import pytest

from ckpt_migrate.core.peft_layout import BACKBONE_NAMES_OF_SOME_HEADS, HEAD_NAMES
from ckpt_migrate.formats.architecture import CLASSIFICATION, class_names, meta_instance

LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers")


def _build(model_class_name: str, model_type: str):
    """The class on the meta device from its default config (one layer where the config allows), or None."""
    import transformers

    cls = getattr(transformers, model_class_name, None)
    if cls is None:
        return None
    try:
        small = transformers.AutoConfig.for_model(model_type)
        for key in LAYER_COUNTS:
            if isinstance(getattr(small, key, None), int):
                setattr(small, key, 1)
        try:
            return meta_instance(cls, small)
        except Exception:  # noqa: BLE001 - some configs refuse a layer count (Funnel): the full default
            return meta_instance(cls, transformers.AutoConfig.for_model(model_type))
    except Exception:  # noqa: BLE001 - optional dependencies (detectron2, natten), configs without defaults
        return None


def _top_level_with_parameters(model) -> set[str]:
    return {name for name, child in model.named_children() if any(True for _ in child.parameters())}


@pytest.fixture(scope="module")
def task_heads() -> tuple[dict[str, set[str]], dict[str, set[str]], int, int]:
    """(head name -> classes having it, bare-model top-level name -> classes, classes built, classes tried)."""
    from transformers import PreTrainedModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    heads: dict[str, set[str]] = {}
    backbone_names: dict[str, set[str]] = {}
    built = tried = 0
    bare = class_names("AutoModel")
    in_backbones: dict[str, set[str]] = {}  # model type -> its bare model's top level: built once, not per task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for auto in CLASSIFICATION:
            for model_type, class_name in class_names(auto).items():
                tried += 1
                model = _build(class_name, model_type)
                if model is None:
                    continue
                built += 1
                if model_type not in in_backbones:
                    backbone = _build(bare[model_type], model_type) if model_type in bare else None
                    in_backbones[model_type] = _top_level_with_parameters(backbone) if backbone is not None else set()
                in_backbone = in_backbones[model_type]
                for name in in_backbone:
                    backbone_names.setdefault(name, set()).add(bare[model_type])
                for name, child in model.named_children():
                    # The backbone: under base_model_prefix, a whole PreTrainedModel, or a module the bare model
                    # has at its own top level (T5ForQuestionAnswering keeps encoder/decoder/shared there).
                    if name == model.base_model_prefix or isinstance(child, PreTrainedModel) or name in in_backbone:
                        continue
                    if any(True for _ in child.parameters()):
                        heads.setdefault(name, set()).add(class_name)
    return heads, backbone_names, built, tried


def test_every_task_head_of_transformers_is_a_head_name(task_heads):
    heads, _, built, tried = task_heads
    assert built >= 0.85 * tried, f"only {built} of {tried} task classes could be built"
    assert {"classifier", "score", "qa_outputs", "projector"} <= set(heads)  # the test sees what it must
    missing = {name: sorted(classes)[:3] for name, classes in heads.items() if name not in HEAD_NAMES}
    unexplained = {name: classes for name, classes in missing.items() if name not in BACKBONE_NAMES_OF_SOME_HEADS}
    assert not unexplained, f"task heads missing from HEAD_NAMES: {unexplained}"


def test_head_names_left_out_are_top_level_modules_of_bare_backbones(task_heads):
    """The names left out on purpose really are a bare model's own top-level modules (else they belong in the list)."""
    heads, backbone_names, _, _ = task_heads
    for name in BACKBONE_NAMES_OF_SOME_HEADS:
        assert name in backbone_names, f"{name!r} is no bare model's top-level module: add it to HEAD_NAMES"
        assert name not in HEAD_NAMES
    assert not HEAD_NAMES & set(backbone_names), sorted(HEAD_NAMES & set(backbone_names))
