"""protocol.py on its own: wire pixels round-trip in every format and stride, body codecs, field paths."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.protocol import (LAYER_FORMATS, MASK_FORMATS, Limits, ProtocolError, decode_body, decode_pixels,
                             encode_body, encode_layer, parse_render_request, to_unit_float)

LIM = Limits()


@settings(max_examples=40, deadline=None)
@given(w=st.integers(8, 40), h=st.integers(8, 40), fmt=st.sampled_from(sorted(LAYER_FORMATS)),
       pad=st.integers(0, 9), tight_last=st.booleans(), seed=st.integers(0, 1000))
def test_layer_round_trip_any_stride(w, h, fmt, pad, tight_last, seed):
    rgba = np.random.default_rng(seed).random((h, w, 4), dtype=np.float32)
    wire = encode_layer(rgba, fmt, x=-3, y=7, name="n")
    row = wire["stride"]
    rows = np.frombuffer(wire["data"], np.uint8).reshape(h, row)
    padded = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1).tobytes()
    if tight_last and pad:
        padded = padded[:-pad]
    back = decode_pixels(dict(wire, stride=row + pad, data=padded), "layer", LAYER_FORMATS, LIM)
    assert (back.x, back.y, back.name, back.format) == (-3, 7, "n", fmt)
    step = {"rgba8": 1 / 255, "rgba16": 1 / 65535, "rgbaf32": 0.0}[fmt]
    assert np.allclose(to_unit_float(back.array), rgba, atol=step / 2 + 1e-7)


def test_mask_formats_and_unit_scaling():
    g8 = decode_pixels({"width": 8, "height": 8, "format": "gray8", "data": bytes(range(0, 256, 4))},
                       "selection", MASK_FORMATS, LIM)
    assert g8.array.shape == (8, 8, 1) and to_unit_float(g8.array).max() == pytest.approx(252 / 255)
    f = np.linspace(-1, 2, 64, dtype="<f4")
    gf = decode_pixels({"width": 8, "height": 8, "format": "grayf32", "data": f.tobytes()}, "selection",
                       MASK_FORMATS, LIM)
    u = to_unit_float(gf.array)
    assert u.min() == 0.0 and u.max() == 1.0  # finite values outside [0,1] are clipped


def test_body_codecs_and_errors():
    obj = {"a": b"\x00\x01", "b": [1, 2.5, None]}
    raw, ctype = encode_body(obj, True)
    assert decode_body(raw, ctype, LIM) == obj
    raw, ctype = encode_body(obj, False)
    assert ctype == "application/json" and b'"AAE="' in raw  # bytes are base64 in JSON
    with pytest.raises(ProtocolError) as e:
        decode_body(b"\x93\x01", "application/msgpack; charset=binary", LIM)
    assert e.value.status == 400 and e.value.code == "bad_msgpack"


def test_render_request_paths_name_the_field():
    with pytest.raises(ProtocolError) as e:
        parse_render_request({"edits": [{"direction": "a", "strength": 1}, {"direction": "a", "strength": "x"}]},
                             LIM, {"a"})
    assert e.value.field == "edits[1].strength" and e.value.status == 422
    req = parse_render_request({"edits": [{"direction": "a", "strength": 2, "layers": [1, 3]}], "format": "rgba16"},
                               LIM, {"a"}, num_ws=8)
    assert req.edits == [("a", 2.0, (1, 3))] and req.format == "rgba16" and req.feather is None
