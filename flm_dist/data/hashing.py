"""ID hashing: raw int64 / string IDs -> embedding rows, with no vocabulary pass.

Spec `flm-hash-v1` (saved with every checkpoint and export, so any process can map
IDs identically; `reference_hash_*` below is the plain-Python definition):

    M = 2**64, all arithmetic mod M, `>>` a logical shift
    fmix64(k) = k ^= k >> 33; k *= 0xff51afd7ed558ccd; k ^= k >> 33;
                k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33          (MurmurHash3 finaliser)
    fnv1a64(b) = h = 0xcbf29ce484222325; for byte in b: h = (h ^ byte) * 0x100000001b3
    seed(table) = fmix64(fnv1a64(utf8(table)) ^ fmix64(global_seed))
    int id      : h = fmix64(uint64(id) ^ seed(table))           (two's complement bits)
    string id   : h = fmix64(fnv1a64(utf8(id)) ^ seed(table) ^ 0x9e3779b97f4a7c15)
    row         = (h >> 1) mod rows

Each table has its own seed, so a user and an item with the same raw ID land on
unrelated rows. Vectorised with numpy (no per-row Python); the same arithmetic runs
inside the exported TorchScript / ONNX graph (`export.torch_hash_int64`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "HASH_VERSION",
    "HashSpec",
    "expected_collisions",
    "hash_array",
    "reference_hash_int",
    "reference_hash_str",
    "fmix64",
    "fnv1a64_strings",
    "identity_keys",
    "prehash_ids",
    "prehash_str",
    "to_signed",
]

HASH_VERSION = "flm-hash-v1"
_M = (1 << 64) - 1
_C1 = 0xFF51AFD7ED558CCD
_C2 = 0xC4CEB9FE1A85EC53
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
STRING_DOMAIN = 0x9E3779B97F4A7C15


# ------------------------------------------------------------------ plain-Python reference


def _fmix64_int(k: int) -> int:
    k &= _M
    k ^= k >> 33
    k = (k * _C1) & _M
    k ^= k >> 33
    k = (k * _C2) & _M
    k ^= k >> 33
    return k


def _fnv1a64_bytes(b: bytes) -> int:
    h = _FNV_OFFSET
    for byte in b:
        h = ((h ^ byte) * _FNV_PRIME) & _M
    return h


def table_seed(table: str, global_seed: int) -> int:
    return _fmix64_int(_fnv1a64_bytes(table.encode()) ^ _fmix64_int(global_seed & _M))


def reference_hash_int(value: int, seed: int, rows: int) -> int:
    """The spec for one integer ID, in plain Python (for other languages and tests)."""
    return (_fmix64_int((value & _M) ^ seed) >> 1) % rows


def reference_hash_str(value: str, seed: int, rows: int) -> int:
    """The spec for one string ID, in plain Python."""
    return (_fmix64_int(_fnv1a64_bytes(value.encode()) ^ seed ^ STRING_DOMAIN) >> 1) % rows


# ------------------------------------------------------------------ vectorised numpy


def fmix64(k: np.ndarray) -> np.ndarray:
    # In-place on a uint64 array: numpy wraps uint64 multiplication mod 2**64.
    k ^= k >> np.uint64(33)
    k *= np.uint64(_C1)
    k ^= k >> np.uint64(33)
    k *= np.uint64(_C2)
    k ^= k >> np.uint64(33)
    return k


def fnv1a64_strings(arr: pa.Array) -> np.ndarray:
    """FNV-1a over each string's UTF-8 bytes, vectorised across strings: one numpy pass
    per byte position (IDs are short), over the strings still that long."""
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        offsets_type = np.int64
    else:
        offsets_type = np.int32
    arr = arr.fill_null("")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=offsets_type, count=len(arr) + 1, offset=arr.offset * np.dtype(offsets_type).itemsize)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = (offsets[1:] - offsets[:-1]).astype(np.int64)
    h = np.full(len(arr), _FNV_OFFSET, dtype=np.uint64)
    prime = np.uint64(_FNV_PRIME)
    if len(arr) == 0:
        return h
    order = np.argsort(-lengths, kind="stable")  # longest first: active set is a prefix
    sorted_len = lengths[order]
    sorted_start = starts[order]
    hs = h[order]
    for j in range(int(sorted_len[0]) if len(sorted_len) else 0):
        n = int(np.searchsorted(-sorted_len, -j, side="left"))  # strings longer than j
        if n == 0:
            break
        byte = data[sorted_start[:n] + j].astype(np.uint64)
        hs[:n] ^= byte
        hs[:n] *= prime
    h[order] = hs
    return h


def prehash_ids(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Raw IDs as the int64 the exported graphs take: integers as they are, strings as
    prehash(s); nulls as 0 / prehash("") (how training hashes them)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_integer(arr.type):
        return pc.cast(arr.fill_null(0), pa.int64(), safe=False).to_numpy(zero_copy_only=False)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return (fnv1a64_strings(arr) ^ np.uint64(STRING_DOMAIN)).view(np.int64)
    raise TypeError(f"IDs must be integers or strings, got {arr.type}")


def hash64(arr: pa.Array, seed: int) -> np.ndarray:
    """Full 64-bit hash (uint64) of raw IDs, independent of table sizes (splits, keys)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    s = np.uint64(table_seed("_split", seed))
    if pa.types.is_integer(arr.type):
        k = pc.cast(arr.fill_null(0), pa.int64(), safe=False).to_numpy(zero_copy_only=False).view(np.uint64).copy()
    else:
        k = fnv1a64_strings(arr)
    k ^= s
    return fmix64(k)


