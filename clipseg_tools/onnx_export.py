"""Export a CLIPSeg model to ONNX, and run the exported graphs with onnxruntime, without PyTorch.

    python -m clipseg_tools.onnx_export --model demo_output --output demo_onnx
    python -m clipseg_tools.onnx_export --model CIDAS/clipseg-rd64-refined --output rd64_onnx --quantize int8 fp16

The model runs as three graphs, as it does in PyTorch, so that one image serves many prompts:
- `vision.onnx`: pixel_values `[I, 3, S, S]` -> activations `[L, I, 1 + (S / patch)^2, width]`, the outputs of
  the L extracted vision blocks, shallowest first (the tower stops after the last of them);
- `text.onnx`: input_ids, attention_mask `[P, T]` -> conditional_embeddings `[P, projection_dim]`;
- `decoder.onnx`: activations, conditional_embeddings, image_index `[P]` (the image each prompt reads) ->
  logits `[P, S, S]`.
I, P and T are dynamic (T up to the text tower's length: `OnnxClipSeg` truncates as `predict()` does); the
image side S is fixed at the model's `config.image_size`, the size `predict()` and the evaluation use.

With `--quantize int8` (the default) each graph also gets a dynamically quantised copy, `*_int8.onnx` (int8
weights, activations quantised at run time); with `fp16` a half-precision one, `*_fp16.onnx` (float32 inputs
and outputs, for runtimes with fast half-precision kernels: a GPU, WebGPU). Beside them: the processor the
model was saved with, and `onnx_config.json` (the graphs, input size, text length, the model's config, and
the logits' difference from PyTorch's measured at export).

`OnnxClipSeg(folder).predict(images, phrases)` gives the maps `ClipSegCustomModel.predict` gives for phrase
prompts, with onnxruntime, numpy, Pillow and the processor only: this module imports PyTorch only in the
exporter.
"""

from __future__ import annotations

import argparse
import json
import logging as logging_module
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from transformers.utils import logging

from .cli import ArgumentParser, run_command, setup_logging
from .errors import FAILED, CommandError
from .files import atomic_folder

logger = logging.get_logger(__name__)

SETTINGS_FILE = "onnx_config.json"
FORMAT_VERSION = 1
PARTS = ("vision", "text", "decoder")
# The exporter's opsets: scaled_dot_product_attention needs 14; the TorchScript exporter stops at 20.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 14, 20, 17
# Beyond this relative difference from PyTorch's logits an fp32 export is wrong, not rounded: it is refused.
FP32_LIMIT = 1e-3
# How long `predict` waits for an image given by URL, as the PyTorch model's.
URL_TIMEOUT_SECONDS = 30.0
# The phrases whose token ids trace the text graph (any in-vocabulary ones would do).
EXAMPLE_PHRASES = ("a photo", "something", "the background of the picture")
DESCRIPTION = (
    "Export a model to ONNX: vision.onnx (the vision tower up to its last extracted block), text.onnx (the "
    "phrase embeddings) and decoder.onnx, so that one image serves many prompts, with dynamic image, prompt "
    "and token counts and the image size fixed at the model's config.image_size; with its processor and "
    f"{SETTINGS_FILE}, read by clipseg_tools.onnx_export.OnnxClipSeg (onnxruntime, no PyTorch)."
)

# Per graph: its inputs, its outputs, and their dynamic axes.
GRAPHS = {
    "vision": (
        ("pixel_values",),
        ("activations",),
        {"pixel_values": {0: "images"}, "activations": {1: "images"}},
    ),
    "text": (
        ("input_ids", "attention_mask"),
        ("conditional_embeddings",),
        {
            "input_ids": {0: "prompts", 1: "tokens"},
            "attention_mask": {0: "prompts", 1: "tokens"},
            "conditional_embeddings": {0: "prompts"},
        },
    ),
    "decoder": (
        ("activations", "conditional_embeddings", "image_index"),
        ("logits",),
        {
            "activations": {1: "images"},
            "conditional_embeddings": {0: "prompts"},
            "image_index": {0: "prompts"},
            "logits": {0: "prompts"},
        },
    ),
}


def graph_file(part: str, precision: str) -> str:
    return f"{part}.onnx" if precision == "fp32" else f"{part}_{precision}.onnx"


# ----------------------------------------------------------------------------------------------------------
# The runner: onnxruntime, numpy and the processor, no PyTorch
# ----------------------------------------------------------------------------------------------------------


