"""A picture of what the degradation does, for users tuning its ranges (``degrade-preview``).

One row per image: HR crop | LR shown with nearest-neighbour upscaling (the real pixels) | LR
upscaled bicubically (roughly what a naive upscaler makes of it), with the sampled parameters
written under the row so that a striking result can be traced to its cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..data import crop_patch, read_image
from .config import DegradationConfig
from .kernels import KernelParams
from .pipeline import DegradationParams, StageParams, degrade

_LABELS = ("HR", "LR (nearest up)", "LR (bicubic up)")
_FONT_SIZE = 13
_LINE = _FONT_SIZE + 4
_MARGIN = 4


def _describe_kernel(k: KernelParams, i: int) -> str:
    kind, size = k.kind[i], int(k.size[i])
    if kind == "identity":
        return "no blur"
    if kind == "sinc":
        return f"sinc {size}px w={float(k.omega[i]):.2f}"
    text = f"{kind} {size}px s={float(k.sigma_x[i]):.1f}"
    if "aniso" in kind:
        text += f"/{float(k.sigma_y[i]):.1f} {float(k.theta[i]) * 180 / np.pi:.0f}deg"
    if float(k.beta[i]) != 1.0:
        text += f" b={float(k.beta[i]):.2f}"
    return text


def _describe_stage(p: StageParams, i: int, with_jpeg: bool) -> str:
    n = p.noise
    gray = " gray" if bool(n.gray[i]) else ""
    noise = (
        f"gauss {float(n.sigma[i]):.1f}{gray}"
        if bool(n.gaussian[i])
        else f"poisson {float(n.poisson_scale[i]):.2f}{gray}"
    )
    text = f"{_describe_kernel(p.kernel, i)} | x{p.resize_scale:.2f} {p.resize_mode} | {noise}"
    return text + (f" | jpeg {float(p.jpeg_quality[i]):.0f}" if with_jpeg else "")


def _describe(params: DegradationParams, i: int) -> list[str]:
    f = params.final
    last = f"{f.resize_mode} to LR + {_describe_kernel(f.sinc, i)}"
    jpeg = f"jpeg {float(params.stage2.jpeg_quality[i]):.0f}"
    order = f"{jpeg}, then {last}" if f.jpeg_first else f"{last}, then {jpeg}"
    return [
        f"1st: {_describe_stage(params.stage1, i, with_jpeg=True)}",
        f"2nd: {_describe_stage(params.stage2, i, with_jpeg=False)}",
        f"final: {order}",
    ]


def _as_hwc(image: str | Path | Tensor) -> np.ndarray:
    if isinstance(image, Tensor):
        t = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"preview tensors must have shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        return t.detach().float().cpu().permute(1, 2, 0).numpy()
    return read_image(image)


def _to_pil(t: Tensor) -> Image.Image:
    arr = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def write_degrade_preview(
    images: Sequence[str | Path | Tensor],
    cfg: DegradationConfig,
    out_path: str | Path,
    seed: int = 0,
    scale: int = 4,
    crop_size: int = 256,
) -> Path:
    """Degrade centre crops of ``images`` (files or (3, H, W) tensors in [0, 1]) with ``seed``
    and write the comparison grid as a PNG at ``out_path``; returns that path.

    Each image is degraded as a batch of its own, so the preview also shows the variety of the
    per-batch choices (resize factor and mode, final order) that one training batch shares.
    """
    if not images:
        raise ValueError("write_degrade_preview needs at least one image")
    if crop_size % scale:
        raise ValueError(f"crop_size ({crop_size}) must be a multiple of scale ({scale})")
    hr = torch.stack([crop_patch(_as_hwc(img), crop_size, random=False) for img in images])
    generator = torch.Generator().manual_seed(seed)
    lrs, params = zip(*(degrade(hr[i : i + 1], cfg, generator, scale) for i in range(len(hr))), strict=True)
    lr = torch.cat(lrs)
    nearest = F.interpolate(lr, scale_factor=scale, mode="nearest")
    bicubic = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)

    font = ImageFont.load_default(size=_FONT_SIZE)
    n_lines = len(_describe(params[0], 0))
    row_h = crop_size + _MARGIN + n_lines * _LINE + _MARGIN
    width = 3 * crop_size + 2 * _MARGIN
    sheet = Image.new("RGB", (width, _LINE + _MARGIN + len(images) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(_LABELS):
        draw.text((col * (crop_size + _MARGIN), 0), label, fill="black", font=font)
    for i in range(len(images)):
        y = _LINE + _MARGIN + i * row_h
        for col, t in enumerate((hr[i], nearest[i], bicubic[i])):
            sheet.paste(_to_pil(t), (col * (crop_size + _MARGIN), y))
        for j, line in enumerate(_describe(params[i], 0)):
            draw.text((0, y + crop_size + _MARGIN + j * _LINE), line, fill="black", font=font)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
