"""Export a CLIPSeg model to ONNX: graphs for onnxruntime (`clipseg_tools.onnx_runtime` runs them without
PyTorch), or the layout transformers.js loads in the browser.

    python -m clipseg_tools.onnx_export --model demo_output --output demo_onnx
    python -m clipseg_tools.onnx_export --model CIDAS/clipseg-rd64-refined --output rd64_onnx --quantize int8 fp16
    python -m clipseg_tools.onnx_export --model demo_output --output demo_web --target transformers.js

For onnxruntime (`--target onnxruntime`, the default) the model runs as four graphs, as it does in PyTorch, so
that one image serves many prompts:
- `vision.onnx`: pixel_values `[I, 3, S, S]` -> activations `[L, I, 1 + (S / patch)^2, width]`, the outputs of
  the L extracted vision blocks, shallowest first (the tower stops after the last of them);
- `text.onnx`: input_ids, attention_mask `[P, T]` -> conditional_embeddings `[P, projection_dim]`;
- `image_prompt.onnx`: conditional_pixel_values `[P, 3, S, S]` (example images) -> conditional_embeddings
  `[P, projection_dim]` (the whole vision tower and its projection);
- `decoder.onnx`: activations, conditional_embeddings, image_index `[P]` (the image each prompt reads) ->
  logits `[P, S, S]`.
I, P and T are dynamic (T up to the text tower's length: `OnnxClipSeg` truncates as `predict()` does); the
image side S is fixed at the model's `config.image_size`, the size `predict()` and the evaluation use.

With `--quantize int8` (the default) each graph also gets a dynamically quantised copy, `*_int8.onnx` (int8
weights, activations quantised at run time); with `fp16` a half-precision one, `*_fp16.onnx` (float32 inputs
and outputs, for runtimes with fast half-precision kernels: a GPU, WebGPU). Beside them: the processor the
model was saved with, and `onnx_config.json` (the graphs, input size, text length, the model's config, and
the differences from PyTorch measured at export).

For transformers.js (`--target transformers.js`) the model is one graph, as its `CLIPSegForImageSegmentation`
runs it: `onnx/model.onnx` (input_ids, attention_mask `[P, T]`, pixel_values `[I, 3, S, S]` -> logits
`[P, S, S]`; I is 1, every prompt reading that image, or P, prompt k reading image k),
`onnx/model_quantized.onnx` (int8) and `onnx/model_fp16.onnx`, beside a transformers `CLIPSegConfig`
(config.json), the processor's files and a model card.
"""

from __future__ import annotations

import argparse
import json
import logging as logging_module
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from .cli import ArgumentParser, run_command, setup_logging
from .errors import FAILED, CommandError
from .files import atomic_folder
from .hub import hub_access_problem, push_folder
from .onnx_runtime import PARTS, SETTINGS_FILE, OnnxClipSeg, graph_file

logger = logging.get_logger(__name__)

