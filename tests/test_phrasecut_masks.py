"""Polygon rasterisation (official convention) and the model-side image/mask transforms."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from phrasecut_dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_image,
    decode_pixels,
    image_to_tensor,
    polygons_to_mask,
    resize_image,
    resize_mask,
    resize_pixels,
    row_masks,
)

# A 10x8 image. Vertices are truncated with int(), so this quadrilateral becomes the rectangle
# (1,1)-(6,5); the boundary counts, so it covers columns 1..6 and rows 1..5: 6 * 5 = 30 pixels.
QUAD = [[1.5, 1.2], [6.9, 1.7], [6.2, 5.8], [1.1, 5.3]]


def test_quadrilateral_with_float_vertices_counted_by_hand():
    mask = polygons_to_mask([[QUAD]], height=8, width=10)
    assert mask.shape == (8, 10) and mask.dtype == bool
    assert mask.sum() == 30
    assert mask[1:6, 1:7].all()


def test_triangle_includes_its_boundary():
    # (0,0),(3,0),(0,3): the pixels with x + y <= 3, i.e. 4 + 3 + 2 + 1 = 10.
    mask = polygons_to_mask([[[[0.0, 0.0], [3.9, 0.2], [0.4, 3.7]]]], height=8, width=10)
    expected = np.add.outer(np.arange(8), np.arange(10)) <= 3
    np.testing.assert_array_equal(mask, expected)


def test_union_over_polygons_and_instances_counts_overlap_once():
    # Instance 0: the triangle above (10 px) and the rectangle cols 2..5 x rows 1..2 (8 px), sharing
    # pixel (x=2, y=1): 17. Instance 1: cols 7..9 x rows 5..7 (9 px). Total 26.
    instances = [
        [[[0.0, 0.0], [3.9, 0.2], [0.4, 3.7]], [[2.2, 1.3], [5.8, 1.1], [5.1, 2.9], [2.6, 2.4]]],
        [[[7.5, 5.5], [9.99, 5.2], [9.3, 7.9], [7.2, 7.6]]],
    ]
    assert polygons_to_mask(instances, 8, 10).sum() == 26
    # A flat list of polygons (as the official evaluator passes them) gives the same mask.
    flat = instances[0] + instances[1]
    np.testing.assert_array_equal(polygons_to_mask(flat, 8, 10), polygons_to_mask(instances, 8, 10))


def test_points_outside_are_clipped_and_degenerate_polygons_ignored():
    # Negative coordinates truncate toward zero (int(-0.5) == 0): the whole 10x8 image.
    assert polygons_to_mask([[[[-0.5, -0.5], [9.5, -0.5], [9.5, 7.5], [-0.5, 7.5]]]], 8, 10).all()
    assert polygons_to_mask([[[[-5, -5], [-1, -5], [-1, -1]]]], 8, 10).sum() == 0
    assert polygons_to_mask([[[[3.0, 3.0]]]], 8, 10).sum() == 0  # one point: skipped, as officially
    assert polygons_to_mask([], 8, 10).sum() == 0


def test_numpy_float32_polygons_are_accepted():
    mask = polygons_to_mask([[np.asarray(QUAD, dtype=np.float32)]], 8, 10)
    assert mask.sum() == 30


def test_resize_mask_is_pixel_centre_nearest_neighbour():
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    up = resize_mask(mask, 12)
    assert up.shape == (12, 12) and up.dtype == bool
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(mask)[None, None].float(), size=(12, 12), mode="nearest-exact"
    )[0, 0].bool()
    np.testing.assert_array_equal(up, expected.numpy())
    stack = resize_mask(np.stack([mask, ~mask]), (3, 5))
    assert stack.shape == (2, 3, 5)
    np.testing.assert_array_equal(stack[1], ~stack[0])


def test_model_transform_equals_the_vit_processor_the_model_ships_with():
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(
        size={"height": 352, "width": 352},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        resample=Image.BILINEAR,
    )
    rng = np.random.default_rng(0)
    for shape in [(300, 500, 3), (400, 250, 3)]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        ours = image_to_tensor(resize_image(image, 352))
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == (3, 352, 352) and ours.dtype == torch.float32
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_resize_image_converts_grey_and_squashes():
    image = Image.new("L", (40, 10), 128)
    out = resize_image(image, 16)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_images_and_masks_already_at_the_size_are_kept_as_they_are():
    """A crop of an image stored at the model's size needs no resize: the same pixels, no copies."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert resize_image(image, 16) is image
    np.testing.assert_array_equal(np.asarray(image.resize((16, 16), Image.BILINEAR)), np.asarray(image))
    grey = Image.new("L", (16, 16), 7)
    assert resize_image(grey, 16).mode == "RGB"
    mask = np.random.default_rng(1).random((2, 16, 16)) > 0.5
    assert resize_mask(mask, 16) is mask
    from phrasecut_dataset.masks import _nearest_indices

    for size in (7, 16, 352, 500):  # what the general path would do at the same size: nothing
        np.testing.assert_array_equal(_nearest_indices(size, size), np.arange(size))


