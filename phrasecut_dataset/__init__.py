"""PhraseCut for `datasets`: the builder over the real layout, masks and transforms, subsets, export, synthetic data."""

import importlib

from .builder import (
    FEATURES,
    KNOWN_BAD_IMAGE_IDS,
    SPLIT_FILES,
    PhraseCut,
    PhraseCutConfig,
    load_phrasecut,
    prepare_phrasecut,
)
from .masks import (
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
from .shrink import shrink_images
from .subsets import OFFICIAL_SUBSETS, FrequencyRanks, read_frequency_ranks, task_subsets
from .validate import PhraseCutFormatError

# The command-line modules are imported on first use: `python -m phrasecut_dataset.synthetic` would
# otherwise find its own module already imported by this file, and runpy warns about that.
_FROM_COMMAND_LINE_MODULES = {
    "construct_phrase": "synthetic",
    "synthetic_vocabulary": "synthetic",
    "write_synthetic_phrasecut": "synthetic",
    "dataset_card": "publish",
    "export_dataset": "publish",
    "push_export_to_hub": "publish",
    "write_parquet_shards": "publish",
}


def __getattr__(name: str):
    if name in _FROM_COMMAND_LINE_MODULES:
        module = importlib.import_module(f".{_FROM_COMMAND_LINE_MODULES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FEATURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_BAD_IMAGE_IDS",
    "OFFICIAL_SUBSETS",
    "SPLIT_FILES",
    "FrequencyRanks",
    "PhraseCut",
    "PhraseCutConfig",
    "PhraseCutFormatError",
    "construct_phrase",
    "dataset_card",
    "decode_image",
    "decode_pixels",
    "export_dataset",
    "image_to_tensor",
    "load_phrasecut",
    "polygons_to_mask",
    "prepare_phrasecut",
    "push_export_to_hub",
    "read_frequency_ranks",
    "resize_image",
    "resize_mask",
    "resize_pixels",
    "row_masks",
    "shrink_images",
    "synthetic_vocabulary",
    "task_subsets",
    "write_parquet_shards",
    "write_synthetic_phrasecut",
]
