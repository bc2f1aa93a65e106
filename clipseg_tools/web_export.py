"""The transformers.js layout of a model: what `CLIPSegForImageSegmentation.from_pretrained` loads in the browser.

    python -m clipseg_tools.onnx_export --model demo_output --output demo_web --target transformers.js

transformers.js runs CLIPSeg as one graph. The folder holds:
- `onnx/model.onnx`: input_ids, attention_mask `[P, T]`, pixel_values `[I, 3, S, S]` -> logits `[P, S, S]`. I is
  1 (every prompt reads that image: one image, many phrases, as transformers.js' CLIPSeg example feeds it) or
  P (prompt k reads image k, as transformers' `CLIPSegForImageSegmentation` pairs them);
- `onnx/model_quantized.onnx` (weights uint8, dynamic quantisation, the converter's usual choice for the
  browser's runtime) and `onnx/model_fp16.onnx`, as `--quantize` asks;
- config.json (a transformers `CLIPSegConfig`: transformers.js knows `model_type: clipseg`, not this project's
  own), the processor's files and README.md (the card, with the JavaScript that runs it).
The graph computes what the project's model computes (vision tower to its last extracted block, text tower,
decoder): its logits are checked against PyTorch's before the folder gets its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.utils import logging

from .errors import FAILED, CommandError

logger = logging.get_logger(__name__)

SUBFOLDER = "onnx"
FILES = {"fp32": "model.onnx", "int8": "model_quantized.onnx", "fp16": "model_fp16.onnx"}
NAMES = (
    ("input_ids", "attention_mask", "pixel_values"),
    ("logits",),
    {
        "input_ids": {0: "prompts", 1: "tokens"},
        "attention_mask": {0: "prompts", 1: "tokens"},
        "pixel_values": {0: "images"},
        "logits": {0: "prompts"},
    },
)


def whole_model(model: Any) -> Any:
    """The model as one module of transformers.js' inputs: prompt k reads image k modulo the image count."""
    import torch

    side = model.config.image_size // model.config.vision_config.patch_size

    class WholeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, pixel_values):
            # Traced as shape arithmetic, not as numbers: the prompt and image counts stay dynamic.
            prompt_index = torch.ones_like(input_ids[:, 0]).cumsum(0) - 1
            image_index = prompt_index % torch._shape_as_tensor(pixel_values)[0]
            activations = model.vision_activations(pixel_values)
            embeddings = model.text_embeddings(input_ids, attention_mask)
            return model.decoder(activations, embeddings, image_index, (side, side))

    return WholeModel().eval()


def write_transformers_js(
    model: Any, processor: Any, inputs: dict[str, tuple], folder: Path, opset: int, quantize: list[str]
) -> dict[str, float]:
    """Write the layout into `folder` (empty, being written); returns each precision's logits' relative
    difference from PyTorch's."""
    from .onnx_export import export_graph, fixed_position_embeddings, fp16_file, quantize_file

    graphs = folder / SUBFOLDER
    graphs.mkdir()
    ids, mask = inputs["text"]
    pixels = inputs["vision"][0][:1]
    with fixed_position_embeddings(model):
        export_graph(whole_model(model), (ids, mask, pixels), graphs / FILES["fp32"], NAMES, opset)
    if "int8" in quantize:
        quantize_file(graphs / FILES["fp32"], graphs / FILES["int8"], signed=False)
    if "fp16" in quantize:
        fp16_file(graphs / FILES["fp32"], graphs / FILES["fp16"])
    # The graph computes the model's own head: the config tells transformers.js the model type, and may name
    # a refined head stock CLIPSeg cannot build (patch 8), since no weights are loaded from it.
    model.config.to_clipseg_config(check_head=False).save_pretrained(folder)
    # The graph takes the model's image size only: a processor saved with another size (a stale
    # preprocessor_config.json) would feed it images it cannot take.
    size = model.config.image_size
    processor.image_processor.size = {"height": size, "width": size}
    processor.save_pretrained(folder)
    # transformers.js reads the image settings from preprocessor_config.json, which transformers 5 folds into
    # processor_config.json unless the image processor is saved on its own.
    processor.image_processor.save_pretrained(folder)
    return check_parity(model, inputs, graphs, ["fp32", *quantize])


