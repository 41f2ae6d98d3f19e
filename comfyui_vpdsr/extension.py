"""The extension ComfyUI loads: registers ``models/vpdsr`` and lists the nodes."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .folders import register_student_folder
from .nodes_inspect import CLIPSemanticInspector
from .nodes_load import LoadVPDClip, LoadVPDModel
from .nodes_upscale import OneStepSR

NODES: list[type[io.ComfyNode]] = [LoadVPDModel, OneStepSR, LoadVPDClip, CLIPSemanticInspector]


class VPDSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> VPDSRExtension:
    register_student_folder()  # before ComfyUI asks the loader node for its file list
    return VPDSRExtension()