class OnnxClipSeg:
    """The exported graphs of a model, run with onnxruntime.

    Example:

    ```python
    >>> from clipseg_tools.onnx_export import OnnxClipSeg
    >>> model = OnnxClipSeg("rd64_onnx", precision="int8")
    >>> maps = model.predict("street.jpg", ["a red car", "the sky"])
    >>> maps[0].shape  # probabilities per prompt at the photo's own size
    (2, 480, 640)
    ```
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        precision: str = "fp32",
        providers: Sequence[str] | None = None,
        session_options: Any = None,
    ):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.settings = json.loads((self.folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        files = self.settings["graphs"].get(precision)
        if files is None:
            raise ValueError(
                f"{self.folder} holds no {precision} graphs (it holds {', '.join(self.settings['graphs'])})"
            )
        providers = list(providers or ["CPUExecutionProvider"])
        if session_options is None:
            session_options = ort.SessionOptions()
            # Errors only: on a CPU, fp16 graphs warn of each constant that has no fp16 kernel to fold it.
            session_options.log_severity_level = 3
        self.sessions = {
            part: ort.InferenceSession(
                str(self.folder / files[part]), sess_options=session_options, providers=providers
            )
            for part in PARTS
        }
        self.image_size = int(self.settings["image_size"])
        self.max_text_length = int(self.settings["max_text_length"])
        self._processor = None

    @property
    def processor(self) -> Any:
        """The processor saved with the graphs (its tokenizer and image normalisation), loaded when first used."""
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.folder)
        return self._processor

    # --- the graphs one by one, as the model's methods of the same names ---

    def vision_activations(self, pixel_values: np.ndarray) -> np.ndarray:
        """`[I, 3, S, S]` normalised pixels -> `[L, I, tokens, width]` activations of the extracted blocks."""
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        return self.sessions["vision"].run(None, feeds)[0]

    def text_embeddings(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """`[P, T]` tokens (T at most `max_text_length`) -> `[P, projection_dim]` conditional embeddings."""
        feeds = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        return self.sessions["text"].run(None, feeds)[0]

    def decode(self, activations: np.ndarray, embeddings: np.ndarray, image_index: np.ndarray) -> np.ndarray:
        """Activations `[L, I, tokens, width]`, embeddings `[P, D]`, image_index `[P]` -> logits `[P, S, S]`."""
        feeds = {
            "activations": activations,
            "conditional_embeddings": np.asarray(embeddings, dtype=np.float32),
            "image_index": np.asarray(image_index, dtype=np.int64),
        }
        return self.sessions["decoder"].run(None, feeds)[0]

    def logits(
        self,
        pixel_values: np.ndarray,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        image_index: np.ndarray,
    ) -> np.ndarray:
        """What `model(pixel_values=..., input_ids=..., attention_mask=..., image_index=...).logits` gives."""
        activations = self.vision_activations(pixel_values)
        return self.decode(activations, self.text_embeddings(input_ids, attention_mask), image_index)

    # --- high-level inference ---

    def predict(self, images: Any, prompts: Any, batch_size: int = 8) -> list[np.ndarray]:
        """Probability maps per phrase at each image's original size, as `ClipSegCustomModel.predict`.

        Args:
            images: a PIL image, an array (H, W) or (H, W, 1|3|4), a file path or an http(s) URL, or a list of
                them.
            prompts: for one image, a phrase or a list of phrases; for a list of images, one such entry per
                image. (Example-image prompts need the PyTorch model: the graphs embed phrases only.)
            batch_size: images per run of the graphs.

        Returns:
            one float32 array `[K, height, width]` per image, K its number of phrases, values in [0, 1].
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        phrase_lists = _phrase_lists(prompts, len(images), single)
        pil_images = [_rgb_image(image, f"images[{i}]") for i, image in enumerate(images)]
        maps = []
        for start in range(0, len(pil_images), batch_size):
            chunk = slice(start, start + batch_size)
            maps.extend(self._predict_chunk(pil_images[chunk], phrase_lists[chunk]))
        return maps

    def _predict_chunk(self, images: list[Image.Image], phrase_lists: list[list[str]]) -> list[np.ndarray]:
        size = self.image_size
        pixels = self.processor.image_processor(
            images=images, size={"height": size, "width": size}, return_tensors="np"
        )["pixel_values"]
        phrases = [phrase for phrase_list in phrase_lists for phrase in phrase_list]
        tokens = self.processor.tokenizer(
            phrases, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="np"
        )
        image_index = np.array([i for i, phrase_list in enumerate(phrase_lists) for _ in phrase_list])
        logits = self.logits(pixels, tokens["input_ids"], tokens["attention_mask"], image_index)
        maps, offset = [], 0
        for image, phrase_list in zip(images, phrase_lists):
            own = logits[offset : offset + len(phrase_list)]
            offset += len(phrase_list)
            maps.append(sigmoid(resize_bilinear(own, image.height, image.width)))
        return maps


