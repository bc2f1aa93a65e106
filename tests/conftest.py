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


def run_on_two_processes(module: str, function: str, *args, timeout: int = 120) -> None:
    """`accelerate.debug_launcher(module.function, args)` on two CPU processes, forked from a fresh
    interpreter: forking this one after it has run OpenMP-parallel torch ops can hang the children."""
    import signal
    import subprocess

    code = (
        f"import sys; sys.path[:0] = [{str(REPO_ROOT)!r}, {str(REPO_ROOT / 'tests')!r}]\n"
        "from accelerate import debug_launcher\n"
        f"from {module} import {function}\n"
        f"debug_launcher({function}, args={args!r}, num_processes=2)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a hang can be killed whole
    )
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        pytest.fail(f"{function} on two processes did not finish within {timeout} s:\n{output[-3000:]}")
    assert child.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def train_split(synthetic_data, tmp_path_factory):
    """The synthetic training split with its images left encoded, as run_train.py reads it."""
    import datasets

    from phrasecut_dataset import load_phrasecut

    split = load_phrasecut(synthetic_data, cache_dir=tmp_path_factory.mktemp("cache"), splits=["train"])[
        "train"
    ]
    return split.cast_column("image", datasets.Image(decode=False))


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
