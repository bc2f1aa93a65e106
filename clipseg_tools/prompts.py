"""Prompt templates of the original CLIPSeg training (`--prompt_template`)."""

from __future__ import annotations

import numpy as np

_SHUFFLE = ["a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}."]
TEMPLATES: dict[str, list[str]] = {
    "plain": ["{}"],
    "fixed": ["a photo of a {}."],
    "shuffle": _SHUFFLE,
    "shuffle+": _SHUFFLE
    + [
        "a cropped photo of a {}.",
        "a good photo of a {}.",
        "a photo of one {}.",
        "a bad photo of a {}.",
        "a photo of the {}.",
    ],
}


def apply_template(phrase: str, template_set: str, rng: np.random.Generator) -> str:
    """The phrase wrapped in one template of the set, drawn uniformly (as the original did per phrase)."""
    try:
        templates = TEMPLATES[template_set]
    except KeyError:
        raise ValueError(
            f"unknown prompt template set {template_set!r}; choose one of {sorted(TEMPLATES)}"
        ) from None
    template = templates[int(rng.integers(len(templates)))] if len(templates) > 1 else templates[0]
    return template.format(phrase)
