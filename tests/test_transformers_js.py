"""The transformers.js export loaded and run by transformers.js itself (in Node, with its onnxruntime), as a web
page would load it: tokens equal the Python tokenizer's, and its logits equal PyTorch's on the pixels its own
processor made (fp32) or nearly (the quantised graph).

Needs Node and an installed `@huggingface/transformers`: CLIPSEG_TRANSFORMERS_JS names its `node_modules` folder
(`.ci/run` installs it). Without it the test is skipped."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from clipseg_tools.onnx_export import main
from clipseg_tools.tiny_clip import tiny_clip_configs
from configuration import ClipSegCustomConfig
from modeling_clipseg_custom import ClipSegCustomModel, make_processor

SCRIPT = Path(__file__).resolve().parent / "fixtures" / "transformers_js_segment.mjs"
NODE_MODULES = os.environ.get("CLIPSEG_TRANSFORMERS_JS", "")
PHRASES = ["red circle", "a blue square", "green"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("node") and Path(NODE_MODULES, "@huggingface", "transformers").is_dir()),
        reason="needs node and CLIPSEG_TRANSFORMERS_JS (the node_modules folder holding @huggingface/transformers)",
    ),
]


def segment_in_node(models: Path, name: str, dtype: str, image: Path, tmp_path: Path) -> dict:
    """The script run beside the installed transformers.js (ES modules resolve packages from the script's
    folder)."""
    runner = tmp_path / "runner"
    runner.mkdir(exist_ok=True)
    if not (runner / "node_modules").exists():
        (runner / "node_modules").symlink_to(Path(NODE_MODULES).resolve())
    shutil.copy(SCRIPT, runner / SCRIPT.name)
    output = tmp_path / f"{dtype}.json"
    command = ["node", str(runner / SCRIPT.name), str(models), name, dtype, json.dumps(PHRASES), str(image)]
    result = subprocess.run([*command, str(output)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())


def test_transformers_js_runs_the_export_as_pytorch_does(tiny_clip_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    torch.manual_seed(8)
    configs = tiny_clip_configs(tokenizer, width=32, layers=3, heads=4, patch_size=8, pretrain_image_size=32)
    config = ClipSegCustomConfig(**configs, image_size=64, reduce_dim=16, extract_layers=[0, 1])
    model = ClipSegCustomModel(config).eval()
    with torch.no_grad():  # logits around the threshold: masks with both values
        model.decoder.transposed_convolution[-1].bias.fill_(-0.85)
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    make_processor(tokenizer, image_size=64).save_pretrained(saved)
    models = tmp_path / "models"
    assert main(["--model", str(saved), "--output", str(models / "web"), "--target", "transformers.js"]) == 0
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(image)
    tokens = AutoProcessor.from_pretrained(saved).tokenizer(PHRASES, padding=True, return_tensors="pt")

    for dtype in ("fp32", "q8"):  # q8: onnx/model_quantized.onnx
        got = segment_in_node(models, "web", dtype, image, tmp_path)
        assert got["input_ids"] == tokens["input_ids"].flatten().tolist()
        assert got["logits_shape"] == [3, 64, 64] and got["pixel_shape"] == [1, 3, 64, 64]
        pixels = torch.tensor(got["pixel_values"], dtype=torch.float32).reshape(got["pixel_shape"])
        with torch.no_grad():
            expected = model(
                pixel_values=pixels, **tokens, image_index=torch.zeros(len(PHRASES), dtype=torch.long)
            ).logits.numpy()
        logits = np.asarray(got["logits"], dtype=np.float32).reshape(got["logits_shape"])
        if dtype == "fp32":
            assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4
        else:
            threshold = np.log(0.3 / 0.7)
            assert 0.05 < (expected > threshold).mean() < 0.95
            assert ((logits > threshold) == (expected > threshold)).mean() > 0.95
