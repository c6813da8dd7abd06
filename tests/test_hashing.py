import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flm_dist.data.hashing import (
    HashSpec,
    expected_collisions,
    hash_array,
    prehash_str,
    reference_hash_int,
    reference_hash_str,
    table_seed,
    to_signed,
)
from flm_dist.export import torch_hash_int64

SEED = table_seed("user", 42)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=50), st.integers(1, 10**9))
def test_int_vectorised_and_torch_match_reference(ids, rows):
    arr = np.array(ids, dtype=np.int64)
    ref = [reference_hash_int(i, SEED, rows) for i in ids]
    assert hash_array(arr, SEED, rows).tolist() == ref
    assert hash_array(pa.array(ids, pa.int64()), SEED, rows).tolist() == ref
    assert torch_hash_int64(torch.tensor(ids, dtype=torch.int64), to_signed(SEED), rows).tolist() == ref


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=40), st.integers(1, 10**9))
def test_strings_match_reference_plain_large_dictionary_and_sliced(values, rows):
    ref = [reference_hash_str(v, SEED, rows) for v in values]
    assert hash_array(pa.array(values, pa.string()), SEED, rows).tolist() == ref
    assert hash_array(pa.array(values, pa.large_string()), SEED, rows).tolist() == ref
    assert hash_array(pa.array(values).dictionary_encode(), SEED, rows).tolist() == ref
    assert hash_array(pa.array(["pad"] + values).slice(1), SEED, rows).tolist() == ref
    # an int64-only graph serves strings through prehash
    assert [reference_hash_int(prehash_str(v), SEED, rows) for v in values] == ref


def test_narrower_int_types_hash_like_int64():
    ids = [0, 1, 7, 127]
    for t in (pa.int8(), pa.int16(), pa.int32(), pa.uint32()):
        assert hash_array(pa.array(ids, t), SEED, 1000).tolist() == hash_array(np.array(ids), SEED, 1000).tolist()


def test_tables_are_independent_and_spec_roundtrips():
    spec = HashSpec.build({"user": 1000, "item": 1000}, 7)
    ids = np.arange(200)
    assert (spec.hash("user", ids) != spec.hash("item", ids)).mean() > 0.9
    again = HashSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    with pytest.raises(ValueError, match="unsupported hash spec version"):
        HashSpec.from_dict({**spec.to_dict(), "version": "flm-hash-v0"})


def test_hash_is_stable_across_processes_and_hash_seeds():
    code = (
        "import numpy as np, pyarrow as pa, json;"
        "from flm_dist.data.hashing import HashSpec;"
        "s = HashSpec.build({'user': 977}, 3);"
        "print(json.dumps([s.hash('user', np.arange(20)).tolist(), s.hash('user', pa.array(['a','bb','ccc'])).tolist()]))"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"}, check=True)
        outs.add(out.stdout)
    assert len(outs) == 1
    s = HashSpec.build({"user": 977}, 3)
    assert json.loads(outs.pop()) == [s.hash("user", np.arange(20)).tolist(), s.hash("user", pa.array(["a", "bb", "ccc"])).tolist()]


def test_distribution_is_uniform_enough():
    rows = 1000
    h = hash_array(np.arange(200_000), SEED, rows)
    counts = np.bincount(h, minlength=rows)
    assert counts.min() > 120 and counts.max() < 290  # mean 200


def test_expected_collisions():
    c = expected_collisions(1000, 1 << 20)
    assert 0.0009 < c["ids_colliding"] < 0.0011
    assert expected_collisions(0, 10)["ids_colliding"] == 0.0
    # n == m: about 1 - 1/e of IDs share a row
    assert abs(expected_collisions(100_000, 100_000)["ids_colliding"] - (1 - np.exp(-1))) < 0.01