KEY_SEED = 0x5EED


def identity_keys(arr: pa.Array) -> np.ndarray:
    """64-bit identity keys of raw IDs (int64 view), independent of table sizes: which
    user/item a row is, for evaluation slices and retrieval exclusions."""
    return hash64(arr, KEY_SEED).view(np.int64)


def hash_array(arr: pa.Array | pa.ChunkedArray | np.ndarray, seed: int, rows: int) -> np.ndarray:
    """Rows (int64) for an array of IDs. Integers and strings follow the spec; nulls hash
    as 0 / "" (callers drop null-ID rows before training and count them)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if isinstance(arr, np.ndarray):
        if arr.dtype.kind not in "iu":
            raise TypeError(f"hash_array: numpy IDs must be integers, got {arr.dtype}")
        k = arr.astype(np.int64, copy=False).view(np.uint64).copy()
        k ^= np.uint64(seed)
    elif pa.types.is_dictionary(arr.type):
        # Hash each dictionary value once; a null entry (a null index) hashes like the
        # null of a plain column (0 / ""), never like dictionary[0].
        values = hash_array(pa.concat_arrays([arr.dictionary, pa.nulls(1, arr.dictionary.type)]), seed, rows)
        codes = arr.indices.cast(pa.int64()).fill_null(len(arr.dictionary)).to_numpy(zero_copy_only=False)
        return values[codes]
    elif pa.types.is_integer(arr.type):
        k = pc.cast(arr.fill_null(0), pa.int64(), safe=False).to_numpy(zero_copy_only=False).view(np.uint64).copy()
        k ^= np.uint64(seed)
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        k = fnv1a64_strings(arr)
        k ^= np.uint64(seed ^ STRING_DOMAIN)
    else:
        raise TypeError(f"IDs must be integer or string, got {arr.type}")
    h = fmix64(k)
    h >>= np.uint64(1)
    return (h % np.uint64(rows)).astype(np.int64)


# ------------------------------------------------------------------ torch (exported graph)


def to_signed(c: int) -> int:
    """A uint64 value as the int64 with the same bits."""
    return c - (1 << 64) if c >= (1 << 63) else c


def prehash_str(value: str) -> int:
    """A string ID as the int64 that, hashed as an integer ID, gives the string's row:
    fmix64(prehash ^ seed) == fmix64(fnv1a64(s) ^ seed ^ DOMAIN). Lets int64-only
    graphs (TorchScript, ONNX) serve string IDs."""
    return to_signed(_fnv1a64_bytes(value.encode()) ^ STRING_DOMAIN)


# ------------------------------------------------------------------ spec object


@dataclass(frozen=True)
class HashSpec:
    """Per-table seeds and sizes; JSON-able, saved with checkpoints and exports."""

    version: str
    global_seed: int
    tables: dict[str, dict[str, int]]  # table -> {"rows": n, "seed": s}

    @classmethod
    def build(cls, table_rows: dict[str, int], global_seed: int) -> HashSpec:
        return cls(
            version=HASH_VERSION,
            global_seed=global_seed,
            tables={t: {"rows": int(r), "seed": table_seed(t, global_seed)} for t, r in sorted(table_rows.items())},
        )

    def hash(self, table: str, arr) -> np.ndarray:
        t = self.tables[table]
        return hash_array(arr, t["seed"], t["rows"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["definition"] = __doc__.split("Spec `flm-hash-v1`")[1].split("Each table")[0].strip()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HashSpec:
        if d.get("version") != HASH_VERSION:
            raise ValueError(f"unsupported hash spec version {d.get('version')!r}; this build reads {HASH_VERSION}")
        return cls(version=d["version"], global_seed=d["global_seed"], tables={k: dict(v) for k, v in d["tables"].items()})


def expected_collisions(distinct_ids: int, rows: int) -> dict[str, float]:
    """For n distinct IDs hashed uniformly into m rows: the share of IDs that share their
    row with at least one other ID, and the share of rows in use."""
    n, m = max(distinct_ids, 0), max(rows, 1)
    if n == 0:
        return {"ids_colliding": 0.0, "rows_used": 0.0, "expected_distinct_rows": 0.0}
    p_alone = math.exp((n - 1) * math.log1p(-1.0 / m)) if m > 1 else 0.0
    used = m * (1.0 - math.exp(n * math.log1p(-1.0 / m))) if m > 1 else 1.0
    return {"ids_colliding": 1.0 - p_alone, "rows_used": used / m, "expected_distinct_rows": used}
