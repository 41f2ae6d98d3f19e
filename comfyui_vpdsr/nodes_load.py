"""Loader nodes: a VPD-SR student (plus its base for LoRA students) and a CLIP for the inspector."""

from __future__ import annotations

from comfy import model_management
from comfy_api.latest import io

from vpdsr.semantics import list_configs

from . import folders
from .loading import load_semantic_model, load_student_pipeline, stamp_or_missing
from .sockets import VPDClip, VPDModel

CATEGORY = "image/upscaling/VPD-SR"
DTYPES = ["auto", "fp16", "bf16", "fp32"]
AUTO_CONFIG = "auto"


class LoadVPDModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VPDSR_LoadModel",
            display_name="Load VPD Model",
            category=CATEGORY,
            description="Loads a one-step VPD-SR super-resolution student from models/vpdsr. Nothing is downloaded.",
            inputs=[
                io.Combo.Input(
                    "model",
                    options=folders.student_options(),
                    default=folders.EMBEDDED_DEFAULT,
                    tooltip="Student file (.safetensors) from models/vpdsr, or the default model embedded in vpdsr.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPES,
                    default="auto",
                    tooltip="Precision: auto is fp32 on the CPU, bf16 on GPUs that support it, else fp16.",
                ),
                io.Combo.Input(
                    "base",
                    options=folders.base_options(),
                    default=folders.NO_BASE,
                    optional=True,
                    tooltip="Base weights for LoRA students: an SD 2.x / SD-Turbo single-file checkpoint "
                    "(models/checkpoints) or a diffusers folder (models/diffusers). Full students need none.",
                ),
            ],
            outputs=[VPDModel.Output("vpd_model", tooltip="The loaded student, for One-Step SR.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model: str, dtype: str, base: str = folders.NO_BASE):
        return (
            stamp_or_missing(lambda: folders.student_path(model)),
            stamp_or_missing(lambda: folders.base_path(base)),
            dtype,
        )

    @classmethod
    def execute(cls, model: str, dtype: str, base: str = folders.NO_BASE) -> io.NodeOutput:
        pipe = load_student_pipeline(
            folders.student_path(model),
            folders.base_path(base),
            dtype,
            device=model_management.get_torch_device(),
            offload_device=model_management.unet_offload_device(),
        )
        return io.NodeOutput(pipe)


class LoadVPDClip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VPDSR_LoadCLIP",
            display_name="Load CLIP (VPD-SR Inspector)",
            category=CATEGORY,
            description="Loads a CLIP (image and text towers) for the CLIP Semantic Inspector: one file with both, "
            "or an image tower plus a text tower. Nothing is downloaded.",
            inputs=[
                io.Combo.Input(
                    "clip_name",
                    options=folders.clip_options(),
                    tooltip="A whole CLIP (OpenCLIP or Hugging Face CLIPModel), or the image tower when text_encoder "
                    "names the text tower, e.g. a clip_vision file (ViT-L/14, ViT-H/14). clip/ is "
                    "models/text_encoders; .pt/.pth/.bin/.ckpt are read as weights only.",
                ),
                io.Combo.Input(
                    "config",
                    options=[AUTO_CONFIG, *list_configs()],
                    default=AUTO_CONFIG,
                    tooltip="OpenCLIP architecture (e.g. ViT-B-32). auto: from the file (vpdsr CLIP exports), an "
                    "open_clip_config.json or config.json beside it, or, for Hugging Face files, SD checkpoints "
                    "and pairs, the tensor shapes. Plain OpenCLIP checkpoints need it named.",
                ),
                io.Combo.Input(
                    "text_encoder",
                    options=folders.text_encoder_options(),
                    default=folders.NO_TEXT_ENCODER,
                    optional=True,
                    tooltip="The text tower that belongs to clip_name's image tower: clip_l (text_encoders) with a "
                    "ViT-L/14 clip_vision file, or an SD 2.x checkpoint with OpenCLIP ViT-H/14's. none: clip_name "
                    "holds both.",
                ),
            ],
            outputs=[VPDClip.Output("clip", tooltip="The loaded CLIP, for the CLIP Semantic Inspector.")],
        )

    @classmethod
    def fingerprint_inputs(cls, clip_name: str, config: str, text_encoder: str = folders.NO_TEXT_ENCODER):
        return (
            stamp_or_missing(lambda: folders.clip_path(clip_name)),
            stamp_or_missing(lambda: folders.text_encoder_path(text_encoder)),
            config,
        )

    @classmethod
    def execute(cls, clip_name: str, config: str, text_encoder: str = folders.NO_TEXT_ENCODER) -> io.NodeOutput:
        model = load_semantic_model(
            folders.clip_path(clip_name),
            None if config == AUTO_CONFIG else config,
            folders.text_encoder_path(text_encoder),
        )
        return io.NodeOutput(model)