FORMAT_VERSION = 2
# The exporter's opsets: scaled_dot_product_attention needs 14; the TorchScript exporter stops at 20.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 14, 20, 17
# Beyond this relative difference from PyTorch's logits an fp32 export is wrong, not rounded: it is refused.
FP32_LIMIT = 1e-3
# The phrases whose token ids trace the text graph (any in-vocabulary ones would do).
EXAMPLE_PHRASES = ("a photo", "something", "the background of the picture")
DESCRIPTION = (
    "Export a model to ONNX: vision.onnx (the vision tower up to its last extracted block), text.onnx (the "
    "phrase embeddings) and decoder.onnx, so that one image serves many prompts, with dynamic image, prompt "
    "and token counts and the image size fixed at the model's config.image_size; with its processor and "
    f"{SETTINGS_FILE}, read by clipseg_tools.onnx_runtime.OnnxClipSeg (onnxruntime, no PyTorch)."
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
    "image_prompt": (
        ("conditional_pixel_values",),
        ("conditional_embeddings",),
        {"conditional_pixel_values": {0: "prompts"}, "conditional_embeddings": {0: "prompts"}},
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


# ----------------------------------------------------------------------------------------------------------
# The exporter (PyTorch)
# ----------------------------------------------------------------------------------------------------------


def export(
    model_source: str,
    output: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    quantize: Sequence[str] = ("int8",),
    target: str = "onnxruntime",
    recorded_source: str | None = None,
) -> Path:
    """Write the model's graphs to the new folder `output` for `target` ("onnxruntime" or "transformers.js", see
    the module's docstring); a failed export leaves no folder. Raises `CommandError` for a folder that holds
    files, a model that does not load, or graphs the installed onnxruntime cannot run. `recorded_source`: the
    model's name in the folder's settings and card (default: `model_source`)."""
    output = Path(output)
    check_output(output)
    _require_onnx()
    model, processor = load_model(model_source)
    logger.info(f"exporting {model_source} to ONNX for {target} (opset {opset})")
    inputs = example_inputs(model, processor)
    with atomic_folder(output) as staging, refusals(model_source):
        if target == "transformers.js":
            from .web_export import write_card, write_transformers_js

            parity = write_transformers_js(model, processor, inputs, staging, opset, list(quantize))
            write_card(staging, output.name, recorded_source or model_source, parity)
        else:
            source = recorded_source or model_source
            write_runtime_folder(model, processor, source, inputs, staging, opset, quantize)
    return output


@contextmanager
def refusals(model_source: str) -> Iterator[None]:
    """What PyTorch's exporter (or a config) raises for a model it cannot trace, in one sentence."""
    import torch

    try:
        yield
    except (torch.onnx.errors.OnnxExporterError, torch.jit.Error, ValueError, NotImplementedError) as error:
        first_line = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
        raise CommandError(
            f"--model {model_source} could not be exported to ONNX: {first_line}", FAILED
        ) from error


def write_runtime_folder(model, processor, source: str, inputs, folder: Path, opset: int, quantize) -> None:
    """The graphs for `OnnxClipSeg`, their quantised copies, the processor and the settings."""
    graphs = {"fp32": write_graphs(model, inputs, folder, opset)}
    for precision in quantize:
        graphs[precision] = QUANTIZERS[precision](folder)
    settings = export_settings(model, source, opset, graphs)
    write_settings(folder, settings)
    settings["relative_difference"] = check_parity(model, inputs, folder, graphs)
    write_settings(folder, settings)
    processor.save_pretrained(folder)


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
    if model.has_clip_adapter:  # a LoRA adapter folded into CLIP: plain graphs, as fast as the model's own
        model.merge_clip_adapter()
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
        "image_prompt": Graph(model.image_embeddings),
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
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    examples = torch.randn(3, 3, size, size, generator=generator)
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
        "image_prompt": (examples,),
        "decoder": (activations, embeddings, image_index),
    }


def write_graphs(model: Any, inputs: dict[str, tuple], folder: Path, opset: int) -> dict[str, str]:
    """The fp32 graphs, traced by PyTorch's TorchScript exporter on `inputs`; their file names by part."""
    files = {}
    with fixed_position_embeddings(model):
        for part, module in graph_modules(model).items():
            files[part] = graph_file(part, "fp32")
            export_graph(module, inputs[part], folder / files[part], GRAPHS[part], opset)
    return files


@contextmanager
def fixed_position_embeddings(model: Any) -> Iterator[None]:
    """While tracing, the vision tower's position embeddings at the graphs' one image size, as a constant.
    Traced as they are, CLIP's embeddings resize the pre-training grid (bicubic) at every run, since the
    tracer keeps the image size dynamic: a tenth of the vision graph's time at 352 px on a CPU."""
    import torch

    embeddings = model.clip.vision_model.embeddings
    size = model.config.image_size
    tokens = 1 + (size // model.config.vision_config.patch_size) ** 2
    with torch.no_grad():
        dummy = torch.zeros(1, tokens, embeddings.embed_dim, dtype=embeddings.position_embedding.weight.dtype)
        fixed = embeddings.interpolate_pos_encoding(dummy, size, size).clone()
    embeddings.interpolate_pos_encoding = lambda _embeddings, height, width: fixed
    try:
        yield
    finally:
        del embeddings.interpolate_pos_encoding  # the class's method again


def export_graph(module: Any, inputs: tuple, path: Path, names: tuple, opset: int) -> None:
    """One module traced on `inputs` into an ONNX file; `names`: its input names, output names, dynamic axes."""
    import torch

    input_names, output_names, dynamic_axes = names
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
            inputs,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )


def quantize_int8(folder: Path) -> dict[str, str]:
    """Dynamic int8 quantisation: weights of the matrix products stored as int8, activations quantised at run
    time (no calibration images needed)."""
    files = {}
    for part in PARTS:
        files[part] = graph_file(part, "int8")
        quantize_file(folder / graph_file(part, "fp32"), folder / files[part], signed=True)
    return files


def quantize_file(source: Path, target: Path, signed: bool) -> None:
    """`source` quantised dynamically into `target`, with int8 (`signed`) or uint8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs every tensor it skips on the root logger, and advises its shape pre-processing, which
    # made these graphs neither faster nor closer to fp32 when measured.
    logging_module.disable(logging_module.WARNING)
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8 if signed else QuantType.QUInt8)
    finally:
        logging_module.disable(logging_module.NOTSET)


def convert_fp16(folder: Path) -> dict[str, str]:
    """Half-precision weights and computation, float32 inputs and outputs (the runner feeds the same arrays)."""
    files = {}
    for part in PARTS:
        files[part] = graph_file(part, "fp16")
        fp16_file(folder / graph_file(part, "fp32"), folder / files[part])
    return files


def fp16_file(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = onnx.load(str(source))
    onnx.save(convert_float_to_float16(graph, keep_io_types=True), str(target))


QUANTIZERS = {"int8": quantize_int8, "fp16": convert_fp16}
TARGETS = ("onnxruntime", "transformers.js")


def check_parity(
    model: Any, inputs: dict[str, tuple], folder: Path, graphs: dict[str, dict]
) -> dict[str, dict[str, float]]:
    """Each precision's logits, and its example images' embeddings, against PyTorch's on the example inputs,
    as the largest difference relative to the largest value; an fp32 export beyond `FP32_LIMIT`, or graphs
    onnxruntime cannot load, are refused."""
    import torch

    pixels, (ids, mask), image_index = inputs["vision"][0], inputs["text"], inputs["decoder"][2]
    examples = inputs["image_prompt"][0]
    with torch.no_grad():
        expected = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, image_index=image_index)
        expected_examples = model.image_embeddings(examples).numpy()
    expected = expected.logits.numpy()
    parity = {"logits": {}, "image_prompt_embeddings": {}}
    for precision in graphs:
        runner = _runner(folder, precision)
        got = runner.logits(pixels.numpy(), ids.numpy(), mask.numpy(), image_index.numpy())
        parity["logits"][precision] = relative_difference(got, expected)
        got = runner.image_embeddings(examples.numpy())
        parity["image_prompt_embeddings"][precision] = relative_difference(got, expected_examples)
        logger.info(
            f"{precision} graphs: logits within {parity['logits'][precision]:.1e} of PyTorch's, example-image "
            f"embeddings within {parity['image_prompt_embeddings'][precision]:.1e} (relative)"
        )
    worst = max(parity["logits"]["fp32"], parity["image_prompt_embeddings"]["fp32"])
    if worst > FP32_LIMIT:
        raise CommandError(
            f"the exported fp32 graphs differ from PyTorch by {worst:.1e} (relative, more than {FP32_LIMIT:g}): "
            "this model does not export correctly",
            FAILED,
        )
    return parity


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference relative to the largest expected magnitude."""
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))


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
        "relative_difference": None,  # from PyTorch's, measured once the graphs are written
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
    parser.add_argument(
        "--target",
        default="onnxruntime",
        choices=TARGETS,
        help="onnxruntime: four graphs for clipseg_tools.onnx_runtime (one image, many prompts); "
        "transformers.js: onnx/model.onnx (+ model_quantized.onnx, model_fp16.onnx), config.json and the "
        "processor, as transformers.js loads CLIPSeg in the browser",
    )
    parser.add_argument(
        "--push_to_hub",
        metavar="NAMESPACE/NAME",
        help="upload the written folder to this model repository (created if needed)",
    )
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repository private")
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
    if args.push_to_hub:
        problem = hub_access_problem(token=None)
        if problem:
            raise CommandError(f"--push_to_hub: {problem}")
    folder = export(args.model, args.output, opset=args.opset, quantize=args.quantize, target=args.target)
    written = ", ".join(sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.onnx")))
    logger.info(f"{written} and the processor in {folder}/")
    if args.push_to_hub:
        files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
        url = push_folder(
            folder,
            args.push_to_hub,
            files=files,
            what="The export",
            private=args.hub_private_repo,
            commit_message=f"Upload ONNX export ({args.target}) made with clipseg-finetune",
        )
        logger.info(f"Pushed {folder} to {url}")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when the folder is written, 2 with one sentence for bad input, 1 when the export failed."""
    run_command(lambda: run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
