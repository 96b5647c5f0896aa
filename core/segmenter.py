"""Segment sources for ChunkyGAN's automatic segments (``SessionOptions(segments="auto")``).

Where a model's segmenter lives (``find_segmenter``):

* the embedded model: ``core/demo/weights/face64.segmenter.pt``, a DatasetGAN-style head on the generator's own
  synthesis features (trained by ``python -m core.demo.train_segmenter``);
* any other checkpoint ``<stem>.pt``: ``<stem>.segmenter.pt`` — this module's format (:func:`save_segmenter`:
  ``{"format": "latent-edit-segmenter", "version": 1, "meta": JSON text with "head" {channels, parts, resolution,
  hidden} and/or "unet" {parts, width} and "generator_sha256", "head.*" / "unet.*" tensors}``, read with
  ``weights_only=True``).  A head needs part labels for that generator's images; an image network (the U-Net)
  can be trained on any labelled face set;
* or ``<stem>.faceparsing.pth``: a BiSeNet face-parsing ``state_dict`` (the CelebAMask-HQ 19-class network of
  face-parsing.PyTorch that STIT uses; ``core.faceparsing``), read as an image network whose 19 classes are
  grouped into the parts of :data:`core.faceparsing.PART_GROUPS`.  Its masks are static (it sees pixels, not
  codes); ``<stem>.segmenter.pt`` wins when both exist.

A model without a segmenter offers no "auto" segments; a session asking for them is refused naming the file to
add (a label-map layer works with any model).
"""
from __future__ import annotations

import pathlib
from typing import Optional

SEGMENTER_SUFFIX = ".segmenter.pt"  # DatasetGAN-style head for <stem>.pt (this module's format)
FACE_PARSING_SUFFIX = ".faceparsing.pth"  # BiSeNet face-parsing weights (CelebAMask-HQ's 19 classes)
SIDECAR_SUFFIXES = (SEGMENTER_SUFFIX, FACE_PARSING_SUFFIX)


def segmenter_paths(checkpoint) -> tuple[pathlib.Path, pathlib.Path]:
    """``ffhq.pkl`` -> (``ffhq.segmenter.pt``, ``ffhq.faceparsing.pth``) beside it."""
    p = pathlib.Path(checkpoint)
    return p.with_name(p.stem + SEGMENTER_SUFFIX), p.with_name(p.stem + FACE_PARSING_SUFFIX)


def default_segmenter_path() -> pathlib.Path:
    """The embedded model's shipped head (``core/demo/weights/face64.segmenter.pt``)."""
    from core.demo import WEIGHTS_DIR

    return WEIGHTS_DIR / ("face64" + SEGMENTER_SUFFIX)


def find_segmenter(checkpoint, default: bool = False) -> tuple[Optional[pathlib.Path], str]:
    """(the segmenter file for a checkpoint or None, what to add when there is none); ``default``: the
    checkpoint is the embedded model."""
    if default:
        path = default_segmenter_path()
        if path.is_file():
            return path, ""
        return None, (f"the embedded model's segmenter {path.name} is not installed (python -m "
                      "core.demo.train_segmenter writes it); use a label-map layer instead")
    head, parsing = segmenter_paths(checkpoint)
    for path in (head, parsing):
        if path.is_file():
            return path, ""
    return None, (f"add a segmenter for {pathlib.Path(checkpoint).name} beside it: a BiSeNet face-parsing file "
                  f"as {parsing.name} (face-parsing.PyTorch's 79999_iter.pth) or {head.name} (core.segmenter "
                  f"format); or use a label-map layer")


# ------------------------------------------------------------------------------------------------ networks
# (appended below the file conventions; torch is imported here so that find_segmenter stays light)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.common import InvalidInput  # noqa: E402

FORMAT = "latent-edit-segmenter"
VERSION = 1


class PartHead(nn.Module):
    """DatasetGAN-style part head (Zhang et al. 2021: a light per-pixel classifier on the generator's own
    features): each chosen synthesis block's feature map gets a 1×1 projection to ``hidden`` channels, all
    are bilinearly upsampled to the output resolution and summed, then a per-pixel MLP (two 1×1 convs)
    gives ``len(parts)`` logits.  Inputs: ``{block: (N,C_b,R_b,R_b)}``; output ``(N,K,r,r)``."""

    def __init__(self, channels: dict, parts, resolution: int, hidden: int = 32):
        super().__init__()
        self.blocks = sorted(int(b) for b in channels)
        self.channels = {int(b): int(c) for b, c in channels.items()}
        self.parts = tuple(parts)
        self.resolution = int(resolution)
        self.hidden = int(hidden)
        self.proj = nn.ModuleList([nn.Conv2d(self.channels[b], hidden, 1) for b in self.blocks])
        self.mlp = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(hidden, hidden, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(hidden, len(self.parts), 1))

    def forward(self, feats: dict) -> torch.Tensor:
        r = self.resolution
        h = 0
        for b, proj in zip(self.blocks, self.proj):
            x = proj(feats[b])
            h = h + (x if x.shape[-1] == r else F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False))
        return self.mlp(h)

    def config(self) -> dict:
        return {"channels": {str(b): c for b, c in self.channels.items()}, "parts": list(self.parts),
                "resolution": self.resolution, "hidden": self.hidden}


