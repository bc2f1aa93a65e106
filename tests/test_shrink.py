"""Training images stored at the model's size: geometry, masks and pixels against the full-size path."""

import datasets
import numpy as np
import pytest
import torch

from clipseg_tools.batching import PhraseIndex, TrainingOptions, TrainingSamples, row_masks
from clipseg_tools.data import shrink_images
from clipseg_tools.transforms import decode_image, resize_mask
from phrasecut_dataset import load_phrasecut, write_synthetic_phrasecut


@pytest.fixture(scope="module")
def large_split(tmp_path_factory):
    """PhraseCut-sized synthetic images (short side 150-200 here, shrunk to 96 below)."""
    root = tmp_path_factory.mktemp("large")
    data = write_synthetic_phrasecut(root / "data", {"train": 12}, seed=4, min_size=150, max_size=260)
    split = load_phrasecut(data, cache_dir=root / "cache", splits=["train"])["train"]
    return split.cast_column("image", datasets.Image(decode=False))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max(1, (a | b).sum())


def test_shrunk_rows_have_the_short_side_and_masks_that_match(large_split):
    shrunk = shrink_images(large_split, 96)
    assert len(shrunk) == len(large_split) and shrunk.features == large_split.features
    for row, small in zip(large_split, shrunk):
        image = decode_image(small["image"])
        assert min(image.size) == 96 and image.size == (small["width"], small["height"])
        assert abs(small["width"] / small["height"] - row["width"] / row["height"]) < 0.02
        native = resize_mask(row_masks(row), (small["height"], small["width"]))  # full-size masks resized
        from_scaled_polygons = row_masks(small)
        for a, b in zip(native, from_scaled_polygons):
            assert iou(a, b) > 0.85, iou(a, b)
        assert [t["phrase"] for t in small["tasks"]] == [t["phrase"] for t in row["tasks"]]


def test_small_images_are_left_alone(large_split):
    unchanged = shrink_images(large_split, 1000)
    assert unchanged[0]["image"]["bytes"] == large_split[0]["image"]["bytes"]
    with pytest.raises(ValueError, match="short_side"):
        shrink_images(large_split, 0)


def test_training_samples_from_shrunk_images_match_the_full_size_path(large_split):
    options = TrainingOptions(image_size=96, random_crop=False, negative_prob=0.0, prompt_template="plain")
    shrunk = shrink_images(large_split, 96)
    full = TrainingSamples(large_split, PhraseIndex.from_dataset(large_split), options)
    small = TrainingSamples(shrunk, PhraseIndex.from_dataset(shrunk), options)
    for item in range(0, len(full), 5):
        a, b = full[item], small[item]
        assert a["phrases"] == b["phrases"] and a["pixel_values"].shape == b["pixel_values"].shape
        difference = (a["pixel_values"].float() - b["pixel_values"].float()).abs().mean()
        assert difference < 6, difference  # two resamplings and a JPEG re-encoding, out of 255
        assert iou(a["masks"].numpy(), b["masks"].numpy()) > 0.85
    cropped = TrainingSamples(shrunk, PhraseIndex.from_dataset(shrunk), TrainingOptions(image_size=96))
    assert cropped[0]["pixel_values"].shape == (3, 96, 96) and cropped[0]["pixel_values"].dtype == torch.uint8
