"""How close the exported graphs' masks are to PyTorch's, on real test images of a trained model.

    python -m clipseg_tools.onnx_export --model demo_output --output demo_onnx --quantize int8 fp16
    python benchmarks/onnx_parity.py --model demo_output --onnx demo_onnx \\
        --data_dir ~/.cache/clipseg_finetune/demo/data_v2_1200 --split test --max_images 100

Each image of the split is segmented with its own phrases by `ClipSegCustomModel.predict` (PyTorch, float32)
and by `OnnxClipSeg.predict` at each precision the folder holds, maps at the image's own size. Per precision:
the largest difference of the probability maps, and the IoU of the masks at 0.3 against PyTorch's masks (mean
over masks, the lowest, and pooled over all pixels), and the logits' difference. The logits' relative difference
on the export's own inputs
is in the folder's onnx_config.json; here it is measured per image (the largest difference relative to the
image's largest logit, the worst image reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.data import load_splits  # noqa: E402
from clipseg_tools.onnx_runtime import SETTINGS_FILE, OnnxClipSeg  # noqa: E402
from clipseg_tools.transforms import decode_image  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel  # noqa: E402

THRESHOLD = 0.3


def mask_agreement(got: list[np.ndarray], expected: list[np.ndarray]) -> dict[str, float]:
    """IoU of the masks at THRESHOLD, per mask (mean, lowest) and pooled; masks empty in both count as 1."""
    ious, intersection, union, largest = [], 0, 0, 0.0
    for ours, reference in zip(got, expected, strict=True):
        largest = max(largest, float(np.abs(ours - reference).max()))
        for a, b in zip(ours > THRESHOLD, reference > THRESHOLD):
            both, either = int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())
            ious.append(both / either if either else 1.0)
            intersection, union = intersection + both, union + either
    return {
        "masks": len(ious),
        "mean_iou": float(np.mean(ious)),
        "lowest_iou": float(np.min(ious)),
        "pooled_iou": intersection / union if union else 1.0,
        "largest_probability_difference": largest,
    }


def logits_difference(runner: OnnxClipSeg, model: ClipSegCustomModel, images: list, phrases: list) -> float:
    """The largest, over images, of the logits' largest difference relative to PyTorch's largest logit, both
    fed the same pixels and tokens (at the model's input size)."""
    worst = 0.0
    for image, image_phrases in zip(images, phrases):
        pixels = runner.pixel_values([image])
        tokens = runner.processor.tokenizer(image_phrases, padding=True, return_tensors="np")
        index = np.zeros(len(image_phrases), dtype=np.int64)
        got = runner.logits(pixels, tokens["input_ids"], tokens["attention_mask"], index)
        with torch.inference_mode():
            expected = model(
                pixel_values=torch.from_numpy(pixels),
                input_ids=torch.from_numpy(tokens["input_ids"]),
                attention_mask=torch.from_numpy(tokens["attention_mask"]),
                image_index=torch.from_numpy(index),
            ).logits.numpy()
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
    return worst


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the trained model's folder")
    parser.add_argument("--onnx", required=True, help="its export (python -m clipseg_tools.onnx_export)")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_images", type=int, default=100)
    args = parser.parse_args(argv)
    model = ClipSegCustomModel.from_pretrained(args.model).eval()
    (split,) = load_splits({"--split": args.split}, data_dir=args.data_dir)
    rows = split.select(range(min(args.max_images, len(split))))
    images = [decode_image(row["image"]) for row in rows]
    phrases = [sorted({task["phrase"] for task in row["tasks"]}) for row in rows]
    with torch.inference_mode():
        expected = [maps.numpy() for maps in model.predict(images, phrases)]
    settings = json.loads((Path(args.onnx) / SETTINGS_FILE).read_text())
    results = {}
    for precision in settings["graphs"]:
        runner = OnnxClipSeg(args.onnx, precision)
        results[precision] = mask_agreement(runner.predict(images, phrases), expected)
        results[precision]["logits_relative_difference"] = logits_difference(runner, model, images, phrases)
        figures = results[precision]
        print(
            f"{precision}: {figures['masks']} masks of {len(images)} images; IoU at {THRESHOLD} against PyTorch's "
            f"mean {figures['mean_iou']:.4f}, lowest {figures['lowest_iou']:.4f}, pooled {figures['pooled_iou']:.4f}; "
            f"largest probability difference {figures['largest_probability_difference']:.2e}; logits within "
            f"{figures['logits_relative_difference']:.2e} of PyTorch's (relative, worst image)",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