def test_a_broken_jpeg_fails_in_decode_image():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buffer, format="JPEG")
    with pytest.raises(OSError):
        decode_image(buffer.getvalue()[:200])  # truncated: the error comes from decoding, here


def test_decode_image_accepts_every_cell_form(tmp_path):
    image = Image.new("CMYK", (7, 5), (10, 20, 30, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    data = buffer.getvalue()
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    for cell in [
        data,
        {"bytes": data, "path": "x.jpg"},
        {"bytes": None, "path": str(path)},
        str(path),
        Image.open(path),
    ]:
        decoded = decode_image(cell)
        assert decoded.mode == "RGB" and decoded.size == (7, 5)


def encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_decode_pixels_gives_pillows_pixels_for_every_kind_of_image(tmp_path):
    """JPEGs in YCbCr (every chroma subsampling, progressive) and grey go through simplejpeg; CMYK, PNG, a
    path and a PIL image through Pillow. Every one: the pixels of `decode_image`, as a writable array."""
    rng = np.random.default_rng(3)
    colour = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    cells = [encoded(colour, quality=q, subsampling=s) for q, s in ((95, 2), (90, 1), (75, 0))]
    cells += [
        encoded(colour, quality=90, progressive=True),
        encoded(colour.convert("L"), quality=90),
        encoded(colour.convert("CMYK"), quality=90),
        encoded(colour, "PNG"),
        colour,
    ]
    path = tmp_path / "x.jpg"
    path.write_bytes(cells[0])
    cells += [{"bytes": cells[0], "path": None}, {"bytes": None, "path": str(path)}, str(path)]
    for cell in cells:
        pixels = decode_pixels(cell)
        assert pixels.dtype == np.uint8 and pixels.shape == (37, 53, 3) and pixels.flags.writeable
        np.testing.assert_array_equal(pixels, np.asarray(decode_image(cell)))
    with pytest.raises(OSError):  # a truncated JPEG: Pillow gets it and names the problem
        decode_pixels(cells[0][:200])


def test_resize_pixels_is_resize_image_on_arrays():
    pixels = np.random.default_rng(4).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    expected = np.asarray(resize_image(Image.fromarray(pixels), 16))
    np.testing.assert_array_equal(resize_pixels(pixels, 16), expected)
    assert resize_pixels(pixels[:16, :16], 16).base is pixels  # already the size: the same view


def test_row_masks_rasterises_every_task_at_native_size_then_resizes():
    row = {
        "height": 8,
        "width": 10,
        "tasks": [{"polygons": [[QUAD]]}, {"polygons": [[[[0.0, 0.0], [3.9, 0.2], [0.4, 3.7]]]]}],
    }
    native = row_masks(row)
    assert native.shape == (2, 8, 10)
    assert native.sum(axis=(1, 2)).tolist() == [30, 10]
    resized = row_masks(row, 352, 352)
    assert resized.shape == (2, 352, 352)
    np.testing.assert_array_equal(resized, resize_mask(native, 352))


@pytest.mark.parametrize("size", [1, 3])
def test_resize_mask_to_tiny_sizes(size):
    assert resize_mask(np.ones((5, 5), dtype=bool), size).all()
