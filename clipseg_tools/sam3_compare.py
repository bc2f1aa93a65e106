"""SAM 3 scored beside CLIPSeg models: `run_eval.py --compare sam3:facebook/sam3`.

SAM 3 (transformers' `Sam3Model`) answers a text prompt with instances: DETR-style queries, each with a
detection score and a mask. The evaluation scores one probability map per (image, phrase), as CLIPSeg makes
it; `Sam3Compare` turns the instances into that map behind the project's forward signature, so `evaluate`,
the multi-class maps and the failure gallery run SAM 3 unchanged.

What SAM 3 sees: the evaluation loader squashes every image to the model's `config.image_size`, which here is
SAM 3's own input size (1008 in transformers' default SAM 3 configuration). SAM 3 therefore gets each image
squashed straight from its original size to its input square (bilinear: by PIL here, by torchvision in its
processor), as its own processor makes it, and not an upscaled copy of a smaller CLIPSeg input. The cost: the
CLIPSeg paper protocol counts SAM 3's pixels at that size where a CLIPSeg model's are counted at its own (352
for the CIDAS checkpoints), as for any two models of different sizes; the official protocol scores every model
at the original size.

SAM 3's image processor needs torchvision, which this project does not install; its arithmetic on a picture
already at its size (rescale to [0, 1], normalise with its mean and std) is done here on the device, from
the settings saved with the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from modeling_clipseg_custom import IMAGENET_MEAN, IMAGENET_STD

from .errors import CommandError
from .sources import load_error, looks_local

SAM3_PREFIX = "sam3:"
# A saved `Sam3Model` says "sam3"; a checkpoint of the video model, tracker included, says "sam3_video" (and
# `Sam3Model` loads its detector, leaving the tracker out).
SAM3_MODEL_TYPES = ("sam3", "sam3_video")
# Prompts run through SAM 3's detector and mask decoder at once: each carries its image's repeated feature
# pyramid (about 0.2 GB at 1008 pixels in float32), so a batch's prompts go in slices of this many.
PROMPTS_PER_PASS = 16
# Probabilities are turned into logits for the evaluation, which applies the sigmoid again: clamped this far
# from 0 and 1, so a map that is exactly 0 or 1 gives finite logits.
PROBABILITY_EPS = 1e-6


def sam3_source_problem(source: str) -> str | None:
    """Why a local folder is not a SAM 3 model (its config.json names another model type), in a few words;
    None when it is one, or when `source` is a Hub id (checked when it is loaded)."""
    config = Path(source) / "config.json"
    if not looks_local(source) or not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        return f"has a config.json that cannot be read ({error})"
    return None if model_type in SAM3_MODEL_TYPES else _not_sam3(model_type)


def _not_sam3(model_type: Any) -> str:
    """The words for a config.json of another model type."""
    expected = " or ".join(repr(t) for t in SAM3_MODEL_TYPES)
    return f"is not a SAM 3 model (its config.json says model_type {model_type!r}, SAM 3's says {expected})"


class Sam3Compare(torch.nn.Module):
    """A `Sam3Model` behind our forward signature: one probability map per phrase, as logits [P, S, S].

    The map of a phrase is the pixel-wise maximum, over SAM 3's instance queries, of (instance score x mask
    probability), where the score is SAM 3's own (query probability x presence probability, as its
    `post_process_instance_segmentation` computes it before its threshold). Why this union rather than the
    masks of the instances above a detection threshold: it is a probability at every pixel that falls with
    the detection's confidence, so the 49-threshold sweep and AP rank pixels by both confidences, and no
    detection threshold of our choosing is built into the map (a pixel passes a threshold t only inside an
    instance scored above t: the sweep runs over the detection threshold too). The maximum, not a noisy-or,
    because DETR-style queries repeat an object at low scores and a noisy-or would add the repeats up. SAM
    3's semantic map (`semantic_seg`) is not used: the presence score, the part of SAM 3 that says whether
    the phrase is in the image at all, does not weigh it.
    """

    def __init__(
        self,
        model: Any,
        image_mean: list[float],
        image_std: list[float],
        input_size: tuple[int, int],
        prompts_per_pass: int = PROMPTS_PER_PASS,
    ):
        super().__init__()
        self.model = model
        self.input_size = input_size
        self.prompts_per_pass = prompts_per_pass
        # The loader normalises every model's pixels with CLIPSeg's constants (`transforms.normalize_pixels`):
        # undone here, then SAM 3's normalisation applied.
        for name, values in (
            ("clip_mean", IMAGENET_MEAN),
            ("clip_std", IMAGENET_STD),
            ("sam3_mean", image_mean),
            ("sam3_std", image_std),
        ):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)
        self.config = argparse.Namespace(text_config=model.config.text_config, image_size=max(input_size))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor,
    ) -> SimpleNamespace:
        # The vision tower runs once per image; each phrase then takes its image's features.
        vision = self.model.get_vision_features(pixel_values=self.sam3_pixels(pixel_values))
        maps = [
            self.phrase_maps(vision, image_index[start:end], input_ids[start:end], attention_mask[start:end])
            for start, end in slices(len(input_ids), self.prompts_per_pass)
        ]
        probs = torch.cat(maps).float()[:, None]
        # Bilinear, as SAM 3's post-processing resizes its masks; after the union here, which is cheaper than
        # resizing every query's mask and differs only where the strongest instance changes from one mask
        # pixel to the next.
        probs = F.interpolate(probs, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return SimpleNamespace(logits=torch.logit(probs, eps=PROBABILITY_EPS))

    def sam3_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The loader's normalised pixels as SAM 3's processor would give them."""
        pixels = pixel_values.float() * self.clip_std + self.clip_mean  # back to [0, 1]
        if tuple(pixels.shape[-2:]) != self.input_size:  # only for a processor with a size that is not square
            pixels = F.interpolate(pixels, size=self.input_size, mode="bilinear", align_corners=False)
        return (pixels - self.sam3_mean) / self.sam3_std

    def phrase_maps(
        self, vision: Any, image_index: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Union maps [n, h, w] at SAM 3's mask resolution for n phrases of the images `vision` encoded.

        The phrases are padded to the longest, not to 32 tokens as SAM 3's processor pads them: the attention
        mask keeps the padding out of every layer (checked: the outputs agree to float rounding)."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        repeated = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(level[image_index] for level in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(level[image_index] for level in vision.fpn_position_encoding),
        )
        output = self.model(vision_embeds=repeated, input_ids=input_ids, attention_mask=attention_mask)
        scores = output.pred_logits.sigmoid()
        if output.presence_logits is not None:
            scores = scores * output.presence_logits.sigmoid()
        return (scores[:, :, None, None] * output.pred_masks.sigmoid()).amax(dim=1)


