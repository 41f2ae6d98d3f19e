"""CLIP Semantic Inspector: what the output shows, and whether upscaling changed what the input showed."""

from __future__ import annotations

import math

import numpy as np
import torch
from comfy import model_management
from comfy_api.latest import io

from vpdsr.errors import VPDError
from vpdsr.semantics import InspectionReport, SemanticModel, prompt_from_tags

from .chart import TagBar, tag_chart
from .nodes_load import CATEGORY
from .nodes_upscale import bhwc_to_bchw
from .sockets import VPDClip


def _bars(report: InspectionReport) -> list[TagBar]:
    drift = report.drift
    bars = [TagBar(c.tag, c.lr_prob, c.sr_prob) for c in drift.kept]
    bars += [TagBar(c.tag, c.lr_prob, c.sr_prob, "+") for c in drift.gained]
    bars += [TagBar(c.tag, c.lr_prob, c.sr_prob, "-") for c in drift.lost]
    return sorted(bars, key=lambda b: max(b.lr or 0.0, b.sr), reverse=True)


def _sr_only_text(tags: list[tuple[str, float]], quality: float) -> str:
    return "\n".join(
        [
            "Semantic consistency: not measured (connect the low-resolution input to 'reference')",
            f"CLIP-IQA quality: {quality:.3f}",
            "Tags: " + ", ".join(f"{tag} {p:.3f}" for tag, p in tags),
        ]
    )


def _pair_batches(sr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if reference.shape[0] == sr.shape[0]:
        return reference
    if reference.shape[0] == 1:
        return reference.expand(sr.shape[0], -1, -1, -1)
    raise VPDError(
        f"the reference batch has {reference.shape[0]} images for {sr.shape[0]} upscaled images; give one, or one per image"
    )


class CLIPSemanticInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VPDSR_CLIPSemanticInspector",
            display_name="CLIP Semantic Inspector (VPD-SR)",
            category=CATEGORY,
            description="Zero-shot CLIP tags, consistency and quality of an upscaled image, compared with its input.",
            inputs=[
                io.Image.Input("sr_image", tooltip="The upscaled image batch to inspect."),
                VPDClip.Input("clip", tooltip="An OpenCLIP model from Load CLIP (VPD-SR Inspector)."),
                io.Int.Input(
                    "top_k",
                    default=8,
                    min=1,
                    max=32,
                    tooltip="How many of the most likely tags to compare, chart and return.",
                ),
                io.Image.Input(
                    "reference",
                    optional=True,
                    tooltip="The low-resolution input the SR image was made from (one, or one per SR image). "
                    "Without it, consistency is not measured (NaN) and the tags describe the SR image.",
                ),
            ],
            outputs=[
                io.String.Output("report", display_name="report", tooltip="Readable report for every image."),
                io.Float.Output(
                    "consistency",
                    display_name="consistency",
                    tooltip="CLIP cosine of SR and input at the input's size (batch mean); NaN without a reference.",
                ),
                io.Float.Output(
                    "quality", display_name="quality", tooltip="CLIP-IQA score of the SR image in [0, 1] (batch mean)."
                ),
                io.String.Output(
                    "tags",
                    display_name="tags",
                    tooltip="Comma-separated top tags of the input (of the SR image without a reference), first "
                    "image; usable as One-Step SR's prompt.",
                ),
                io.Image.Output("chart", display_name="chart", tooltip="Bar chart of the top tags, input vs output."),
            ],
        )

    @classmethod
    def execute(
        cls, sr_image: torch.Tensor, clip: SemanticModel, top_k: int, reference: torch.Tensor | None = None
    ) -> io.NodeOutput:
        device = model_management.get_torch_device()
        weights = sum(t.numel() * t.element_size() for t in clip.state_dict().values())
        model_management.free_memory(weights * 2, device)
        clip.to(device)
        try:
            sr = bhwc_to_bchw(sr_image)
            if reference is None:
                return cls._inspect_alone(clip, sr, top_k)
            return cls._inspect_pair(clip, sr, bhwc_to_bchw(_pair_batches(sr_image, reference)), top_k)
        finally:
            clip.to(model_management.unet_offload_device())

    @staticmethod
    def _inspect_pair(clip: SemanticModel, sr: torch.Tensor, lr: torch.Tensor, top_k: int) -> io.NodeOutput:
        reports = clip.inspect(lr, sr, top_k=top_k)
        bars = [_bars(r) for r in reports]
        rows = max(len(b) for b in bars)
        charts = [
            tag_chart(
                b,
                f"Image {i + 1}: consistency {r.consistency:.3f}, quality {r.quality_lr:.3f} -> {r.quality_sr:.3f}",
                rows,
            )
            for i, (r, b) in enumerate(zip(reports, bars))
        ]
        text = _join([r.to_text() for r in reports])
        consistency = float(np.mean([r.consistency for r in reports]))
        quality = float(np.mean([r.quality_sr for r in reports]))
        tags = prompt_from_tags(reports[0].lr_tags, max_tags=None)
        return io.NodeOutput(text, consistency, quality, tags, _stack(charts))

    @staticmethod
    def _inspect_alone(clip: SemanticModel, sr: torch.Tensor, top_k: int) -> io.NodeOutput:
        tags = clip.top_tags(sr, k=top_k)
        quality = clip.quality(sr).tolist()
        charts = [
            tag_chart([TagBar(tag, None, p) for tag, p in t], f"Image {i + 1}: quality {q:.3f}", top_k)
            for i, (t, q) in enumerate(zip(tags, quality))
        ]
        text = _join([_sr_only_text(t, q) for t, q in zip(tags, quality)])
        return io.NodeOutput(
            text, math.nan, float(np.mean(quality)), prompt_from_tags(tags[0], max_tags=None), _stack(charts)
        )


def _join(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"Image {i + 1} of {len(texts)}\n{t}" for i, t in enumerate(texts))


def _stack(charts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(charts))
