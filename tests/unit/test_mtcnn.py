"""MTCNN built here: architectures against the wheel's state dicts, NMS, and detections against facenet-pytorch."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image
from skimage import data

from core.mtcnn import (MissingWeights, MTCNNOptions, ONet, PNet, RNet, default_weights_dir, load_mtcnn, nms,
                        run_mtcnn)

# facenet-pytorch 2.6.0 MTCNN(keep_all=True).detect(..., landmarks=True) on the same images (run once with a
# stand-in torchvision providing batched_nms; recorded here because facenet_pytorch cannot be imported).
REFERENCE = {
    "astronaut": {
        "box": [181.05140686, 62.15613174, 267.74731445, 172.05015564],
        "score": 0.9999977350,
        "landmarks": [[205.01091003, 101.72744751], [246.76257324, 103.71408081], [224.67135620, 128.96499634],
                      [201.71611023, 139.24617004], [245.26548767, 141.85700989]],
    },
    "grace_hopper": {
        "box": [174.40222168, 119.55542755, 355.64825439, 340.45697021],
        "score": 0.9998244643,
        "landmarks": [[221.66613770, 192.20590210], [309.82891846, 186.13040161], [269.35687256, 239.17364502],
                      [232.65196228, 279.64865112], [306.63848877, 275.92749023]],
    },
}


def grace_hopper() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


IMAGES = {"astronaut": data.astronaut, "grace_hopper": grace_hopper}


def test_architectures_match_the_wheel_state_dicts():
    folder = default_weights_dir()
    for name, net in (("pnet", PNet()), ("rnet", RNet()), ("onet", ONet())):
        state = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
        assert set(state) == set(net.state_dict())
        net.load_state_dict(state, strict=True)  # shapes must match too
    pnet, rnet, onet = load_mtcnn()
    reg, prob = pnet(torch.zeros(1, 3, 12, 12))
    assert reg.shape == (1, 4, 1, 1) and prob.shape == (1, 1, 1)
    reg, prob = rnet(torch.zeros(2, 3, 24, 24))
    assert reg.shape == (2, 4) and prob.shape == (2,)
    reg, pts, prob = onet(torch.zeros(2, 3, 48, 48))
    assert reg.shape == (2, 4) and pts.shape == (2, 10) and prob.shape == (2,)
    assert ((prob >= 0) & (prob <= 1)).all()


def test_nms_union_and_min():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 6, 6]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # IoU(0,1) = 81/119 = 0.68; box 3 lies inside boxes 0 and 1 (IoU 0.16, min-overlap 1.0)
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [3, 0, 1, 2]
    assert nms(boxes, scores, 0.7, mode="min").tolist() == [3, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_matches_facenet_pytorch(name):
    ref = REFERENCE[name]
    boxes, scores, landmarks = run_mtcnn(IMAGES[name]())
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0], ref["box"], atol=0.01)
    np.testing.assert_allclose(landmarks[0], ref["landmarks"], atol=0.01)
    assert abs(scores[0] - ref["score"]) < 1e-5


def test_several_faces_sorted_and_blank_image_has_none():
    a, g = data.astronaut(), grace_hopper()
    canvas = np.full((620, 1100, 3), 128, np.uint8)
    canvas[:512, :512] = a
    canvas[20:620, 560:1072] = g
    boxes, scores, landmarks = run_mtcnn(canvas)
    assert len(boxes) == 2 and scores[0] >= scores[1]
    centres = sorted(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes)
    # the pyramid's 2-px cell grid makes MTCNN only roughly shift-invariant: a few % of the box size
    np.testing.assert_allclose(centres[0], [224.4, 117.1], atol=3)
    np.testing.assert_allclose(centres[1], [560 + 265.0, 20 + 230.0], atol=6)
    assert landmarks.shape == (2, 5, 2)
    empty = run_mtcnn(np.full((200, 300, 3), 90, np.uint8))
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,) and empty[2].shape == (0, 5, 2)


def test_face_cut_by_the_image_edge_keeps_its_landmarks():
    # MTCNN pads crops that leave the image with zeros (the reference MATLAB code does; facenet-pytorch
    # stretches them instead and puts the eyes 60 px off here).
    g = grace_hopper()
    truth = run_mtcnn(g)[2][0] - [200, 150]
    _, _, landmarks = run_mtcnn(g[150:, 200:])
    assert len(landmarks) == 1
    assert np.abs(landmarks[0] - truth).max() < 8


def test_weights_dir_override_and_missing_weights(tmp_path):
    for name in ("pnet", "rnet", "onet"):
        shutil.copy(default_weights_dir() / f"{name}.pt", tmp_path / f"{name}.pt")
    boxes, _, _ = run_mtcnn(data.astronaut(), weights_dir=tmp_path)
    assert len(boxes) == 1
    (tmp_path / "rnet.pt").unlink()
    with pytest.raises(MissingWeights, match="rnet.pt"):
        load_mtcnn(tmp_path)
    (tmp_path / "rnet.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MissingWeights, match="cannot load"):
        load_mtcnn(tmp_path)


def test_min_face_size_controls_the_pyramid():
    small = np.asarray(Image.fromarray(data.astronaut()).resize((160, 160), Image.Resampling.LANCZOS))
    assert len(run_mtcnn(small)[0]) == 1  # face ~28 px, above the default 20 px minimum
    # a minimum face larger than the image leaves no pyramid level at all
    assert len(run_mtcnn(small, MTCNNOptions(min_face_size=200))[0]) == 0
