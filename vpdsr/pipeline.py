"""The one call every front-end makes: ``load_pipeline(...)`` then ``pipe(image, ...)``.

Tiling, the out-of-memory retry, colour fixes, masks and progress/cancel hooks live here so the
CLI, the ComfyUI nodes and the Gradio demo all get them the same way. The caller owns only what
is its own: the device, where progress is shown, and when to stop.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .color import COLOR_FIXES, DEFAULT_COLOR_FIX, color_fix_
from .errors import ModelFileError, NonFiniteOutput, OutOfMemory, VPDError
from .imageio import join_image, split_image
from .model import OneStepStudent
from .modelfile import StudentMeta, load_student, read_meta
from .paths import default_model_path, model_path
from . import layerwise
from .threads import cpu_threads

__all__ = ["VPDPipeline", "cpu_has_native_bf16", "default_model_path", "load_pipeline", "resolve_device", "resolve_dtype", "scale_note"]

ProgressCallback = Callable[[int, int], None]
_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", RuntimeError), getattr(torch.cuda, "OutOfMemoryError", RuntimeError)} - {RuntimeError})
MIN_TILE = 64
MIN_SCALE, MAX_SCALE = 1.0, 8.0
# Back-projection steps below the native scale: against one, two gain 0.3-0.5 dB PSNR-Y on clean
# photos at x2/x3 and lose 0.05 dB on DRealSR's real ones; more gain little.
_BACK_PROJECTIONS = 2


def scale_note(meta: StudentMeta, scale: float) -> str | None:
    """What serving ``scale`` costs with this model, for front-ends to show; None where it costs nothing.

    The network only ever runs at its own scale or above (``VPDPipeline.network_scale``). Below it,
    the native result is brought down and made to agree with the input (``_project_down``), which
    costs nothing against bicubic but leaves nothing to add at x1; above it, the input is resized
    bicubically first, so the model adds no more detail than at its own scale.
    """
    name, native = meta.name or "this model", meta.scale
    if scale > native:
        return (
            f"{name} is trained for x{native:g}: larger scales resize the input bicubically first, "
            f"so they add no more detail than x{native:g}"
        )
    if scale == MIN_SCALE < native:
        return (
            f"x1 gives back the input unchanged: below its trained x{native:g}, "
            f"{name}'s result is made to agree with the input"
        )
    return None


def resolve_scale(meta: StudentMeta, scale: float | None) -> float:
    """The scale asked for, or the model's own for None; checked here so a bad one fails before any work.
    Functions of the metadata, so that a front-end can size a request before any model loads."""
    scale = float(meta.scale if scale is None else scale)
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise VPDError(f"scale must be between {MIN_SCALE:g} and {MAX_SCALE:g}, got {scale:g}")
    return scale


def network_scale(meta: StudentMeta, scale: float | None) -> float:
    """The scale the network runs at for ``scale``: never below the model's own.

    A student only restores inputs as blurry as the ones it was trained on; encoding a smaller
    output hands it a sharper one and it prints grids and colour shifts (x2 with the x4 default:
    4 dB below bicubic). This is also the size that tiles, progress totals and memory count.
    """
    return max(resolve_scale(meta, scale), float(meta.scale))


def ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where oneDNN's bf16
    convolutions run about twice as fast as fp32 ones; elsewhere bf16 is emulated and slower.
    The probes are torch's own (private, hence the guarded lookup: a torch without them says no)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, else fp16; on the CPU bf16 where the CPU has it in hardware
    (``cpu_has_native_bf16``: the embedded default then runs 1.5x faster, its output 62-69 dB
    PSNR from fp32's on DRealSR crops), else fp32, since emulated half precision is slower than fp32 there."""
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
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


