"""The shared host flow's segment sources (issue 21) and "Keep photo detail" (issue 20), without a host:
label layers read as "each colour one segment", the checks before any upload, what reaches the wire."""
from __future__ import annotations

import struct

import pytest

from plugins.common import flow as F
from plugins.common import pixels as P

RED, GREEN, BLUE = (255, 0, 0, 255), (0, 200, 0, 255), (0, 0, 255, 255)


def _rgba(rows) -> bytes:
    return b"".join(bytes(p) for row in rows for p in row)


def _bands(w=30, h=10, alpha=255):
    """Three vertical bands red | green | blue."""
    cols = [RED] * (w // 3) + [GREEN] * (w // 3) + [BLUE] * (w - 2 * (w // 3))
    return [[c[:3] + (alpha,) for c in cols] for _ in range(h)]


def test_each_flat_colour_is_one_segment_in_reading_order():
    rows = _bands()
    lm = F.label_map(_rgba(rows), 30, 10)
    assert lm.wire["format"] == "label8" and (lm.wire["width"], lm.wire["height"]) == (30, 10)
    labels = list(lm.wire["data"])
    assert labels[:10] == [0] * 10 and labels[10:20] == [1] * 10 and labels[20:30] == [2] * 10
    assert lm.colours == [0xFF0000, 0x00C800, 0x0000FF] and lm.areas == [100, 100, 100]


def test_transparent_pixels_are_in_no_segment_and_edge_blends_join_the_nearest_colour():
    rows = _bands(w=300, h=40)
    rows[0][0] = (0, 0, 0, 0)  # transparent: no segment
    rows[0][1] = (255, 0, 0, 100)  # under half opacity: no segment
    rows[5][5] = (250, 10, 5, 255)  # an anti-aliased red: joins red
    rows[5][150] = (10, 190, 20, 255)  # ... green
    lm = F.label_map(_rgba(rows), 300, 40)
    assert lm.wire["format"] == "label32"
    labels = struct.unpack("<%di" % (300 * 40), lm.wire["data"])
    assert labels[0] == -1 and labels[1] == -1
    assert labels[5 * 300 + 5] == 0 and labels[5 * 300 + 150] == 1
    assert len(lm.colours) == 3 and sum(lm.areas) == 300 * 40 - 2


def test_layers_that_are_not_label_maps_are_refused_in_words():
    with pytest.raises(F.FlowError, match="no painted pixel"):
        F.label_map(bytes(4 * 64), 8, 8, "labels")
    photo = [[(x * 7 % 256, y * 13 % 256, (x * y) % 256, 255) for x in range(64)] for y in range(64)]
    with pytest.raises(F.FlowError, match="does not look like a label layer"):
        F.label_map(_rgba(photo), 64, 64, "photo")
    many = [[(i * 5, 0, 0, 255) for i in range(40) for _ in range(3)] for _ in range(4)]
    with pytest.raises(F.FlowError, match="40 colours"):
        F.label_map(_rgba(many), 120, 4, "many")


class SegServer:
    """Protocol double: records the options and renders it was sent."""

    url = "http://seg"

    def __init__(self, segmenter=False):
        self.segmenter, self.created, self.renders = segmenter, [], []

    def request(self, method, path):
        return {"models": [{"name": "m", "directions": ["smile"], "segmenter": self.segmenter,
                            "unavailable": {} if self.segmenter else {"segmenter": "add m.segmenter.pt"},
                            "methods": [{"name": "pti", "label": "PTI"}, {"name": "chunks", "label": "Segments (ChunkyGAN)"}]}],
                "default_model": "m"}

    def create_session(self, layer, selection=None, model=None, method="pti", align="auto", options=None):
        self.created.append((method, dict(options or {})))
        return {"session_id": "s%d" % len(self.created), "job_id": "j"}

    def wait_job(self, job_id, on_progress=None, should_cancel=None):
        return {"state": "done"}

    def batch(self, items, **kw):
        raise AssertionError("no batch expected")

    def render(self, sid, edits, feather=None, format=None, **extra):
        self.renders.append(extra)
        return {"layer": {"width": 30, "height": 10, "format": format, "data": b"r"},
                "segments": [{"index": 0, "area": 100}, {"index": 1, "area": 100}, {"index": 2, "area": 100}]}


def _item(segments=None):
    return F.Item(P.pack_layer(bytes(30 * 10 * 4), 30, 10, "rgba8"), None, segments)


def test_label_layer_segments_and_keep_detail_reach_the_wire():
    server = SegServer()
    lm = F.label_map(_rgba(_bands()), 30, 10)
    opts = F.EditOptions(edits=[("smile", 1.0)], method="chunks", segments="layer", keep_detail=True)
    out = F.run_edit(server, [_item(lm.wire)], opts, F.SessionCache())
    ((method, sent),) = server.created
    assert method == "chunks" and sent["segments"] is lm.wire
    assert server.renders == [{"fusion": "relevance"}]
    assert [len(s) for s in out.segments] == [3]
    # another label map is another inversion (the cache key holds the labels), no detail: no fusion sent
    other = F.label_map(_rgba([list(reversed(r)) for r in _bands()]), 30, 10)
    F.run_edit(server, [_item(other.wire)], F.EditOptions(edits=[("smile", 1.0)], method="chunks", segments="layer"),
               F.SessionCache())
    assert len(server.created) == 2 and server.renders[-1] == {}


def test_segment_choices_are_checked_before_any_upload():
    server = SegServer(segmenter=False)
    with pytest.raises(F.FlowError, match="Segments \\(ChunkyGAN\\)"):
        F.run_edit(server, [_item()], F.EditOptions(edits=[("smile", 1)], method="pti", segments="auto"), F.SessionCache())
    with pytest.raises(F.FlowError, match="cannot find segments by itself: add m.segmenter.pt"):
        F.run_edit(server, [_item()], F.EditOptions(edits=[("smile", 1)], method="chunks", segments="auto"),
                   F.SessionCache())
    with pytest.raises(F.FlowError, match="label layer"):
        F.run_edit(server, [_item()], F.EditOptions(edits=[("smile", 1)], method="chunks", segments="layer"),
                   F.SessionCache())
    assert server.created == []
    server.segmenter = True
    F.run_edit(server, [_item()], F.EditOptions(edits=[("smile", 1)], method="chunks", segments="auto"), F.SessionCache())
    assert server.created == [("chunks", {"segments": "auto"})]


def test_edit_segments_are_read_and_sent_with_each_edit():
    assert F.parse_segments("") is None and F.parse_segments(" 1, 3;3 ") == [1, 3]
    with pytest.raises(F.FlowError, match="segment numbers"):
        F.parse_segments("mouth")
    assert F.wire_edits([("smile", 1)]) == [("smile", 1.0)]
    assert F.wire_edits([("smile", 1), ("age", -2)], [1]) == [
        {"direction": "smile", "strength": 1.0, "segments": [1]}, {"direction": "age", "strength": -2.0, "segments": [1]}]
    server = SegServer()
    sent = []
    server.render = lambda sid, edits, **kw: sent.append(edits) or SegServer.render(server, sid, edits, **kw)
    lm = F.label_map(_rgba(_bands()), 30, 10)
    F.run_edit(server, [_item(lm.wire)], F.EditOptions(edits=[("smile", 1.0)], method="chunks", segments="layer",
                                                        edit_segments=[2]), F.SessionCache())
    assert sent == [[{"direction": "smile", "strength": 1.0, "segments": [2]}]]
