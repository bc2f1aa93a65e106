"""onnxruntime (fp32, int8) against PyTorch eager on this machine's CPU, side by side in one run.

    python benchmarks/onnx_speed.py --repeats 5

Default architecture (CLIP ViT-B/16 with the rd64-refined decoder, 352 px, random weights: the rates do not
depend on them), exported with `clipseg_tools.onnx_export`; each backend runs the whole model (vision tower to
its last extracted block, text tower, decoder) on the same prepared inputs: batches of 1 and 8 images with 1 and
4 prompts each. Each figure is the median of --repeats calls after one warm-up call.

    python benchmarks/onnx_speed.py --profile

adds where the time goes: the vision tower (nearly all of the model's time at 352 px) profiled op by op in
PyTorch (torch.profiler, self time) and in onnxruntime fp32 (its session profiler, kernel time), batches of 1
and 8 images, 3 calls each after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_tools.demo import demo_words  # noqa: E402
from clipseg_tools.onnx_export import export  # noqa: E402
from clipseg_tools.onnx_runtime import OnnxClipSeg  # noqa: E402
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


def torch_profile(model: ClipSegCustomModel, pixels: torch.Tensor, calls: int) -> dict[str, float]:
    """Milliseconds of self CPU time per call, by PyTorch op, of the vision tower."""
    with torch.inference_mode():
        model.vision_activations(pixels)
        with torch.profiler.profile() as profile:
            for _ in range(calls):
                model.vision_activations(pixels)
    return {event.key: event.self_cpu_time_total / calls / 1000 for event in profile.key_averages()}


def onnxruntime_profile(graph: Path, pixels: np.ndarray, calls: int) -> dict[str, float]:
    """Milliseconds of kernel time per call, by ONNX op type, of the vision graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as OnnxClipSeg runs it
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    session.run(None, {"pixel_values": pixels})  # warm-up, before the profiler starts
    options.enable_profiling = True
    options.profile_file_prefix = str(graph.parent / "profile")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    for _ in range(calls + 1):
        session.run(None, {"pixel_values": pixels})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1000
    return {op: total / (calls + 1) for op, total in by_op.items()}  # the first call's too: all alike


def print_profile(model: ClipSegCustomModel, graph: Path, calls: int = 3) -> None:
    for images in (1, 8):
        pixels = np.random.default_rng(0).standard_normal((images, 3, 352, 352), dtype=np.float32)
        for name, times in (
            ("PyTorch", torch_profile(model, torch.from_numpy(pixels), calls)),
            ("onnxruntime fp32", onnxruntime_profile(graph, pixels, calls)),
        ):
            total = sum(times.values())
            top = sorted(times.items(), key=lambda item: -item[1])[:5]
            shares = ", ".join(f"{op} {ms:.0f} ms ({ms / total:.0%})" for op, ms in top)
            print(f"vision tower, {images} image(s), {name}: {total:.0f} ms per call; {shares}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also profile the vision tower op by op")
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
    if args.profile:
        print_profile(model, folder / "onnx" / "vision.onnx")
    return results


if __name__ == "__main__":
    main()
