"""Test-wide settings: everything offline, nothing from the Hub."""

import os
import sys
from pathlib import Path

# Must be set before transformers / datasets / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


import pytest  # noqa: E402


def two_process_launcher(port: int) -> list[str]:
    """`accelerate launch` with two processes on the CPU (the spelling that really starts two)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(port)]  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic PhraseCut in the real layout (the project's writer)."""
    from phrasecut_dataset import write_synthetic_phrasecut

    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_phrasecut(root / "VGPhraseCut_v0", {"train": 24, "val": 6, "test": 6}, seed=3)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIP checkpoint with a tokenizer for the synthetic phrases, saved like a Hub folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from clipseg_tools.demo import demo_words
    from clipseg_tools.tiny_clip import build_word_tokenizer, tiny_clip_configs

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_word_tokenizer(demo_words(), folder, max_length=16)
    torch.manual_seed(0)
    configs = tiny_clip_configs(
        tokenizer, width=32, layers=3, heads=4, patch_size=16, pretrain_image_size=32, max_positions=16
    )
    CLIPModel(CLIPConfig(**configs)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
