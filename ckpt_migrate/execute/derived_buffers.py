"""Buffers peft derives when it builds a layer and does not save: what loading and ``verify`` must not call unused.

Outside ``migrations/`` because ``verify`` and repair on load use it too, and run where only ``ckpt_migrate`` itself
is importable (an old stack's interpreter with the checkout on its path, which has no ``ckpt_migrate.migrations``).
"""

from __future__ import annotations

from typing import Any


def derived_buffer(model: Any, name: str, saved: Any) -> bool:
    """Whether ``name`` is a buffer the installed peft derives and does not save (BOFT's boft_P since peft 0.13),
    holding exactly the ``saved`` value."""
    import torch

    module_name, _, buffer = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    own = module._buffers.get(buffer)
    return (
        buffer in getattr(module, "_non_persistent_buffers_set", ())
        and isinstance(own, torch.Tensor)
        and isinstance(saved, torch.Tensor)
        and own.shape == saved.shape
        and torch.equal(own.to(saved.dtype), saved.to(own.device))
    )
