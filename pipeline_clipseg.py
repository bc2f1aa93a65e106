"""An `image-segmentation` pipeline for CLIPSeg models: what a phrase (or an example image) names, in each image.

Saved next to every model of this project (with `modeling_clipseg_custom.py`), so that

    from transformers import pipeline
    segmenter = pipeline("image-segmentation", model="you/model", trust_remote_code=True)
    segmenter("photo.jpg", prompts=["a cat", "the sky"])

returns what transformers' image-segmentation pipelines return: per image a list of
`{"label": prompt, "score": float, "mask": PIL image at the image's own size}`, one per prompt. CIDAS
checkpoints and saved `CLIPSegForImageSegmentation` folders load into the same pipeline with
`clipseg_pipeline("CIDAS/clipseg-rd64-refined")`.

Images and example-image prompts may be PIL images, arrays, file paths or URLs; all prompts of an image share
one vision pass (`ClipSegCustomModel.predict`), and the masks are exactly `predict()`'s maps. `score` is the
map's highest probability: a prompt whose object is absent from the image scores low everywhere, so callers can
drop prompts below a score. Options:
- `threshold=0.3`: binary masks (255 where the probability exceeds it); `threshold=None`: the probability map
  itself as an 8-bit image (0-255);
- `multiclass=True`: one map for all the prompts, each pixel given to the prompt of highest probability, none
  where no prompt passes `threshold`; each prompt's mask is then its share of that map (masks do not overlap);
- `batch_size`: images per forward pass.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch
from PIL import Image
from transformers import Pipeline

try:  # as a file next to the weights (trust_remote_code), or as the project's top-level module
    from .modeling_clipseg_custom import ClipSegCustomModel, read_prompt, to_rgb_image
except ImportError:
    from modeling_clipseg_custom import ClipSegCustomModel, read_prompt, to_rgb_image

TASK = "image-segmentation"
DEFAULT_BATCH_SIZE = 8  # images per forward pass, unless the pipeline or the call says otherwise
DEFAULT_THRESHOLD = 0.3  # the project's evaluation threshold (the official PhraseCut protocol's)


class ClipSegSegmentationPipeline(Pipeline):
    """Text- and image-prompted segmentation with a CLIPSeg model (see the module's docstring)."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        prompts: Any = None,
        threshold: Any = "default",
        multiclass: bool | None = None,
        batch_size: int | None = None,
        **unused: Any,
    ) -> tuple[dict, dict, dict]:
        if unused:
            raise TypeError(f"unexpected arguments {sorted(unused)}: give prompts=, threshold=, multiclass=")
        preprocess = {} if prompts is None else {"prompts": prompts}
        postprocess = {}
        if threshold != "default":
            postprocess["threshold"] = threshold
        if multiclass is not None:
            postprocess["multiclass"] = multiclass
        return preprocess, {}, postprocess

    def __call__(self, images: Any, prompts: Any = None, batch_size: int | None = None, **kwargs: Any) -> Any:
        """Per image (or for one image) the list of `{"label", "score", "mask"}`, one per prompt. Arguments given
        when the pipeline was made (`prompts`, `threshold`, `multiclass`, `batch_size`) hold unless the call
        gives others. `images` may be one image or a list, a generator or a data set of them; they are read a
        batch at a time."""
        preprocess, _, postprocess = self._sanitize_parameters(prompts=prompts, **kwargs)
        preprocess = {**self._preprocess_params, **preprocess}
        options = {**self._postprocess_params, **postprocess}
        if preprocess.get("prompts") is None:
            raise ValueError('give the prompts: segmenter(image, prompts=["a cat", "the sky"])')
        prompt_list = check_prompts(preprocess["prompts"])
        size = max(1, batch_size or self._batch_size or DEFAULT_BATCH_SIZE)
        single = is_one_image(images)
        sources = iter([images] if single else images)
        results, position = [], 0
        while chunk := list(itertools.islice(sources, size)):
            loaded = [to_rgb_image(image, f"images[{position + i}]") for i, image in enumerate(chunk)]
            position += len(chunk)
            outputs = self._forward({"images": loaded, "prompts": prompt_list})
            results.extend(self.postprocess(maps, prompt_list, **options) for maps in outputs["maps"])
        return results[0] if single else results

    def preprocess(self, image: Any, prompts: Any = None) -> dict[str, Any]:
        return {"images": [to_rgb_image(image)], "prompts": check_prompts(prompts)}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        images, prompts = model_inputs["images"], model_inputs["prompts"]
        with torch.inference_mode():
            maps = self.model.predict(images, [prompts] * len(images), processor=self.processor)
        return {"maps": maps}

    def postprocess(
        self,
        maps: torch.Tensor,
        prompts: list,
        threshold: float | None = DEFAULT_THRESHOLD,
        multiclass: bool = False,
    ) -> list[dict[str, Any]]:
        """`maps` [K, H, W] probabilities of one image -> one `{"label", "score", "mask"}` per prompt."""
        scores = maps.flatten(1).max(dim=1).values.tolist()
        if multiclass:
            masks = list(multiclass_masks(maps, DEFAULT_THRESHOLD if threshold is None else threshold))
        elif threshold is None:
            masks = [(m * 255).round().to(torch.uint8) for m in maps]
        else:
            masks = [(m > threshold).to(torch.uint8) * 255 for m in maps]
        return [
            {
                "label": prompt_label(prompt, k),
                "score": score,
                "mask": Image.fromarray(mask.numpy(), mode="L"),
            }
            for k, (prompt, score, mask) in enumerate(zip(prompts, scores, masks, strict=True))
        ]


