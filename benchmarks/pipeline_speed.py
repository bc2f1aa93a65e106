"""The image-segmentation pipeline's rate against the bare model's, on this machine's CPU, batch 1.

    python benchmarks/pipeline_speed.py --repeats 10

Default architecture (CLIP ViT-B/16 with the rd64-refined decoder, 352 px, random weights: the figures do not
depend on them), one photo of --photo_size (width x height) per call, 1 and 4 prompts:
- bare model: the forward pass on pixels and tokens prepared beforehand, and the sigmoid, at 352 px;
- pipeline: `pipeline_clipseg` from the PIL photo to one binary mask (a PIL image at the photo's size) and a
  score per prompt: resizing and normalising the photo, tokenising, the same forward pass, resizing the maps
  to the photo, thresholding;
- post-processing alone: the maps resized to the photo, thresholded, and turned into PIL images.
Each figure is the median of --repeats calls after two warm-up calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.demo import demo_words  # noqa: E402
from clipseg_tools.tiny_clip import build_word_tokenizer  # noqa: E402
from configuration import ClipSegCustomConfig  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel, make_processor  # noqa: E402
from pipeline_clipseg import ClipSegSegmentationPipeline  # noqa: E402

PROMPTS = ["red circle", "blue square", "green triangle", "yellow star"]


def median_seconds(call, repeats: int) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_maps(model: ClipSegCustomModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.sigmoid(model(**inputs).logits)


def postprocess(maps: torch.Tensor, size: tuple[int, int]) -> list[Image.Image]:
    """What the pipeline does after the model: maps to the photo's size, thresholded, as PIL images."""
    resized = F.interpolate(maps[:, None], size=size, mode="bilinear")[:, 0]
    return [Image.fromarray(((m > 0.3).to(torch.uint8) * 255).numpy(), mode="L") for m in resized]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--photo_size", type=int, nargs=2, default=[640, 480], metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = ClipSegCustomModel(ClipSegCustomConfig(decoder_dropout=0.0)).eval()
    tokenizer = build_word_tokenizer(demo_words(), Path(tempfile.mkdtemp()) / "tokenizer", max_length=77)
    processor = make_processor(tokenizer, image_size=model.config.image_size)
    segmenter = ClipSegSegmentationPipeline(model=model, processor=processor, task="image-segmentation")
    width, height = args.photo_size
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    results = {}
    print(f"torch threads: {torch.get_num_threads()}, photo {width}x{height}, model input 352 px")
    for count in (1, 4):
        prompts = PROMPTS[:count]
        inputs = {
            "pixel_values": processor(images=photo, return_tensors="pt")["pixel_values"],
            "image_index": torch.zeros(count, dtype=torch.long),
            **processor.tokenizer(prompts, padding=True, return_tensors="pt"),
        }
        maps = bare_maps(model, inputs)
        bare_s = median_seconds(partial(bare_maps, model, inputs), args.repeats)
        pipeline_s = median_seconds(partial(segmenter, photo, prompts=prompts), args.repeats)
        post_s = median_seconds(partial(postprocess, maps, (height, width)), args.repeats)
        results[f"{count} prompt(s)"] = {
            "bare_images_per_second": 1 / bare_s,
            "pipeline_images_per_second": 1 / pipeline_s,
            "pipeline_share_of_bare_rate": bare_s / pipeline_s,
            "postprocess_ms_per_image": post_s * 1e3,
        }
        row = results[f"{count} prompt(s)"]
        print(
            f"{count} prompt(s): bare {row['bare_images_per_second']:.2f} images/s, pipeline "
            f"{row['pipeline_images_per_second']:.2f} images/s ({100 * row['pipeline_share_of_bare_rate']:.1f}% of "
            f"the bare rate), post-processing {row['postprocess_ms_per_image']:.1f} ms per image"
        )
    return results


if __name__ == "__main__":
    main()
