"""The zero-shot tag vocabulary, prompt templates, and tag lists turned into a text prompt.

The vocabulary (``tags.txt``) is our own list of everyday objects, animals, materials and scene
words: the things a photo being upscaled tends to contain and the things a generative upscaler
tends to invent (fur, text, faces, foliage).
"""

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

# Averaging a few phrasings (CLIP's prompt ensembling) makes zero-shot scores less sensitive
# to the grammar of any one template, which matters for mass nouns such as "sand" or "wool".
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of {}.",
)

_VOCABULARY = Path(__file__).parent / "tags.txt"


@lru_cache(maxsize=1)
def default_tags() -> tuple[str, ...]:
    """The shipped vocabulary, in file order."""
    return load_tags(_VOCABULARY)


def load_tags(path: str | Path) -> tuple[str, ...]:
    """Read a vocabulary file: one tag per line, ``#`` comments and blank lines ignored.

    Duplicates are an error rather than silently merged, because a repeated tag splits its
    probability between two entries and makes both look weaker than they are.
    """
    tags = [line.strip().lower() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    tags = [tag for tag in tags if tag and not tag.startswith("#")]
    repeated = sorted({tag for tag in tags if tags.count(tag) > 1})
    if repeated:
        raise ValueError(f"Tag vocabulary {path} repeats tags: {', '.join(repeated)}.")
    if not tags:
        raise ValueError(f"Tag vocabulary {path} is empty.")
    return tuple(tags)


def tag_prompts(tags: Sequence[str], template: str) -> list[str]:
    """One prompt per tag, e.g. ``"a photo of a {}."`` -> ``"a photo of a dog."``."""
    if "{}" not in template:
        raise ValueError(f"Prompt template {template!r} needs a '{{}}' where the tag goes.")
    return [template.format(tag) for tag in tags]


def prompt_from_tags(tags: Iterable[str | tuple[str, float]], max_tags: int | None = 8) -> str:
    """A SeeSR-style hard prompt: the tags, most likely first, joined by commas.

    Accepts bare tags or ``(tag, probability)`` pairs as returned by ``SemanticModel.top_tags``
    (order is kept: pass them sorted). Repeats and blanks are dropped.
    """
    seen: list[str] = []
    for item in tags:
        tag = (item[0] if isinstance(item, tuple) else item).strip()
        if tag and tag not in seen:
            seen.append(tag)
    return ", ".join(seen if max_tags is None else seen[:max_tags])