def head_logits(G, head: PartHead, ws: torch.Tensor, noise_mode: str = "const") -> tuple[torch.Tensor, torch.Tensor]:
    """``G^S(X^S)``: ``(images (N,3,r,r), part logits (N,K,r,r))`` for W+ codes ``ws`` (N,num_ws,w_dim), one
    generator forward (differentiable in ``ws``)."""
    images, feats = G.block_features(ws, blocks=head.blocks, noise_mode=noise_mode)
    return images, head({b: x for b, (x, _) in feats.items()})


class _Down(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.LeakyReLU(0.2),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.LeakyReLU(0.2))


class PartUNet(nn.Module):
    """A small U-Net (Ronneberger et al. 2015 layout, three scales) from images ``(N,3,H,W)`` in [-1,1]
    (H, W multiples of 4) to part logits ``(N,K,H,W)`` — the image-space segmenter (no inversion)."""

    def __init__(self, parts, width: int = 16):
        super().__init__()
        self.parts, self.width = tuple(parts), int(width)
        w = self.width
        self.e1, self.e2, self.e3 = _Down(3, w), _Down(w, 2 * w), _Down(2 * w, 4 * w)
        self.d2, self.d1 = _Down(6 * w, 2 * w), _Down(3 * w, w)
        self.out = nn.Conv2d(w, len(self.parts), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(F.avg_pool2d(a, 2))
        c = self.e3(F.avg_pool2d(b, 2))
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        b2 = self.d2(torch.cat([up(c), b], 1))
        return self.out(self.d1(torch.cat([up(b2), a], 1)))

    def config(self) -> dict:
        return {"parts": list(self.parts), "width": self.width}


def save_segmenter(path, head: Optional[PartHead] = None, unet: Optional[PartUNet] = None, meta=None) -> None:
    """Write a segmenter file: ``{"format", "version", "meta" (JSON text), "head.*" / "unet.*" tensors}``
    (plain tensors and strings: read back with ``weights_only=True``)."""
    import json

    record = {"format": FORMAT, "version": VERSION}
    cfg = dict(meta or {})
    if head is not None:
        cfg["head"] = head.config()
        record.update({f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    if unet is not None:
        cfg["unet"] = unet.config()
        record.update({f"unet.{k}": v.detach().cpu() for k, v in unet.state_dict().items()})
    record["meta"] = json.dumps(cfg)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)


class Segmenter:
    """A loaded segmenter: ``head`` (:class:`PartHead`, on the generator's features: masks from a code,
    ``S = G^S(X^S)``) and/or ``unet`` (:class:`PartUNet`, on images); ``parts`` their label names;
    ``meta`` the file's metadata (e.g. the generator fingerprint the head was trained for)."""

    def __init__(self, head=None, unet=None, meta=None, path=None):
        if head is None and unet is None:
            raise InvalidInput("a segmenter needs a head or an image network")
        self.head, self.unet, self.meta, self.path = head, unet, dict(meta or {}), path
        self.parts = tuple((head or unet).parts)

    def to(self, device) -> "Segmenter":
        """Move the networks to ``device`` (the generator's: sessions segment its crops there); returns self."""
        for net in (self.head, self.unet):
            if net is not None:
                net.to(device)
        return self

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Image-space labels: ``(N,3,H,W)`` in [-1,1] -> ``(N,H,W)`` int64 indices into ``parts``."""
        if self.unet is None:
            raise InvalidInput("this segmenter has no image network (only a generator-feature head)")
        return self.unet(images.float()).argmax(1)

    def check_generator(self, G) -> None:
        """InvalidInput when the head was trained for another generator (fingerprint in ``meta``)."""
        want = self.meta.get("generator_sha256")
        if self.head is not None and want:
            from core.stylegan2.formats import fingerprint

            if fingerprint(G) != want:
                raise InvalidInput(f"the segmenter {getattr(self.path, 'name', '')} was trained for another "
                                   "generator: retrain it (python -m core.demo.train_segmenter)")


def load_segmenter(path) -> Segmenter:
    """Read :func:`save_segmenter` output, or a BiSeNet ``*.faceparsing.pth`` (both ``weights_only=True``);
    InvalidInput naming what is wrong."""
    import json

    path = pathlib.Path(path)
    if path.name.endswith(FACE_PARSING_SUFFIX):
        from core.faceparsing import CELEBAMASK_CLASSES, load_face_parser

        return Segmenter(unet=load_face_parser(path), meta={"source": "bisenet", "classes": list(CELEBAMASK_CLASSES)},
                         path=path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if record.get("format") != FORMAT:
            raise InvalidInput(f"{path.name} is not a {FORMAT} file")
        cfg = json.loads(record["meta"])
        head = unet = None
        if "head" in cfg:
            h = cfg["head"]
            head = PartHead({int(b): c for b, c in h["channels"].items()}, h["parts"], h["resolution"], h["hidden"])
            head.load_state_dict({k[5:]: v for k, v in record.items() if k.startswith("head.")})
            head.eval().requires_grad_(False)
        if "unet" in cfg:
            unet = PartUNet(cfg["unet"]["parts"], cfg["unet"]["width"])
            unet.load_state_dict({k[5:]: v for k, v in record.items() if k.startswith("unet.")})
            unet.eval().requires_grad_(False)
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable / wrong tensors: say which file
        raise InvalidInput(f"cannot read the segmenter {path.name}: {exc}") from exc
    return Segmenter(head, unet, cfg, path)


# ------------------------------------------------------------------------------------------ session use
MIN_PART_PIXELS = 4  # a part becomes a segment when it covers at least this many selected generator pixels; ours


def part_mask_generator(G, segmenter: Segmenter, xs: torch.Tensor, support: torch.Tensor):
    """ChunkyGAN's segment generator for a session: ``(fn, kept parts)`` where ``fn(X^S)`` (1,num_ws,w_dim) ->
    ``(n,1,r,r)`` = the head's softmax over the ``n`` parts that cover at least :data:`MIN_PART_PIXELS` of the
    ``support`` (1,1,r,r) bool at ``X^S = xs`` (others dropped, the rest renormalised to sum 1)."""
    head = segmenter.head
    with torch.no_grad():
        _, logits = head_logits(G, head, xs)
    labels = logits.argmax(1)[0]
    inside = support[0, 0]
    counts = torch.bincount(labels[inside], minlength=len(head.parts))
    kept = [int(k) for k in torch.nonzero(counts >= MIN_PART_PIXELS).flatten()]
    if not kept:  # a tiny selection: its most common part
        kept = [int(counts.argmax())]

    def fn(code: torch.Tensor) -> torch.Tensor:
        return torch.softmax(head_logits(G, head, code)[1][0, kept], 0)[:, None]

    return fn, kept


def image_part_masks(segmenter: Segmenter, image: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Static masks from the image network: ``image`` (1,3,r,r) in [-1,1] -> ``((n,r,r) float in {0,1} within
    ``support`` (1,1,r,r) bool, the part index of each)``; parts under :data:`MIN_PART_PIXELS` are dropped."""
    labels = segmenter.segment(image)[0]
    inside = support[0, 0]
    masks, kept = [], []
    for k in range(len(segmenter.parts)):
        m = (labels == k) & inside
        if int(m.sum()) >= MIN_PART_PIXELS:
            masks.append(m.float())
            kept.append(k)
    if not masks:
        return inside.float()[None], [int(torch.bincount(labels[inside]).argmax())]
    return torch.stack(masks), kept


_DEFAULT: dict = {}  # the embedded segmenter, loaded once


def segment(images) -> "np.ndarray":
    """``core.demo.segment``: the embedded model's image segmenter (its U-Net; no inversion) —
    ``images`` uint8 ``(N,H,W,3)`` (or one ``(H,W,3)``) -> int64 labels ``(N,H,W)`` indexing ``core.demo.PARTS``.
    Faces are framed as the embedded renders are; other sizes are resampled to 64 px and the logits back."""
    import numpy as np

    arr = np.asarray(images)
    single = arr.ndim == 3
    arr = arr[None] if single else arr
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or min(arr.shape[1:3]) < 4:
        raise InvalidInput(f"segment: images must be uint8 (N,H,W,3); got {arr.dtype} {arr.shape}")
    if "seg" not in _DEFAULT:
        path = default_segmenter_path()
        if not path.is_file():
            raise InvalidInput(f"the embedded segmenter {path.name} is not installed (python -m "
                               "core.demo.train_segmenter --install writes it)")
        _DEFAULT["seg"] = load_segmenter(path)
    net = _DEFAULT["seg"].unet
    if net is None:
        raise InvalidInput("the embedded segmenter file has no image network")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1
    H, W = x.shape[-2:]
    out = []
    with torch.no_grad():
        for s in range(0, len(x), 64):
            b = x[s:s + 64]
            if (H, W) != (64, 64):
                b = F.interpolate(b, size=(64, 64), mode="area" if min(H, W) >= 64 else "bilinear")
            logits = net(b)
            if (H, W) != (64, 64):
                logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
            out.append(logits.argmax(1))
    labels = torch.cat(out).numpy().astype(np.int64)
    return labels[0] if single else labels