class VPDPipeline:
    """A loaded student ready to upscale images, with everything around the network itself."""

    def __init__(self, student: OneStepStudent, meta: StudentMeta, device: torch.device, dtype: torch.dtype,
                 text_encoder: Any = None) -> None:  # fmt: skip
        self.student = student
        self.meta = meta
        self.scale_noted = False  # whether scale_note was warned about: once per pipeline, not once per image
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        # CPU threads per call; None picks them per call from the cores other work leaves free (vpdsr.threads)
        self.threads: int | None = None
        self.student.to(device=device, dtype=dtype)
        self._set_layout()

    def _set_layout(self) -> None:
        """Channels-last weights for bf16 on the CPU: oneDNN then convolves without reordering every
        activation to its own layout and back, which was a third of the embedded default's CPU time
        (torch.profiler, 128->512). fp32 keeps torch's default layout because it is the exact mode:
        channels-last sums in another order, 5e-5 off OSEDiff's own latent where the default layout
        is within 1e-5 (tests/test_osediff.py), for 15% less time. Other devices keep the default too."""
        reordered = self.device.type == "cpu" and self.dtype != torch.float32
        self.student.to(memory_format=torch.channels_last if reordered else torch.contiguous_format)

    @property
    def info(self) -> dict[str, Any]:
        """The model's metadata as front-ends show it; ``scale`` is the one it runs at and the default."""
        m = self.meta
        return {"name": m.name, "backbone": m.backbone.name, "weights": m.weights, "scale": m.scale,
                "timestep": m.timestep, "prompt": m.prompt, "training": m.training,
                "text_encoder": self.text_encoder is not None}  # fmt: skip

    def to(self, device: str | torch.device) -> VPDPipeline:
        self.device = torch.device(device)
        self.student.to(self.device)
        self._set_layout()
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
        """Pixel sizes are padded up to a multiple of this (``StudentMeta.size_multiple``)."""
        return self.meta.size_multiple

    def resolve_scale(self, scale: float | None) -> float:
        return resolve_scale(self.meta, scale)

    def network_scale(self, scale: float | None) -> float:
        return network_scale(self.meta, scale)

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        scale: float | None = None,
        prompt: str | None = None,
        tile: int | None = None,
        color_fix: str = DEFAULT_COLOR_FIX,
        mask: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Upscale a BCHW batch in [0, 1]; returns BCHW float32 in [0, 1] on the CPU.

        ``scale`` defaults to the model's own. A smaller one is the native result brought down to size
        (``_project_down``); a larger one, or x1, warns once (see ``scale_note``). ``tile`` is in
        pixels of the network's output, which is larger than the result below the model's own scale.
        Tiles run layer by layer with exact halos (``vpdsr.layerwise``), so neighbouring tiles share
        no pixels and need no overlap to blend.
        """
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[1] != 3:
            raise VPDError(f"expected an RGB image batch of shape (B, 3, H, W), got {tuple(image.shape)}")
        scale = self.resolve_scale(scale)
        if color_fix not in COLOR_FIXES:
            raise VPDError(f"color_fix must be one of {COLOR_FIXES}, got {color_fix!r}")
        if not torch.isfinite(image).all():
            raise VPDError("the image contains NaN or infinite values")
        cond = self._condition(prompt)
        if mask is not None:
            mask = self._check_mask(mask, image.shape[0])
        self._warn_scale(scale)
        out_h, out_w = round(image.shape[2] * scale), round(image.shape[3] * scale)
        run_scale = self.network_scale(scale)
        run_h, run_w = round(image.shape[2] * run_scale), round(image.shape[3] * run_scale)
        if (out_h, out_w) == image.shape[2:] and (run_h, run_w) != (out_h, out_w):
            return image.float().cpu().clamp(0, 1)  # what _project_down gives back, without the network's work
        if tile is None:
            tile = 0 if run_h * run_w <= 1024 * 1024 else (1024 if self.device.type == "cuda" else 512)
        while True:
            try:
                with cpu_threads(self.threads) if self.device.type == "cpu" else nullcontext():
                    y = self._upscale(image, run_h, run_w, cond, tile, color_fix, mask, progress, should_stop)
                return _project_down(y, image, out_h, out_w)
            except _OOM_ERRORS:
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                current = tile or max(run_h, run_w)
                if current // 2 < MIN_TILE:
                    dtype = str(self.dtype).removeprefix("torch.")
                    raise OutOfMemory(
                        f"out of {self.device.type} memory even with {current}px tiles in {dtype}; free memory, "
                        "run in half precision, or run on the CPU",
                        device=self.device.type,
                        tile=current,
                        dtype=dtype,
                    ) from None
                tile = current // 2

    def _warn_scale(self, scale: float) -> None:
        """Say what ``scale`` costs once per pipeline: a folder of images would repeat it per file."""
        note = scale_note(self.meta, scale)
        if note and not self.scale_noted:
            self.scale_noted = True
            warnings.warn(note, UserWarning, stacklevel=4)  # the caller's line, past torch.no_grad's

    def _upscale(self, image, out_h, out_w, cond, tile, color_fix, mask, progress, should_stop):  # noqa: ANN001
        s, m = self.student, self.multiple
        f = s.vae_factor
        x = resize_input(image, out_h, out_w, self.meta.preprocess.resize)
        pad_h, pad_w = ceil_to(out_h, m) - out_h, ceil_to(out_w, m) - out_w
        mode = "reflect" if pad_h < out_h and pad_w < out_w else "replicate"
        x_pad = F.pad(x * 2 - 1, (0, pad_w, 0, pad_h), mode=mode).to(self.device, self.dtype)
        h, w = x_pad.shape[2:]
        # Every stage runs layer by layer over tiles with whole-image GroupNorm statistics
        # (vpdsr.layerwise), so tiled output equals untiled output; one tile is the untiled call.
        tile_px = tile if tile and tile < max(h, w) else 0
        lt = ceil_to(tile_px, f) // f
        sizes = {"encode": (s.vae, h, w, tile_px), "unet": (s.unet, h // f, w // f, lt),
                 "decode": (s.vae, h // f, w // f, lt)}  # fmt: skip
        if s.refiner is not None:
            sizes["refine"] = (s.refiner, h, w, tile_px)
        total = sum(layerwise.count_steps(stage, *args) for stage, args in sizes.items())
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        run: dict[str, Any] = dict(device=self.device, step=step, should_stop=should_stop)
        z = layerwise.encode_mean(s.vae, x_pad, tile=tile_px, **run).to(self.device) * s.config.scaling_factor
        guide = x_pad if s.refiner is not None else None  # only a refiner reads the input again: without one,
        del x_pad  # its memory (576 MB at 8000x6000) is free while the UNet and the decoder run
        x0 = s.x0(z, layerwise.unet_forward(s.unet, z, **s.unet_inputs(z, cond), tile=lt, **run).to(self.device))
        if mask is not None:
            x0 = self._blend_mask(x0, z, mask, out_h // f, out_w // f)
        y = layerwise.decode(s.vae, x0 / s.config.scaling_factor, tile=lt, **run)
        if guide is not None:
            y = layerwise.refine(s.refiner, y.to(self.device), guide, tile=tile_px, **run)
        del guide
        _check_finite(y, self.dtype)
        # Whole-image work from here on runs in place: one float copy of the result beside ``x``, which the
        # colour fix takes as scratch, and a few bands of rows (at 8000x6000 one copy is 576 MB).
        y = y[:, :, :out_h, :out_w].to("cpu", torch.float32).add_(1).div_(2).clamp_(0, 1)
        m = self.meta
        return color_fix_(y, x.cpu(), color_fix, levels=m.wavelet_levels, ring=m.ring_clamp).clamp_(0, 1)

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
            alpha = F.interpolate(parts.alpha, size=rgb.shape[2:], mode="bicubic", align_corners=False).clamp_(0, 1)
        return join_image(rgb, parts, alpha)


def resize_input(image: torch.Tensor, height: int, width: int, method: str = "torch-bicubic") -> torch.Tensor:
    """The LR batch in [0, 1] resized to the network's size with the model's kernel (``Preprocess.resize``).

    ``"pil-bicubic-uint8"`` is what OSEDiff's test script does, PIL's BICUBIC on the 8-bit RGB image:
    its kernel (a = -0.5) and 8-bit output differ from torch's bicubic (a = -0.75) by up to 0.056 on
    DRealSR inputs, which the model amplifies. An image with more than 8 bits (a 16-bit PNG) gets the
    same filter on float channels (PIL mode F), so its depth survives.
    """
    if method == "torch-bicubic":
        return F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    if method != "pil-bicubic-uint8":
        raise ValueError(f"unknown resize {method!r}")
    x = image.detach().float().cpu().clamp(0, 1)
    levels = (x * 255).round()
    if torch.equal(levels / 255, x):
        rgb = levels.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out = np.stack([np.asarray(Image.fromarray(a).resize((width, height), Image.BICUBIC)) for a in rgb])
        return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255
    out = np.array([[np.asarray(Image.fromarray(c).resize((width, height), Image.BICUBIC)) for c in a]
                    for a in x.numpy()])  # fmt: skip
    return torch.from_numpy(out).clamp(0, 1)


def _check_finite(y: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse a network output with NaN or infinity in it: clamped, it would be a black or white image
    that looks like a result. One float32 sum finds any (NaN and infinity survive it) without a
    full-size mask; a finite sum could only overflow for values no image comes near."""
    if torch.isfinite(y.sum(dtype=torch.float32)):
        return
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    why = {
        "float16": ": float16 overflowed, as it does for some models; run in float32 or bfloat16",
        "bfloat16": " in bfloat16; run in float32 to rule out precision as the cause",
        "float32": " even in float32: the model or its base weights are likely broken",
    }[name]
    raise NonFiniteOutput(f"the network's output has NaN or infinite values{why}", dtype=name)


