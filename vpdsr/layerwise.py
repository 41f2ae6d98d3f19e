"""Layer-by-layer tiled execution: exact at any image size, accelerator memory bounded by the tile.

Why: running a whole stage per tile (vpdsr's tiling before this module) lets each GroupNorm see
only its tile, and the whole-image statistics put in their place came from a shrunk copy of the
image: exact up to about four tiles, an estimate past that. Here the image goes through the network one layer at a time.
The whole-image activation of each layer waits on ``host`` (CPU RAM); the compute ``device`` sees
one tile of it at a time, plus the halo that layer reads, and writes back the cropped result:

- a convolution on a tile and its halo equals the untiled convolution there; the module's own zero
  padding only matters at the image border, where it is what the untiled call does too;
- a GroupNorm normalises with the whole image's per-group moments, gathered tile by tile while
  the layer before it ran (float32 moments per tile, combined in float64);
- strided and resampling layers read exactly the input rows their outputs depend on, so no grid
  alignment is needed and odd sizes work;
- self-attention is global: it runs per query tile against the keys and values of the whole image.

A single tile is the same code without host copies: the activation stays on the device and every
pass calls the layers on the whole tensor, as the module's own forward does, so the tiled and the
untiled runs cannot drift apart. Inference only (no gradients; the modules must be in eval mode).

Progress: ``step()`` is called once per tile of every pass (a pass is one layer, or a few fused
pointwise layers around one spatial layer); :func:`count_steps` gives the total beforehand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    UpDecoderBlock2D,
)
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

from .backbones import SmoothUpsample
from .errors import Cancelled
from .refiner import PixelRefiner
from .shuffle_decoder import ResidualConvBlock, ShuffleDecoder, upscale_bilinear

__all__ = ["UnsupportedModule", "count_steps", "decode", "encode_mean", "refine", "unet_forward"]

Step = Callable[[], None]
StopCheck = Callable[[], bool]


class UnsupportedModule(TypeError):
    """A module the layer-by-layer runner cannot reproduce exactly, named so it can be added."""


def _unsupported(module: object, why: str = "") -> UnsupportedModule:
    detail = f": {why}" if why else ""
    return UnsupportedModule(f"layerwise tiling does not support {type(module).__name__}{detail}")


# --- geometry: which input rows an output row range reads ------------------------------------------


@dataclass(frozen=True)
class _Conv:
    """One axis of a convolution: output ``o`` reads inputs ``[o*stride - pad, o*stride - pad + span)``."""

    span: int
    stride: int = 1
    pad: int = 0
    pad_end: int = 0

    def length(self, n: int) -> int:
        return (n + self.pad + self.pad_end - self.span) // self.stride + 1

    def need(self, o0: int, o1: int, n: int) -> tuple[int, int, int]:
        """Input range ``[a, b)`` for outputs ``[o0, o1)``, and where ``o0`` falls in the layer's output on it.

        ``a`` is a multiple of the stride, so the layer run on the region keeps the image's grid.
        """
        s = self.stride
        a = max(0, (o0 * s - self.pad) // s * s)
        b = min(n, (o1 - 1) * s - self.pad + self.span)
        return a, b, o0 - a // s


_POINT = _Conv(1)


@dataclass(frozen=True)
class _Nearest:
    """Nearest resize (indices taken from torch itself) followed by a stride-1 convolution."""

    index: Tensor
    conv: _Conv

    def length(self, n: int) -> int:
        return self.conv.length(len(self.index))

    def need(self, o0: int, o1: int, n: int) -> tuple[int, int, int]:
        va, vb, off = self.conv.need(o0, o1, len(self.index))
        return int(self.index[va]), int(self.index[vb - 1]) + 1, off

    def local(self, o0: int, o1: int, a: int) -> Tensor:
        """The region rows that make up the resized rows this tile's convolution reads."""
        va, vb, _ = self.conv.need(o0, o1, len(self.index))
        return self.index[va:vb] - a


