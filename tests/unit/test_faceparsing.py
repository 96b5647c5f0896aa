"""BiSeNet face parsing (core.faceparsing): parity with the reference implementation, safe loading, and its use
as the segmenter of a checkpoint (``<stem>.faceparsing.pth`` -> segments="auto")."""
import zlib

import numpy as np
import pytest
import torch

from core.common import InvalidInput
from core.faceparsing import CELEBAMASK_CLASSES, PART_GROUPS, BiSeNet, FaceParser, load_face_parser
from tests.conftest import FIXTURES

REF = FIXTURES / "faceparsing"


class Payload:
    """An arbitrary object in a file: the loader must refuse it rather than unpickle it."""


def reference_weights(shapes: dict) -> dict:
    """Deterministic BiSeNet weights from names and shapes alone (each tensor seeded by its name's CRC-32), so
    the fixture's reference outputs can be checked without shipping 50 MB of weights.  Convolutions He-scaled;
    BatchNorm affine/statistics near identity."""
    out = {}
    for name, shape in sorted(shapes.items()):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        stem, leaf = name.rsplit(".", 1)
        is_bn = f"{stem}.running_mean" in shapes
        if leaf == "num_batches_tracked":
            out[name] = torch.zeros((), dtype=torch.long)
        elif is_bn and leaf == "weight":
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif is_bn and leaf == "running_var":
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif is_bn:  # bias, running_mean
            out[name] = 0.1 * torch.randn(shape, generator=g)
        else:  # conv weights (O,I,k,k)
            fan_in = int(np.prod(shape[1:]))
            out[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out


def reference_shapes() -> dict:
    shapes = {}
    for line in (REF / "bisenet_keys.txt").read_text().splitlines():
        name, shape = line.split(" ", 1)
        shapes[name] = tuple(int(s) for s in shape.split("x")) if shape != "scalar" else ()
    return shapes


def test_tensor_names_and_shapes_match_the_reference_file_layout():
    ours = {k: tuple(v.shape) for k, v in BiSeNet().state_dict().items()}
    assert ours == reference_shapes()


@pytest.mark.parametrize("case", ["square", "wide"])
def test_outputs_match_the_reference_implementation(case):
    net = BiSeNet()
    net.load_state_dict(reference_weights(reference_shapes()))
    x = torch.from_numpy(np.load(REF / f"bisenet_{case}_in.npy"))
    want = np.load(REF / f"bisenet_{case}_out.npy")
    with torch.no_grad():
        got = net.eval()(x).numpy()
    assert got.shape == want.shape
    # float32 rounding grows with the values (up to 189 here) and differs with the convolution algorithm torch picks
    # for a thread count: measured up to 2.1e-4 (square) and 3.8e-5 (wide), i.e. ~1.1e-6 of the largest value
    assert np.abs(got - want).max() <= 3e-6 * np.abs(want).max()


def save_parser_file(path, prefix=""):
    state = reference_weights(reference_shapes())
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return state


def test_load_face_parser_reads_plain_and_dataparallel_files(tmp_path):
    save_parser_file(tmp_path / "a.faceparsing.pth")
    save_parser_file(tmp_path / "b.faceparsing.pth", prefix="module.")
    a, b = load_face_parser(tmp_path / "a.faceparsing.pth", size=64), load_face_parser(tmp_path / "b.faceparsing.pth", size=64)
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    la, lb = a(x), b(x)
    assert la.shape == (2, len(PART_GROUPS), 40, 40) and a.parts == tuple(PART_GROUPS)
    assert torch.equal(la, lb)
    # groups are sums of class probabilities: they sum to one per pixel, and argmax follows the classes' sums
    assert torch.allclose(la.exp().sum(1), torch.ones(2, 40, 40), atol=1e-5)
    probs = torch.softmax(a.class_logits(x), 1)
    hair = CELEBAMASK_CLASSES.index("hair")
    assert torch.allclose(la[:, a.parts.index("hair")].exp(), probs[:, hair], atol=1e-6)


def test_face_parser_feeds_the_network_as_the_reference_test_script_does(tmp_path):
    """[-1,1] images -> [0,1] RGB -> ImageNet normalisation (face-parsing.PyTorch test.py), at the parse size."""
    from core.faceparsing import IMAGENET_MEAN, IMAGENET_STD

    save_parser_file(tmp_path / "a.faceparsing.pth")
    parser = load_face_parser(tmp_path / "a.faceparsing.pth", size=48)
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = parser.net(((x + 1) / 2 - mean) / std)
        assert torch.allclose(parser.class_logits(x), want, atol=1e-5)
        big = parser.class_logits(torch.rand(1, 3, 96, 96) * 2 - 1)  # other sizes: parsed at 48, returned at 96
    assert big.shape == (1, len(CELEBAMASK_CLASSES), 96, 96)


def test_bad_face_parsing_files_are_refused_by_name(tmp_path):
    p = tmp_path / "m.faceparsing.pth"
    p.write_bytes(b"not a torch file")
    with pytest.raises(InvalidInput, match="cannot read the face-parsing file m.faceparsing.pth"):
        load_face_parser(p)
    state = save_parser_file(p)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])  # truncated download
    with pytest.raises(InvalidInput, match="cannot read the face-parsing file"):
        load_face_parser(p)
    torch.save({"g_ema.weight": torch.zeros(3)}, p)  # a generator, not a parser
    with pytest.raises(InvalidInput, match="not a face-parsing BiSeNet"):
        load_face_parser(p)
    bad = dict(state)
    bad["conv_out.conv_out.weight"] = torch.zeros(11, 256, 1, 1)
    torch.save(bad, p)
    with pytest.raises(InvalidInput, match="11 classes"):
        load_face_parser(p)
    bad = dict(state)
    del bad["cp.arm16.conv_atten.weight"]
    torch.save(bad, p)
    with pytest.raises(InvalidInput, match="missing: cp.arm16.conv_atten.weight"):
        load_face_parser(p)

    torch.save({"x": Payload()}, p)  # arbitrary objects are never unpickled
    with pytest.raises(InvalidInput, match="holds Python objects besides tensors"):
        load_face_parser(p)
    p.write_bytes(b"")  # a failed download
    with pytest.raises(InvalidInput, match="cannot read the face-parsing file m.faceparsing.pth"):
        load_face_parser(p)
    bad = dict(state)
    bad["conv_out.conv_out.weight"] = torch.zeros(())
    torch.save(bad, p)
    with pytest.raises(InvalidInput, match="not a face-parsing BiSeNet"):
        load_face_parser(p)


def test_face_parser_is_a_checkpoints_segmenter(tmp_path):
    """A checkpoint with <stem>.faceparsing.pth beside it: find_segmenter names it, load_segmenter gives an
    image-network Segmenter, and an auto-segments session makes static segments inside the selection."""
    from core.segmenter import find_segmenter, load_segmenter
    from tests.conftest import auto_segments_session, make_tiny_generator

    ckpt = tmp_path / "ffhq.pt"
    save_parser_file(tmp_path / "ffhq.faceparsing.pth")
    path, why = find_segmenter(ckpt)
    assert path == tmp_path / "ffhq.faceparsing.pth" and why == ""
    seg = load_segmenter(path)
    assert seg.head is None and isinstance(seg.unet, FaceParser) and seg.parts == tuple(PART_GROUPS)
    assert seg.meta["source"] == "bisenet"
    sess, _, _ = auto_segments_session(make_tiny_generator(), seg)
    assert sess.info["segment_source"] == "auto" and set(sess.inversion.info["segment_parts"]) <= set(PART_GROUPS)
