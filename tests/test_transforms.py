"""Model-side transforms: image cells decoded, images and masks resized, pixels as the model's processor
makes them."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_tools.transforms import (
    _nearest_indices,
    decode_image,
    decode_pixels,
    image_to_tensor,
    resize_mask,
    resize_pixels,
)
from modeling_clipseg_custom import IMAGENET_MEAN, IMAGENET_STD


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
        ours = image_to_tensor(Image.fromarray(resize_pixels(np.asarray(image), 352)))
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == (3, 352, 352) and ours.dtype == torch.float32
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_images_and_masks_already_at_the_size_are_kept_as_they_are():
    """A crop of an image stored at the model's size needs no resize: the same pixels, no copies."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert resize_pixels(pixels, 16) is pixels
    image = Image.fromarray(pixels)
    np.testing.assert_array_equal(np.asarray(image.resize((16, 16), Image.BILINEAR)), pixels)
    mask = np.random.default_rng(1).random((2, 16, 16)) > 0.5
    assert resize_mask(mask, 16) is mask
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


def test_resize_pixels_is_pils_bilinear_resize_on_arrays():
    pixels = np.random.default_rng(4).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(resize_pixels(pixels, 16), expected)
    assert resize_pixels(pixels[:16, :16], 16).base is pixels  # already the size: the same view


@pytest.mark.parametrize("size", [1, 3])
def test_resize_mask_to_tiny_sizes(size):
    assert resize_mask(np.ones((5, 5), dtype=bool), size).all()