def _project_down(result: torch.Tensor, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The native-scale ``result`` for ``image``, brought down to ``height`` x ``width``; itself at that size.

    Antialiased bicubic (PIL's filter) first: plain bicubic would alias the native detail into moire.
    That alone is not enough: the student's result is far less faithful than its input (on DRealSR
    x2 and x3 it stays 2 dB below bicubic, on clean photos 4 dB), and at a smaller scale the input
    knows a larger share of the output's band. So back-projection (Irani and Peleg) adds the
    bicubic upscale of what the input and the result's own downscale disagree on: the result then
    agrees with the input, at or above bicubic's PSNR, and keeps the student's finer detail.
    """
    if result.shape[-2:] == (height, width):
        return result
    image = image.float().cpu()
    result = F.interpolate(result, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    for _ in range(_BACK_PROJECTIONS):
        seen = F.interpolate(result, size=image.shape[2:], mode="bicubic", align_corners=False, antialias=True)
        result = result + F.interpolate(image - seen, size=(height, width), mode="bicubic", align_corners=False)
    return result.clamp(0, 1)


def load_pipeline(
    model: str | Path | None = None,
    base: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    allow_download: bool = False,
) -> VPDPipeline:
    """Load a student file (or the embedded default: ``None`` or ``"default"``) and, for LoRA students, its base
    weights."""
    path = model_path(model)
    meta = read_meta(path)
    base_parts = text_encoder = None
    if meta.weights == "lora" and base is not None:  # without one, load_student raises MissingBaseError
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
