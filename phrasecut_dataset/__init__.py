"""PhraseCut for `datasets`: the builder over the real layout, its validation, task masks drawn the official way,
the official subsets, the Parquet export with its dataset card, and a synthetic writer of the same layout."""

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
from .masks import polygons_to_mask
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
    "KNOWN_BAD_IMAGE_IDS",
    "OFFICIAL_SUBSETS",
    "SPLIT_FILES",
    "FrequencyRanks",
    "PhraseCut",
    "PhraseCutConfig",
    "PhraseCutFormatError",
    "construct_phrase",
    "dataset_card",
    "export_dataset",
    "load_phrasecut",
    "polygons_to_mask",
    "prepare_phrasecut",
    "push_export_to_hub",
    "read_frequency_ranks",
    "synthetic_vocabulary",
    "task_subsets",
    "write_parquet_shards",
    "write_synthetic_phrasecut",
]
