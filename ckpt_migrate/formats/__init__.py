"""One reader (and, where the tool writes it, one writer) per file format a checkpoint holds.

Only :mod:`~ckpt_migrate.formats.pickles` and the ``.bin`` path of
:mod:`~ckpt_migrate.formats.adapter` import torch, and only when a pickle must actually be loaded.
"""