def _phrase_lists(prompts: Any, num_images: int, single: bool) -> list[list[str]]:
    """One list of phrases per image, refused as `predict()` refuses them (and example images, which the
    graphs cannot embed)."""
    lists = [prompts] if single else list(prompts)
    if len(lists) != num_images:
        raise ValueError(f"got {num_images} images but {len(lists)} prompt lists: give one per image")
    lists = [list(p) if isinstance(p, (list, tuple)) else [p] for p in lists]
    if not lists or any(not p for p in lists):
        raise ValueError("every image needs at least one prompt")
    for i, phrase_list in enumerate(lists):
        for k, phrase in enumerate(phrase_list):
            name = f"prompts[{k}]" if single else f"prompts[{i}][{k}]"
            if not isinstance(phrase, str) or phrase.startswith(("http://", "https://")):
                raise ValueError(f"{name}: the ONNX graphs take phrases only; example images need PyTorch")
            if not phrase.strip():
                raise ValueError(f"{name} is an empty phrase: give a phrase")
    return lists


def _rgb_image(image: Any, name: str) -> Image.Image:
    """A PIL RGB image from an image of any mode, an array as `predict()` takes it, or a file path or http(s)
    URL (turned upright by its EXIF orientation, as `predict()` does)."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        from transformers.image_utils import load_image

        image = load_image(image, timeout=URL_TIMEOUT_SECONDS)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{name}: {path} is not a file")
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # a copy: the file is closed on return
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"{name}: expected an array (H, W) or (H, W, 3|4), got shape {array.shape}")
    if array.dtype != np.uint8:  # floats in [0, 1], as predict() reads them
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def resize_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[K, h, w]` -> `[K, height, width]`, as PyTorch's `interpolate(mode="bilinear")` (half-pixel centres,
    no antialiasing), which `predict()` uses."""
    rows_low, rows_high, rows_frac = _bilinear_sources(maps.shape[1], height)
    rows = maps[:, rows_low] * (1 - rows_frac)[:, None] + maps[:, rows_high] * rows_frac[:, None]
    cols_low, cols_high, cols_frac = _bilinear_sources(maps.shape[2], width)
    return rows[:, :, cols_low] * (1 - cols_frac) + rows[:, :, cols_high] * cols_frac


