"""The one call every front-end makes: ``load_pipeline(...)`` then ``pipe(image, ...)``.

Tiling, the out-of-memory retry, colour fixes, masks and progress/cancel hooks live here so the
CLI, the ComfyUI nodes and the Gradio demo all get them the same way. The caller owns only what
is its own: the device, where progress is shown, and when to stop.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .color import COLOR_FIXES, DEFAULT_COLOR_FIX, apply_color_fix
from .errors import ModelFileError, OutOfMemory, VPDError
from .imageio import join_image, split_image
from .model import OneStepStudent
from .modelfile import StudentMeta, load_student, read_meta
from .tiling import ceil_to, count_calls, tiled_apply

__all__ = ["VPDPipeline", "default_model_path", "load_pipeline", "resolve_device", "resolve_dtype"]

ProgressCallback = Callable[[int, int], None]
DEFAULT_MODEL_NAME = "vpdsr-tiny-default.safetensors"
_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", RuntimeError), getattr(torch.cuda, "OutOfMemoryError", RuntimeError)} - {RuntimeError})
MIN_TILE = 64


def default_model_path() -> Path | None:
    """The embedded default model shipped inside the package, if this build has one."""
    path = Path(str(resources.files("vpdsr").joinpath("assets", DEFAULT_MODEL_NAME)))
    return path if path.is_file() else None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise VPDError("device 'cuda' was asked for, but this torch build sees no CUDA GPU")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise VPDError("device 'mps' was asked for, but MPS is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on the CPU (half precision is slow there); bf16 on GPUs that have it, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # fmt: skip
    if dtype in table:
        return table[dtype]
    if dtype != "auto":
        raise VPDError(f"dtype must be auto, fp32, fp16 or bf16, got {dtype!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


class VPDPipeline:
    """A loaded student ready to upscale images, with everything around the network itself."""

    def __init__(self, student: OneStepStudent, meta: StudentMeta, device: torch.device, dtype: torch.dtype,
                 text_encoder: Any = None) -> None:  # fmt: skip
        self.student = student
        self.meta = meta
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        self.student.to(device=device, dtype=dtype)

    @property
    def info(self) -> dict[str, Any]:
        m = self.meta
        return {"name": m.name, "backbone": m.backbone.name, "weights": m.weights, "scale": m.scale,
                "timestep": m.timestep, "prompt": m.prompt, "training": m.training,
                "text_encoder": self.text_encoder is not None}  # fmt: skip

    def to(self, device: str | torch.device) -> VPDPipeline:
        self.device = torch.device(device)
        self.student.to(self.device)
        if self.text_encoder is not None:
            self.text_encoder.to(self.device)
        return self

    def _condition(self, prompt: str | None) -> torch.Tensor | None:
        if not prompt:
            return None
        if self.text_encoder is None:
            raise VPDError(
                f"this model ({self.meta.backbone.name} backbone) has no text encoder, so it cannot take a prompt; "
                "it uses the conditioning stored in its model file"
            )
        return self.text_encoder(prompt).to(self.device, self.dtype)

    @property
    def multiple(self) -> int:
        """Pixel sizes must divide by this: the VAE factor times the UNet's own downsampling."""
        unet_down = 2 ** (len(self.student.unet.config.block_out_channels) - 1)
        return self.student.vae_factor * unet_down

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        scale: float = 4.0,
        prompt: str | None = None,
        tile: int | None = None,
        overlap: int = 64,
        color_fix: str = DEFAULT_COLOR_FIX,
        mask: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Upscale a BCHW batch in [0, 1]; returns BCHW float32 in [0, 1] on the CPU."""
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[1] != 3:
            raise VPDError(f"expected an RGB image batch of shape (B, 3, H, W), got {tuple(image.shape)}")
        if not 1 <= scale <= 8:
            raise VPDError(f"scale must be between 1 and 8, got {scale}")
        if color_fix not in COLOR_FIXES:
            raise VPDError(f"color_fix must be one of {COLOR_FIXES}, got {color_fix!r}")
        if not torch.isfinite(image).all():
            raise VPDError("the image contains NaN or infinite values")
        cond = self._condition(prompt)
        if mask is not None:
            mask = self._check_mask(mask, image.shape[0])
        out_h, out_w = round(image.shape[2] * scale), round(image.shape[3] * scale)
        if tile is None:
            tile = 0 if out_h * out_w <= 1024 * 1024 else (1024 if self.device.type == "cuda" else 512)
        while True:
            try:
                return self._upscale(image, out_h, out_w, cond, tile, overlap, color_fix, mask, progress, should_stop)
            except _OOM_ERRORS:
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                current = tile or max(out_h, out_w)
                if current // 2 < MIN_TILE:
                    raise OutOfMemory(
                        f"out of {self.device.type} memory even with {current}px tiles; free memory, use --dtype fp16, "
                        "or run on the CPU"
                    ) from None
                tile = current // 2

    def _upscale(self, image, out_h, out_w, cond, tile, overlap, color_fix, mask, progress, should_stop):  # noqa: ANN001
        s, m = self.student, self.multiple
        f = s.vae_factor
        x = F.interpolate(image.float(), size=(out_h, out_w), mode="bicubic", align_corners=False).clamp(0, 1)
        pad_h, pad_w = ceil_to(out_h, m) - out_h, ceil_to(out_w, m) - out_w
        mode = "reflect" if pad_h < out_h and pad_w < out_w else "replicate"
        x_pad = F.pad(x * 2 - 1, (0, pad_w, 0, pad_h), mode=mode).to(self.device, self.dtype)
        h, w = x_pad.shape[2:]
        if tile and tile < max(h, w):
            tile_px = max(m, min(ceil_to(tile, m), ceil_to(max(h, w), m)))
            overlap_px = min(ceil_to(overlap, m), tile_px - m)
        else:
            tile_px, overlap_px = ceil_to(max(h, w), m), 0
        lt, lo, la = tile_px // f, overlap_px // f, m // f
        # The UNet works at latent size, where memory is cheap, and its tile borders cost the
        # most accuracy (its deepest layers see the whole tile), so it gets tiles twice as wide.
        ut, uo = min(2 * lt, ceil_to(max(h, w) // f, la)), min(2 * lo, 2 * lt - la)
        total = count_calls(h, w, tile_px, overlap_px, m) + count_calls(h // f, w // f, ut, uo, la)
        total += count_calls(h // f, w // f, lt, lo, la)
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        run: dict[str, Any] = dict(step=step, should_stop=should_stop)
        z = tiled_apply(s.encode, x_pad, tile=tile_px, overlap=overlap_px, ratio=Fraction(1, f), align=m,
                        norm_modules=[s.vae.encoder], **run)  # fmt: skip
        x0 = tiled_apply(lambda t: s.denoise(t, cond), z, tile=ut, overlap=uo, ratio=Fraction(1), align=la,
                         norm_modules=[s.unet], **run)  # fmt: skip
        if mask is not None:
            x0 = self._blend_mask(x0, z, mask, out_h // f, out_w // f)
        y = tiled_apply(s.decode, x0, tile=lt, overlap=lo, ratio=Fraction(f), align=la,
                        norm_modules=[s.vae.decoder], **run)  # fmt: skip
        y = ((y.float()[:, :, :out_h, :out_w] + 1) / 2).clamp(0, 1).cpu()
        return apply_color_fix(y, x, color_fix).clamp(0, 1)

    @staticmethod
    def _check_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
        """Bring a mask to Bx1xHxW before any work, so a wrong one fails at once."""
        if mask.dim() == 2:
            mask = mask[None, None]
        elif mask.dim() == 3:
            mask = mask[:, None]
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise VPDError(f"mask must be HxW, BxHxW or Bx1xHxW, got {tuple(mask.shape)}")
        if mask.shape[0] not in (1, batch):
            raise VPDError(
                f"the mask batch has {mask.shape[0]} masks for {batch} images; give one, or one per image"
            )
        return mask

    @staticmethod
    def _blend_mask(x0: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Per-pixel generative strength: 1 keeps the student's latent, 0 keeps the input's."""
        # the mask covers the unpadded image: fit it to the unpadded part of the latent, then pad
        m = F.interpolate(mask.float().clamp(0, 1).to(x0.device), size=(h, w), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, x0.shape[3] - w, 0, x0.shape[2] - h), mode="replicate")
        m = m.expand(x0.shape[0], -1, -1, -1).to(x0.dtype)
        return m * x0 + (1 - m) * z

    def upscale_pil(self, image: Image.Image, **options: Any) -> Image.Image:
        """Upscale a PIL image of any mode, keeping alpha, grayscale, 16-bit and the ICC profile."""
        parts = split_image(image)
        rgb = self(parts.rgb, **options)
        alpha = None
        if parts.alpha is not None:
            alpha = F.interpolate(parts.alpha, size=rgb.shape[2:], mode="bicubic", align_corners=False).clamp(0, 1)
        return join_image(rgb, parts, alpha)


