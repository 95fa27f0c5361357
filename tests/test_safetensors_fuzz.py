"""Property-based fuzzing of ``read_header``: whatever the bytes, it succeeds or raises UnreadableInputError.

When it succeeds, what it returns must be safe to act on: every tensor lies inside the file, the
tensors tile the data section exactly, and byte lengths match shapes. Files the reference safetensors
implementation accepts must be accepted too (no false refusals of real checkpoints).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hostile_helpers import FIXTURES, read_safetensors_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.formats.dtypes import DTYPES as DTYPE_TABLE
from ckpt_migrate.formats.safetensors import read_header

FUZZ = settings(
    max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
VALID_FILE = FIXTURES / "llama_score" / "run" / "checkpoint-2" / "adapter_model.safetensors"
VALID = VALID_FILE.read_bytes()
VALID_HEADER, VALID_DATA = read_safetensors_raw(VALID_FILE)
DTYPES = list(DTYPE_TABLE)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="st-fuzz-") as directory:
        yield Path(directory) / "fuzz.safetensors"


def check(path: Path, raw: bytes):
    """Write ``raw``, parse it; on success, check the header is safe to act on. Returns the header or None."""
    path.write_bytes(raw)
    try:
        header = read_header(path)
    except UnreadableInputError as exc:
        assert exc.path == path and str(exc).startswith(str(path))
        assert "\n" not in exc.message
        return None
    size = len(raw)
    assert header.file_size == size and 8 <= header.data_start <= size
    cursor = 0
    for info in sorted(header.tensors.values(), key=lambda t: (t.begin, t.end)):
        assert info.begin == cursor and info.end >= info.begin
        assert info.nbytes == math.prod(info.shape) * DTYPE_TABLE[info.dtype].size
        cursor = info.end
    assert header.data_start + cursor == size
    for name in header.tensors:
        assert len(header.read_bytes(name)) == header.tensors[name].nbytes
    return header


def encode(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ---------------------------------------------------------------- arbitrary bytes


@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes(scratch, raw):
    check(scratch, raw)


@FUZZ
@given(header=st.binary(max_size=200), data=st.binary(max_size=64), slack=st.integers(-16, 16))
def test_arbitrary_header_bytes_with_plausible_length(scratch, header, data, slack):
    check(scratch, encode(header, data, max(0, len(header) + slack)))


# ---------------------------------------------------------------- arbitrary JSON headers

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
dims = st.integers(-2, 6) | st.sampled_from([2**32, 2**63, 2**64, 10**30])
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(DTYPES) | st.sampled_from(["F4", "f32", "", "C64"]) | json_values,
        "shape": st.lists(dims, max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-4, 600) | st.sampled_from([2**64, 2**64 - 1]), max_size=3) | json_values,
    },
)


@FUZZ
@given(
    tensors=st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5),
    metadata=st.none() | json_values | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    data_len=st.integers(0, 600),
)
def test_arbitrary_json_headers(scratch, tensors, metadata, data_len):
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    check(scratch, encode(header, b"\0" * data_len))


@st.composite
def consistent_files(draw):
    """Headers that are valid by construction, so the reference implementation has something to accept."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=5))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = math.prod(shape) * DTYPE_TABLE[dtype].size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    items = list(header.items())
    order = draw(st.permutations(range(len(items))))
    return encode(dict(items[i] for i in order), b"\x01" * offset)


@FUZZ
@given(consistent_files())
def test_valid_files_are_accepted_like_the_reference_implementation(scratch, raw):
    safetensors = pytest.importorskip("safetensors")
    header = check(scratch, raw)
    reference = safetensors.deserialize(raw)  # the Rust parser; raises on anything it refuses
    assert header is not None, "read_header refused a file the safetensors library reads"
    assert sorted(name for name, _ in reference) == sorted(header.tensors)


# ---------------------------------------------------------------- mutations of a real checkpoint file


HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]

# Each mutation is a small tuple (shown compactly when hypothesis reports a failure), applied in order.
byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, HEADER_END - 1), st.integers(0, 255)),  # length prefix or header
    st.tuples(st.just("flip-data"), st.integers(HEADER_END, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID))),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID)), st.integers(1, 8)),
    st.tuples(
        st.just("length"),
        st.integers(0, 2**64 - 1) | st.integers(HEADER_END - 32, HEADER_END + 24).map(lambda n: max(n - 8, 0)),
    ),
)


def apply_byte_mutations(mutations) -> bytes:
    raw = bytearray(VALID)
    for op, *args in mutations:
        if op in ("flip", "flip-data") and args[0] < len(raw):
            raw[args[0]] = args[1]
        elif op == "truncate":
            del raw[args[0] :]
        elif op == "insert":
            raw[args[0] : args[0]] = args[1]
        elif op == "delete":
            del raw[args[0] : args[0] + args[1]]
        elif op == "length" and len(raw) >= 8:
            raw[:8] = struct.pack("<Q", args[0])
    return bytes(raw)


@FUZZ
@given(st.lists(byte_mutation, min_size=1, max_size=4))
def test_mutated_real_file_bytes(scratch, mutations):
    check(scratch, apply_byte_mutations(mutations))


TENSOR_NAMES = sorted(n for n in VALID_HEADER if n != "__metadata__")
header_mutation = st.one_of(
    st.tuples(st.just("entry"), st.sampled_from(TENSOR_NAMES), json_values),
    st.tuples(st.just("drop"), st.sampled_from(TENSOR_NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(TENSOR_NAMES), st.text(max_size=6)),
    st.tuples(
        st.just("field"),
        st.sampled_from(TENSOR_NAMES),
        st.sampled_from(["dtype", "shape", "data_offsets"]),
        json_values | st.sampled_from(DTYPES),
    ),
    st.tuples(  # nudge one number of a shape or offsets: near-valid headers probe the boundary checks
        st.just("nudge"),
        st.sampled_from(TENSOR_NAMES),
        st.sampled_from(["shape", "data_offsets"]),
        st.integers(0, 1),
        st.integers(-8, 8) | st.sampled_from([2**64, -(2**64), 2**63]),
    ),
    st.tuples(st.just("metadata"), json_values),
)


def apply_header_mutations(mutations) -> dict:
    header = json.loads(json.dumps(VALID_HEADER))
    for op, *args in mutations:
        name = args[0]
        if op == "entry":
            header[name] = args[1]
        elif op == "drop":
            header.pop(name, None)
        elif op == "rename" and name in header:
            header[args[1]] = header.pop(name)
        elif op == "field" and isinstance(header.get(name), dict):
            header[name][args[1]] = args[2]
        elif op == "nudge" and isinstance(header.get(name), dict):
            value = header[name].get(args[1])
            if isinstance(value, list) and len(value) > args[2] and isinstance(value[args[2]], int):
                value[args[2]] += args[3]
        elif op == "metadata":
            header["__metadata__"] = name
    return header


@FUZZ
@given(
    st.lists(header_mutation, min_size=1, max_size=3),
    st.sampled_from([len(VALID_DATA), len(VALID_DATA) - 4, len(VALID_DATA) + 4, 0]),
)
def test_mutated_real_file_headers(scratch, mutations, data_len):
    data = (VALID_DATA + b"\0" * 4)[:data_len]
    check(scratch, encode(apply_header_mutations(mutations), data))


def test_the_unmutated_file_is_accepted(scratch):
    header = check(scratch, VALID)
    assert header is not None and len(header.tensors) == len(VALID_HEADER) - 1