def _bilinear_sources(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the two input positions it lies between and its weight on the second."""
    scale = np.float32(size_in / size_out)  # float32 throughout: PyTorch's source positions to the last bit
    centres = np.arange(size_out, dtype=np.float32) + np.float32(0.5)
    source = np.maximum(centres * scale - np.float32(0.5), 0)
    low = np.minimum(source.astype(np.int64), size_in - 1)
    return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # no overflow warning for large negative logits

    return expit(logits).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# The exporter (PyTorch)
# ----------------------------------------------------------------------------------------------------------


def export(
    model_source: str,
    output: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    quantize: Sequence[str] = ("int8",),
) -> Path:
    """Write the model's graphs to the new folder `output` (see the module's docstring); a failed export leaves
    no folder. Raises `CommandError` for a folder that holds files, a model that does not load, or graphs the
    installed onnxruntime cannot run."""
    output = Path(output)
    check_output(output)
    _require_onnx()
    model, processor = load_model(model_source)
    logger.info(f"exporting {model_source} to ONNX (opset {opset})")
    inputs = example_inputs(model, processor)
    with atomic_folder(output) as staging:
        graphs = {"fp32": write_graphs(model, inputs, staging, opset)}
        for precision in quantize:
            graphs[precision] = QUANTIZERS[precision](staging)
        settings = export_settings(model, model_source, opset, graphs)
        write_settings(staging, settings)
        settings["logits_relative_difference"] = check_parity(model, inputs, staging, graphs)
        write_settings(staging, settings)
        processor.save_pretrained(staging)
    return output


def write_settings(folder: Path, settings: dict[str, Any]) -> None:
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def check_output(output: Path) -> None:
    if output.is_dir() and any(output.iterdir()):
        raise CommandError(f"--output {output} already holds files: give a new or empty folder")
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {output} is a file: give a new or empty folder")


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise CommandError(
            f"the export needs onnx and onnxruntime ({error}): pip install -e '.[onnx]'"
        ) from error


def load_model(model_source: str) -> tuple[Any, Any]:
    """The model in float32 on the CPU, in inference mode, and its processor."""
    import torch

    from .predict_command import load_model as load_for_prediction
    from .sources import model_source_problem

    problem = model_source_problem(model_source)
    if problem:
        raise CommandError(f"--model {model_source} {problem}")
    model, processor = load_for_prediction(model_source, torch.device("cpu"))
    return model.float().eval(), processor


def graph_modules(model: Any) -> dict[str, Any]:
    """The three graphs as modules to trace, each calling the model's own methods (so that they compute what
    PyTorch computes, speed machinery included)."""
    import torch

    side = model.config.image_size // model.config.vision_config.patch_size

    class Graph(torch.nn.Module):
        def __init__(self, run: Any):
            super().__init__()
            self.model = model  # its weights become the graph's initializers
            self.run = run

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.run(*inputs)

    def decoder(activations: torch.Tensor, embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return model.decoder(list(activations.unbind(0)), embeddings, index, (side, side))

    modules = {
        "vision": Graph(lambda pixel_values: torch.stack(model.vision_activations(pixel_values))),
        "text": Graph(model.text_embeddings),
        "decoder": Graph(decoder),
    }
    # The exporter restores each module's mode afterwards; a module left in training mode would put the
    # model's decoder in it (dropout) for whatever runs next.
    return {part: module.eval() for part, module in modules.items()}


def example_inputs(model: Any, processor: Any) -> dict[str, tuple]:
    """Inputs to trace each graph with: 2 images, 3 prompts (distinct sizes, so that no axis is mistaken for
    another); also the parity check's inputs."""
    import torch

    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # Cut to the text tower's length as the runner does: a longer row would trace the model's own cutting,
    # which no fed input needs.
    limit = model.config.text_config.max_position_embeddings
    tokens = processor.tokenizer(
        list(EXAMPLE_PHRASES), padding=True, truncation=True, max_length=limit, return_tensors="pt"
    )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    image_index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        activations = torch.stack(model.vision_activations(pixels))
        embeddings = model.text_embeddings(ids, mask)
    return {
        "vision": (pixels,),
        "text": (ids, mask),
        "decoder": (activations, embeddings, image_index),
    }


