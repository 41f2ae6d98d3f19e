"""CLIP semantics for super-resolution: what an image shows, and whether upscaling changed it.

Built on OpenCLIP with weights from local files only. ``SemanticModel`` is the entry point for the
front-ends and the trainer; ``load_clip``/``save_clip`` read and write the checkpoints.
"""

from .loading import ClipSpec, build_clip, build_tokenizer, list_configs, load_clip, resolve_config, save_clip
from .preprocess import ClipPreprocess, clip_preprocess
from .quality import QUALITY_PAIRS, quality_from_embeddings
from .report import DriftReport, InspectionReport, TagChange, drift_report
from .semantic_model import SemanticLossTerms, SemanticModel
from .tags import DEFAULT_TEMPLATES, default_tags, load_tags, prompt_from_tags

__all__ = [
    "ClipPreprocess",
    "ClipSpec",
    "DEFAULT_TEMPLATES",
    "DriftReport",
    "InspectionReport",
    "QUALITY_PAIRS",
    "SemanticLossTerms",
    "SemanticModel",
    "TagChange",
    "build_clip",
    "build_tokenizer",
    "clip_preprocess",
    "default_tags",
    "drift_report",
    "list_configs",
    "load_clip",
    "load_tags",
    "prompt_from_tags",
    "quality_from_embeddings",
    "resolve_config",
    "save_clip",
]
