"""A CLIP-IQA-style no-reference quality score from antonym prompt pairs.

Following CLIP-IQA (Wang et al., 2023): for each pair of opposite prompts, a softmax over the
image's similarity to the two gives the probability of the positive one; the score is the mean
over pairs, in [0, 1]. Pairs rather than single prompts cancel most of CLIP's bias towards
whatever the image shows, since both prompts share it. Unlike CLIP-IQA (a ResNet CLIP run at
any resolution) we resize to the model's input size, so the score judges the image as CLIP sees
it at that size; compare images at equal sizes.
"""

import torch

QUALITY_PAIRS: tuple[tuple[str, str], ...] = (
    ("Good photo.", "Bad photo."),
    ("High quality photo.", "Low quality photo."),
    ("Sharp photo.", "Blurry photo."),
    ("Clean photo.", "Noisy photo."),
    ("High resolution photo.", "Low resolution photo."),
)


def quality_from_embeddings(
    image_embeddings: torch.Tensor,
    pair_embeddings: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Per-pair probability of the positive prompt, shape (B, P).

    ``image_embeddings`` (B, D) and ``pair_embeddings`` (P, 2, D) are unit-norm, positive
    prompt first.
    """
    if pair_embeddings.ndim != 3 or pair_embeddings.shape[1] != 2:
        raise ValueError(f"pair_embeddings must be (P, 2, D), got {tuple(pair_embeddings.shape)}.")
    logits = logit_scale * torch.einsum("bd,pkd->bpk", image_embeddings.float(), pair_embeddings.float())
    return logits.softmax(dim=-1)[..., 0]
