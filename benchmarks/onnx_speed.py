"""onnxruntime (fp32, int8) against PyTorch eager on this machine's CPU, side by side in one run.

    python benchmarks/onnx_speed.py --repeats 5

Default architecture (CLIP ViT-B/16 with the rd64-refined decoder, 352 px, random weights: the rates do not
depend on them), exported with `clipseg_tools.onnx_export`; each backend runs the whole model (vision tower to
its last extracted block, text tower, decoder) on the same prepared inputs: batches of 1 and 8 images with 1 and
4 prompts each. Each figure is the median of --repeats calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.demo import demo_words  # noqa: E402
from clipseg_tools.onnx_export import OnnxClipSeg, export  # noqa: E402
from clipseg_tools.tiny_clip import build_word_tokenizer  # noqa: E402
from configuration import ClipSegCustomConfig  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel, make_processor  # noqa: E402

PROMPTS = ["red circle", "blue square", "green triangle", "yellow star"]


def median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_default_model(folder: Path) -> ClipSegCustomModel:
    torch.manual_seed(0)
    model = ClipSegCustomModel(ClipSegCustomConfig(decoder_dropout=0.0)).eval()
    tokenizer = build_word_tokenizer(demo_words(), folder / "tokenizer", max_length=77)
    model.save_pretrained(folder / "model")
    make_processor(tokenizer, image_size=model.config.image_size).save_pretrained(folder / "model")
    return model


def case_inputs(model: ClipSegCustomModel, images: int, prompts: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    size = model.config.image_size
    tokens = rng.integers(1, 100, size=(images * prompts, 6))
    tokens[:, -1] = model.config.text_config.eos_token_id
    return {
        "pixel_values": rng.standard_normal((images, 3, size, size), dtype=np.float32),
        "input_ids": tokens.astype(np.int64),
        "attention_mask": np.ones_like(tokens, dtype=np.int64),
        "image_index": np.repeat(np.arange(images), prompts).astype(np.int64),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="clipseg_onnx_speed_"))
    model = saved_default_model(folder)
    export(str(folder / "model"), folder / "onnx", quantize=("int8",))
    runners = {precision: OnnxClipSeg(folder / "onnx", precision=precision) for precision in ("fp32", "int8")}
    print(f"torch threads: {torch.get_num_threads()}; images/s (and against PyTorch)")
    print("| images x prompts | PyTorch eager | onnxruntime fp32 | onnxruntime int8 |\n|---|---:|---:|---:|")
    results = {}
    for images, prompts in ((1, 1), (1, 4), (8, 1), (8, 4)):
        inputs = case_inputs(model, images, prompts)
        tensors = {key: torch.from_numpy(value) for key, value in inputs.items()}

        def eager(tensors: dict = tensors) -> None:
            with torch.inference_mode():
                model(**tensors)

        seconds = {"pytorch": median_seconds(eager, args.repeats)}
        for precision, runner in runners.items():
            seconds[precision] = median_seconds(
                lambda runner=runner, inputs=inputs: runner.logits(**inputs), args.repeats
            )
        rates = {name: images / value for name, value in seconds.items()}
        results[f"{images}x{prompts}"] = rates
        cells = [f"{rates['pytorch']:.2f}"] + [
            f"{rates[p]:.2f} ({rates[p] / rates['pytorch']:.2f}x)" for p in ("fp32", "int8")
        ]
        print(f"| {images} x {prompts} | " + " | ".join(cells) + " |", flush=True)
    return results


if __name__ == "__main__":
    main()
