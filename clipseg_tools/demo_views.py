"""The web demo's pictures (`app.py`): each prompt's heat map and overlay, and the multi-class map with its legend.

Probabilities arrive as numpy arrays `[K, H, W]` in [0, 1], one map per prompt at the picture's size (what
`ClipSegCustomModel.predict` returns for one image). The threshold only enters the overlays and the multi-class
map, so the page redraws them from the kept probabilities when it moves, without running the model again.

This module needs numpy and Pillow only, so a Space runs it as it is (`clipseg_tools.space` copies it there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]

# One colour per prompt (Tableau's ten), distinct from each other and from the grey of "no prompt".
PALETTE: tuple[Colour, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (127, 127, 127),
)
# Inferno's colours at 0, 1/4, 1/2, 3/4 and 1: dark for 0, bright for 1, readable in grey print too.
HEAT_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
OVERLAY_ALPHA = 0.55
LEGEND_ROW = 20  # pixels per legend line
NO_PROMPT = "no prompt above the threshold"


def prompt_list(text: str | None) -> list[str]:
    """The prompts typed in one box, comma-separated, in order; blanks dropped."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def fit_image(image: Image.Image, max_side: int = 640) -> Image.Image:
    """The picture in RGB, scaled down to `max_side` at most: the model sees it at its own input size anyway,
    and a phone photo's maps at full size would make every redraw slow."""
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


def colour_of(index: int) -> Colour:
    return PALETTE[index % len(PALETTE)]


def heat_map(probs: np.ndarray) -> Image.Image:
    """A `[H, W]` probability map as an RGB picture of the same size (inferno colours, 0 dark, 1 bright)."""
    value = np.clip(np.asarray(probs, np.float32), 0, 1) * (len(HEAT_STOPS) - 1)
    low = np.minimum(value.astype(np.int64), len(HEAT_STOPS) - 2)
    weight = (value - low)[..., None]
    rgb = HEAT_STOPS[low] * (1 - weight) + HEAT_STOPS[low + 1] * weight
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def overlay(
    image: Image.Image, probs: np.ndarray, threshold: float, colour: Colour = PALETTE[3]
) -> Image.Image:
    """The picture with the pixels above `threshold` tinted in `colour` and outlined in it; others unchanged."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    mask = np.asarray(probs) > threshold
    tint = np.array(colour, np.float32)
    pixels[mask] = pixels[mask] * (1 - OVERLAY_ALPHA) + tint * OVERLAY_ALPHA
    pixels[outline(mask)] = tint  # the region's edge stays visible where the tint is close to the picture
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` with a 4-neighbour outside it (the picture's border counts as outside)."""
    inside = np.pad(mask, 1, constant_values=False)
    interior = inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    return mask & ~interior


def class_map(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Per pixel the index of the prompt of highest probability, or -1 where no prompt is above `threshold`
    (the rule of the evaluation's multi-class map, `clipseg_tools.class_maps`)."""
    probs = np.asarray(probs)
    best = probs.argmax(axis=0)
    return np.where(probs.max(axis=0) > threshold, best, -1)


def class_map_picture(
    image: Image.Image, probs: np.ndarray, threshold: float, labels: Sequence[str], alpha: float = 0.65
) -> Image.Image:
    """The multi-class map over the picture: each pixel tinted with its prompt's colour, the picture in grey
    where no prompt passes the threshold; the legend (colour, prompt) drawn below."""
    classes = class_map(probs, threshold)
    pixels = np.asarray(image.convert("RGB"), np.float32)
    grey = np.asarray(image.convert("L").convert("RGB"), np.float32)
    colours = np.array([colour_of(i) for i in range(len(labels))], np.float32).reshape(-1, 3)
    tinted = pixels * (1 - alpha) + colours[np.maximum(classes, 0)] * alpha
    picture = np.where((classes >= 0)[..., None], tinted, grey)
    return with_legend(Image.fromarray(np.round(picture).astype(np.uint8)), legend(labels))


def legend(labels: Sequence[str]) -> list[tuple[str, Colour]]:
    """(prompt, colour) in the order of the prompts, then the grey of pixels that no prompt claims."""
    return [(label, colour_of(i)) for i, label in enumerate(labels)] + [(NO_PROMPT, (128, 128, 128))]


def with_legend(picture: Image.Image, entries: Sequence[tuple[str, Colour]]) -> Image.Image:
    """`picture` with one line per entry below it: a swatch of the colour, then the text."""
    font = legend_font()
    draw = ImageDraw.Draw(picture)
    text_width = max(draw.textlength(text, font=font) for text, _ in entries)
    width = max(picture.width, int(text_width) + LEGEND_ROW + 12)
    sheet = Image.new("RGB", (width, picture.height + LEGEND_ROW * len(entries) + 6), "white")
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, (text, colour) in enumerate(entries):
        top = picture.height + 4 + row * LEGEND_ROW
        draw.rectangle((4, top + 2, LEGEND_ROW - 2, top + LEGEND_ROW - 4), fill=colour, outline="black")
        draw.text((LEGEND_ROW + 4, top + 2), text, fill="black", font=font)
    return sheet


def legend_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow before 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


def caption(label: str, probs: np.ndarray) -> str:
    """A prompt with its score: the highest probability it reaches in the picture."""
    return f"{label}: max {float(np.max(probs)):.2f}"


def prompt_views(
    image: Image.Image, probs: np.ndarray, labels: Sequence[str], threshold: float
) -> list[tuple[Image.Image, str]]:
    """Per prompt, its heat map and its overlay at `threshold`, each with a caption naming the prompt."""
    views = []
    for k, label in enumerate(labels):
        text = caption(label, probs[k])
        views.append((heat_map(probs[k]), f"{text} · heat map"))
        views.append((overlay(image, probs[k], threshold, colour_of(k)), f"{text} · above {threshold:.2f}"))
    return views