@dataclass(frozen=True)
class _Bilinear:
    """2x bilinear resize (align_corners=False) followed by a stride-1 convolution.

    Resizing a region gets every resized row right except its first and last, where the region's
    edge clamps what the image would interpolate, so the region reaches one row further each way.
    """

    conv: _Conv

    def length(self, n: int) -> int:
        return self.conv.length(2 * n)

    def need(self, o0: int, o1: int, n: int) -> tuple[int, int, int]:
        va, vb, _ = self.conv.need(o0, o1, 2 * n)
        a = max(0, (va - 1) // 2)
        return a, min(n, (vb + 2) // 2), o0 - 2 * a


@dataclass(frozen=True)
class _Shuffle:
    """Pixel shuffle by ``factor``: output row ``o`` comes from input row ``o // factor`` alone."""

    factor: int

    def length(self, n: int) -> int:
        return n * self.factor

    def need(self, o0: int, o1: int, n: int) -> tuple[int, int, int]:
        a = o0 // self.factor
        return a, -(-o1 // self.factor), o0 - a * self.factor


@dataclass(frozen=True)
class _Upscale:
    """Bilinear resize by an integer ``factor`` (align_corners=False), no convolution.

    Output ``o`` interpolates input rows ``floor((o + 0.5) / factor - 0.5)`` and the one after; a
    region holding both for every output of the tile resizes to the image's values there, since
    the resize of a region starting at row ``a`` is the image's shifted by ``a * factor``.
    """

    factor: int

    def length(self, n: int) -> int:
        return n * self.factor

    def need(self, o0: int, o1: int, n: int) -> tuple[int, int, int]:
        f = self.factor
        a = max(0, math.floor((o0 + 0.5) / f - 0.5))
        b = min(n, math.floor((o1 - 0.5) / f - 0.5) + 2)
        return a, b, o0 - a * f


_Axis = _Conv | _Nearest | _Bilinear | _Shuffle | _Upscale


def _base_layer(module: nn.Module) -> nn.Module:
    """The layer under adapter wrappers (peft's LoRA layers keep it as ``base_layer``)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _conv_axes(conv: nn.Module) -> tuple[_Conv, _Conv]:
    base = _base_layer(conv)
    if not isinstance(base, nn.Conv2d):
        raise _unsupported(base, "expected a Conv2d")
    if base.padding_mode != "zeros" or isinstance(base.padding, str):
        raise _unsupported(base, f"padding {base.padding!r} ({base.padding_mode})")
    return tuple(  # type: ignore[return-value]
        _Conv(d * (k - 1) + 1, s, p, p)
        for k, s, p, d in zip(base.kernel_size, base.stride, base.padding, base.dilation, strict=True)
    )


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _tiles_along(n: int, tile: int) -> int:
    return 1 if tile <= 0 or tile >= n else math.ceil(n / tile)


# --- activations and the runner ---------------------------------------------------------------------


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Every host-to-device move goes through here (the memory test counts what it moves)."""
    return t.to(device)


def _layout(t: Tensor) -> torch.memory_format:
    """The memory format of a tile, for the whole-image tensor it is stored into: a channels-last
    model (bf16 on the CPU) writes channels-last tiles, and storing them in the default layout would
    transpose every tile on the way in and again when the next layer fetches its region."""
    # a tile is often a crop of the layer's output, contiguous in neither format: read its strides
    return torch.channels_last if t.dim() == 4 and t.stride(1) < t.stride(3) else torch.contiguous_format


def _run_tile(body: Callable[[Tensor, _Box], Tensor | None], region: Tensor, box: _Box) -> Tensor | None:
    """Every tile's device work goes through here (the memory test watches it)."""
    return body(region, box)


@dataclass
class _Part:
    """One stored tensor of an activation, with its per-channel moments once known."""

    data: Tensor | None
    moments: tuple[Tensor, Tensor] | None = None  # float64 (B, C) sums of x and x^2, on the host


@dataclass
class _Act:
    """A whole-image activation: stored parts concatenated along channels (skip concatenations stay
    two parts, so no concatenated copy is ever stored)."""

    parts: list[_Part]
    hw: tuple[int, int]

    def cat(self, other: _Act) -> _Act:
        if other.hw != self.hw:
            raise ValueError(f"cannot concatenate activations of sizes {self.hw} and {other.hw}")
        return _Act(self.parts + other.parts, self.hw)

    def region(self, y0: int, y1: int, x0: int, x1: int, device: torch.device) -> Tensor:
        whole = (y0, y1, x0, x1) == (0, self.hw[0], 0, self.hw[1])
        datas = [p.data for p in self.parts]
        ts = [_to_device(d if whole else d[:, :, y0:y1, x0:x1], device) for d in datas]  # type: ignore[index]
        return ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)


@dataclass(frozen=True)
class _Box:
    """One output tile ``[y0, y1) x [x0, x1)``; ``oy, ox`` locate it in the layer's output on the region."""

    runner: _Runner
    y0: int
    y1: int
    x0: int
    x1: int
    oy: int
    ox: int
    ry: int  # where the fetched region starts in the input
    rx: int

    def crop(self, t: Tensor) -> Tensor:
        return t[:, :, self.oy : self.oy + self.y1 - self.y0, self.ox : self.ox + self.x1 - self.x0]

    def fetch(self, act: _Act) -> Tensor:
        """Another activation at this tile's output pixels (residuals, skips)."""
        return act.region(self.y0, self.y1, self.x0, self.x1, self.runner.device)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and below, as GroupNorm kernels compute; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Moments:
    """Per-channel sums of x and x^2 over tiles. Each tile's squares are summed about the tile's
    own mean (a float32 sum of raw squares would cancel catastrophically when the mean is large);
    the float64 sums across tiles are then exact enough for any image size. (``torch.var_mean``
    does the same but is ten times slower on the CPU, and ``linalg.vector_norm`` several times slower
    than squaring in place on a channels-last tile.)"""

    def __init__(self, host: torch.device) -> None:
        self.host = host
        self.total: Tensor | None = None

    def add(self, t: Tensor) -> None:
        u = t.to(_accumulation(t.dtype))
        mean = u.mean((2, 3), keepdim=True)
        # a fresh float copy can be centred in place; a float32 or float64 tile is ``t`` itself
        centred = u.sub_(mean) if u is not t else u - mean
        m2 = centred.square_().sum((2, 3)).to(self.host, torch.float64)
        mean = mean[:, :, 0, 0].to(self.host, torch.float64)
        n = t.shape[2] * t.shape[3]
        tile = torch.stack([mean * n, m2 + mean * mean * n])
        self.total = tile if self.total is None else self.total + tile

    def result(self) -> tuple[Tensor, Tensor] | None:
        return None if self.total is None else (self.total[0], self.total[1])


class _Runner:
    """One stage's run: the tile grid (fixed for the stage, scaled to each layer's size), where
    activations are stored, and the pass primitive every layer goes through."""

    def __init__(
        self,
        hw: Sequence[int],
        tile: int,
        device: torch.device,
        host: torch.device,
        step: Step | None,
        should_stop: StopCheck | None,
        counting: bool = False,
    ) -> None:
        self.grid = (_tiles_along(hw[0], tile), _tiles_along(hw[1], tile))
        self.single = self.grid == (1, 1)
        self.device, self.host = device, host
        self.store = device if self.single else host
        self.step, self.should_stop, self.counting = step, should_stop, counting

    def input(self, x: Tensor | None, hw: Sequence[int]) -> _Act:
        return _Act([_Part(None if x is None else x.to(self.store))], (int(hw[0]), int(hw[1])))

    def spatial(
        self,
        src: _Act,
        axes: tuple[_Axis, _Axis],
        body: Callable[[Tensor, _Box], Tensor | None],
        *,
        keep: bool = True,
        moments: bool = True,
    ) -> _Act | None:
        """One pass: for each output tile, fetch the input region it reads, run ``body`` on the device
        and store the cropped result it returns (``keep=False``: the body only gathers, e.g. keys).
        With several tiles, the per-channel moments of the result are summed as it is stored, for
        the GroupNorm that may read it next (``moments=False`` where none does)."""
        (h, w), (gy, gx) = src.hw, axes
        out_hw = (gy.length(h), gx.length(w))
        data, stats = None, _Moments(self.host)
        for y0, y1 in _split(out_hw[0], self.grid[0]):
            for x0, x1 in _split(out_hw[1], self.grid[1]):
                if self.should_stop is not None and self.should_stop():
                    raise Cancelled("cancelled by the caller")
                if not self.counting and y1 > y0 and x1 > x0:
                    ay, by, oy = gy.need(y0, y1, h)
                    ax, bx, ox = gx.need(x0, x1, w)
                    box = _Box(self, y0, y1, x0, x1, oy, ox, ay, ax)
                    t = _run_tile(body, src.region(ay, by, ax, bx, self.device), box)
                    if keep and self.single:
                        data = t
                    elif keep:
                        assert t is not None
                        if data is None:
                            data = torch.empty(
                                (*t.shape[:2], *out_hw), dtype=t.dtype, device=self.host, memory_format=_layout(t)
                            )
                        data[:, :, y0:y1, x0:x1].copy_(t)
                        if moments:
                            stats.add(t)
                if self.step is not None:
                    self.step()
        if not keep:
            return None
        return _Act([_Part(data, stats.result())], out_hw)

    def pointwise(self, src: _Act, body: Callable[[Tensor, _Box], Tensor | None], **kw: bool) -> _Act | None:
        return self.spatial(src, (_POINT, _POINT), body, **kw)

    def norm(self, gn: nn.Module, act: _Act) -> Callable[[Tensor], Tensor]:
        """The GroupNorm as a pointwise function normalising with the whole image's statistics.

        One tile: the module itself (it sees the whole image). Several: the module's affine and
        eps applied to the moments gathered over all tiles, as ``F.group_norm`` computes them.
        """
        if type(gn) is not nn.GroupNorm:
            raise _unsupported(gn, "expected a GroupNorm")
        if self.single or self.counting:
            return gn
        if any(p.moments is None for p in act.parts):
            raise RuntimeError("a GroupNorm's input was stored without its moments (a pass with moments=False)")
        s1 = torch.cat([p.moments[0] for p in act.parts], dim=1)  # type: ignore[index]
        s2 = torch.cat([p.moments[1] for p in act.parts], dim=1)  # type: ignore[index]
        b, c = s1.shape
        g = gn.num_groups
        count = act.hw[0] * act.hw[1] * (c // g)
        mean = s1.view(b, g, -1).sum(-1) / count
        var = (s2.view(b, g, -1).sum(-1) / count - mean * mean).clamp_min(0)
        rstd = (var + gn.eps).rsqrt()
        scale = rstd.repeat_interleave(c // g, dim=1)
        shift = -mean.repeat_interleave(c // g, dim=1) * scale
        if gn.affine:
            weight = gn.weight.detach().to(self.host, torch.float64)
            scale, shift = scale * weight, shift * weight + gn.bias.detach().to(self.host, torch.float64)
        dtype = act.parts[0].data.dtype  # type: ignore[union-attr]
        acc = _accumulation(dtype)
        return _affine(scale.to(acc).to(self.device), shift.to(acc).to(self.device), dtype)


def _affine(scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``x * scale + shift`` per sample and channel (``(B, C)`` float tensors), computed in their float
    type and returned in ``x``'s, as GroupNorm computes in float on half-precision input.

    For one sample it is an eval-mode batch norm with mean 0, variance 1 and eps 0: one kernel that
    reads bf16 and computes in float, without the float copy of the tile that ``addcmul`` would take
    first. Only where batch norm takes half-precision ``dtype`` input with float weights: CUDA, and
    the CPU except in float16 (which torch's CPU batch norm gained after 2.1, our oldest); MPS and
    the rest get ``addcmul``.
    """
    fused = scale.device.type == "cuda" or (scale.device.type == "cpu" and dtype != torch.float16)
    if scale.shape[0] == 1 and fused:
        zero, one = torch.zeros_like(scale[0]), torch.ones_like(scale[0])
        # on a strided region the kernel takes a slow path: the copy into its own layout costs less
        # (and the convolution that reads the result would have made it anyway)
        weight, bias = scale[0], shift[0]
        return lambda x: F.batch_norm(x.contiguous(memory_format=_layout(x)), zero, one, weight, bias, False, 0.0, 0.0)
    scale4, shift4 = scale[:, :, None, None], shift[:, :, None, None]
    return lambda x: torch.addcmul(shift4, x, scale4).to(x.dtype)


# --- layers -----------------------------------------------------------------------------------------

Pre = Callable[[Tensor], Tensor] | None
Post = Callable[[Tensor, _Box], Tensor] | None


def _conv(r: _Runner, x: _Act, conv: nn.Module, pre: Pre = None, post: Post = None, moments: bool = True) -> _Act:
    """A convolution module as one pass: pointwise ``pre`` on its input region (halo included, so the
    module's zero padding comes after it, as untiled), ``post`` on the cropped output tile."""

    def body(v: Tensor, box: _Box) -> Tensor:
        t = box.crop(conv(v if pre is None else pre(v)))
        return t if post is None else post(t, box)

    return r.spatial(x, _conv_axes(conv), body, moments=moments)  # type: ignore[return-value]


def _resnet(r: _Runner, m: nn.Module, x: _Act, temb: Tensor | None) -> _Act:
    """ResnetBlock2D in two passes: norm1-act-conv1(+temb), then norm2-act-conv2 plus the shortcut."""
    if type(m) is not ResnetBlock2D or m.upsample is not None or m.downsample is not None:
        raise _unsupported(m, "only plain ResnetBlock2D (no up/down) is supported")
    if m.time_embedding_norm == "scale_shift":
        raise _unsupported(m, "time_embedding_norm 'scale_shift'")
    if m.conv_shortcut is not None and _conv_axes(m.conv_shortcut) != (_POINT, _POINT):
        raise _unsupported(m, "a spatial conv_shortcut")
    t = None
    # like diffusers, only the "default" kind adds the embedding (the VAE decoder's "group" has none)
    if m.time_embedding_norm == "default" and m.time_emb_proj is not None and temb is not None and not r.counting:
        t = m.time_emb_proj(temb if m.skip_time_act else m.nonlinearity(temb))[:, :, None, None]
    n1 = r.norm(m.norm1, x)
    h = _conv(r, x, m.conv1, pre=lambda v: m.nonlinearity(n1(v)), post=None if t is None else lambda v, _: v + t)
    n2 = r.norm(m.norm2, h)

    def residual(v: Tensor, box: _Box) -> Tensor:
        skip = box.fetch(x)
        if m.conv_shortcut is not None:
            skip = m.conv_shortcut(skip)
        out = skip + v
        return out if m.output_scale_factor == 1 else out / m.output_scale_factor  # x / 1 is x: skip the pass

    return _conv(r, h, m.conv2, pre=lambda v: m.dropout(m.nonlinearity(n2(v))), post=residual)


def _downsample(r: _Runner, m: nn.Module, x: _Act) -> _Act:
    """Downsample2D, the module itself per tile; with ``padding=0`` it pads one zero row and column
    at the bottom and right, which only reaches the image's last outputs (elsewhere, cropped ones)."""
    if type(m) is not Downsample2D or m.norm is not None or not m.use_conv:
        raise _unsupported(m, "only a conv Downsample2D without norm is supported")
    extra = 1 if m.padding == 0 else 0
    axes = tuple(_Conv(a.span, a.stride, a.pad, a.pad + extra) for a in _conv_axes(m.conv))
    return r.spatial(x, axes, lambda v, box: box.crop(m(v)))  # type: ignore[arg-type,return-value]


def _nearest_index(n: int, size: int | None) -> Tensor:
    """Source row of each resized row, computed by torch's own nearest resize so they cannot differ."""
    rows = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1)
    if size is None:
        out = F.interpolate(rows, scale_factor=(2.0, 1.0), mode="nearest")
    else:
        out = F.interpolate(rows, size=(size, 1), mode="nearest")
    return out.view(-1).long()


def _upsample(r: _Runner, m: nn.Module, x: _Act, size: tuple[int, int] | None = None) -> _Act:
    """Upsample2D (nearest resize, any output size, then its conv) or our bilinear SmoothUpsample."""
    if type(m) is SmoothUpsample:
        if size is not None and tuple(size) != (2 * x.hw[0], 2 * x.hw[1]):
            raise _unsupported(m, "only exact 2x resizing")
        axes = tuple(_Bilinear(a) for a in _conv_axes(m.conv))
        return r.spatial(x, axes, lambda v, box: box.crop(m(v)))  # type: ignore[arg-type,return-value]
    if type(m) is not Upsample2D or m.norm is not None or m.use_conv_transpose or not m.interpolate or not m.use_conv:
        raise _unsupported(m, "only a nearest-resize Upsample2D with a conv and no norm is supported")
    conv = m.conv if m.name == "conv" else m.Conv2d_0
    cy, cx = _conv_axes(conv)
    if cy.stride != 1 or cx.stride != 1:
        raise _unsupported(m, "a strided conv after the resize")
    gy = _Nearest(_nearest_index(x.hw[0], None if size is None else size[0]), cy)
    gx = _Nearest(_nearest_index(x.hw[1], None if size is None else size[1]), cx)

    def body(v: Tensor, box: _Box) -> Tensor:
        rows, cols = gy.local(box.y0, box.y1, box.ry).to(v.device), gx.local(box.x0, box.x1, box.rx).to(v.device)
        return box.crop(conv(v.index_select(2, rows).index_select(3, cols)))

    return r.spatial(x, (gy, gx), body)  # type: ignore[return-value]


# Tokens in the memory layouts diffusers uses, so that one tile reproduces its forward bit for bit:
# channel-major views in the VAE attention, pixel-major copies in Transformer2DModel.


def _tokens(v: Tensor) -> Tensor:
    return v.flatten(2).transpose(1, 2)


def _pixels(t: Tensor, like: Tensor) -> Tensor:
    return t.transpose(1, 2).reshape(like.shape[0], -1, *like.shape[2:])


def _pixel_tokens(v: Tensor) -> Tensor:
    return v.permute(0, 2, 3, 1).reshape(v.shape[0], v.shape[2] * v.shape[3], v.shape[1])


def _token_pixels(t: Tensor, like: Tensor) -> Tensor:
    """Tokens ``(B, H*W, C)`` back to pixels in ``like``'s layout: the permuted view already is
    channels-last, so a channels-last model's tile is made without a copy."""
    return t.reshape(like.shape[0], *like.shape[2:], -1).permute(0, 3, 1, 2).contiguous(memory_format=_layout(like))


def _check_attention(attn: nn.Module, cross: bool) -> None:
    if type(attn) is not Attention:
        raise _unsupported(attn, "expected diffusers' Attention")
    if cross:
        return  # cross-attention is per query token: the module itself runs on each tile
    if type(attn.processor) is not AttnProcessor2_0:
        raise _unsupported(attn.processor, "self-attention is reproduced for AttnProcessor2_0 only")
    if attn.is_cross_attention or attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        raise _unsupported(attn, "self-attention with spatial_norm, q/k norms or cross inputs")
    if attn.add_k_proj is not None or attn.is_causal:
        raise _unsupported(attn, "added key/value projections or causal attention")


def _keys_values(r: _Runner, attn: nn.Module, src: _Act, prep: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Keys and values of the whole image, on the device: the one place whose memory grows with the
    image (2 x tokens x channels), since every query attends to every pixel."""
    keys, values = [], []

    def body(v: Tensor, box: _Box) -> None:
        n = prep(v)
        k, val = attn.to_k(n), attn.to_v(n)
        heads = (n.shape[0], -1, attn.heads, k.shape[-1] // attn.heads)
        keys.append(k.view(heads).transpose(1, 2))
        values.append(val.view(heads).transpose(1, 2))

    r.pointwise(src, body, keep=False)
    if r.counting:
        return torch.empty(0), torch.empty(0)
    return (keys[0], values[0]) if len(keys) == 1 else (torch.cat(keys, dim=2), torch.cat(values, dim=2))


def _attend(attn: nn.Module, n: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """AttnProcessor2_0's self-attention for these query tokens against precomputed keys and values."""
    q = attn.to_q(n)
    q = q.view(n.shape[0], -1, attn.heads, k.shape[-1]).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(n.shape[0], -1, attn.heads * k.shape[-1]).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def _vae_attention(r: _Runner, attn: nn.Module, x: _Act) -> _Act:
    """The VAE mid-block self-attention: keys and values of the whole image, then query tiles."""
    _check_attention(attn, cross=False)
    norm = (lambda v: v) if attn.group_norm is None else r.norm(attn.group_norm, x)
    k, v = _keys_values(r, attn, x, lambda t: _tokens(norm(t)))

    def body(t: Tensor, box: _Box) -> Tensor:
        out = _pixels(_attend(attn, _tokens(norm(t)), k, v), t)
        if attn.residual_connection:
            out = out + t
        return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor

    return r.pointwise(x, body)  # type: ignore[return-value]


def _self_attention_block(blk: nn.Module, k: Tensor, v: Tensor, ctx: Tensor | None) -> Callable[[Tensor], Tensor]:
    """BasicTransformerBlock (layer_norm) after its keys and values are known: per query token."""

    def run(t: Tensor) -> Tensor:
        t = _attend(blk.attn1, blk.norm1(t), k, v) + t
        if blk.attn2 is not None:
            t = blk.attn2(blk.norm2(t), encoder_hidden_states=ctx) + t
        return blk.ff(blk.norm3(t)) + t

    return run


def _transformer(r: _Runner, m: nn.Module, x: _Act, ctx: Tensor | None) -> _Act:
    """Transformer2DModel: everything is per token except self-attention, so blocks are chained per
    tile and the tokens are stored only where a block needs every token's keys first."""
    if type(m) is not Transformer2DModel or not m.is_input_continuous:
        raise _unsupported(m, "only continuous-input Transformer2DModel is supported")
    linear = m.use_linear_projection
    if not linear and (_conv_axes(m.proj_in) != (_POINT, _POINT) or _conv_axes(m.proj_out) != (_POINT, _POINT)):
        raise _unsupported(m, "spatial proj_in/proj_out convolutions")
    norm = r.norm(m.norm, x)

    def enter(v: Tensor) -> Tensor:
        v = norm(v)
        return m.proj_in(_pixel_tokens(v)) if linear else _pixel_tokens(m.proj_in(v))

    src, chain = x, [enter]
    for blk in m.transformer_blocks:
        if type(blk) is not BasicTransformerBlock or blk.norm_type != "layer_norm" or blk.pos_embed is not None:
            raise _unsupported(blk, "only layer_norm BasicTransformerBlock without positional embedding")
        if blk.double_self_attention or hasattr(blk, "fuser"):
            raise _unsupported(blk, "double self-attention or GLIGEN")
        _check_attention(blk.attn1, cross=blk.only_cross_attention)
        if blk.attn2 is not None:
            _check_attention(blk.attn2, cross=True)
        if blk.only_cross_attention:
            chain.append(lambda t, blk=blk: blk(t, encoder_hidden_states=ctx))
            continue
        current = list(chain)
        store = lambda v, _, fns=current: _token_pixels(_chain(fns, v), v)  # noqa: E731
        src = r.pointwise(src, store, moments=False)  # type: ignore[assignment]
        k, v = _keys_values(r, blk.attn1, src, lambda t, blk=blk: blk.norm1(_pixel_tokens(t)))
        chain = [_pixel_tokens, _self_attention_block(blk, k, v, ctx)]

    def leave(v: Tensor, box: _Box, fns: list[Callable[[Tensor], Tensor]] = chain) -> Tensor:
        t = _chain(fns, v)
        out = _token_pixels(m.proj_out(t), v) if linear else m.proj_out(_token_pixels(t, v))
        return out + box.fetch(x)

    return r.pointwise(src, leave)  # type: ignore[return-value]


def _chain(fns: list[Callable[[Tensor], Tensor]], v: Tensor) -> Tensor:
    for fn in fns:
        v = fn(v)
    return v


# --- blocks -----------------------------------------------------------------------------------------


def _down_block(
    r: _Runner, block: nn.Module, h: _Act, temb: Tensor | None, ctx: Tensor | None
) -> tuple[_Act, list[_Act]]:
    """CrossAttnDownBlock2D / DownBlock2D / DownEncoderBlock2D: the output and the skips it leaves."""
    kind = type(block)
    if kind not in (CrossAttnDownBlock2D, DownBlock2D, DownEncoderBlock2D):
        raise _unsupported(block)
    skips = []
    for i, resnet in enumerate(block.resnets):
        h = _resnet(r, resnet, h, temb)
        if kind is CrossAttnDownBlock2D:
            h = _transformer(r, block.attentions[i], h, ctx)
        skips.append(h)
    if block.downsamplers is not None:
        for down in block.downsamplers:
            h = _downsample(r, down, h)
        skips.append(h)
    return h, skips


def _mid_block(r: _Runner, block: nn.Module, h: _Act, temb: Tensor | None, ctx: Tensor | None) -> _Act:
    """UNetMidBlock2D (VAE; attention optional) or UNetMidBlock2DCrossAttn (UNet)."""
    kind = type(block)
    if kind not in (UNetMidBlock2D, UNetMidBlock2DCrossAttn):
        raise _unsupported(block)
    h = _resnet(r, block.resnets[0], h, temb)
    for attn, resnet in zip(block.attentions, block.resnets[1:], strict=True):
        if kind is UNetMidBlock2DCrossAttn:
            h = _transformer(r, attn, h, ctx)
        elif attn is not None:
            h = _vae_attention(r, attn, h)
        h = _resnet(r, resnet, h, temb)
    return h


def _up_block(
    r: _Runner,
    block: nn.Module,
    h: _Act,
    skips: list[_Act],
    temb: Tensor | None,
    ctx: Tensor | None,
    size: tuple[int, int] | None,
) -> _Act:
    """CrossAttnUpBlock2D / UpBlock2D (skips concatenated, last first) / UpDecoderBlock2D (no skips)."""
    kind = type(block)
    if kind not in (CrossAttnUpBlock2D, UpBlock2D, UpDecoderBlock2D):
        raise _unsupported(block)
    if all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")):
        raise _unsupported(block, "FreeU is enabled")
    for i, resnet in enumerate(block.resnets):
        if kind is not UpDecoderBlock2D:
            h = h.cat(skips.pop())
        h = _resnet(r, resnet, h, temb)
        if kind is CrossAttnUpBlock2D:
            h = _transformer(r, block.attentions[i], h, ctx)
    if block.upsamplers is not None:
        for up in block.upsamplers:
            h = _upsample(r, up, h, size)
    return h


def _norm_act_conv(
    r: _Runner, h: _Act, norm: nn.Module | None, act: nn.Module, conv: nn.Module, post: Post = None
) -> _Act:
    """The closing conv_norm_out -> conv_act -> conv_out of the encoder, decoder and UNet, in one pass."""
    if norm is None:
        return _conv(r, h, conv, post=post, moments=False)
    n = r.norm(norm, h)
    return _conv(r, h, conv, pre=lambda v: act(n(v)), post=post, moments=False)


# --- stages -----------------------------------------------------------------------------------------


def _encode(r: _Runner, vae: nn.Module, x: _Act) -> _Act:
    """AutoencoderKL.encode up to the posterior mean: the encoder, quant_conv, then the first half."""
    if not isinstance(vae, AutoencoderKL) or type(vae.encoder) is not Encoder:
        raise _unsupported(vae, "expected an AutoencoderKL with diffusers' Encoder")
    enc, quant = vae.encoder, vae.quant_conv
    if quant is not None and _conv_axes(quant) != (_POINT, _POINT):
        raise _unsupported(quant, "a spatial quant_conv")
    h = _conv(r, x, enc.conv_in)
    for block in enc.down_blocks:
        h, _ = _down_block(r, block, h, None, None)
    h = _mid_block(r, enc.mid_block, h, None, None)

    def mean(t: Tensor, _: _Box) -> Tensor:
        return torch.chunk(t if quant is None else quant(t), 2, dim=1)[0]

    return _norm_act_conv(r, h, enc.conv_norm_out, enc.conv_act, enc.conv_out, post=mean)


def _decode(r: _Runner, vae: nn.Module, z: _Act) -> _Act:
    """AutoencoderKL.decode: post_quant_conv (fused into conv_in's pass), then the decoder."""
    if not isinstance(vae, AutoencoderKL) or type(vae.decoder) not in (Decoder, ShuffleDecoder):
        raise _unsupported(vae, "expected an AutoencoderKL with diffusers' Decoder or vpdsr's ShuffleDecoder")
    dec, quant = vae.decoder, vae.post_quant_conv
    if quant is not None and _conv_axes(quant) != (_POINT, _POINT):
        raise _unsupported(quant, "a spatial post_quant_conv")
    if type(dec) is ShuffleDecoder:
        return _shuffle_decode(r, dec, quant, z)
    if type(dec.conv_norm_out) is not nn.GroupNorm:
        raise _unsupported(dec.conv_norm_out, "the decoder's spatial norm")
    h = _conv(r, z, dec.conv_in, pre=quant)
    h = _mid_block(r, dec.mid_block, h, None, None)
    for block in dec.up_blocks:
        h = _up_block(r, block, h, [], None, None, None)
    return _norm_act_conv(r, h, dec.conv_norm_out, dec.conv_act, dec.conv_out)


def _shuffle_decode(r: _Runner, dec: ShuffleDecoder, quant: nn.Module | None, z: _Act) -> _Act:
    """ShuffleDecoder: one pass per convolution (SiLUs fused into the next), the base's bilinear
    resize, then the pixel shuffle with the base added. It has no norms, so no pass gathers moments."""
    h = _conv(r, z, dec.conv_in, pre=quant, moments=False)
    for block in dec.blocks:
        if type(block) is not ResidualConvBlock:
            raise _unsupported(block, "expected vpdsr's ResidualConvBlock")
        t = _conv(r, h, block.conv1, pre=block.act, moments=False)
        h = _conv(r, t, block.conv2, pre=block.act, post=lambda v, box, skip=h: box.fetch(skip) + v, moments=False)
    f = dec.factor
    small = _conv(r, h, dec.conv_base, pre=dec.act, moments=False)
    base = r.spatial(small, (_Upscale(f), _Upscale(f)), lambda v, box: box.crop(upscale_bilinear(v, f)), moments=False)
    h = _conv(r, h, dec.conv_out, pre=dec.act, moments=False)

    def shuffle(v: Tensor, box: _Box) -> Tensor:
        return box.fetch(base) + box.crop(F.pixel_shuffle(v, f))  # type: ignore[arg-type]

    return r.spatial(h, (_Shuffle(f), _Shuffle(f)), shuffle, moments=False)  # type: ignore[return-value]


def _time_embedding(
    unet: nn.Module, timestep: Tensor | float | int, like: Tensor, device: torch.device, added: dict | None
) -> Tensor:
    """The timestep embedding plus, for SDXL-style UNets, the added one (pooled text and time ids):
    one vector per sample, so it needs no tiling."""
    if isinstance(timestep, Tensor):
        timestep = timestep.to(device)
    stand_in = torch.empty((like.shape[0], 0), dtype=like.dtype, device=device)  # batch, dtype, device
    emb = unet.time_embedding(unet.get_time_embed(sample=stand_in, timestep=timestep), None)
    if unet.config.addition_embed_type is not None:
        added = {k: v.to(device) for k, v in (added or {}).items()}
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=None, added_cond_kwargs=added)
    return emb if unet.time_embed_act is None else unet.time_embed_act(emb)


def _unet(
    r: _Runner,
    unet: nn.Module,
    x: _Act,
    timestep: Tensor | float | int | None,
    context: Tensor | None,
    added: dict | None,
) -> _Act:
    """UNet2DConditionModel.forward for a timestep, text conditioning and SDXL's added embeddings
    (no class or ControlNet inputs): skips are kept as activations and concatenated per tile in the
    up blocks."""
    if not isinstance(unet, UNet2DConditionModel):
        raise _unsupported(unet, "expected a UNet2DConditionModel")
    if unet.class_embedding is not None or unet.config.addition_embed_type not in (None, "text_time"):
        raise _unsupported(unet, "class embeddings or added embeddings other than SDXL's text_time")
    if unet.encoder_hid_proj is not None or getattr(unet, "position_net", None) is not None:
        raise _unsupported(unet, "encoder_hid_proj or GLIGEN")
    temb = ctx = None
    if not r.counting:
        like = x.parts[0].data
        temb = _time_embedding(unet, timestep, like, r.device, added)  # type: ignore[arg-type]
        ctx = context.to(r.device)  # type: ignore[union-attr]
    forward_size = any(d % 2**unet.num_upsamplers for d in x.hw)
    h = _conv(r, x, unet.conv_in, pre=(lambda v: 2 * v - 1.0) if unet.config.center_input_sample else None)
    skips = [h]
    for block in unet.down_blocks:
        h, res = _down_block(r, block, h, temb, ctx)
        skips += res
    if unet.mid_block is not None:
        h = _mid_block(r, unet.mid_block, h, temb, ctx)
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].hw if forward_size and i < len(unet.up_blocks) - 1 else None
        h = _up_block(r, block, h, res, temb, ctx, size)
    return _norm_act_conv(r, h, unet.conv_norm_out, unet.conv_act, unet.conv_out)


def _refine(r: _Runner, refiner: nn.Module, y: _Act, x: _Act) -> _Act:
    """PixelRefiner: ``y + net(cat([y, x]))``, one pass per convolution (SiLU fused into the next)."""
    if type(refiner) is not PixelRefiner:
        raise _unsupported(refiner, "expected vpdsr's PixelRefiner")
    layers = list(refiner.net)
    h, pre = y.cat(x), None
    for i, layer in enumerate(layers):
        if type(layer) is nn.SiLU and pre is None:
            pre = layer
        elif isinstance(_base_layer(layer), nn.Conv2d):
            last = i == len(layers) - 1
            post = (lambda t, box: box.fetch(y) + t) if last else None
            h, pre = _conv(r, h, layer, pre=pre, post=post, moments=False), None
        else:
            raise _unsupported(layer, "the refiner holds only Conv2d layers with single SiLUs between them")
    if pre is not None:
        raise _unsupported(refiner, "the refiner must end with a Conv2d")
    return h


_STAGES: dict[str, tuple[Callable[..., _Act], int, int]] = {
    # name: (stage, tensor inputs, other arguments)
    "encode": (_encode, 1, 0),
    "decode": (_decode, 1, 0),
    "unet": (_unet, 1, 3),
    "refine": (_refine, 2, 0),
}


# --- entry points -----------------------------------------------------------------------------------


def _run(
    stage: str,
    model: nn.Module,
    tensors: Sequence[Tensor],
    extra: Sequence[object],
    tile: int,
    device: torch.device | str | None,
    host: torch.device | str,
    step: Step | None,
    should_stop: StopCheck | None,
) -> Tensor:
    if model.training:
        raise ValueError("layerwise tiling needs the model in eval mode (call .eval()): dropout would differ per tile")
    fn = _STAGES[stage][0]
    compute = torch.device(device) if device is not None else next(model.parameters()).device
    r = _Runner(tensors[0].shape[-2:], tile, compute, torch.device(host), step, should_stop)
    with torch.no_grad():
        out = fn(r, model, *(r.input(t, t.shape[-2:]) for t in tensors), *extra)
    return out.parts[0].data  # type: ignore[return-value]


def encode_mean(
    vae: AutoencoderKL,
    x: Tensor,
    *,
    tile: int = 0,
    device: torch.device | str | None = None,
    host: torch.device | str = "cpu",
    step: Step | None = None,
    should_stop: StopCheck | None = None,
) -> Tensor:
    """``vae.encode(x).latent_dist.mean`` (unscaled), layer by layer over tiles of ``tile`` input pixels.

    ``tile <= 0`` or at least the image size is one tile. ``device`` (default: the model's) computes;
    ``host`` keeps the whole-image activations when there are several tiles. The result is on
    ``device`` for one tile and on ``host`` otherwise. ``should_stop`` is checked before every tile
    and raises ``Cancelled``; ``step`` is called after every tile of every pass (:func:`count_steps`).
    """
    return _run("encode", vae, [x], [], tile, device, host, step, should_stop)


def decode(
    vae: AutoencoderKL,
    z: Tensor,
    *,
    tile: int = 0,
    device: torch.device | str | None = None,
    host: torch.device | str = "cpu",
    step: Step | None = None,
    should_stop: StopCheck | None = None,
) -> Tensor:
    """``vae.decode(z).sample`` (``z`` unscaled), ``tile`` in latent pixels; see :func:`encode_mean`."""
    return _run("decode", vae, [z], [], tile, device, host, step, should_stop)


def unet_forward(
    unet: UNet2DConditionModel,
    sample: Tensor,
    timestep: Tensor | float | int,
    encoder_hidden_states: Tensor,
    *,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    tile: int = 0,
    device: torch.device | str | None = None,
    host: torch.device | str = "cpu",
    step: Step | None = None,
    should_stop: StopCheck | None = None,
) -> Tensor:
    """``unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=...).sample``, ``tile`` in
    latent pixels; ``added_cond_kwargs`` are SDXL's pooled text embedding and time ids.

    Self-attention (SD's ``attn1``, and the mid block's even on the tiny backbones) holds the keys
    and values of every latent pixel on the device, so that part of device memory grows with the
    image; everything else is bounded by the tile. See :func:`encode_mean` for the other arguments.
    """
    extra = [timestep, encoder_hidden_states, added_cond_kwargs]
    return _run("unet", unet, [sample], extra, tile, device, host, step, should_stop)


def refine(
    refiner: PixelRefiner,
    y: Tensor,
    x: Tensor,
    *,
    tile: int = 0,
    device: torch.device | str | None = None,
    host: torch.device | str = "cpu",
    step: Step | None = None,
    should_stop: StopCheck | None = None,
) -> Tensor:
    """``refiner(y, x)``: the decoded image ``y`` corrected with the input ``x``; see :func:`encode_mean`."""
    return _run("refine", refiner, [y, x.to(y.dtype)], [], tile, device, host, step, should_stop)


def count_steps(stage: str, model: nn.Module, height: int, width: int, tile: int) -> int:
    """How many times ``step`` will be called for a stage's input of ``height`` x ``width``.

    ``stage`` is ``"encode"``, ``"decode"``, ``"unet"`` or ``"refine"``. The same stage code runs
    with no tensors (nothing is computed), so the count cannot disagree with the run.
    """
    if stage not in _STAGES:
        raise ValueError(f"stage must be one of {sorted(_STAGES)}, got {stage!r}")
    fn, inputs, others = _STAGES[stage]
    steps = 0

    def count() -> None:
        nonlocal steps
        steps += 1

    cpu = torch.device("cpu")
    r = _Runner((height, width), tile, cpu, cpu, count, None, counting=True)
    fn(r, model, *(r.input(None, (height, width)) for _ in range(inputs)), *([None] * others))
    return steps
