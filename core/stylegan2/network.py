"""StyleGAN2 generator (config-f, 'skip' architecture) in plain torch ops.

Numerically equivalent to rosinality/stylegan2-pytorch and NVlabs/stylegan2-ada-pytorch (fixtures README §3):
mapping = PixelNorm + equalised-lr FCs (lr_mul 0.01) with lrelu·√2; synthesis = per-layer affine styles,
modulated + demodulated 3×3 convs (up-convs as one stride-2 transposed conv + a 4×4 FIR [1,3,3,1]),
const noise buffers × strength, bias + lrelu·√2, skip ToRGB (1×1, no demodulation) with an FIR-upsampled image.

Speed notes (CPU): feature maps are channels-last (NHWC oneDNN convs). A single sample folds style and
demodulation into the conv weight (one plain conv per layer); batches, and backward passes with frozen weights
(inversion), scale the activations around one shared conv instead (no grouped conv, no weight-gradient conv).
Demodulation coefficients come from ``styles² @ Σ_k W²``; the bias rides in the conv or an ``addcmul``; the lrelu
gain √2 is carried by the next layer's styles; noise and activation run in place; ToRGB is a matmul over pixels
with a hand-written backward. Result: the same numbers as the references to ~1e-6 (fixtures), in fewer passes.

Feature access (Yin et al. 2022 content fusion, ``core.expanded``): ``synthesis(..., block_hook=fn)`` shows each
resolution block's output feature map and running skip image to ``fn``, which may replace them;
``block_features`` reads them.  Without a hook the forward does no extra work and gives identical output.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.common import InvalidInput

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2  # StyleGAN2: leaky ReLU slope 0.2, gain sqrt(2)
DEMOD_EPS = 1e-8  # StyleGAN2 eq. 3 epsilon
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)  # StyleGAN2 resample filter


@dataclasses.dataclass
class GeneratorConfig:
    """Architecture of a StyleGAN2 generator.

    ``channels`` maps every resolution 4, 8, …, ``resolution`` to its feature-map channel count.
    """

    resolution: int
    z_dim: int
    w_dim: int
    mapping_layers: int
    channels: dict
    lr_multiplier: float = 0.01  # StyleGAN2 (Karras et al. 2020) mapping-network learning-rate multiplier
    conv_clamp: Optional[float] = None  # stylegan2-ada: None (config-f, --fp32); ada training default 256

    def __post_init__(self):
        self.channels = {int(k): int(v) for k, v in dict(self.channels).items()}
        res = int(self.resolution)
        if res < 4 or res & (res - 1):
            raise InvalidInput(f"resolution must be a power of two >= 4, got {self.resolution}")
        self.resolution = res
        missing = [r for r in self.resolutions if r not in self.channels]
        if missing:
            raise InvalidInput(f"channels missing for resolutions {missing}")
        self.channels = {r: self.channels[r] for r in self.resolutions}
        for name in ("z_dim", "w_dim", "mapping_layers"):
            if int(getattr(self, name)) < 1:
                raise InvalidInput(f"{name} must be positive, got {getattr(self, name)}")
            setattr(self, name, int(getattr(self, name)))
        self.lr_multiplier = float(self.lr_multiplier)
        if self.conv_clamp is not None:
            self.conv_clamp = float(self.conv_clamp)

    @property
    def resolutions(self) -> list:
        return [2 ** k for k in range(2, int(math.log2(self.resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.resolution)) - 2

    def to_dict(self) -> dict:
        """JSON-safe dict (channel keys become strings)."""
        return {
            "resolution": self.resolution,
            "z_dim": self.z_dim,
            "w_dim": self.w_dim,
            "mapping_layers": self.mapping_layers,
            "channels": {str(k): v for k, v in self.channels.items()},
            "lr_multiplier": self.lr_multiplier,
            "conv_clamp": self.conv_clamp,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidInput(f"unknown GeneratorConfig keys: {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass
class StyleLayer:
    """One affine (style) layer of the synthesis network, in synthesis order."""

    index: int  # position in style_layers() (the key of style_deltas)
    ws_index: int  # row of ws feeding this affine
    affine_weight: torch.Tensor  # (C_in, w_dim) stored weight (used × 1/sqrt(w_dim))
    affine_bias: torch.Tensor  # (C_in,)
    kind: str  # "conv" | "torgb"
    channels: int  # C_in, the length of the style vector
    resolution: int


# ----------------------------------------------------------------------------------------------- functional ops


def fir_kernel(dtype=torch.float32, device=None) -> torch.Tensor:
    """(4,4) normalised separable [1,3,3,1] filter (sums to 1)."""
    k = torch.tensor(FIR_TAPS, dtype=torch.float64)
    k = torch.outer(k, k)
    return (k / k.sum()).to(dtype=dtype, device=device)


def upsample_fir(x: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """2× upsampling of (N,C,H,W): zero insertion + 4×4 FIR (gain 4), padding (2,1) → (N,C,2H,2W)."""
    c = x.shape[1]
    k = (fir * 4).to(x.dtype).expand(c, 1, 4, 4)
    return F.conv_transpose2d(x, k, stride=2, padding=1, groups=c)


def blur_after_transpose(x: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """The FIR after a stride-2 transposed 3×3 conv: (N,C,2H+1,2W+1) → (N,C,2H,2W), gain 4, padding 1."""
    c = x.shape[1]
    k = (fir * 4).to(x.dtype).expand(c, 1, 4, 4)
    return F.conv2d(x, k, padding=1, groups=c)


# ----------------------------------------------------------------------------------------------- layers


def _randn(init: bool, *shape) -> torch.Tensor:
    """N(0,1) weights (the references' init), or uninitialised memory when a loader will overwrite them."""
    return torch.randn(*shape) if init else torch.empty(*shape)


class FullyConnected(nn.Module):
    """Equalised-lr linear layer ``x @ (W·lr/√in)ᵀ + b·lr`` (weights stored ÷ lr, like both references)."""

    def __init__(self, in_features: int, out_features: int, lr_multiplier: float = 1.0, bias_init: float = 0.0,
                 init: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier if init
                                   else torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        return torch.addmm(b, x, w.t())


class StyleConv(nn.Module):
    """Modulated 3×3 conv (optionally 2× up), noise, bias, lrelu.  (N,C_in,H,W) → (N,C_out,H·up,W·up).

    The activation gain √2 is *not* applied to the output: it is carried by the consumer (``in_gain`` of the next
    StyleConv / ToRGB scales their styles), which saves a full pass over every feature map, forward and backward.
    So this layer returns ``lrelu(...)`` = (the reference's activation) / √2.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool,
                 conv_clamp: Optional[float] = None, init: bool = True):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0, init=init)
        self.weight = nn.Parameter(_randn(init, out_channels, in_channels, 3, 3))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", _randn(init, resolution, resolution))
        self.resolution = resolution
        self.up = up

    def forward(self, x, w, fir, noise_mode="const", noise=None, style_delta=None, in_gain=1.0):
        styles = self.affine(w)  # (N, C_in)
        if style_delta is not None:
            styles = styles + style_delta.to(styles.dtype)
        n = x.shape[0]
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype)
        # Demodulation coefficients (N, C_out) = rsqrt(Σ_i s_i² Σ_k W_oik² + eps), at least fp32 (no fp16 overflow).
        acc = torch.promote_types(x.dtype, torch.float32)
        wsq = self.weight.to(acc).square().sum(dim=(2, 3))  # (O, I)
        dcoef = torch.rsqrt(styles.to(acc).square() @ wsq.t() + DEMOD_EPS).to(x.dtype)
        s_in = (styles * in_gain).to(x.dtype)  # the previous layer's √2 rides on the styles
        # One sample and no frozen-weight backward: fold style + demodulation into the weight (one plain conv).
        # Otherwise scale the activations around one shared conv: with frozen weights the backward then needs
        # no weight-gradient convolution, and batches need no grouped conv.
        fused = n == 1 and not (torch.is_grad_enabled() and not self.weight.requires_grad)
        if fused:
            wmod = weight * (s_in[0].view(1, -1, 1, 1) * dcoef[0].view(-1, 1, 1, 1))
            if self.up:
                y = self._conv(x, wmod, fir).add_(bias.view(1, -1, 1, 1))
            else:
                y = F.conv2d(x, wmod, bias, padding=1)  # bias inside the conv: no extra pass
        else:
            y = self._conv(x * s_in.view(n, -1, 1, 1), weight, fir)
            y = torch.addcmul(bias.view(1, -1, 1, 1), y, dcoef.view(n, -1, 1, 1))  # b + y·d in one pass
        if noise is None:
            if noise_mode == "const":
                noise = self.noise_const
            elif noise_mode == "random":
                noise = torch.randn(n, 1, y.shape[2], y.shape[3], device=y.device, dtype=y.dtype)
        if noise is not None:  # the references add noise before the bias; addition order only changes rounding
            y = y.add_(noise.to(y.dtype) * self.noise_strength.to(y.dtype))
        y = F.leaky_relu_(y, LRELU_SLOPE)
        if self.conv_clamp is not None:  # stylegan2-ada clamps lrelu·√2 to ±conv_clamp
            c = self.conv_clamp / SQRT2
            y = y.clamp(-c, c)
        return y

    def _conv(self, x, weight, fir):
        if self.up:
            y = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            return blur_after_transpose(y, fir)
        return F.conv2d(x, weight, padding=1)


class PixelMatmul(torch.autograd.Function):
    """``bias + pix @ wmodᵀ`` for pix (N,P,C), wmod (N,K,C) → (N,P,K), with a backward whose products keep the
    long pixel axis as the contraction/row axis (autograd's default ``pixᵀ @ grad`` is ~10× slower on CPU)."""

    @staticmethod
    def forward(ctx, pix, wmod, bias):
        ctx.save_for_backward(pix, wmod)
        return torch.baddbmm(bias.view(1, 1, -1), pix, wmod.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        pix, wmod = ctx.saved_tensors
        g_pix = torch.bmm(grad, wmod) if ctx.needs_input_grad[0] else None  # (N,P,C): channels-last
        g_w = torch.bmm(grad.transpose(1, 2), pix) if ctx.needs_input_grad[1] else None  # (N,K,C)
        g_b = grad.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
        return g_pix, g_w, g_b


class ToRGB(nn.Module):
    """Modulated 1×1 conv to 3 channels (styles × 1/√C_in, no demodulation) + bias.  (N,C,H,W) → (N,3,H,W)."""

    def __init__(self, in_channels: int, w_dim: int, img_channels: int = 3, conv_clamp: Optional[float] = None,
                 init: bool = True):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0, init=init)
        self.weight = nn.Parameter(_randn(init, img_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x, w, style_delta=None, in_gain=1.0):
        styles = self.affine(w)
        if style_delta is not None:
            styles = styles + style_delta.to(styles.dtype)
        styles = (styles * (self.weight_gain * in_gain)).to(x.dtype)
        n, c, h, wd = x.shape
        wmod = self.weight.to(x.dtype)[:, :, 0, 0].unsqueeze(0) * styles.unsqueeze(1)  # (N, 3, C)
        # 1×1 conv as a matmul over pixels: (N, HW, C) @ (N, C, 3); a free view for channels-last x.
        pix = x.permute(0, 2, 3, 1).reshape(n, h * wd, c)
        y = PixelMatmul.apply(pix, wmod, self.bias.to(x.dtype))
        if self.conv_clamp is not None:
            y = y.clamp(-self.conv_clamp, self.conv_clamp)
        return y.view(n, h, wd, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------- generator


class Generator(nn.Module):
    """StyleGAN2 generator.  ``mapping(z) -> ws``, ``synthesis(ws) -> (N,3,H,W)`` (≈[-1,1], unclamped).

    Parameters (state-dict names): ``mapping_fcs.{i}.{weight,bias}``, buffer ``w_avg (w_dim,)``,
    ``const (C4,4,4)``, ``convs.{j}`` (synthesis order: 4×4 conv, then up-conv and conv per resolution)
    and ``torgbs.{k}`` (one per resolution).
    """

    def __init__(self, config: GeneratorConfig, init: bool = True):
        """``init=False`` leaves the weights uninitialised (cheap: untouched memory) for loaders to replace."""
        super().__init__()
        if isinstance(config, dict):
            config = GeneratorConfig.from_dict(config)
        self.config = config
        self.resolution = config.resolution
        self.z_dim = config.z_dim
        self.w_dim = config.w_dim
        self.num_ws = config.num_ws
        ch = config.channels
        self.mapping_fcs = nn.ModuleList(
            FullyConnected(config.z_dim if i == 0 else config.w_dim, config.w_dim, config.lr_multiplier, init=init)
            for i in range(config.mapping_layers)
        )
        self.register_buffer("w_avg", torch.zeros(config.w_dim))
        self.const = nn.Parameter(_randn(init, ch[4], 4, 4))
        cc = config.conv_clamp
        convs = [StyleConv(ch[4], ch[4], config.w_dim, 4, up=False, conv_clamp=cc, init=init)]
        torgbs = [ToRGB(ch[4], config.w_dim, conv_clamp=cc, init=init)]
        for res in config.resolutions[1:]:
            convs.append(StyleConv(ch[res // 2], ch[res], config.w_dim, res, up=True, conv_clamp=cc, init=init))
            convs.append(StyleConv(ch[res], ch[res], config.w_dim, res, up=False, conv_clamp=cc, init=init))
            torgbs.append(ToRGB(ch[res], config.w_dim, conv_clamp=cc, init=init))
        self.convs = nn.ModuleList(convs)
        self.torgbs = nn.ModuleList(torgbs)
        self.register_buffer("fir", fir_kernel(), persistent=False)
        if init:
            self.reset_w_avg()

    # -- mapping ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_w_avg(self, num_samples: int = 4096, seed: int = 0) -> torch.Tensor:
        """Set ``w_avg`` to the mean mapping output over ``num_samples`` seeded z (does not touch the global RNG)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(num_samples, self.z_dim, generator=gen).to(self.w_avg.device)
        dtype = self.mapping_fcs[0].weight.dtype
        self.w_avg.copy_(self._map(z.to(dtype)).mean(0).to(self.w_avg.dtype))
        return self.w_avg

    def _map(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # PixelNorm
        for fc in self.mapping_fcs:
            x = F.leaky_relu(fc(x), LRELU_SLOPE) * SQRT2
        return x

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None):
        """z (N, z_dim) → ws (N, num_ws, w_dim); truncation ``w_avg + ψ (w - w_avg)`` on the first
        ``truncation_cutoff`` rows (all rows when None)."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise InvalidInput(f"z must be (N, {self.z_dim}), got {tuple(z.shape)}")
        dtype = self.mapping_fcs[0].weight.dtype
        w = self._map(z.to(dtype))
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            avg = self.w_avg.to(ws.dtype)
            if truncation_cutoff is None:
                ws = avg.lerp(ws, truncation_psi)
            else:
                ws = ws.clone()
                ws[:, :truncation_cutoff] = avg.lerp(ws[:, :truncation_cutoff], truncation_psi)
        return ws

    # -- synthesis ----------------------------------------------------------------------------------------------

    def style_layers(self) -> list:
        """Every affine of the synthesis network in synthesis order (see :class:`StyleLayer`)."""
        out = []
        res_list = self.config.resolutions
        for i, res in enumerate(res_list):
            k = int(math.log2(res))
            if i == 0:
                mods = [(self.convs[0], "conv", 0), (self.torgbs[0], "torgb", 1)]
            else:
                mods = [
                    (self.convs[2 * i - 1], "conv", 2 * k - 5),
                    (self.convs[2 * i], "conv", 2 * k - 4),
                    (self.torgbs[i], "torgb", 2 * k - 3),
                ]
            for mod, kind, wi in mods:
                out.append(StyleLayer(len(out), wi, mod.affine.weight, mod.affine.bias, kind,
                                      mod.affine.weight.shape[0], res))
        return out

    def synthesis(
        self,
        ws: torch.Tensor,
        noise_mode: str = "const",
        style_deltas: Optional[dict] = None,
        noise: Optional[Sequence[torch.Tensor]] = None,
        block_hook: Optional[Callable] = None,
    ) -> torch.Tensor:
        """ws (N, num_ws, w_dim) → images (N,3,H,W), ≈[-1,1] (not clamped).

        ``noise_mode``: "const" (stored buffers), "random" (fresh N(0,1)), "none". ``noise``: explicit tensors, one
        per conv in synthesis order (each broadcastable to (N,1,R,R)); overrides ``noise_mode``.
        ``style_deltas``: {style_layer_index: (C_in,) or (N, C_in)} added to that layer's affine output.
        ``block_hook``: per-block feature access (see :func:`block_features`); ``hook(block, x, img)`` is called
        after each resolution block (block ``i`` at ``4·2^i`` px) with its feature map ``x`` (N,C,R,R) — the
        tensor the next block reads, held as lrelu output ÷ √2 (the gain rides on the next styles) — and the
        running skip image ``img`` (N,3,R,R); it returns None (keep both) or ``(x, img)`` to use instead.
        Without a hook the forward is unchanged (no extra work, identical output).
        """
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise InvalidInput(f"ws must be (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        if noise_mode not in ("const", "random", "none"):
            raise InvalidInput(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")
        if noise is not None and len(noise) != len(self.convs):
            raise InvalidInput(f"noise must list {len(self.convs)} tensors, got {len(noise)}")
        deltas = style_deltas or {}
        n_styles = 3 * len(self.torgbs) - 1
        bad = [k for k in deltas if not 0 <= int(k) < n_styles]
        if bad:
            raise InvalidInput(f"style_deltas keys out of range 0..{n_styles - 1}: {bad}")
        dtype = self.const.dtype
        if torch.is_autocast_enabled(ws.device.type) and ws.device.type != "cpu":
            dtype = torch.get_autocast_dtype(ws.device.type)
        ws = ws.to(dtype)
        fir = self.fir.to(dtype)
        x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: faster oneDNN convs on CPU
        img = None
        si = 0  # style layer index
        ci = 0  # conv index
        with torch.autocast(ws.device.type, enabled=False):
            for i, torgb in enumerate(self.torgbs):
                k = i + 2
                rows = [0] if i == 0 else [2 * k - 5, 2 * k - 4]
                for r in rows:
                    nz = None if noise is None else noise[ci]
                    gain = 1.0 if ci == 0 else SQRT2  # const input / lrelu output without its √2
                    x = self.convs[ci](x, ws[:, r], fir, noise_mode, nz, deltas.get(si), in_gain=gain)
                    ci += 1
                    si += 1
                r = 1 if i == 0 else 2 * k - 3
                y = torgb(x, ws[:, r], deltas.get(si), in_gain=SQRT2)
                si += 1
                img = y if img is None else upsample_fir(img, fir).add_(y)
                if block_hook is not None:
                    replaced = block_hook(i, x, img)
                    if replaced is not None:
                        x, img = replaced
        return img.contiguous()  # NCHW-contiguous for callers (a 3-channel copy)

    def block_resolutions(self) -> list:
        """Resolution of each synthesis block (the ``block`` index of ``block_hook``): 4, 8, …, resolution."""
        return list(self.config.resolutions)

    def block_features(self, ws: torch.Tensor, blocks: Optional[Sequence[int]] = None, noise_mode: str = "const",
                       style_deltas: Optional[dict] = None) -> tuple:
        """``(images (N,3,H,W), {block: (x (N,C,R,R), img (N,3,R,R))})``: one forward that also returns the
        feature map and running skip image after each block in ``blocks`` (all when None; see ``block_hook``)."""
        n_blocks = len(self.torgbs)
        wanted = set(range(n_blocks)) if blocks is None else {int(b) for b in blocks}
        bad = sorted(b for b in wanted if not 0 <= b < n_blocks)
        if bad:
            raise InvalidInput(f"blocks out of range 0..{n_blocks - 1}: {bad}")
        out: dict = {}

        def keep(i, x, img):
            if i in wanted:
                out[i] = (x, img)
            return None

        return self.synthesis(ws, noise_mode=noise_mode, style_deltas=style_deltas, block_hook=keep), out

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const") -> torch.Tensor:
        """z (N, z_dim) → images (N,3,H,W)."""
        return self.synthesis(self.mapping(z, truncation_psi), noise_mode=noise_mode)

    def extra_repr(self) -> str:
        c = self.config
        return f"resolution={c.resolution}, z_dim={c.z_dim}, w_dim={c.w_dim}, mapping_layers={c.mapping_layers}"