def load_pipeline(
    model: str | Path | None = None,
    base: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    allow_download: bool = False,
) -> VPDPipeline:
    """Load a student file (or the embedded default) and, for LoRA students, its base weights."""
    path = Path(model) if model is not None else default_model_path()
    if path is None:
        raise ModelFileError(
            "no embedded default model ships with this version of vpdsr yet; pass a student file "
            "(e.g. `vpdsr upscale photo.png --model student.safetensors`)"
        )
    meta = read_meta(path)
    base_parts = text_encoder = None
    if meta.weights == "lora":
        if base is None:
            raise ModelFileError(
                f"{path.name} is a LoRA student for the {meta.backbone.name} backbone; pass its base weights "
                "(a diffusers folder or a single-file .safetensors checkpoint) with --base"
            )
        from .weights import load_base

        base_parts = load_base(meta.backbone, base, allow_download=allow_download)
        text_encoder = base_parts.text_encoder
    student = load_student(path, base=base_parts)
    if not meta.has_prompt_embeds:
        if text_encoder is None:
            raise ModelFileError(
                f"{path.name} stores no prompt embedding, and the base weights have no text encoder to make one"
            )
        student.prompt_embeds.data = text_encoder(meta.prompt)[0].float()
    dev = resolve_device(device)
    return VPDPipeline(student, meta, dev, resolve_dtype(dtype, dev), text_encoder=text_encoder)