def write_graphs(model: Any, inputs: dict[str, tuple], folder: Path, opset: int) -> dict[str, str]:
    """The fp32 graphs, traced by PyTorch's TorchScript exporter on `inputs`; their file names by part."""
    import torch

    files = {}
    for part, module in graph_modules(model).items():
        input_names, output_names, dynamic_axes = GRAPHS[part]
        files[part] = graph_file(part, "fp32")
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns of each Python condition on a shape (text length against the tower's limit and
            # the like): each holds for every length the runner feeds, which the tests run at other lengths.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript exporter is deprecated (and says so twice per graph), but the dynamo exporter
            # would need onnxscript, and this one traces these graphs as they are.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", "Exporting aten::index", UserWarning)  # no negative indices fed
            torch.onnx.export(
                module,
                inputs[part],
                str(folder / files[part]),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
    return files


def quantize_int8(folder: Path) -> dict[str, str]:
    """Dynamic int8 quantisation: weights of the matrix products stored as int8, activations quantised at run
    time (no calibration images needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {}
    # The quantiser logs every tensor it skips on the root logger, and advises its shape pre-processing, which
    # made these graphs neither faster nor closer to fp32 when measured.
    logging_module.disable(logging_module.WARNING)
    try:
        for part in PARTS:
            files[part] = graph_file(part, "int8")
            source, target = folder / graph_file(part, "fp32"), folder / files[part]
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    finally:
        logging_module.disable(logging_module.NOTSET)
    return files


def convert_fp16(folder: Path) -> dict[str, str]:
    """Half-precision weights and computation, float32 inputs and outputs (the runner feeds the same arrays)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    files = {}
    for part in PARTS:
        files[part] = graph_file(part, "fp16")
        graph = onnx.load(str(folder / graph_file(part, "fp32")))
        onnx.save(convert_float_to_float16(graph, keep_io_types=True), str(folder / files[part]))
    return files


QUANTIZERS = {"int8": quantize_int8, "fp16": convert_fp16}


def check_parity(
    model: Any, inputs: dict[str, tuple], folder: Path, graphs: dict[str, dict]
) -> dict[str, float]:
    """Each precision's logits against PyTorch's on the example inputs, as the largest difference relative to
    the largest logit; an fp32 export beyond `FP32_LIMIT`, or graphs onnxruntime cannot load, are refused."""
    import torch

    pixels, (ids, mask), image_index = inputs["vision"][0], inputs["text"], inputs["decoder"][2]
    with torch.no_grad():
        expected = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, image_index=image_index)
    expected = expected.logits.numpy()
    parity = {}
    for precision in graphs:
        runner = _runner(folder, precision)
        got = runner.logits(pixels.numpy(), ids.numpy(), mask.numpy(), image_index.numpy())
        parity[precision] = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
        logger.info(f"{precision} graphs: logits within {parity[precision]:.1e} of PyTorch's (relative)")
    if parity["fp32"] > FP32_LIMIT:
        raise CommandError(
            f"the exported fp32 graphs' logits differ from PyTorch's by {parity['fp32']:.1e} (relative, more "
            f"than {FP32_LIMIT:g}): this model does not export correctly",
            FAILED,
        )
    return parity


def _runner(folder: Path, precision: str) -> OnnxClipSeg:
    """A runner on the folder being written: an opset the installed onnxruntime lacks is found here."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    try:
        return OnnxClipSeg(folder, precision)
    except (state.Fail, state.InvalidGraph, state.NotImplemented, state.InvalidProtobuf) as error:
        raise CommandError(
            f"onnxruntime {ort.__version__} cannot load the {precision} graphs ({str(error).splitlines()[0]}): "
            "export with another --opset, or install a newer onnxruntime"
        ) from error


def export_settings(model: Any, source: str, opset: int, graphs: dict[str, dict]) -> dict[str, Any]:
    """What `OnnxClipSeg` reads, and what the folder was made from."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    config = model.config
    return {
        "format": FORMAT_VERSION,
        "source": source,
        "image_size": config.image_size,
        "max_text_length": config.text_config.max_position_embeddings,
        "opset": opset,
        "graphs": graphs,
        "logits_relative_difference": None,  # measured once the graphs are written
        "inputs": {part: list(GRAPHS[part][0]) for part in PARTS},
        "outputs": {part: list(GRAPHS[part][1]) for part in PARTS},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "model_config": config.to_dict(),
    }


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m clipseg_tools.onnx_export", description=DESCRIPTION)
    parser.add_argument(
        "--model",
        required=True,
        metavar="FOLDER_OR_HUB_ID",
        help="a model of ours or a CIDAS checkpoint (e.g. CIDAS/clipseg-rd64-refined)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="a new (or empty) folder")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET}"
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=["int8"],
        choices=["none", *QUANTIZERS],
        help="copies besides the fp32 graphs (always written): int8 (dynamic quantisation, *_int8.onnx), "
        "fp16 (*_fp16.onnx), or none",
    )
    args = parser.parse_args(argv)
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(f"--opset must lie in {MIN_OPSET}..{MAX_OPSET} (PyTorch's TorchScript exporter)")
    if "none" in args.quantize and len(args.quantize) > 1:
        parser.error("--quantize none means the fp32 graphs alone: give it without int8 or fp16")
    args.quantize = [kind for kind in dict.fromkeys(args.quantize) if kind != "none"]
    return args


def run(argv: list[str] | None = None) -> Path:
    """The command without its error policy (`main` adds it)."""
    args = parse_args(argv)
    setup_logging()
    folder = export(args.model, args.output, opset=args.opset, quantize=args.quantize)
    written = ", ".join(sorted(path.name for path in folder.glob("*.onnx")))
    logger.info(f"{written} and the processor in {folder}/")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when the folder is written, 2 with one sentence for bad input, 1 when the export failed."""
    run_command(lambda: run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
