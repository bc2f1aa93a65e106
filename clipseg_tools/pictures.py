"""Pictures a person reads: tiles side by side with their captions written on the picture, in a font
large enough to read (the training run's sample pictures, the failure gallery)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def caption_font(size: int = 16) -> ImageFont.ImageFont:
    """A font a person reads at a glance: Pillow's own scalable one (with FreeType), else its small bitmap."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow built without FreeType
        return ImageFont.load_default()


def captioned(tiles: list[Image.Image], captions: list[str], band: int = 24) -> Image.Image:
    """The tiles side by side with each one's caption written below it, clipped to its width."""
    height = max(tile.height for tile in tiles)
    sheet = Image.new("RGB", (sum(tile.width for tile in tiles), height + band), "white")
    draw, font, x = ImageDraw.Draw(sheet), caption_font(), 0
    for tile, caption in zip(tiles, captions, strict=True):
        sheet.paste(tile, (x, 0))
        text = caption
        while text and draw.textlength(text, font=font) > tile.width - 6:
            text = text[:-2] + "…" if len(text) > 2 else ""
        draw.text((x + 3, height + 4), text, fill="black", font=font)
        x += tile.width
    return sheet
