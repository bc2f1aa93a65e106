"""Model-side transforms: image cells decoded, images and masks resized, pixels normalised, masks packed,
batches moved to the device.

Training, evaluation, the failure gallery and the demo all go through these functions, so the pixels a model
sees and the masks it is scored against are made one way only. Workers make uint8 pixels and packed masks
(small to hand over); `model_inputs` turns a batch into the model's float inputs on the device.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image

from modeling_clipseg_custom import IMAGENET_MEAN, IMAGENET_STD

PIXEL_KEYS = ("pixel_values", "conditional_pixel_values")


# --- decoding ---


def decode_image(image_cell: Any) -> Image.Image:
    """A `datasets` Image cell as an RGB PIL image: a decoded PIL image, a `{"bytes": ..., "path": ...}` dict
    (an `Image(decode=False)` column or a Parquet row), raw bytes, or a file path."""
    data = _encoded_bytes(image_cell)
    if isinstance(image_cell, Image.Image):
        image = image_cell
    elif data is not None:
        image = Image.open(io.BytesIO(data))
    else:
        image = Image.open(image_cell["path"] if isinstance(image_cell, Mapping) else image_cell)
    if image.mode == "RGB":
        image.load()  # decode now (errors surface here) and close the file; convert would also copy
        return image
    return image.convert("RGB")


def _encoded_bytes(image_cell: Any) -> bytes | bytearray | None:
    """The encoded bytes an image cell holds (a `{"bytes": ...}` dict or raw bytes), else None."""
    if isinstance(image_cell, Mapping):
        return image_cell.get("bytes")
    return image_cell if isinstance(image_cell, (bytes, bytearray)) else None


def decode_pixels(image_cell: Any) -> np.ndarray:
    """`decode_image` as a writable RGB uint8 array [H, W, 3], for the training and evaluation samples.

    A JPEG in YCbCr or grey is decoded by libjpeg-turbo through simplejpeg, straight into the array: less
    CPU than Pillow's decode plus its copy out of the image, and the same pixels (both use libjpeg-turbo's
    accurate DCT and smooth upsampling; tested). Anything else (CMYK, PNG, a path, a PIL image, a JPEG
    simplejpeg refuses) goes through Pillow, which names what it cannot decode.
    """
    data = _encoded_bytes(image_cell)
    if data is not None and data[:2] == b"\xff\xd8":
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass
    return np.array(decode_image(image_cell))


# --- resizing (the whole image squashed to the model's size, as CLIPSeg does; no crop) ---


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] resized to size x size with PIL's bilinear filter, as the processor of the
    CIDAS checkpoints resizes; an array already that size is returned as it is (no copy)."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.array(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def _nearest_indices(source: int, target: int) -> np.ndarray:
    # Pixel-centre aligned nearest neighbour (torch's "nearest-exact"): the geometry of the bilinear image
    # resize, so a resized mask stays on top of its resized image.
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask [H, W] (or a stack [K, H, W]) to size x size or (height, width).
    A mask already of that size is returned as it is."""
    height, width = (size, size) if isinstance(size, int) else size
    if mask.shape[-2:] == (height, width):
        return mask
    rows = _nearest_indices(mask.shape[-2], height)
    cols = _nearest_indices(mask.shape[-1], width)
    # Two 1-D gathers: several times faster than one 2-D fancy index.
    return np.take(np.take(mask, rows, axis=-2), cols, axis=-1)


# --- tensors: uint8 in the workers, float on the device ---


def image_to_tensor(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """An RGB PIL image -> normalised float32 tensor [3, H, W], the processor's arithmetic on the host."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def image_to_uint8(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB PIL image or uint8 array [H, W, 3] -> uint8 tensor [3, H, W], a view of the pixels as they lie
    (channels last): the host never transposes them, `normalize_pixels` does on the device. Batches travel
    as uint8, a quarter of float32's bytes through worker queues and host-to-device copies."""
    pixels = image if isinstance(image, np.ndarray) else np.array(image, dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[3, S, S] uint8 images -> a batch [N, 3, S, S] stored channels last: each image's rows are copied as
    they lie (a transposing copy costs the worker several times more)."""
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 [N, 3, H, W] in any memory layout -> contiguous float32 divided by 255, minus mean, over std (the
    processor's arithmetic in the same order, so the values equal `image_to_tensor`'s bit for bit)."""
    pixels = pixels.contiguous().float() / 255.0
    mean, std = _channel_constants(tuple(mean), tuple(std), pixels.device)
    return (pixels - mean) / std


@functools.lru_cache(maxsize=8)
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [1, C, 1, 1] tensors on `device`, made once (a copy to the device each step would wait
    for its queue)."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device) for v in (mean, std))


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """bool [..., H, W] -> uint8 [..., H, ceil(W / 8)], eight pixels per byte (most significant bit first)."""
    return torch.from_numpy(np.packbits(masks.numpy(), axis=-1))


def unpack_masks(packed: torch.Tensor, width: int) -> torch.Tensor:
    """`pack_masks` undone, on the tensor's device: bool [..., H, width]."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)  # made there: no copy in
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :width].bool()


def model_inputs(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collated batch on `device` as the model takes it: tensors copied without blocking (from pinned
    memory on a GPU, the host does not wait), pixels normalised to float32, labels float32 (unpacked there
    when the collate packed them). Other values (lists of phrases, native-size masks) stay as they are."""
    moved = {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }
    for key in PIXEL_KEYS:
        if key in moved and moved[key].dtype == torch.uint8:
            moved[key] = normalize_pixels(moved[key])
    if "packed_labels" in moved:
        moved["labels"] = unpack_masks(moved.pop("packed_labels"), moved["pixel_values"].shape[-1])
    if "labels" in moved:
        moved["labels"] = moved["labels"].float()
    if "packed_ignore" in moved:  # one per image: each of its prompts is trained and scored on the rest
        ignore = unpack_masks(moved.pop("packed_ignore"), moved["pixel_values"].shape[-1])
        moved["loss_mask"] = ~ignore[moved["image_index"]]
    return moved
