"""Semantic drift between a low-resolution input and its super-resolved output.

A generative upscaler can invent content (fur on a carpet, text in foliage, a face in a rock) or
wash some out. Comparing the zero-shot tag distributions of the input and the output shows both:
tags that enter the output's top list were likely hallucinated, tags that leave it were likely
lost. These are plain dataclasses built from probability vectors, so the logic is testable
without a model and front-ends can format them as they like (``to_text`` gives a default).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TagChange:
    """One tag's zero-shot probability in the input (LR) and in the output (SR)."""

    tag: str
    lr_prob: float
    sr_prob: float

    @property
    def delta(self) -> float:
        return self.sr_prob - self.lr_prob

    def __str__(self) -> str:
        return f"{self.tag} {self.lr_prob:.3f} -> {self.sr_prob:.3f}"


@dataclass(frozen=True)
class DriftReport:
    """Tags gained and lost between the top-k lists of LR and SR, and the KL between them.

    ``gained`` is sorted by how much the tag rose, ``lost`` by how much it fell, ``kept`` by
    its SR probability. ``kl`` is KL(LR || SR) over the whole vocabulary, in nats: 0 when the
    output means exactly what the input did.
    """

    top_k: int
    gained: list[TagChange]
    lost: list[TagChange]
    kept: list[TagChange]
    kl: float

    def to_text(self) -> str:
        def line(label: str, changes: list[TagChange]) -> str:
            return f"  {label}: " + (", ".join(map(str, changes)) if changes else "none")

        return "\n".join(
            [
                f"Semantic drift (top {self.top_k} tags, LR -> SR probability)",
                line("gained (possible hallucination)", self.gained),
                line("lost", self.lost),
                line("kept", self.kept),
                f"  KL(LR || SR): {self.kl:.4f} nats",
            ]
        )


def drift_report(
    lr_probs: torch.Tensor,
    sr_probs: torch.Tensor,
    tags: Sequence[str],
    top_k: int = 10,
) -> DriftReport:
    """Compare two tag distributions (each (T,), summing to 1) over the vocabulary ``tags``."""
    lr_probs = lr_probs.detach().double().cpu().flatten()
    sr_probs = sr_probs.detach().double().cpu().flatten()
    if not (lr_probs.numel() == sr_probs.numel() == len(tags)):
        raise ValueError(
            f"Tag probabilities and vocabulary differ in length: LR {lr_probs.numel()}, "
            f"SR {sr_probs.numel()}, tags {len(tags)}."
        )
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    k = min(top_k, len(tags))
    lr_top = set(lr_probs.topk(k).indices.tolist())
    sr_top = set(sr_probs.topk(k).indices.tolist())

    def changes(indices: set[int]) -> list[TagChange]:
        return [TagChange(tags[i], float(lr_probs[i]), float(sr_probs[i])) for i in indices]

    eps = 1e-12
    kl = float((lr_probs * ((lr_probs + eps).log() - (sr_probs + eps).log())).sum().clamp(min=0.0))
    return DriftReport(
        top_k=k,
        gained=sorted(changes(sr_top - lr_top), key=lambda c: c.delta, reverse=True),
        lost=sorted(changes(lr_top - sr_top), key=lambda c: c.delta),
        kept=sorted(changes(lr_top & sr_top), key=lambda c: c.sr_prob, reverse=True),
        kl=kl,
    )


@dataclass(frozen=True)
class InspectionReport:
    """Everything the semantic inspector shows for one LR/SR pair.

    ``lr_tags``/``sr_tags`` are (tag, probability) lists, most likely first, ready for a bar
    chart; ``prompt`` is the hard prompt the student would be conditioned on for this input.
    """

    consistency: float
    quality_lr: float
    quality_sr: float
    lr_tags: list[tuple[str, float]]
    sr_tags: list[tuple[str, float]]
    drift: DriftReport
    prompt: str

    def to_text(self) -> str:
        def tag_list(tags: list[tuple[str, float]]) -> str:
            return ", ".join(f"{tag} {prob:.3f}" for tag, prob in tags)

        return "\n".join(
            [
                f"Semantic consistency (CLIP cosine, SR vs LR at LR size): {self.consistency:.4f}",
                f"CLIP-IQA quality: LR {self.quality_lr:.3f}, SR {self.quality_sr:.3f}",
                f"LR tags: {tag_list(self.lr_tags)}",
                f"SR tags: {tag_list(self.sr_tags)}",
                self.drift.to_text(),
                f"Prompt from LR tags: {self.prompt}",
            ]
        )
