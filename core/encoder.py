"""Image → W+ encoders: e4e (``Encoder4Editing``, Tov et al. 2021) and pSp (``GradualStyleEncoder``, Richardson et
al. 2021) on an IR-SE ResNet backbone, built here in plain torch with every size inferred from the tensors.

Architecture (the layout of the official checkpoints, key names included, so their ``encoder.*`` tensors load
as they are):

* ``input_layer``: 3×3 conv (no bias) → BatchNorm → PReLU, stride 1;
* ``body``: IR(-SE) bottleneck units.  Unit = ``res_layer`` [BN → 3×3 conv → PReLU → 3×3 conv (stride s) → BN
  → optional squeeze-excitation gate (avg-pool → 1×1 conv → ReLU → 1×1 conv → sigmoid)] + shortcut (a 1×1
  conv (stride s) + BN when the width changes, else a stride-s subsample).  Units are grouped in four stages; the
  first unit of each stage has stride 2 (IR-SE50: 3, 4, 14, 3 units of 64, 128, 256, 512 channels);
* feature taps ``c1``, ``c2``, ``c3`` = the outputs of the last units of stages 2, 3, 4 (IR-SE50: body indices
  6, 20, 23); FPN ``p2 = up(c3) + latlayer1(c2)``, ``p1 = up(p2) + latlayer2(c1)`` (bilinear,
  ``align_corners=True``);
* ``styles[i]``: stride-2 3×3 convs with LeakyReLU(0.01) down to 1×1, then an equalised-lr linear layer;
  rows ``i < coarse`` read c3, ``coarse ≤ i < middle`` read p2, the rest p1 (official: 3 and 7);
* pSp: row i = ``styles[i](features)``; e4e: ``w0 = styles[0](c3)`` on every row plus a delta
  ``styles[i](features)`` on row i ≥ 1.

The encoder's input size is inferred too: the coarse blocks reduce c3 (input/16) to 1×1, so input =
16·2^(convs of styles[0]) — 256 for the official files.  :func:`encode` resizes other sizes to it (bilinear with
antialiasing, ``align_corners=False``: the PIL bilinear ``Resize((256, 256))`` of the official inference
transform, up to PIL's filter support rounding) and adds ``latent_avg`` when the checkpoint's
``opts["start_from_latent_avg"]`` says so.

Files: ``{"state_dict": {"encoder.*": …, "decoder.*": …}, "latent_avg": (num_ws|1, w_dim) or (w_dim,),
"opts": dict}`` loaded with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed for ``opts``);
``core.load_generator`` on the same file returns the ``decoder``.  :func:`save_encoder` writes our own encoders in
that layout (no decoder: ours ship beside their generator).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import pathlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.common import InvalidInput
from core.stylegan2.formats import CheckpointError, _torch_load, check_tensors_match, detect_format
from core.stylegan2.network import FullyConnected

ENCODER_TYPES = {"Encoder4Editing": "e4e", "GradualStyleEncoder": "psp"}
STYLE_LRELU = 0.01  # GradualStyleBlock: nn.LeakyReLU() (PyTorch default slope 0.01)
BN_EPS = 1e-5  # nn.BatchNorm2d default, as in the official checkpoints
SE_REDUCTION = 16  # IR-SE SEModule(channels, reduction=16)


# ================================================================================================= configuration


@dataclasses.dataclass(frozen=True)
class Unit:
    """One IR(-SE) bottleneck: ``in_channels`` → ``depth`` at ``stride``; ``se`` = SE hidden width (0: no SE)."""

    in_channels: int
    depth: int
    stride: int
    se: int


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Everything that sizes an encoder (see :func:`encoder_config` for how each is read from a checkpoint)."""

    kind: str  # "e4e" | "psp"
    input_channels: int
    stem_channels: int
    units: tuple  # of Unit, in body order
    taps: tuple  # body indices of c1, c2, c3 (official IR-SE50: 6, 20, 23)
    fpn_channels: int
    w_dim: int
    style_channels: int  # width of the style blocks' convs (official: = w_dim)
    style_convs: tuple  # stride-2 convs per style block, one entry per W+ row
    coarse: int  # first row reading p2 (official 3)
    middle: int  # first row reading p1 (official 7)

    @property
    def num_ws(self) -> int:
        return len(self.style_convs)

    @property
    def input_size(self) -> int:
        return 16 * 2 ** self.style_convs[0]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["units"] = [dataclasses.asdict(u) for u in self.units]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        d = dict(d)
        d["units"] = tuple(Unit(**u) for u in d["units"])
        for k in ("taps", "style_convs"):
            d[k] = tuple(int(v) for v in d[k])
        return cls(**d)


