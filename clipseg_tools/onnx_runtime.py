"""Run a model exported by `clipseg_tools.onnx_export` with onnxruntime, numpy, Pillow and the processor: no
PyTorch.

    from clipseg_tools.onnx_runtime import OnnxClipSeg, OnnxSegmenter
    maps = OnnxClipSeg("demo_onnx").predict("street.jpg", ["a red car", "the sky"])
    segmenter = OnnxSegmenter("demo_onnx", precision="int8")
    segmenter("street.jpg", prompts=["a red car", "the sky"])  # the pipeline's [{"label", "score", "mask"}]

`OnnxClipSeg.predict` gives the maps `ClipSegCustomModel.predict` gives, for phrases and example images, with
the same pre- and post-processing; `OnnxSegmenter` gives what the project's image-segmentation pipeline gives.
`onnx_folder(source)` finds the graphs: an export folder, a model folder holding one in `onnx/` (what
`run_train.py --export_onnx` saves), or a Hub id whose repository holds `onnx/`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

SETTINGS_FILE = "onnx_config.json"
PARTS = ("vision", "text", "image_prompt", "decoder")
PRECISIONS = ("fp32", "int8", "fp16")
# How long `predict` waits for an image given by URL, as the PyTorch model's.
URL_TIMEOUT_SECONDS = 30.0


def graph_file(part: str, precision: str) -> str:
    return f"{part}.onnx" if precision == "fp32" else f"{part}_{precision}.onnx"


# ----------------------------------------------------------------------------------------------------------
# The runner: onnxruntime, numpy and the processor, no PyTorch
# ----------------------------------------------------------------------------------------------------------


class OnnxClipSeg:
    """The exported graphs of a model, run with onnxruntime.

    Example:

    ```python
    >>> from clipseg_tools.onnx_runtime import OnnxClipSeg
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
            # The graphs run one after another, each session with its own threads: threads left spinning
            # after their graph would take the cores from the next one (measured: 3.1 -> 3.3-3.7 images/s
            # for one image and one prompt at 352 px on 2 vCPUs).
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Folders of the first format have no image_prompt graph: they take phrases only.
        self.sessions = {
            part: ort.InferenceSession(
                str(self.folder / files[part]), sess_options=session_options, providers=providers
            )
            for part in PARTS
            if part in files
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

    def image_embeddings(self, conditional_pixel_values: np.ndarray) -> np.ndarray:
        """`[P, 3, S, S]` normalised example images -> `[P, projection_dim]` conditional embeddings."""
        if "image_prompt" not in self.sessions:
            raise ValueError(
                f"{self.folder} has no image_prompt graph (an export of an earlier version): export the model "
                "again to use example images"
            )
        feeds = {"conditional_pixel_values": np.ascontiguousarray(conditional_pixel_values, dtype=np.float32)}
        return self.sessions["image_prompt"].run(None, feeds)[0]

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
        """Probability maps per prompt at each image's original size, as `ClipSegCustomModel.predict`.

        Args:
            images: a PIL image, an array (H, W) or (H, W, 1|3|4), a file path or an http(s) URL, or a list of
                them.
            prompts: for one image, a phrase or example image, or a list of them; for a list of images, one
                such entry per image. An example image is a PIL image, an array, a `Path` or an http(s) URL;
                any other string is a phrase.
            batch_size: images per run of the graphs.

        Returns:
            one float32 array `[K, height, width]` per image, K its number of prompts, values in [0, 1].
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        prompt_lists = _prompt_lists(prompts, len(images), single)
        pil_images = [_rgb_image(image, f"images[{i}]") for i, image in enumerate(images)]
        maps = []
        for start in range(0, len(pil_images), batch_size):
            chunk = slice(start, start + batch_size)
            maps.extend(self._predict_chunk(pil_images[chunk], prompt_lists[chunk]))
        return maps

    def pixel_values(self, images: list[Image.Image]) -> np.ndarray:
        """The processor's normalised pixels at the graphs' image size, `[I, 3, S, S]`."""
        size = self.image_size
        return self.processor.image_processor(
            images=images, size={"height": size, "width": size}, return_tensors="np"
        )["pixel_values"]

    def embed_prompts(self, prompts: list) -> np.ndarray:
        """Phrases through the text graph, example images (PIL) through the image_prompt graph, in order."""
        texts = [k for k, prompt in enumerate(prompts) if isinstance(prompt, str)]
        examples = [k for k, prompt in enumerate(prompts) if not isinstance(prompt, str)]
        parts = []
        if texts:
            tokens = self.processor.tokenizer(
                [prompts[k] for k in texts],
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="np",
            )
            parts.append(self.text_embeddings(tokens["input_ids"], tokens["attention_mask"]))
        if examples:
            parts.append(self.image_embeddings(self.pixel_values([prompts[k] for k in examples])))
        embeddings = np.concatenate(parts)
        return embeddings[np.argsort(texts + examples, kind="stable")]

    def _predict_chunk(self, images: list[Image.Image], prompt_lists: list[list]) -> list[np.ndarray]:
        prompts = [prompt for prompt_list in prompt_lists for prompt in prompt_list]
        image_index = np.array([i for i, prompt_list in enumerate(prompt_lists) for _ in prompt_list])
        activations = self.vision_activations(self.pixel_values(images))
        logits = self.decode(activations, self.embed_prompts(prompts), image_index)
        maps, offset = [], 0
        for image, prompt_list in zip(images, prompt_lists):
            own = logits[offset : offset + len(prompt_list)]
            offset += len(prompt_list)
            maps.append(sigmoid(resize_bilinear(own, image.height, image.width)))
        return maps


def _prompt_lists(prompts: Any, num_images: int, single: bool) -> list[list]:
    """One list of prompts per image, each a phrase or a PIL RGB example image, refused as `predict()` refuses
    them."""
    lists = [prompts] if single else list(prompts)
    if len(lists) != num_images:
        raise ValueError(f"got {num_images} images but {len(lists)} prompt lists: give one per image")
    lists = [list(p) if isinstance(p, (list, tuple)) else [p] for p in lists]
    if not lists or any(not p for p in lists):
        raise ValueError("every image needs at least one prompt")
    return [
        [_prompt(prompt, f"prompts[{k}]" if single else f"prompts[{i}][{k}]") for k, prompt in enumerate(p)]
        for i, p in enumerate(lists)
    ]


def _prompt(prompt: Any, name: str) -> Any:
    """A phrase (refused when empty), or an example image: a `Path`, an http(s) URL, a PIL image or an array."""
    if isinstance(prompt, str) and not _is_url(prompt):
        if not prompt.strip():
            raise ValueError(f"{name} is an empty phrase: give a phrase or an example image")
        return prompt
    return _rgb_image(prompt, name)


def _is_url(text: str) -> bool:
    """As `modeling_clipseg_custom.is_url`: the scheme and no spaces."""
    return text.startswith(("http://", "https://")) and not any(c.isspace() for c in text)


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
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)  # a copy: the file is closed on return
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise ValueError(f"{name}: {path} could not be read as an image ({error})") from error
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
# The pipeline's sibling: the same call and the same output, on onnxruntime
# ----------------------------------------------------------------------------------------------------------

DEFAULT_THRESHOLD = 0.3  # the pipeline's: the project's evaluation threshold


class OnnxSegmenter:
    """What `pipeline("image-segmentation", model=..., trust_remote_code=True)` gives for a model of this
    project, on its exported graphs: per image a list of `{"label", "score", "mask"}`, one per prompt, with the
    pipeline's options (`threshold`, `None` for probabilities, `multiclass`, `batch_size`) and masks (equal to
    the pipeline's up to pixels whose probability lies within onnxruntime's rounding of the threshold).

    Example:

    ```python
    >>> segmenter = OnnxSegmenter("demo_onnx", precision="int8")
    >>> segmenter("shapes.png", prompts=["red circle", "blue square"])[0]["label"]
    'red circle'
    ```
    """

    def __init__(self, source: str | os.PathLike | OnnxClipSeg, precision: str = "fp32", **options: Any):
        self.model = (
            source if isinstance(source, OnnxClipSeg) else OnnxClipSeg(onnx_folder(source), precision)
        )
        self.options = options

    def __call__(self, images: Any, prompts: Any = None, **options: Any) -> Any:
        options = {**self.options, **options}
        prompts = options.pop("prompts", None) if prompts is None else prompts
        if prompts is None:
            raise ValueError('give the prompts: segmenter(image, prompts=["a cat", "the sky"])')
        batch_size = options.pop("batch_size", None) or 8
        threshold = options.pop("threshold", DEFAULT_THRESHOLD)
        multiclass = options.pop("multiclass", False)
        if options:
            raise TypeError(f"unexpected arguments {sorted(options)}: give prompts=, threshold=, multiclass=")
        prompt_list = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        if not prompt_list:
            raise ValueError("give at least one prompt")
        single = is_one_image(images)
        image_list = [images] if single else list(images)  # a list, a generator or a data set of images
        all_maps = self.model.predict(image_list, [prompt_list] * len(image_list), batch_size=batch_size)
        results = [segments(maps, prompt_list, threshold, multiclass) for maps in all_maps]
        return results[0] if single else results


def segments(
    maps: np.ndarray, prompts: list, threshold: float | None, multiclass: bool
) -> list[dict[str, Any]]:
    """`[K, H, W]` probabilities of one image -> one `{"label", "score", "mask"}` per prompt, as the pipeline's
    postprocess."""
    scores = maps.reshape(len(maps), -1).max(axis=1).tolist()
    if multiclass:
        masks = multiclass_masks(maps, DEFAULT_THRESHOLD if threshold is None else threshold)
    elif threshold is None:
        masks = (maps * 255).round().astype(np.uint8)
    else:
        masks = (maps > threshold).astype(np.uint8) * 255
    return [
        {
            "label": prompt if isinstance(prompt, str) and not _is_url(prompt) else f"example image {k}",
            "score": score,
            "mask": Image.fromarray(mask, mode="L"),
        }
        for k, (prompt, score, mask) in enumerate(zip(prompts, scores, masks, strict=True))
    ]


def is_one_image(images: Any) -> bool:
    """One image (a PIL image, an array, a path or URL), not a collection of them: as the pipeline decides."""
    return isinstance(images, (Image.Image, str, bytes, os.PathLike)) or hasattr(images, "__array__")


def multiclass_masks(maps: np.ndarray, threshold: float) -> np.ndarray:
    """`[K, H, W]` probabilities -> `[K, H, W]` uint8 masks that do not overlap: each pixel belongs to the prompt
    of highest probability, or to none where no prompt's probability exceeds `threshold`."""
    winner = maps.argmax(axis=0)
    owned = (np.arange(len(maps))[:, None, None] == winner[None]) & (maps.max(axis=0) > threshold)[None]
    return owned.astype(np.uint8) * 255


# ----------------------------------------------------------------------------------------------------------
# Where the graphs are
# ----------------------------------------------------------------------------------------------------------

SUBFOLDER = "onnx"  # where a model folder (or its Hub repository) keeps its graphs


def onnx_folder(source: str | os.PathLike) -> Path:
    """The folder of exported graphs for `source`: an export folder, a model folder with one in `onnx/`, or
    a Hub id whose repository holds `onnx/` (downloaded, or found in the local cache). A ValueError says
    what was looked for."""
    path = Path(source)
    for candidate in (path, path / SUBFOLDER):
        if (candidate / SETTINGS_FILE).is_file():
            return candidate
    if path.exists():
        raise ValueError(
            f"{source} holds no exported graphs ({SETTINGS_FILE} neither there nor in {SUBFOLDER}/): export "
            f"the model with `python -m clipseg_tools.onnx_export --model MODEL --output FOLDER`, or train "
            "with --export_onnx"
        )
    return _hub_onnx_folder(str(source))


def _hub_onnx_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    if str(repo_id).count("/") != 1:
        raise ValueError(f"{repo_id} is neither a folder nor a Hub id (namespace/name)")
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[f"{SUBFOLDER}/*"]))
    except Exception as error:  # no network, no such repository, no access: each its own type
        raise ValueError(f"{repo_id}: its exported graphs could not be downloaded ({error})") from error
    folder = snapshot / SUBFOLDER
    if not (folder / SETTINGS_FILE).is_file():
        raise ValueError(
            f"the Hub repository {repo_id} holds no exported graphs ({SUBFOLDER}/{SETTINGS_FILE}): push them "
            "with `run_train.py --export_onnx --push_to_hub`, or export the model yourself"
        )
    return folder