def slices(total: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive slices of at most `size` out of `total` items."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def load_sam3(source: str, device: torch.device, flag: str) -> tuple[Sam3Compare, SimpleNamespace]:
    """The wrapped model and a stand-in processor holding SAM 3's tokenizer (the evaluation tokenises the
    phrases with it) from a folder or Hub id; `flag` names the argument in errors."""
    from transformers import AutoTokenizer, PreTrainedConfig, Sam3Model
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        config, _ = PreTrainedConfig.get_config_dict(source)
        if config.get("model_type") not in SAM3_MODEL_TYPES:  # it would load as a SAM 3 of random weights
            raise CommandError(f"{flag} {_not_sam3(config.get('model_type'))}")
        model = Sam3Model.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        settings, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError, KeyError) as error:
        raise load_error(f"{flag} is not a loadable SAM 3 model", source, error) from error
    size = settings.get("size") or {}
    input_size = (
        int(size.get("height", model.config.image_size)),
        int(size.get("width", model.config.image_size)),
    )
    wrapped = Sam3Compare(
        model,
        settings.get("image_mean", [0.5, 0.5, 0.5]),  # SAM 3's image processor's defaults
        settings.get("image_std", [0.5, 0.5, 0.5]),
        input_size,
    )
    return wrapped.to(device).eval(), SimpleNamespace(tokenizer=tokenizer)