def small_config(w_dim: int, num_ws: int, input_size: int = 64, kind: str = "e4e",
                 depths: Sequence[int] = (24, 48, 64, 96), units: Sequence[int] = (1, 2, 2, 1),
                 stem: int = 16, fpn: int = 96, style_channels: int = 48) -> EncoderConfig:
    """A small IR-SE encoder (same topology as IR-SE50, fewer/narrower units, narrower style blocks)."""
    body, c = [], stem
    for depth, n in zip(depths, units):
        for j in range(n):
            body.append(Unit(c, depth, 2 if j == 0 else 1, max(1, depth // SE_REDUCTION)))
            c = depth
    ends = list(itertools.accumulate(int(n) for n in units))
    base = int(math.log2(input_size // 16))
    if 16 * 2 ** base != input_size or base < 1:
        raise InvalidInput(f"input_size must be 16·2^k (k ≥ 1), got {input_size}")
    coarse, middle = min(3, num_ws), min(7, num_ws)
    convs = tuple(base if i < coarse else base + 1 if i < middle else base + 2 for i in range(num_ws))
    return EncoderConfig(kind, 3, stem, tuple(body), (ends[1] - 1, ends[2] - 1, ends[3] - 1), fpn, w_dim,
                         style_channels, convs, coarse, middle)


def encoder_config(shapes: dict, encoder_type: str, path="checkpoint") -> EncoderConfig:
    """Infer the architecture from ``{name: shape}`` of the ``encoder.``-stripped state dict.

    Units: ``body.{i}``; stride 2 for the first unit and wherever the width changes (IR-SE stages: the first unit
    of a stage changes the width); stages end where the next unit has stride 2; taps at the ends of stages 2-4.
    Style rows: ``styles.{i}``, their conv counts give the coarse / middle boundaries.
    """
    kind = ENCODER_TYPES.get(encoder_type)
    if kind is None:
        raise CheckpointError(f"{path}: encoder type {encoder_type!r} is not supported "
                              f"(supported: {', '.join(ENCODER_TYPES)})")
    try:
        shp = {k: tuple(v) for k, v in shapes.items()}
        stem_out, in_ch = shp["input_layer.0.weight"][:2]
        units, i, c = [], 0, stem_out
        while f"body.{i}.res_layer.1.weight" in shp:
            depth, cin = shp[f"body.{i}.res_layer.1.weight"][:2]
            if cin != c:
                raise CheckpointError(f"{path}: body.{i} takes {cin} channels but the previous layer gives {c}")
            has_sc = f"body.{i}.shortcut_layer.0.weight" in shp
            if has_sc != (cin != depth):
                raise CheckpointError(f"{path}: body.{i}: shortcut conv present={has_sc} with {cin}→{depth} channels")
            se = shp[f"body.{i}.res_layer.5.fc1.weight"][0] if f"body.{i}.res_layer.5.fc1.weight" in shp else 0
            units.append(Unit(int(cin), int(depth), 2 if (i == 0 or cin != depth) else 1, int(se)))
            c, i = depth, i + 1
        starts = [j for j, u in enumerate(units) if u.stride == 2]
        if len(starts) != 4:
            raise CheckpointError(f"{path}: expected 4 backbone stages, found {len(starts)}")
        ends = [s - 1 for s in starts[1:]] + [len(units) - 1]
        taps = (ends[1], ends[2], ends[3])
        fpn, lat1_in = shp["latlayer1.weight"][:2]
        fpn2, lat2_in = shp["latlayer2.weight"][:2]
        convs, dims, j = [], set(), 0
        while f"styles.{j}.linear.weight" in shp:
            n = 0
            while f"styles.{j}.convs.{2 * n}.weight" in shp:
                n += 1
            convs.append(n)
            dims.add((shp[f"styles.{j}.convs.0.weight"][0], *shp[f"styles.{j}.linear.weight"]))
            j += 1
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor encoder.{e.args[0]} (not an e4e/pSp encoder?)") from None
    if not convs:
        raise CheckpointError(f"{path}: no style blocks (encoder.styles.0.linear.weight) found")
    if len(dims) != 1 or len({d[0] for d in dims}) != 1 or next(iter(dims))[0] != next(iter(dims))[2]:
        raise CheckpointError(f"{path}: style blocks of unequal or inconsistent widths {sorted(dims)}")
    style_channels, w_dim, _ = next(iter(dims))
    base = convs[0]
    coarse = next((k for k, n in enumerate(convs) if n != base), len(convs))
    middle = next((k for k, n in enumerate(convs) if n == base + 2), len(convs))
    want = [base if k < coarse else base + 1 if k < middle else base + 2 for k in range(len(convs))]
    if convs != want:
        raise CheckpointError(f"{path}: style blocks have {convs} convs; expected coarse/middle/fine groups")
    c1, c2, c3 = (units[t].depth for t in taps)
    if (lat1_in, lat2_in) != (c2, c1) or fpn != fpn2 or c3 != fpn:
        raise CheckpointError(f"{path}: FPN widths do not match the backbone (latlayer1 {lat1_in}→{fpn}, latlayer2 "
                              f"{lat2_in}→{fpn2}, taps {c1}/{c2}/{c3})")
    return EncoderConfig(kind, int(in_ch), int(stem_out), tuple(units), taps, int(fpn), int(w_dim),
                         int(style_channels), tuple(convs), coarse, middle)


# ================================================================================================= modules


class SEGate(nn.Module):
    """Squeeze-excitation: x · sigmoid(fc2(relu(fc1(mean_hw x))))."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        g = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(g))))


class IRUnit(nn.Module):
    """IR(-SE) bottleneck (N,C_in,H,W) → (N,depth,⌈H/s⌉,⌈W/s⌉)."""

    def __init__(self, u: Unit):
        super().__init__()
        self.stride = u.stride
        if u.in_channels != u.depth:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(u.in_channels, u.depth, 1, u.stride, bias=False),
                                                nn.BatchNorm2d(u.depth, eps=BN_EPS))
        else:
            self.shortcut_layer = None
        layers = [nn.BatchNorm2d(u.in_channels, eps=BN_EPS), nn.Conv2d(u.in_channels, u.depth, 3, 1, 1, bias=False),
                  nn.PReLU(u.depth), nn.Conv2d(u.depth, u.depth, 3, u.stride, 1, bias=False),
                  nn.BatchNorm2d(u.depth, eps=BN_EPS)]
        if u.se:
            layers.append(SEGate(u.depth, u.se))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x):
        if self.shortcut_layer is not None:
            short = self.shortcut_layer(x)
        else:  # MaxPool2d(1, stride): a subsample
            short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        return self.res_layer(x) + short


class StyleBlock(nn.Module):
    """``n`` stride-2 3×3 convs (width ``channels``) + LeakyReLU(0.01) down to 1×1, then an equalised-lr linear
    ``channels → w_dim``: (N,C,2^n,2^n) → (N, w_dim).  Official: ``channels = w_dim``."""

    def __init__(self, in_channels: int, channels: int, w_dim: int, n: int):
        super().__init__()
        layers = []
        for k in range(n):
            layers += [nn.Conv2d(in_channels if k == 0 else channels, channels, 3, 2, 1), nn.LeakyReLU(STYLE_LRELU)]
        self.convs = nn.Sequential(*layers)
        self.linear = FullyConnected(channels, w_dim, lr_multiplier=1.0)  # EqualLinear(out_c, out_c, lr_mul=1)
        self.channels = channels

    def forward(self, x):
        x = self.convs(x)
        if x.shape[-2:] != (1, 1):
            raise InvalidInput(f"style block reached {tuple(x.shape[-2:])}, not 1×1: wrong input size")
        return self.linear(x.reshape(x.shape[0], self.channels))


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=True) resize of ``x`` to ``y``'s size, plus ``y``."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class Encoder(nn.Module):
    """IR-SE FPN encoder: ``forward(x (N,3,S,S)) -> codes (N, num_ws, w_dim)`` (no latent average added).

    ``config.kind`` "psp" (``GradualStyleEncoder``: each row from its own block) or "e4e" (``Encoder4Editing``:
    a shared w0 plus per-row deltas).  Buffers: ``latent_avg (num_ws, w_dim)``; ``start_from_latent_avg`` says
    whether :func:`encode` adds it.  ``S`` = ``config.input_size``.
    """

    def __init__(self, config: EncoderConfig, start_from_latent_avg: bool = True, opts: Optional[dict] = None):
        super().__init__()
        self.config = config
        self.start_from_latent_avg = bool(start_from_latent_avg)
        self.opts = dict(opts or {})
        c = config
        self.input_layer = nn.Sequential(nn.Conv2d(c.input_channels, c.stem_channels, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(c.stem_channels, eps=BN_EPS), nn.PReLU(c.stem_channels))
        self.body = nn.Sequential(*(IRUnit(u) for u in c.units))
        d1, d2 = c.units[c.taps[0]].depth, c.units[c.taps[1]].depth
        self.latlayer1 = nn.Conv2d(d2, c.fpn_channels, 1)
        self.latlayer2 = nn.Conv2d(d1, c.fpn_channels, 1)
        self.styles = nn.ModuleList(StyleBlock(c.fpn_channels, c.style_channels, c.w_dim, n) for n in c.style_convs)
        self.register_buffer("latent_avg", torch.zeros(c.num_ws, c.w_dim))

    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    @property
    def w_dim(self) -> int:
        return self.config.w_dim

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def features(self, x):
        """Backbone taps (c1, c2, c3) at input/4, /8, /16."""
        x = self.input_layer(x)
        taps, out = self.config.taps, []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in taps:
                out.append(x)
            if i == taps[-1]:
                break
        return tuple(out)

    def forward(self, x, stage: Optional[int] = None):
        """``stage`` (e4e progressive training): only rows 1…stage get their delta; None = all rows."""
        c1, c2, c3 = self.features(x)
        cfg = self.config
        p2 = p1 = None

        def feats(i):
            nonlocal p2, p1
            if i < cfg.coarse:
                return c3
            if p2 is None:
                p2 = upsample_add(c3, self.latlayer1(c2))
            if i < cfg.middle:
                return p2
            if p1 is None:
                p1 = upsample_add(p2, self.latlayer2(c1))
            return p1

        if cfg.kind == "psp":
            return torch.stack([self.styles[i](feats(i)) for i in range(cfg.num_ws)], dim=1)
        w0 = self.styles[0](c3)
        last = cfg.num_ws - 1 if stage is None else min(int(stage), cfg.num_ws - 1)
        rows = [w0] + [w0 + self.styles[i](feats(i)) if i <= last else w0 for i in range(1, cfg.num_ws)]
        return torch.stack(rows, dim=1)

    def deltas(self, codes: torch.Tensor) -> torch.Tensor:
        """e4e's Δ_i = w_i − w_0 for rows 1… of ``codes`` (N, num_ws, w_dim) → (N, num_ws−1, w_dim)."""
        return codes[:, 1:] - codes[:, :1]


# ================================================================================================= public API


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise InvalidInput(f"{name} must be a (N,3,H,W) tensor in [-1,1], got {shape}")
    if image.shape[0] < 1 or min(image.shape[-2:]) < 2:
        raise InvalidInput(f"{name} is empty or too small: {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise InvalidInput(f"{name} contains NaN or infinite values")
    return image


def prepare_input(E: Encoder, image: torch.Tensor) -> torch.Tensor:
    """``image`` (N,3,H,W) in [-1,1] resized to the encoder's input size (bilinear, antialiased) when it differs."""
    image = check_image(image)
    s = E.input_size
    p = next(E.parameters())
    image = image.to(p.device, p.dtype)
    if tuple(image.shape[-2:]) != (s, s):
        image = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    return image


def encode(E: Encoder, image: torch.Tensor, add_latent_avg: Optional[bool] = None) -> torch.Tensor:
    """``image`` (N,3,H,W) in [-1,1] → ws (N, num_ws, w_dim); grad flows when enabled (training).

    Adds ``E.latent_avg`` when the checkpoint says ``start_from_latent_avg`` (override with ``add_latent_avg``).
    """
    codes = E(prepare_input(E, image))
    add = E.start_from_latent_avg if add_latent_avg is None else add_latent_avg
    return codes + E.latent_avg.to(codes.dtype) if add else codes


@torch.no_grad()
def encoder_pivot(E: Encoder, image: torch.Tensor) -> torch.Tensor:
    """The encoder's W+ code as a PTI pivot: ``image`` (N,3,H,W) in [-1,1] → ws (N, num_ws, w_dim), float32."""
    was = E.training
    E.eval()
    try:
        return encode(E, image).float().detach()
    finally:
        E.train(was)


def check_compatible(E: Encoder, G) -> None:
    """InvalidInput unless the encoder's codes fit the generator (num_ws, w_dim)."""
    if (E.num_ws, E.w_dim) != (G.num_ws, G.w_dim):
        raise InvalidInput(f"the encoder makes {E.num_ws}×{E.w_dim} codes but the generator takes "
                           f"{G.num_ws}×{G.w_dim}; use an encoder trained for this generator")


def encoder_matches(E: Encoder, G) -> bool:
    """True when ``E`` was trained for exactly this generator (the sha256 our trainer stores in its opts)."""
    from core.stylegan2.formats import fingerprint

    want = (E.opts.get("latent_edit_meta") or {}).get("generator_sha256")
    return want is not None and want == fingerprint(G)


def _opts_dict(opts, path) -> dict:
    if isinstance(opts, argparse.Namespace):
        opts = vars(opts)
    if not isinstance(opts, dict):
        raise CheckpointError(f"{path}: 'opts' is a {type(opts).__name__}, not a dict of options")
    return opts


def _latent_avg(value, cfg: EncoderConfig, path) -> torch.Tensor:
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise CheckpointError(f"{path}: latent_avg is not a float tensor")
    t = value.detach().float()
    if t.shape[-1] != cfg.w_dim or t.numel() not in (cfg.w_dim, cfg.num_ws * cfg.w_dim):
        raise CheckpointError(f"{path}: latent_avg has shape {tuple(t.shape)}; expected ({cfg.w_dim},) or "
                              f"({cfg.num_ws}, {cfg.w_dim})")
    return t.reshape(-1, cfg.w_dim).expand(cfg.num_ws, cfg.w_dim).clone()


def read_checkpoint(path) -> dict:
    """The e4e/pSp checkpoint dict, read safely (``weights_only=True``); CheckpointError names file and problem."""
    path = pathlib.Path(path)
    kind = detect_format(path)
    if kind == "pickle":
        raise CheckpointError(f"refusing to load {path}: it is a plain pickle, not a torch.save checkpoint "
                              f"(unpickling it could run code)")
    obj = _torch_load(path, mmap=kind == "torch-zip")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not an e4e/pSp checkpoint (no 'state_dict'; found {found})")
    return obj


def load_encoder(path, device="cpu") -> Encoder:
    """Load an e4e / pSp encoder (official checkpoints or ours) → eval-mode :class:`Encoder` on ``device``."""
    path = pathlib.Path(path)
    obj = read_checkpoint(path)
    opts = _opts_dict(obj.get("opts", {}), path)
    sd = {k[len("encoder."):]: v for k, v in obj["state_dict"].items() if str(k).startswith("encoder.")}
    if not sd:
        raise CheckpointError(f"{path}: the checkpoint holds no encoder.* tensors")
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: encoder.{bad[0]} is not a tensor")
    etype = opts.get("encoder_type")
    if etype is None:
        raise CheckpointError(f"{path}: opts has no 'encoder_type' (Encoder4Editing or GradualStyleEncoder)")
    cfg = encoder_config({k: v.shape for k, v in sd.items()}, str(etype), path)
    E = Encoder(cfg, start_from_latent_avg=bool(opts.get("start_from_latent_avg", True)), opts=opts)
    expected = E.state_dict()
    state = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    latent = obj.get("latent_avg")
    if latent is None:
        if E.start_from_latent_avg:
            raise CheckpointError(f"{path}: opts say start_from_latent_avg but the file has no latent_avg")
        state["latent_avg"] = torch.zeros(cfg.num_ws, cfg.w_dim)
    else:
        state["latent_avg"] = _latent_avg(latent, cfg, path)
    for k in [k for k in expected if k.endswith("num_batches_tracked")]:
        state[k] = sd.get(k, torch.zeros((), dtype=torch.long))
    check_tensors_match(path, state, expected, prefix="encoder.")
    E.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=True)
    E.checkpoint_info = {"format": f"{cfg.kind} encoder", "path": str(path)}
    return E.to(device).eval().requires_grad_(False)


def save_encoder(E: Encoder, path, meta: Optional[dict] = None) -> None:
    """Write ``E`` in the e4e/pSp layout (``state_dict`` of ``encoder.*``, ``latent_avg``, ``opts``), atomically."""
    path = pathlib.Path(path)
    sd = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in E.state_dict().items() if k != "latent_avg"}
    opts = {**E.opts, "encoder_type": next(k for k, v in ENCODER_TYPES.items() if v == E.config.kind),
            "start_from_latent_avg": E.start_from_latent_avg, "input_size": E.input_size}
    if meta:
        opts["latent_edit_meta"] = {str(k): v for k, v in meta.items()}
    record = {"state_dict": sd, "latent_avg": E.latent_avg.detach().cpu().clone(), "opts": opts}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    os.replace(tmp, path)


def parameter_count(cfg: EncoderConfig) -> int:
    """Parameters of an encoder with ``cfg``, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        E = Encoder(cfg)
    return sum(p.numel() for p in E.parameters())
