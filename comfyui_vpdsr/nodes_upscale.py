"""One-Step SR: the node runs the core pipeline; it only adds what ComfyUI owns.

That is the device and memory management, the progress bar, the interrupt button, and the
IMAGE layout: ComfyUI images are BHWC, the core works in BCHW, and the conversion happens here
and nowhere else. Tiling, the out-of-memory retry and colour fixes are the core's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from comfy import model_management
from comfy.utils import ProgressBar
from comfy_api.latest import io

from vpdsr.color import COLOR_FIXES, DEFAULT_COLOR_FIX
from vpdsr.errors import Cancelled, OutOfMemory, VPDError

from .loading import HINTS
from .nodes_load import CATEGORY
from .sockets import VPDModel

if TYPE_CHECKING:
    from vpdsr import VPDPipeline  # the pipeline module loads with the first model, not with the pack

# Activation values per output pixel in the widest stage (the VAE decoder's full-resolution
# blocks: a few 128-channel feature maps); an estimate for free_memory, not a limit.
_VALUES_PER_OUTPUT_PIXEL = 3 * 128
_UNTILED_PIXELS = 1024 * 1024  # what the core's automatic tile size processes in one piece
TILING_MODES = ("auto", "off", "fixed")


def core_tile(tiling: str, tile_size: int) -> int | None:
    """The node's tiling mode and size as the core's ``tile``: None picks it, 0 turns tiling off.

    The mode is a widget of its own: with a single number, 0 meant "automatic" in the node but
    "off" in the CLI and the core, and the node could not turn tiling off at all.
    """
    if tiling not in TILING_MODES:
        raise VPDError(f"tiling must be one of {', '.join(TILING_MODES)}, got {tiling!r}")
    if tiling == "fixed" and tile_size < 1:
        raise VPDError(f"tiling 'fixed' needs a tile_size above 0, got {tile_size}")
    return {"auto": None, "off": 0}.get(tiling, tile_size)


def bhwc_to_bchw(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(-1, 1)


def bchw_to_bhwc(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(1, -1).contiguous()


def memory_estimate(pipe: VPDPipeline, image: torch.Tensor, scale: float, tile: int | None) -> int:
    """Weights plus the activations of one tile (or of the whole image, when it is not tiled)."""
    weights = sum(t.numel() * t.element_size() for t in pipe.student.state_dict().values())
    out_pixels = round(image.shape[1] * scale) * round(image.shape[2] * scale)
    tile_pixels = out_pixels if tile == 0 else min(out_pixels, _UNTILED_PIXELS if tile is None else tile * tile)
    dtype_bytes = torch.finfo(pipe.dtype).bits // 8
    return int(weights + tile_pixels * image.shape[0] * _VALUES_PER_OUTPUT_PIXEL * dtype_bytes)


class OneStepSR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VPDSR_OneStepSR",
            display_name="One-Step SR (VPD-SR)",
            category=CATEGORY,
            description="Super-resolves an image batch with one diffusion step of a VPD-SR student.",
            inputs=[
                io.Image.Input("image", tooltip="Low-resolution RGB image batch."),
                VPDModel.Input("vpd_model", tooltip="A student from Load VPD Model."),
                io.Float.Input(
                    "scale",
                    default=0.0,
                    min=0.0,
                    max=8.0,
                    step=0.5,
                    tooltip="Output size over input size, 1 to 8; 0 = the model's own (x4 for the embedded one). "
                    "The model always runs at its own scale: smaller ones are resampled from it, larger ones add "
                    "no more detail.",
                ),
                io.Combo.Input(
                    "tiling",
                    options=list(TILING_MODES),
                    default="auto",
                    tooltip="auto: up to 1 megapixel in one piece, else 1024 px tiles on CUDA and 512 px elsewhere; "
                    "off: the whole image in one piece; fixed: tiles of tile_size. Tiles are halved when "
                    "memory runs out.",
                ),
                io.Int.Input(
                    "tile_size",
                    default=512,
                    min=16,
                    max=4096,
                    step=16,
                    tooltip="Output-pixel tile size when tiling is fixed (rounded up to the model's multiple); "
                    "unused otherwise.",
                ),
                io.Combo.Input(
                    "color_fix",
                    options=list(COLOR_FIXES),
                    default=DEFAULT_COLOR_FIX,
                    tooltip="Match the output's colours to the input: adain (per-channel mean and spread), "
                    "wavelet (keep the input's low frequencies) or none.",
                ),
                io.String.Input(
                    "prompt",
                    default="",
                    multiline=True,
                    optional=True,
                    tooltip="Optional text prompt (e.g. the inspector's tags). Needs a student with a text "
                    "encoder (LoRA students on an SD base); empty uses the prompt stored in the model.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Optional per-pixel strength in [0, 1]: 1 = full generative detail, 0 = keep the "
                    "input's content (upscaled through the VAE). Any size; resized to the image.",
                ),
            ],
            outputs=[io.Image.Output("upscaled", tooltip="The upscaled batch.")],
        )

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        vpd_model: VPDPipeline,
        scale: float,
        tiling: str,
        tile_size: int,
        color_fix: str,
        prompt: str = "",
        mask: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        if image.dim() != 4 or image.shape[-1] != 3:
            raise VPDError(f"One-Step SR takes an RGB IMAGE batch (B, H, W, 3), got shape {tuple(image.shape)}")
        tile = core_tile(tiling, tile_size)
        core_scale = scale or None  # a FLOAT widget has a fixed default: 0 stands for the model's own
        device = model_management.get_torch_device()
        estimate = memory_estimate(vpd_model, image, vpd_model.network_scale(core_scale), tile)  # the network's size
        model_management.free_memory(estimate, device)
        bar: ProgressBar | None = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = ProgressBar(total)
            bar.update_absolute(done, total)

        vpd_model.to(device)
        try:
            out = vpd_model(
                bhwc_to_bchw(image),
                scale=core_scale,
                prompt=prompt.strip() or None,
                tile=tile,
                color_fix=color_fix,
                mask=mask,
                progress=progress,
                should_stop=model_management.processing_interrupted,
            )
        except Cancelled:
            model_management.throw_exception_if_processing_interrupted()  # ComfyUI's own "interrupted"
            raise
        except OutOfMemory as err:
            raise err.worded(HINTS) from None
        finally:
            vpd_model.to(model_management.unet_offload_device())
        return io.NodeOutput(bchw_to_bhwc(out))
