"""The streaming writer produces exactly what a naive load-everything / fold / save_file script does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

from ckpt_migrate import fix
from ckpt_migrate.formats.safetensors import read_header

NAIVE = Path(__file__).parents[1] / "benchmarks" / "naive_fix.py"
FLAT_HEAD_CASES = ["llama_score", "distilbert_two_heads", "mistral_bf16", "bert_token_cls"]


def data_section(path: Path) -> bytes:
    header = read_header(path)
    return path.read_bytes()[header.data_start :]


@pytest.mark.parametrize("case", FLAT_HEAD_CASES)
def test_streamed_output_equals_naive_save_file_output(tmp_path, case):
    checkpoint = FIXTURES / case / "run" / "checkpoint-2"
    naive, ours = tmp_path / "naive", tmp_path / "ours"
    subprocess.run([sys.executable, str(NAIVE), str(checkpoint), str(naive), "--no-fsync"], check=True)
    assert fix(checkpoint, ours, progress=False).exit_code == 0
    naive_header = read_header(naive / "adapter_model.safetensors")
    our_header = read_header(ours / "adapter_model.safetensors")
    assert list(our_header.tensors.values()) == list(naive_header.tensors.values())  # names, dtypes, offsets
    assert data_section(ours / "adapter_model.safetensors") == data_section(naive / "adapter_model.safetensors")
    assert set(our_header.metadata) == set(naive_header.metadata) | {"ckpt_migrate"}
