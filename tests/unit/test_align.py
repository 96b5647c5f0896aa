"""Face detection on real photos, FFHQ alignment and full-resolution paste-back."""
from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

import core
from core.align import (AlignTransform, Face, align_face, as_uint8_rgb, choose_face, detect_faces, face_transform,
                        ffhq_quad, find_face, layer_selection, paste_back, warp_crop)
from core.common import InvalidInput


def grace_hopper() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def astro_face(astronaut):
    return detect_faces(astronaut)[0]


def psnr(a, b, mask, peak=255.0) -> float:
    err = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    return float(10 * np.log10(peak ** 2 / err[mask].mean()))


def ellipse(shape, centre, radii, soft=6.0) -> np.ndarray:
    """Soft elliptical selection: 1 inside, 0 outside, a linear ramp ``soft`` px wide."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    r = np.sqrt(((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2)
    return np.clip((1 - r) * min(radii) / soft, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------- detection


def test_detects_astronaut_face_and_landmarks(astronaut):
    faces = core.detect_faces(astronaut)
    assert len(faces) == 1
    f = faces[0]
    # facenet-pytorch on the same image: box (181,62)-(268,172), eyes (205,102) (247,104), nose (225,129),
    # mouth (202,139) (245,142)
    np.testing.assert_allclose(f.box, [181, 62, 268, 172], atol=1.5)
    expected = [[205, 102], [247, 104], [225, 129], [202, 139], [245, 142]]
    np.testing.assert_allclose(f.landmarks, expected, atol=1.5)
    assert f.landmarks.shape == (5, 2) and f.score > 0.99


def test_detects_grace_hopper_face_and_landmarks():
    faces = detect_faces(grace_hopper())
    assert len(faces) == 1
    f = faces[0]
    np.testing.assert_allclose(f.box, [174.4, 119.6, 355.6, 340.5], atol=1.5)
    expected = [[221.7, 192.2], [309.8, 186.1], [269.4, 239.2], [232.7, 279.6], [306.6, 275.9]]
    np.testing.assert_allclose(f.landmarks, expected, atol=1.5)
    assert f.score > 0.99


def test_large_photo_is_detected_downscaled_and_mapped_back(astronaut, astro_face):
    big = np.full((1500, 2000, 3), 100, np.uint8)
    up = np.asarray(Image.fromarray(astronaut).resize((1024, 1024), Image.Resampling.BICUBIC))
    big[300:1324, 700:1724] = up
    faces = detect_faces(big)  # runs on 1024x768
    assert len(faces) == 1
    expected = (astro_face.landmarks + 0.5) * 2 - 0.5 + [700, 300]
    eye_dist = np.hypot(*(expected[1] - expected[0]))
    assert np.abs(faces[0].landmarks - expected).max() < 0.05 * eye_dist


def test_detect_faces_rejects_bad_input(astronaut):
    with pytest.raises(InvalidInput, match="uint8"):
        detect_faces(astronaut.astype(np.float32) / 255)
    with pytest.raises(InvalidInput, match=r"\(H,W,3\)"):
        detect_faces(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(InvalidInput, match="numpy"):
        detect_faces(astronaut.tolist())
    assert detect_faces(np.full((64, 80, 3), 200, np.uint8)) == []


def test_as_uint8_rgb_converts_layers(astronaut):
    rgba16 = np.concatenate([astronaut, np.full((512, 512, 1), 255, np.uint8)], 2).astype(np.uint16) * 257
    np.testing.assert_array_equal(as_uint8_rgb(rgba16), astronaut)
    np.testing.assert_array_equal(as_uint8_rgb(astronaut.astype(np.float32) / 255), astronaut)
    assert as_uint8_rgb(astronaut[:, :, 0]).shape == (512, 512, 3)


# ----------------------------------------------------------------------------------------------- choosing


def test_choose_face_by_selection_and_errors(astronaut):
    g = grace_hopper()
    canvas = np.full((620, 1100, 3), 128, np.uint8)
    canvas[:512, :512] = astronaut
    canvas[20:620, 560:1072] = g
    faces = detect_faces(canvas)
    assert len(faces) == 2
    sel = np.zeros(canvas.shape[:2], np.float32)
    sel[150:400, 700:1000] = 1  # over Grace Hopper
    chosen = choose_face(faces, sel)
    assert chosen.box[0] > 600
    sel2 = np.zeros_like(sel)
    sel2[50:200, 150:300] = 1  # over the astronaut
    assert choose_face(faces, sel2).box[0] < 300
    assert choose_face(faces).box[0] > 600  # no selection: the largest face
    empty = np.zeros_like(sel)
    empty[500:600, 0:100] = 1
    with pytest.raises(InvalidInput, match="selection contains no face"):
        choose_face(faces, empty)
    with pytest.raises(InvalidInput, match="no face found"):
        choose_face([], sel)
    tiny = Face((10.0, 10.0, 30.0, 34.0), np.zeros((5, 2)), 0.99)
    with pytest.raises(InvalidInput, match=r"too small: 20 px.*at least 32 px"):
        choose_face([tiny])


def test_find_face_end_to_end_errors(astronaut):
    small = np.asarray(Image.fromarray(astronaut).resize((160, 160), Image.Resampling.LANCZOS))
    with pytest.raises(InvalidInput, match="too small.*32 px"):
        find_face(small)  # the face is ~27 px across
    with pytest.raises(InvalidInput, match="no face found"):
        find_face(np.full((200, 200, 3), 0.5, np.float32))
    sel = np.zeros((512, 512), np.float32)
    sel[400:500, 0:100] = 1
    with pytest.raises(InvalidInput, match="selection contains no face"):
        find_face(astronaut, sel)
    # selection in canvas coordinates, layer at offset (300, 40): the face box is at canvas x 481..568
    canvas_sel = np.zeros((700, 900), np.float32)
    canvas_sel[120:200, 500:560] = 1
    assert find_face(astronaut, canvas_sel, offset=(300, 40)).score > 0.99


def test_layer_selection_crops_canvas_mask():
    canvas = np.arange(20 * 30, dtype=np.float32).reshape(20, 30) / 600
    out = layer_selection(canvas, (8, 10), offset=(25, -3))  # hangs off the right and top edges
    expected = np.zeros((8, 10), np.float32)
    expected[3:8, 0:5] = canvas[0:5, 25:30]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(layer_selection(np.full((4, 4), 255, np.uint8), (2, 2), (1, 1)), np.ones((2, 2)))
    assert layer_selection(None, (3, 3)) is None
    with pytest.raises(InvalidInput, match="NaN"):
        layer_selection(np.full((4, 4), np.nan, np.float32), (4, 4))
    with pytest.raises(InvalidInput, match="mask"):
        layer_selection(np.zeros((4, 4, 3)), (4, 4))


# ----------------------------------------------------------------------------------------------- transform


def test_ffhq_quad_upright_face():
    # eyes 40 px apart at y=100, mouth 50 px below the eye midpoint
    lm = np.array([[80, 100], [120, 100], [100, 125], [85, 150], [115, 150]], float)
    quad = ffhq_quad(lm)
    # x = e2e + (e2m_y, -e2m_x) = (90, 0), scaled to max(40*2, 50*1.8) = 90; centre (100, 105)
    np.testing.assert_allclose(quad, [[10, 15], [10, 195], [190, 195], [190, 15]], atol=1e-9)


def test_ffhq_quad_rotates_with_the_face():
    lm = np.array([[80, 100], [120, 100], [100, 125], [85, 150], [115, 150]], float)
    th = np.deg2rad(30)
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    np.testing.assert_allclose(ffhq_quad(lm @ R.T), ffhq_quad(lm) @ R.T, atol=1e-9)


def test_transform_inverse_corners_and_json(astro_face):
    t = face_transform(astro_face, 256, (512, 512))
    np.testing.assert_allclose(t.matrix @ t.inverse, np.eye(3), atol=1e-12)
    # the crop's outer corners (-0.5,-0.5), (-0.5,S-0.5), ... are the quad's corners
    corners = np.array([[-0.5, -0.5], [-0.5, 255.5], [255.5, 255.5], [255.5, -0.5]])
    np.testing.assert_allclose(t.crop_to_image(corners), t.quad, atol=1e-9)
    pts = np.random.default_rng(0).uniform(0, 512, (10, 2))
    np.testing.assert_allclose(t.crop_to_image(t.image_to_crop(pts)), pts, atol=1e-9)
    # the crop's centre is eye_avg + 0.1 * eye_to_mouth
    lm = astro_face.landmarks
    eye_avg = (lm[0] + lm[1]) / 2
    centre = eye_avg + 0.1 * ((lm[3] + lm[4]) / 2 - eye_avg)
    np.testing.assert_allclose(t.image_to_crop(centre[None])[0], [127.5, 127.5], atol=1e-9)
    back = AlignTransform.from_json(json.loads(json.dumps(t.to_json())))
    np.testing.assert_array_equal(back.quad, t.quad)
    assert back.size == t.size and back.image_size == t.image_size and back.kind == t.kind
    with pytest.raises(InvalidInput, match="parallelogram"):
        AlignTransform([[0, 0], [0, 10], [10, 12], [10, 0]], 8, (20, 20))
    with pytest.raises(InvalidInput, match="bad alignment transform"):
        AlignTransform.from_json({"quad": [[0, 0]]})


def test_face_round_trips_through_json(astro_face):
    back = Face.from_json(json.loads(json.dumps(astro_face.to_json())))
    np.testing.assert_array_equal(back.landmarks, astro_face.landmarks)
    assert back.box == astro_face.box and back.score == astro_face.score


# ----------------------------------------------------------------------------------------------- align


def test_align_geometry_is_exact_on_linear_images():
    # a linear ramp is reproduced exactly by bicubic interpolation and by any symmetric filter, so the crop
    # must equal the ramp evaluated at the transform's points (both when upsampling and when shrinking)
    yy, xx = np.mgrid[:300, :400].astype(np.float64)
    ramp = np.stack([0.001 * xx, 0.002 * yy, 0.001 * (xx + yy)], -1).astype(np.float32)
    lm = np.array([[180, 140], [222, 146], [200, 165], [185, 190], [215, 194]], float)
    for size in (32, 160):  # scale 3.6 (antialiased) and 0.72 (upsampled)
        crop, t = align_face(ramp, lm, size)
        u, v = np.meshgrid(np.arange(size), np.arange(size))
        p = t.crop_to_image(np.stack([u, v], -1).reshape(-1, 2)).reshape(size, size, 2)
        exp = np.stack([0.001 * p[..., 0], 0.002 * p[..., 1], 0.001 * (p[..., 0] + p[..., 1])], -1)
        assert np.abs(crop - exp).max() < 2e-4, size


def test_align_preserves_dtype_and_float_range(astronaut, astro_face):
    crop8, t = align_face(astronaut, astro_face, 64)
    assert crop8.dtype == np.uint8 and crop8.shape == (64, 64, 3)
    crop16, _ = align_face(astronaut.astype(np.uint16) * 257, astro_face, 64)
    assert crop16.dtype == np.uint16
    assert np.abs(crop16.astype(np.float64) / 257 - crop8).max() <= 1.0
    f = astronaut.astype(np.float32) / 255 * 4 - 1  # range [-1, 3]
    cropf, _ = align_face(f, astro_face, 64)
    assert cropf.dtype == np.float32
    assert np.abs(np.clip((cropf + 1) / 4 * 255, 0, 255) - crop8).max() <= 1.0  # integers clip the ringing
    gray, _ = align_face(astronaut[:, :, 0], astro_face, 64)
    assert gray.shape == (64, 64)
    with pytest.raises(InvalidInput, match="size"):
        align_face(astronaut, astro_face, 0)
    with pytest.raises(InvalidInput, match="dtype"):
        align_face(astronaut.astype(np.int32), astro_face, 64)
    with pytest.raises(InvalidInput, match="landmarks"):
        align_face(astronaut, np.zeros((4, 2)), 64)


def test_padding_changes_only_pixels_outside_the_image():
    g = grace_hopper().astype(np.float32) / 255
    edge = g[150:, 200:]  # the face runs off the top-left corner
    face = detect_faces(as_uint8_rgb(edge))[0]
    crop, t = align_face(edge, face, 128)
    # same content with real pixels instead of padding around it
    rng = np.random.default_rng(1)
    big = rng.uniform(0, 1, (edge.shape[0] + 200, edge.shape[1] + 200, 3)).astype(np.float32)
    big[200:, 200:] = edge
    crop_big, _ = align_face(big, face.landmarks + 200, 128)
    # crop pixels whose filter footprint (±3 crop px) lies inside the edge image agree
    u, v = np.meshgrid(np.arange(128), np.arange(128))
    p = t.crop_to_image(np.stack([u, v], -1).reshape(-1, 2)).reshape(128, 128, 2)
    margin = 4 * t.scale + 2
    inside = (p[..., 0] > margin) & (p[..., 1] > margin)
    assert inside.mean() > 0.3 and (~inside).mean() > 0.2
    assert np.abs(crop - crop_big)[inside].max() < 1e-4
    # outside, the mirrored padding is blurred: smoother than the noise it replaced
    assert np.isfinite(crop).all() and np.abs(crop - crop_big)[~inside].mean() > 0.05


# ----------------------------------------------------------------------------------------------- paste back


@pytest.mark.parametrize("size", [64, 256])
def test_round_trip_psnr_at_generator_resolution(astronaut, astro_face, size):
    if size == 64:
        # the generator's resolution: the photo is scaled so the FFHQ quad is about as large as the crop
        # (a larger face cannot come back sharper than the 64 px crop it was reduced to)
        photo = np.asarray(Image.fromarray(astronaut).resize((150, 150), Image.Resampling.LANCZOS))
        face = (astro_face.landmarks + 0.5) * 150 / 512 - 0.5
    else:
        photo, face = astronaut, astro_face
    crop, t = align_face(photo, face, size)
    assert 0.5 < t.scale < 1.0
    sel = ellipse(photo.shape[:2], t.crop_to_image([[size / 2, size / 2]])[0], (t.scale * size * 0.3,) * 2)
    out, alpha = paste_back(photo, crop, t, sel, return_alpha=True)
    full = alpha >= 1
    assert full.sum() > 150
    assert psnr(out, photo, full) >= 35.0
    outside = alpha == 0
    assert outside.mean() > 0.3
    np.testing.assert_array_equal(out[outside], photo[outside])
    # the original's detail survives exactly when only the change to a reference crop is pasted
    same = paste_back(photo, crop, t, sel, reference_crop=crop)
    np.testing.assert_array_equal(same, photo)


def test_round_trip_in_crop_space(astronaut, astro_face):
    # a 2.6x reduced crop goes back to full resolution and, aligned again, reproduces itself
    crop, t = align_face(astronaut, astro_face, 64)
    out, alpha = paste_back(astronaut, crop, t, None, return_alpha=True)
    full_in_crop = warp_crop((alpha >= 1).astype(np.float32), t) >= 0.999
    assert full_in_crop.mean() > 0.4
    assert psnr(warp_crop(out, t), crop, full_in_crop) >= 35.0


def test_edit_lands_inside_selection_only(astronaut, astro_face):
    crop, t = align_face(astronaut, astro_face, 128)
    edited = np.full_like(crop, 255)  # a white crop: every pasted pixel changes
    sel = ellipse(astronaut.shape[:2], (224, 120), (40, 50))
    out, alpha = paste_back(astronaut, edited, t, sel, feather=4.0, return_alpha=True)
    np.testing.assert_array_equal(out[alpha == 0], astronaut[alpha == 0])
    assert (alpha <= sel + 1e-7).all()
    inner = alpha >= 1
    assert inner.sum() > 3000 and (out[inner] == 255).all()
    # outside the (eroded, feathered) crop square nothing is pasted even where the selection is 1
    everything = np.ones(astronaut.shape[:2], np.float32)
    out2, alpha2 = paste_back(astronaut, edited, t, everything, return_alpha=True)
    corners = t.quad
    assert alpha2[0, 0] == 0 and alpha2[511, 511] == 0
    centre = np.round(corners.mean(0)).astype(int)
    assert alpha2[centre[1], centre[0]] == 1
    np.testing.assert_array_equal(out2[alpha2 == 0], astronaut[alpha2 == 0])


def test_offset_layer_in_a_larger_canvas(astronaut, astro_face):
    crop, t = align_face(astronaut, astro_face, 64)
    edited = np.clip(crop.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    canvas_sel = np.zeros((800, 1000), np.float32)
    canvas_sel[300:420, 450:560] = 1  # canvas coordinates
    offset = (260, 230)  # the layer's top-left in the canvas
    out = paste_back(astronaut, edited, t, canvas_sel, offset=offset)
    local = np.zeros((512, 512), np.float32)
    local[70:190, 190:300] = 1  # the same selection in layer coordinates
    expected = paste_back(astronaut, edited, t, local)
    np.testing.assert_array_equal(out, expected)
    changed = np.any(out != astronaut, axis=2)
    assert changed[70:190, 190:300].mean() > 0.5 and not changed[:70].any() and not changed[190:].any()
    # a layer that lies outside the selection entirely is returned unchanged
    np.testing.assert_array_equal(paste_back(astronaut, edited, t, canvas_sel, offset=(700, 700)), astronaut)


def test_non_square_layer_and_16_bit(astronaut, astro_face):
    layer = np.full((400, 700, 3), 30, np.uint8)
    layer[:, 100:612] = astronaut[50:450]
    layer16 = layer.astype(np.uint16) * 257 + np.random.default_rng(3).integers(0, 200, layer.shape, dtype=np.uint16)
    face = Face(astro_face.box, astro_face.landmarks + [100, -50], astro_face.score)
    crop, t = align_face(layer16, face, 256)
    assert crop.dtype == np.uint16 and t.image_size == (400, 700)
    sel = ellipse(layer.shape[:2], (324, 70), (45, 60))
    out, alpha = paste_back(layer16, crop, t, sel, return_alpha=True)
    assert out.dtype == np.uint16 and out.shape == layer16.shape
    np.testing.assert_array_equal(out[alpha == 0], layer16[alpha == 0])
    assert psnr(out, layer16, alpha >= 1, peak=65535.0) >= 35.0
    # a float edit on the [0,1] scale is accepted for an integer layer
    out_f = paste_back(layer16, crop.astype(np.float32) / 65535, t, sel)
    assert np.abs(out_f.astype(np.int64) - out.astype(np.int64)).max() <= 1


def test_rgba_layer_keeps_its_alpha_when_rgb_is_pasted(astronaut, astro_face):
    rgba = np.concatenate([astronaut.astype(np.float32) / 255, np.full((512, 512, 1), 0.7, np.float32)], 2)
    crop, t = align_face(rgba, astro_face, 64)
    assert crop.shape == (64, 64, 4)
    out = paste_back(rgba, 1.0 - crop[:, :, :3], t, None)
    np.testing.assert_array_equal(out[:, :, 3], rgba[:, :, 3])
    assert np.abs(out[:, :, :3] - rgba[:, :, :3]).max() > 0.5


def test_paste_back_rejects_bad_input(astronaut, astro_face):
    crop, t = align_face(astronaut, astro_face, 64)
    with pytest.raises(InvalidInput, match="transform was made for"):
        paste_back(astronaut[:500], crop, t)
    with pytest.raises(InvalidInput, match="square"):
        paste_back(astronaut, crop[:60], t)
    with pytest.raises(InvalidInput, match="channels"):
        paste_back(astronaut, crop[:, :, :1], t)
    with pytest.raises(InvalidInput, match="NaN"):
        paste_back(astronaut, np.full((64, 64, 3), np.nan, np.float32), t)
    with pytest.raises(InvalidInput, match="reference_crop"):
        paste_back(astronaut, crop, t, reference_crop=crop[:32, :32])


def test_larger_edited_crop_is_antialiased(astronaut, astro_face):
    # a generator output larger than the aligned crop (and denser than the layer) goes back at the same quad
    crop, t = align_face(astronaut, astro_face, 1024)
    out, alpha = paste_back(astronaut, crop, t.resized(64), None, return_alpha=True)
    assert psnr(out, astronaut, alpha >= 1) >= 35.0
    # a checkerboard at the crop's Nyquist frequency averages out instead of aliasing
    checker = (np.indices((1024, 1024)).sum(0) % 2).astype(np.float32)[:, :, None].repeat(3, 2)
    out = paste_back(astronaut.astype(np.float32) / 255, checker, t, None, feather=0.0)
    inner = paste_back(astronaut, crop, t, None, return_alpha=True)[1] >= 1
    assert np.abs(out[inner] - 0.5).max() < 0.02
