"""One object that judges images with a CLIP: embeddings, tags, consistency, quality, ESS loss.

The ComfyUI inspector node, the Gradio semantics tab and the trainer's semantic loss all need the
same model, tokenizer and text embeddings of the tag vocabulary. Encoding ~500 tags times a few
templates is the slow part on a big CLIP, so it is done once, lazily, and kept in non-persistent
buffers that follow the module through ``.to(device, dtype)``.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from .loading import TINY_CONFIG, ClipSpec, build_clip, build_tokenizer, load_clip
from .preprocess import check_images, clip_preprocess, resize_images
from .quality import QUALITY_PAIRS, quality_from_embeddings
from .report import InspectionReport, drift_report
from .tags import DEFAULT_TEMPLATES, default_tags, prompt_from_tags, tag_prompts

_TEXT_BATCH = 256
_MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature here during training


@dataclass(frozen=True)
class SemanticLossTerms:
    """The two parts of the ESS loss, each a scalar tensor that backpropagates into SR.

    ``cosine`` is the mean of 1 - cos(SR, HR) embeddings; ``kl`` is KL(HR || SR) between their
    zero-shot tag distributions (batch mean, nats). The trainer weights and adds them.
    """

    cosine: torch.Tensor
    kl: torch.Tensor


class SemanticModel(nn.Module):
    """A frozen CLIP plus tokenizer, tag vocabulary and cached text embeddings.

    The CLIP is put in eval mode with gradients off, since every use here treats it as a fixed
    judge; gradients still flow through it to the *images* (for the ESS loss). To train a CLIP
    (the DAPE stage), use ``load_clip``/``build_clip`` and ``save_clip`` directly.
    """

    def __init__(
        self,
        clip: nn.Module,
        spec: ClipSpec,
        tags: Sequence[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> None:
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.spec = spec
        self.tokenizer = build_tokenizer(spec)
        self.tags = tuple(default_tags() if tags is None else tags)
        self.templates = tuple(templates)
        if not self.tags:
            raise ValueError("SemanticModel needs at least one tag.")
        for template in self.templates:
            tag_prompts(self.tags[:1], template)  # fails early on a template without "{}"
        self.register_buffer("tag_text_embeddings", None, persistent=False)
        self.register_buffer("quality_text_embeddings", None, persistent=False)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        text_path: str | os.PathLike | None = None,
    ) -> "SemanticModel":
        """Load a CLIP from disk, or from an image tower and a ``text_path`` (see ``load_clip``); CPU, float32."""
        clip, spec = load_clip(path, config, text_path=text_path)
        return cls(clip, spec, tags=tags)

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike | Mapping[str, Any] = TINY_CONFIG,
        tags: Sequence[str] | None = None,
    ) -> "SemanticModel":
        """A randomly initialised CLIP: for tests and plumbing checks, meaningless scores."""
        clip, spec = build_clip(config)
        return cls(clip, spec, tags=tags)

    def train(self, mode: bool = True) -> "SemanticModel":
        """Stays in eval mode: the judge must not change behaviour when a trainer calls ``.train()``."""
        return super().train(False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().float().exp().clamp(max=_MAX_LOGIT_SCALE)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, D) of BCHW [0, 1] images; differentiable w.r.t. the images."""
        param = next(self.clip.parameters())
        images = check_images(images).to(param.device)  # resize where the model is, not on the CPU
        pixels = clip_preprocess(images, self.spec.image_size, self.spec.mean, self.spec.std)
        features = self.clip.encode_image(pixels.to(param.dtype))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Like ``encode_images`` without autograd, returned on the CPU in float32."""
        return self.encode_images(images).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, D), float32; not cached."""
        param = next(self.clip.parameters())
        chunks = []
        for start in range(0, len(texts), _TEXT_BATCH):
            tokens = self.tokenizer(list(texts[start : start + _TEXT_BATCH])).to(param.device)
            chunks.append(F.normalize(_encode_text(self.clip, tokens).float(), dim=-1))
        return torch.cat(chunks)

    def tag_embeddings(self) -> torch.Tensor:
        """Template-averaged text embeddings of the vocabulary (T, D), computed once."""
        if self.tag_text_embeddings is None:
            per_template = torch.stack([self.encode_texts(tag_prompts(self.tags, t)) for t in self.templates])
            self.tag_text_embeddings = F.normalize(per_template.mean(dim=0), dim=-1)
        return self.tag_text_embeddings.float()

    def tag_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits (B, T) over the vocabulary; differentiable w.r.t. the images."""
        return self._tag_logits(self.encode_images(images))

    def tag_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot tag distribution (B, T): a softmax over the vocabulary, as in CLIP."""
        return self.tag_logits(images).softmax(dim=-1)

    @torch.no_grad()
    def top_tags(self, images: torch.Tensor, k: int = 10) -> list[list[tuple[str, float]]]:
        """The k most likely tags per image with their probabilities, most likely first."""
        return self._top_from_probs(self.tag_probabilities(images), k)

    @torch.no_grad()
    def prompts(self, images: torch.Tensor, max_tags: int = 8, min_prob: float = 0.0) -> list[str]:
        """Hard prompts (comma-joined top tags) per image, for conditioning the student."""
        return [
            prompt_from_tags([(tag, p) for tag, p in top if p >= min_prob], max_tags=None)
            for top in self.top_tags(images, k=max_tags)
        ]

    def consistency(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B,) of SR and LR embeddings, SR first resized to the LR size.

        Comparing at the LR size removes resolution itself from the measurement: CLIP embeddings
        move with sharpness and scale, so an SR image judged at full size differs from its input
        even when it shows exactly the same things. Resampled to the same grid, both go through
        the same CLIP resize, and what remains is a change of content (invented or erased
        objects, changed colours). Differentiable w.r.t. ``sr``.
        """
        sr, lr = _check_pair(sr, lr, "lr")
        return self._consistency(sr, self.encode_images(lr), tuple(lr.shape[-2:]))

    def quality_per_pair(self, images: torch.Tensor) -> torch.Tensor:
        """Probability of the positive prompt for each of ``QUALITY_PAIRS``, shape (B, P)."""
        return self._quality_per_pair(self.encode_images(images))

    def quality(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-IQA-style score (B,) in [0, 1], the mean over ``QUALITY_PAIRS``; higher is better."""
        return self.quality_per_pair(images).mean(dim=-1)

    def semantic_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> SemanticLossTerms:
        """ESS loss terms pulling SR towards HR's meaning; HR is a fixed target (no gradient)."""
        sr, hr = _check_pair(sr, hr, "hr")
        sr_embed = self.encode_images(sr)
        with torch.no_grad():
            hr_embed = self.encode_images(hr)
        sr_log_probs = self._tag_logits(sr_embed).log_softmax(dim=-1)
        hr_log_probs = self._tag_logits(hr_embed).log_softmax(dim=-1)
        return SemanticLossTerms(
            cosine=(1.0 - (sr_embed * hr_embed).sum(dim=-1)).mean(),
            kl=F.kl_div(sr_log_probs, hr_log_probs, log_target=True, reduction="batchmean"),
        )

    @torch.no_grad()
    def inspect(self, lr: torch.Tensor, sr: torch.Tensor, top_k: int = 10) -> list[InspectionReport]:
        """One report per image pair: consistency, quality, tags, drift and the LR prompt.

        Each image is encoded once and every score is derived from those embeddings.
        """
        sr, lr = _check_pair(sr, lr, "lr")
        lr_embed = self.encode_images(lr)
        sr_embed = self.encode_images(sr)
        consistency = self._consistency(sr, lr_embed, tuple(lr.shape[-2:]))
        quality_lr = self._quality_per_pair(lr_embed).mean(dim=-1)
        quality_sr = self._quality_per_pair(sr_embed).mean(dim=-1)
        lr_probs = self._tag_logits(lr_embed).softmax(dim=-1)
        sr_probs = self._tag_logits(sr_embed).softmax(dim=-1)
        lr_tops = self._top_from_probs(lr_probs, top_k)
        sr_tops = self._top_from_probs(sr_probs, top_k)
        return [
            InspectionReport(
                consistency=float(consistency[i]),
                quality_lr=float(quality_lr[i]),
                quality_sr=float(quality_sr[i]),
                lr_tags=lr_tops[i],
                sr_tags=sr_tops[i],
                drift=drift_report(lr_probs[i], sr_probs[i], self.tags, top_k),
                prompt=prompt_from_tags(lr_tops[i]),
            )
            for i in range(lr.shape[0])
        ]

    def _tag_logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * image_embeddings @ self.tag_embeddings().T

    def _consistency(self, sr: torch.Tensor, lr_embeddings: torch.Tensor, lr_size: tuple[int, int]) -> torch.Tensor:
        return (self.encode_images(resize_images(sr, lr_size)) * lr_embeddings).sum(dim=-1)

    def _quality_per_pair(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        if self.quality_text_embeddings is None:
            flat = self.encode_texts([prompt for pair in QUALITY_PAIRS for prompt in pair])
            self.quality_text_embeddings = flat.view(len(QUALITY_PAIRS), 2, -1)
        return quality_from_embeddings(image_embeddings, self.quality_text_embeddings.float(), self.logit_scale)

    def _top_from_probs(self, probs: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        values, indices = probs.detach().float().cpu().topk(min(k, len(self.tags)), dim=-1)
        return [
            [(self.tags[i], float(v)) for v, i in zip(row_values.tolist(), row_indices.tolist(), strict=True)]
            for row_values, row_indices in zip(values, indices, strict=True)
        ]


def _check_pair(sr: torch.Tensor, other: torch.Tensor, other_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    sr = check_images(sr, "sr")
    other = check_images(other, other_name)
    if sr.shape[0] != other.shape[0]:
        raise ValueError(f"sr and {other_name} batches differ in size: {sr.shape[0]} vs {other.shape[0]}.")
    return sr, other


def _encode_text(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text`` with the padding after the longest prompt cut off, when that is exact.

    CLIP's text tower is causal and pools at the end-of-text token, so nothing after that token
    can change the result. Tags are ~10 tokens in a context of 77; cutting the padding makes
    encoding the vocabulary several times faster, which is minutes on a CPU for a large CLIP.
    Any other text tower (no causal mask, other pooling, custom text) takes the plain path.
    """
    if not (isinstance(clip, CLIP) and clip.text_pool_type == "argmax" and clip.attn_mask is not None):
        return clip.encode_text(tokens)
    end = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
    length = int(end.max()) + 1
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)[torch.arange(len(tokens), device=tokens.device), end]
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x if clip.text_projection is None else x @ clip.text_projection