def check_parity(
    model: Any, inputs: dict[str, tuple], graphs: Path, precisions: list[str]
) -> dict[str, float]:
    """Each graph's logits against PyTorch's, fed as transformers.js feeds them (by input name), for one image
    read by every prompt and for images paired with prompts."""
    import onnxruntime as ort
    import torch

    from .onnx_export import FP32_LIMIT, relative_difference

    ids, mask = inputs["text"]
    pixels = inputs["vision"][0]
    cases = []  # (pixel_values, image_index)
    cases.append((pixels[:1], torch.zeros(len(ids), dtype=torch.long)))
    paired = pixels[torch.arange(len(ids)) % len(pixels)]
    cases.append((paired, torch.arange(len(ids))))
    parity = {}
    for precision in precisions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(graphs / FILES[precision]), options, providers=["CPUExecutionProvider"]
        )
        worst = 0.0
        for case_pixels, image_index in cases:
            with torch.no_grad():
                expected = model(
                    pixel_values=case_pixels, input_ids=ids, attention_mask=mask, image_index=image_index
                ).logits.numpy()
            feeds = {
                "input_ids": ids.numpy(),
                "attention_mask": mask.numpy(),
                "pixel_values": case_pixels.numpy(),
            }
            got = session.run(["logits"], {name.name: feeds[name.name] for name in session.get_inputs()})[0]
            worst = max(worst, relative_difference(got, expected))
        parity[precision] = worst
        logger.info(f"onnx/{FILES[precision]}: logits within {worst:.1e} of PyTorch's (relative)")
    if parity["fp32"] > FP32_LIMIT:
        raise CommandError(
            f"the exported graph's logits differ from PyTorch's by {parity['fp32']:.1e} (relative, more than "
            f"{FP32_LIMIT:g}): this model does not export correctly",
            FAILED,
        )
    return parity


def write_card(folder: Path, name: str, source: str, parity: dict[str, float]) -> None:
    """README.md: what the folder (to be called `name`) is and the JavaScript that runs it."""
    hub_id = source if source.count("/") == 1 and not Path(source).exists() else None
    front = ["---", "library_name: transformers.js", "pipeline_tag: image-segmentation", "tags:"]
    front += ["- clipseg", "- onnx", "- image-segmentation"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front.append("---")
    kinds = {"fp32": "float32", "int8": "8-bit, uint8 weights", "fp16": "float16"}
    files = ", ".join(
        f"`onnx/{FILES[p]}` ({kinds[p]}, logits within {d:.1e} of PyTorch's)" for p, d in parity.items()
    )
    body = f"""
# {hub_id or name} for transformers.js

ONNX weights of {f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else "a CLIPSeg model"} in the layout
transformers.js loads: {files}. Exported with clipseg-finetune
(`python -m clipseg_tools.onnx_export --target transformers.js`).

```js
import {{ AutoTokenizer, AutoProcessor, CLIPSegForImageSegmentation, RawImage }} from "@huggingface/transformers";

const repo = "{hub_id or "you/this-repository"}";
const tokenizer = await AutoTokenizer.from_pretrained(repo);
const processor = await AutoProcessor.from_pretrained(repo);
const model = await CLIPSegForImageSegmentation.from_pretrained(repo);

const texts = ["a red circle", "the background"];
const textInputs = tokenizer(texts, {{ padding: true, truncation: true }});
const imageInputs = await processor(await RawImage.read("photo.jpg"));
const {{ logits }} = await model({{ ...textInputs, ...imageInputs }});  // [prompts, size, size]
```

Feed one image (every phrase reads it) or as many images as phrases (phrase k reads image k). The
probabilities are `sigmoid(logits)`; the project scores masks at 0.3.
"""
    (Path(folder) / "README.md").write_text("\n".join(front) + "\n" + body, encoding="utf-8")
