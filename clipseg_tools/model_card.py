"""The model card (`README.md`) written next to a trained model, with its results as Hub `model-index`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# Metric keys of the CLIPSeg paper protocol shown on the card, with their display names.
CARD_METRICS = {
    "miou_0.3": "mIoU (t=0.3)",
    "fgiou_0.3": "foreground IoU (t=0.3)",
    "ap": "AP",
    "miou_best": "mIoU (best t)",
    "fgiou_best": "foreground IoU (best t)",
    # Semantic and COCO data: the multi-class map (argmax over the class prompts), `evaluate`'s mean_iou names.
    "class_map_mean_iou": "multi-class map mean IoU",
    "class_map_mean_accuracy": "multi-class map mean accuracy",
    "class_map_overall_accuracy": "multi-class map overall accuracy",
}

ATTRIBUTION = """\
## Attribution

- Model: CLIPSeg, T. Lüddecke and A. Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022
  (arXiv:2112.10003).
- Data: {data}
- Starting weights: {base_model}. The `CIDAS/clipseg-*` weights were released by the CLIPSeg authors for
  research use; the MIT licence of the code does not cover them.
"""


# Flags whose values are places on the trainer's machine: left off the card, which is published.
LOCAL_PLACES = ("output_dir", "cache_dir", "resume_from_checkpoint", "hub_token", "card_notes")
# Flags that name a model or data set: a Hub id stays, a local folder is shown by its own name only.
SOURCES = ("model_name_or_path", "clip_model_name_or_path", "data_dir", "dataset_name")


PHRASECUT = """PhraseCut, C. Wu, Z. Lin, S. Cohen, T. Bui and S. Maji, "PhraseCut: Language-based Image \
Segmentation in the Wild", CVPR 2020, built on Visual Genome (annotations CC BY 4.0; images under their own terms)."""


def public_name(source: str | None) -> str | None:
    """What a reader can make sense of: a Hub id as it is, a local file or folder by its own name (never the
    trainer's file system)."""
    if source is None or not Path(source).exists() and not Path(source).is_absolute():
        return source
    return Path(source).name


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The training configuration as the card shows it: no local places, sources by their public names."""
    shown = {key: value for key, value in config.items() if key not in LOCAL_PLACES}
    for key in SOURCES:
        if shown.get(key):
            shown[key] = public_name(shown[key])
    return shown


def eval_results(
    metrics: dict[str, float], dataset_name: str, split: str, phrasecut: bool = True
) -> list[EvalResult]:
    return [
        EvalResult(
            task_type="image-segmentation",
            task_name="Referring expression segmentation" if phrasecut else "Text-prompted segmentation",
            dataset_type=dataset_name.lower(),
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=key.replace(".", "_"),
            metric_name=label,
            metric_value=round(float(metrics[key]), 4),
        )
        for key, label in CARD_METRICS.items()
        if key in metrics and metrics[key] == metrics[key]  # skip NaN
    ]


ONNX_SECTION = """
Without PyTorch, with onnxruntime: the graphs in `onnx/` (fp32, and int8 at about twice the speed on a CPU),
run by the clipseg-finetune project's `OnnxSegmenter` (same call, same output) or its predict command:

```python
from clipseg_tools.onnx_runtime import OnnxSegmenter

segmenter = OnnxSegmenter("{model_name}", precision="int8")
segmenter("photo.jpg", prompts=["a red car", "the sky"])
```
"""


def write_model_card(
    output_dir: str | Path,
    model_name: str,
    base_model: str,
    dataset_name: str,
    eval_split: str,
    metrics: dict[str, float],
    training_config: dict[str, Any],
    notes: str = "",
    eval_scope: str = "",
    phrasecut: bool = True,
    onnx: bool = False,
    trained: str = "",
) -> Path:
    """Write `output_dir/README.md` with metadata (incl. model-index), usage, config and attribution; with
    `onnx`, how to run the graphs saved in onnx/.

    `eval_split` is the split's name (the metadata's); `eval_scope` says in the text how much of it was scored.
    Local paths in `base_model`, `dataset_name` and `training_config` are shown by their own names only."""
    base_model, dataset_name = public_name(base_model), public_name(dataset_name)
    training_config = public_config(training_config)
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=["clipseg", "image-segmentation", "referring-expression-segmentation", "custom_code"],
        datasets=[dataset_name] if "/" in dataset_name else None,
        base_model=base_model if "/" in base_model else None,
        eval_results=eval_results(metrics, dataset_name, eval_split, phrasecut) or None,
    )
    rows = "\n".join(
        f"| {label} | {metrics[key]:.4f} |" for key, label in CARD_METRICS.items() if key in metrics
    )
    results = f"| metric | value |\n|---|---|\n{rows}" if rows else "No evaluation was run."
    config_json = json.dumps(training_config, indent=2, sort_keys=True, default=str)
    # e.g. "500 images, 1,234 phrases": in the text only, the metadata takes the split's name
    scope = f", {eval_scope}" if eval_scope else ""
    onnx_section = ONNX_SECTION.format(model_name=model_name) if onnx else ""
    content = f"""---
{card_data.to_yaml()}
---

# {model_name}

A CLIPSeg model (frozen CLIP + a small FiLM-conditioned decoder) that segments what a text phrase or an
example image names. Trained with the clipseg-finetune project, starting from `{base_model}`, on
{dataset_name}.

{notes}

{trained}

## Use

```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="{model_name}", trust_remote_code=True)
for found in segmenter("photo.jpg", prompts=["a red car", "the sky"]):
    print(found["label"], found["score"])  # score: the highest probability (low when absent)
    found["mask"].save(f"{{found['label']}}.png")  # at the photo's size; threshold=None gives probabilities
# multiclass=True: one map, each pixel to the prompt of highest probability (none below the threshold)
```

or the model's own `predict()`:

```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{model_name}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{model_name}", trust_remote_code=True)
maps = model.predict(Image.open("photo.jpg"), ["a red car", "the sky"], processor=processor)
# maps[0]: [2, height, width] probabilities at the photo's size
```
{onnx_section}
## Evaluation ({dataset_name}, split `{eval_split}`{scope}, CLIPSeg paper protocol)

{results}

## Training configuration

```json
{config_json}
```

{ATTRIBUTION.format(base_model=base_model, data=PHRASECUT if phrasecut else f"{dataset_name} (see its own card)")}"""
    path = Path(output_dir) / "README.md"
    ModelCard(content).save(path)
    return path
