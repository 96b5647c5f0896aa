"""The stdlib msgpack codec against the reference ``msgpack`` package: byte-identical encoding where the
reference is canonical, and round trips both ways on property-based data."""
from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.common.msgpack_codec import ExtType, MsgpackError, packb, unpackb

# every int width boundary: fixint, uint8/16/32/64, negative fixint, int8/16/32/64
BOUNDARIES = sorted({s * v + d for v in (0, 31, 32, 127, 128, 255, 256, 2**15, 2**16, 2**31, 2**32, 2**63)
                     for s in (1, -1) for d in (-1, 0, 1)
                     if -2**63 <= s * v + d < 2**64} | {2**64 - 1, -2**63})

ints = st.one_of(st.sampled_from(BOUNDARIES), st.integers(-2**63, 2**64 - 1))
floats = st.floats(allow_nan=True, allow_infinity=True)
keys = st.one_of(st.text(max_size=40), st.integers(-2**63, 2**64 - 1), st.binary(max_size=20))
leaves = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=300), st.binary(max_size=300))
values = st.recursive(
    leaves,
    lambda children: st.one_of(st.lists(children, max_size=20), st.dictionaries(keys, children, max_size=20)),
    max_leaves=60,
)


def ref_pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ref_unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


def same(a, b) -> bool:
    """Structural equality where NaN equals NaN and bool is not int."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items())
    return a == b


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(values)
def test_encoding_matches_reference_bytes(obj):
    data = packb(obj)
    assert data == ref_pack(obj)
    assert same(unpackb(data), obj)
    assert same(unpackb(ref_pack(obj)), ref_unpack(ref_pack(obj)))


@settings(max_examples=200, deadline=None)
@given(ints)
def test_every_int_width_round_trips(v):
    assert packb(v) == ref_pack(v)
    assert unpackb(ref_pack(v)) == v


@pytest.mark.parametrize("v", BOUNDARIES)
def test_int_boundaries_use_the_smallest_width(v):
    assert packb(v) == ref_pack(v)
    assert unpackb(packb(v)) == v


def test_out_of_range_ints_raise():
    with pytest.raises(MsgpackError, match="uint64"):
        packb(2**64)
    with pytest.raises(MsgpackError, match="int64"):
        packb(-2**63 - 1)


@settings(max_examples=100, deadline=None)
@given(st.floats(width=32, allow_nan=False))
def test_float32_both_directions(v):
    ours = packb(v, use_single_float=True)
    assert ours == msgpack.packb(v, use_single_float=True)
    assert unpackb(ours) == msgpack.unpackb(ours)


@pytest.mark.parametrize("v", [float("inf"), float("-inf"), float("nan"), -0.0, 5e-324, 1.7976931348623157e308])
def test_special_floats(v):
    assert packb(v) == ref_pack(v)
    assert same(unpackb(packb(v)), v)


@pytest.mark.parametrize("n", [0, 31, 32, 255, 256, 65535, 65536, 70000])
def test_bin_and_str_widths(n):
    b = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    assert packb(b) == ref_pack(b)
    assert unpackb(ref_pack(b)) == b
    s = "é" * (n // 2) + "a" * (n % 2)  # utf-8 length n
    assert packb(s) == ref_pack(s)
    assert unpackb(ref_pack(s)) == s


@pytest.mark.parametrize("n", [0, 15, 16, 65535, 65536])
def test_container_widths(n):
    arr = list(range(n % 200)) * (n // 200) + list(range(n % 200))
    arr = arr[:n] + [0] * (n - len(arr[:n]))
    assert packb(arr) == ref_pack(arr)
    assert unpackb(ref_pack(arr)) == arr
    m = {i: i for i in range(n)}
    assert packb(m) == ref_pack(m)
    assert unpackb(ref_pack(m)) == m


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.text(max_size=8),
                       st.builds(lambda seed, n: (seed * (70000 // max(1, len(seed)) + 2))[:n] + bytes(65537),
                                 st.binary(min_size=1, max_size=64), st.integers(0, 5000)),
                       min_size=1, max_size=3))
def test_large_bins_in_maps(d):
    assert packb(d) == ref_pack(d)
    assert unpackb(ref_pack(d)) == d


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=500))
def test_unicode(s):
    assert packb(s) == ref_pack(s)
    assert unpackb(ref_pack(s)) == s


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 0, 3, 17, 255, 256, 70000])
def test_ext_passthrough(n):
    data = bytes(i % 251 for i in range(n))
    ours = packb(ExtType(5, data))
    assert ours == ref_pack(msgpack.ExtType(5, data))
    assert unpackb(ours) == ExtType(5, data)
    ref = msgpack.unpackb(ours)
    assert (ref.code, ref.data) == (5, data)


def test_tuples_and_bytearray_encode_like_lists_and_bytes():
    assert packb((1, 2, bytearray(b"xy"), memoryview(b"z"))) == ref_pack([1, 2, b"xy", b"z"])


@pytest.mark.parametrize("bad", [b"", b"\xc1", b"\xcd\x01", b"\xa5abc", b"\x92\x01", b"\xdd\xff\xff\xff\xff", b"\x01\x02",
                                 b"\xa2\xff\xfe"])
def test_malformed_input_raises(bad):
    with pytest.raises(MsgpackError):
        unpackb(bad)


def test_unencodable_object_raises():
    with pytest.raises(MsgpackError, match="set"):
        packb({1, 2})


def test_deep_nesting_is_refused_not_a_crash():
    data = b"\x91" * 100000 + b"\xc0"
    with pytest.raises(MsgpackError, match="nested"):
        unpackb(data)


def test_float32_on_wire_decodes_exactly():
    data = b"\xca" + struct.pack(">f", 0.1)
    assert unpackb(data) == struct.unpack(">f", struct.pack(">f", 0.1))[0]


def test_negative_ext_codes_pass_through():
    data = packb(ExtType(-1, b"\x00\x00\x00\x01"))  # the reserved timestamp type stays raw here
    assert data == b"\xd6\xff\x00\x00\x00\x01"
    assert unpackb(data) == ExtType(-1, b"\x00\x00\x00\x01")
