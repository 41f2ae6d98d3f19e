"""The socket types our nodes pass between each other (ComfyUI shows them by these names)."""

from comfy_api.latest import io

VPDModel = io.Custom("VPD_MODEL")  # a vpdsr.VPDPipeline
VPDClip = io.Custom("VPD_CLIP")  # a vpdsr.semantics.SemanticModel
