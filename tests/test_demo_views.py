"""The web demo's pictures (`clipseg_tools.demo_views`), without Gradio or a model."""

import numpy as np
from PIL import Image

from clipseg_tools.demo_views import (
    LEGEND_ROW,
    NO_PROMPT,
    PALETTE,
    class_map,
    class_map_picture,
    fit_image,
    heat_map,
    legend,
    overlay,
    prompt_list,
    prompt_views,
)


def picture(height: int = 20, width: int = 30) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_prompts_are_split_on_commas_in_order_without_blanks():
    assert prompt_list(" red circle, ,blue square ,") == ["red circle", "blue square"]
    assert prompt_list("") == [] and prompt_list(None) == []


def test_large_pictures_are_scaled_down_and_made_rgb():
    small = fit_image(Image.new("L", (100, 50)), max_side=640)
    assert small.size == (100, 50) and small.mode == "RGB"
    assert fit_image(Image.new("RGBA", (1280, 640)), max_side=640).size == (640, 320)


def test_heat_map_has_the_maps_size_and_runs_dark_to_bright():
    probs = np.tile(np.linspace(0, 1, 30, dtype=np.float32), (20, 1))
    drawn = heat_map(probs)
    assert drawn.mode == "RGB" and drawn.size == (30, 20)
    heat = np.asarray(drawn, dtype=np.int64)
    brightness = heat.sum(axis=-1)[0]
    assert np.all(np.diff(brightness) >= 0), "brighter with the probability"
    assert tuple(heat[0, 0]) == (0, 0, 4) and tuple(heat[0, -1]) == (252, 255, 164)
    # Out-of-range values are clipped, not wrapped.
    assert np.array_equal(np.asarray(heat_map(np.full((2, 2), 7.0))), np.asarray(heat_map(np.ones((2, 2)))))


def test_overlay_changes_the_pixels_above_the_threshold_only():
    image = picture()
    probs = np.zeros((20, 30), np.float32)
    probs[5:15, 10:20] = 0.8
    before = np.asarray(image)
    after = np.asarray(overlay(image, probs, threshold=0.3, colour=(255, 0, 0)))
    inside = probs > 0.3
    assert after.shape == before.shape
    assert np.all(np.any(after[inside] != before[inside], axis=-1))
    assert np.array_equal(after[~inside], before[~inside])
    assert tuple(after[5, 10]) == (255, 0, 0), "the region's edge is drawn in the colour"
    # Above the highest probability nothing is marked.
    assert np.array_equal(np.asarray(overlay(image, probs, threshold=0.9)), before)


def test_multi_class_map_takes_the_most_probable_prompt_or_none_below_the_threshold():
    # Two prompts over three pixels: prompt 0 wins, prompt 1 wins, and neither passes 0.3.
    probs = np.array([[[0.9, 0.4, 0.2]], [[0.5, 0.6, 0.25]]], np.float32)
    assert class_map(probs, 0.3).tolist() == [[0, 1, -1]]
    assert class_map(probs, 0.55).tolist() == [[0, 1, -1]]
    assert class_map(probs, 0.6).tolist() == [[0, -1, -1]], "strictly above the threshold, as evaluated"

    image = Image.new("RGB", (3, 1), (200, 100, 0))
    drawn = class_map_picture(image, probs, 0.3, ["red circle", "blue square"], alpha=1.0)
    pixels = np.asarray(drawn)
    assert tuple(pixels[0, 0]) == PALETTE[0] and tuple(pixels[0, 1]) == PALETTE[1]
    grey = round(0.299 * 200 + 0.587 * 100)  # Pillow's RGB to L
    assert tuple(pixels[0, 2]) == (grey, grey, grey), "the picture in grey where no prompt passes"
    # The legend is drawn below the picture: a line for each prompt and one for "none".
    assert drawn.height == 1 + 3 * LEGEND_ROW + 6 and drawn.width > image.width
    swatch = np.asarray(drawn)[1 + 4 + LEGEND_ROW + LEGEND_ROW // 2, 8]
    assert tuple(swatch) == PALETTE[1]


def test_legend_lists_each_prompt_with_its_colour_then_none():
    assert legend(["a", "b"]) == [("a", PALETTE[0]), ("b", PALETTE[1]), (NO_PROMPT, (128, 128, 128))]
    assert legend([str(i) for i in range(12)])[10][1] == PALETTE[0], "colours repeat past the palette"


def test_each_prompt_gets_a_heat_map_and_an_overlay_captioned_with_its_score():
    probs = np.zeros((2, 20, 30), np.float32)
    probs[0, 2:6, 2:6], probs[1, 10:12, 3:9] = 0.87, 0.12
    views = prompt_views(picture(), probs, ["red circle", "example image"], threshold=0.3)
    assert [caption for _, caption in views] == [
        "red circle: max 0.87 · heat map",
        "red circle: max 0.87 · above 0.30",
        "example image: max 0.12 · heat map",
        "example image: max 0.12 · above 0.30",
    ]
    assert all(image.size == (30, 20) for image, _ in views)