def is_one_image(images: Any) -> bool:
    """One image (a PIL image, an array, a path or URL), not a collection of them."""
    return isinstance(images, Image.Image | str | bytes | os.PathLike | torch.Tensor) or hasattr(
        images, "__array__"
    )


def multiclass_masks(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """[K, H, W] probabilities -> [K, H, W] uint8 masks that do not overlap: each pixel belongs to the prompt of
    highest probability, or to none where no prompt's probability exceeds `threshold`."""
    best, winner = maps.max(dim=0)
    owned = torch.arange(maps.shape[0])[:, None, None] == winner[None]
    return ((owned & (best > threshold)[None]).to(torch.uint8)) * 255


def check_prompts(prompts: Any) -> list:
    """A list of prompts: phrases (an empty one is refused, naming its position) and example images (PIL
    images, arrays, `Path`s or URLs)."""
    prompt_list = list(prompts) if isinstance(prompts, list | tuple) else [prompts]
    if not prompt_list:
        raise ValueError("give at least one prompt")
    checked = [read_prompt(prompt, f"prompts[{k}]") for k, prompt in enumerate(prompt_list)]
    return [p if isinstance(p, str) else to_rgb_image(p, f"prompts[{k}]") for k, p in enumerate(checked)]


def prompt_label(prompt: Any, position: int) -> str:
    return prompt if isinstance(prompt, str) else f"example image {position}"


def clipseg_pipeline(
    model: str | ClipSegCustomModel,
    device: Any = None,
    dtype: Any = None,
    backend: str = "pytorch",
    precision: str = "fp32",
) -> Any:
    """The pipeline for any CLIPSeg model: a folder or Hub id of this project's, a CIDAS checkpoint, or a saved
    `CLIPSegForImageSegmentation` (those two load into the project's model, weight for weight).

    With `backend="onnxruntime"`, `model` is an export folder, or a model folder or Hub repository holding
    its graphs in `onnx/`; the call and its output are the same (`clipseg_tools.onnx_runtime.OnnxSegmenter`,
    `precision` "fp32", "int8" or "fp16")."""
    if backend == "onnxruntime":
        from clipseg_tools.onnx_runtime import OnnxSegmenter

        return OnnxSegmenter(model, precision=precision)
    if backend != "pytorch":
        raise ValueError(f"backend={backend!r}: give 'pytorch' or 'onnxruntime'")
    from transformers import AutoProcessor

    loaded = ClipSegCustomModel.from_pretrained(model) if isinstance(model, str) else model
    processor = AutoProcessor.from_pretrained(model if isinstance(model, str) else loaded.config.name_or_path)
    if dtype is not None:
        loaded = loaded.to(dtype)
    return ClipSegSegmentationPipeline(model=loaded.eval(), processor=processor, device=device, task=TASK)
