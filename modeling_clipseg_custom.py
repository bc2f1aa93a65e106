"""CLIPSeg as a transformers `PreTrainedModel`: a frozen CLIP and a ~1.1M-parameter decoder.

Reference: T. Lüddecke and A. Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022.

Read top to bottom, in the order of the architecture: the output type, the decoder's blocks, the decoder,
the model (loading and freezing, the forward pass, `predict`, export to transformers' stock
`CLIPSegForImageSegmentation`), the processor, and last the speed machinery (compiled towers and CUDA
graphs, the in-place activation of the frozen towers, the patch convolutions as matrix products).

What differs from transformers' `CLIPSegForImageSegmentation` (same weights, the same logits within float
rounding):
- the vision tower runs once per image, however many prompts that image has (`image_index`), and stops
  after the last extracted block;
- a new refined head upsamples by the patch size for any patch size (transformers' fits only patch 16; a
  checkpoint imported from it keeps its geometry);
- the decoder has the original's dropout for training;
- non-square inputs work (the token grid is taken from the input size);
- prompts can mix a phrase with an example image for some prompts only (`visual_index`, the paper's PC+);
- the frozen CLIP can compute in bf16 outside autocast (`cast_backbone`), and the towers and the decoder can
  be compiled, with CUDA graphs too (`compile_backbone`, `compile_decoder`);
- no host-device synchronisation in the forward pass when `image_index` is already on the accelerator.

State-dict keys are exactly those of the CIDAS checkpoints (`clip.*`, `decoder.*`). This file imports only
from `configuration.py` (relatively, as `trust_remote_code` needs), torch, transformers, numpy and Pillow
(`predict` takes PIL images, arrays, file paths and URLs).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

try:  # as remote code (a package made by transformers) or imported from the project's root
    from .configuration import ClipSegCustomConfig
except ImportError:
    from configuration import ClipSegCustomConfig

# CLIPSeg normalises with the ImageNet statistics (not CLIP's own), as does the processor of the CIDAS
# checkpoints.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The image-segmentation pipeline, saved next to the weights when it lies next to this file.
PIPELINE_FILE = "pipeline_clipseg.py"
# A LoRA adapter on CLIP, saved beside the weights in its own folder, as peft saves an adapter of a CLIPModel
# (`PeftModel.from_pretrained(clip, "<model>/clip_adapter")` loads it too); `from_pretrained` applies it. Not at the
# top level: transformers would take a top-level adapter_config.json for an adapter of this whole model.
ADAPTER_FOLDER = "clip_adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # the keys' prefix in peft's saved adapters (PeftModel's own names)
# How long `predict` waits for an image or example image given by URL.
URL_TIMEOUT_SECONDS = 30.0
# What `compile_backbone` and `compile_decoder` compile: methods of the model instance.
COMPILED_METHODS = {"backbone": ("_vision_blocks", "_text_features"), "decoder": ("_decode",)}


@dataclass
class ClipSegCustomOutput(ModelOutput):
    """Output of `ClipSegCustomModel.forward`.

    Args:
        loss: binary cross-entropy with logits against `labels`, when given.
        logits: `[P, H, W]` per-pixel logits, one map per prompt, at the input resolution.
        conditional_embeddings: `[P, projection_dim]` the FiLM conditioning used for each prompt.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    conditional_embeddings: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# The decoder's blocks
# ----------------------------------------------------------------------------------------------------------


class DecoderAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (the CIDAS key layout)."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden)), heads(self.k_proj(hidden)), heads(self.v_proj(hidden))
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class DecoderMLP(nn.Module):
    def __init__(self, width: int, intermediate: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(hidden))))


class DecoderBlock(nn.Module):
    """Post-norm transformer block, as PyTorch's `nn.TransformerEncoderLayer` used by the original CLIPSeg."""

    def __init__(self, config: ClipSegCustomConfig):
        super().__init__()
        width, dropout = config.reduce_dim, config.decoder_dropout
        self.self_attn = DecoderAttention(width, config.decoder_num_attention_heads, dropout)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = DecoderMLP(width, config.decoder_intermediate_size, dropout)
        self.layer_norm2 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.layer_norm1(hidden + self.dropout(self.self_attn(hidden)))
        return self.layer_norm2(hidden + self.dropout(self.mlp(hidden)))


def build_head(config: ClipSegCustomConfig) -> nn.Module:
    """The upsampling head: token grid [P, D, h, w] -> one logit map [P, 1, h * s, w * s], s the product of its
    strides (the patch size, unless imported from a transformers checkpoint with another geometry)."""
    width, patch = config.reduce_dim, config.vision_config.patch_size
    if not config.use_complex_transposed_convolution:
        return PatchTransposedConv2d(width, 1, stride=patch)
    first, second = config.refined_head_strides
    return nn.Sequential(
        nn.Conv2d(width, width, kernel_size=3, padding=1),
        nn.ReLU(),
        PatchTransposedConv2d(width, width // 2, stride=first),
        nn.ReLU(),
        PatchTransposedConv2d(width // 2, 1, stride=second),
    )


# ----------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------


class ClipSegDecoder(nn.Module):
    """Reads CLIP activations deepest first, FiLM-conditions them on the prompt, and upsamples to logits."""

    def __init__(self, config: ClipSegCustomConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        self.conditional_layer = config.conditional_layer
        self.film_mul = nn.Linear(config.projection_dim, config.reduce_dim)
        self.film_add = nn.Linear(config.projection_dim, config.reduce_dim)
        self.transposed_convolution = build_head(config)
        self.reduces = nn.ModuleList(
            nn.Linear(vision_width, config.reduce_dim) for _ in config.extract_layers
        )
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in config.extract_layers)

    def forward(
        self,
        activations: Sequence[torch.Tensor],
        conditional_embeddings: torch.Tensor,
        image_index: torch.Tensor | None,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """activations: per extracted block (shallowest first) `[I, 1 + h*w, vision_width]`, one row per
        image; conditional_embeddings `[P, projection_dim]`; image_index `[P]` (None: prompt p is image p)."""
        hidden = None
        for i, (activation, reduce, layer) in enumerate(zip(activations[::-1], self.reduces, self.layers)):
            # Reduce per image, then pick rows per prompt: a linear map commutes with the row gather.
            reduced = reduce(activation)
            reduced = reduced if image_index is None else reduced[image_index]
            hidden = reduced if hidden is None else hidden + reduced
            if i == self.conditional_layer:
                scale = self.film_mul(conditional_embeddings).unsqueeze(1)
                shift = self.film_add(conditional_embeddings).unsqueeze(1)
                hidden = scale * hidden + shift
            hidden = layer(hidden)
        tokens = hidden[:, 1:, :].transpose(1, 2)  # drop CLS: [P, D, h*w]
        grid_map = tokens.reshape(tokens.shape[0], tokens.shape[1], *grid)
        return self.transposed_convolution(grid_map).squeeze(1)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class ClipSegCustomModel(PreTrainedModel):
    """CLIPSeg: segment what a text phrase or an example image names, in any number of images.

    The `clip` part is transformers' `CLIPModel`, frozen by the model itself after every load path; only the
    `decoder` trains. Load it from a checkpoint of ours or a CIDAS one (`from_pretrained`), or start a new
    decoder on any CLIP checkpoint (`from_clip`).

    Example:

    ```python
    >>> import torch
    >>> from PIL import Image
    >>> from transformers import AutoModel, AutoProcessor

    >>> model = AutoModel.from_pretrained("you/clipseg-rd64-phrasecut", trust_remote_code=True).eval()
    >>> processor = AutoProcessor.from_pretrained("you/clipseg-rd64-phrasecut", trust_remote_code=True)
    >>> maps = model.predict(Image.open("street.jpg"), ["a red car", "the sky"], processor=processor)
    >>> maps[0].shape  # probabilities per prompt at the photo's own size
    torch.Size([2, 480, 640])

    >>> inputs = processor(text=["a red car", "the sky"], images=[Image.open("street.jpg")], return_tensors="pt",
    ...                    padding=True)
    >>> logits = model(**inputs, image_index=torch.tensor([0, 0])).logits  # one vision pass for both phrases
    ```
    """

    config_class = ClipSegCustomConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPEncoderLayer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings"]
    _supports_sdpa = True
    # The original CLIPSeg checkpoints carry an unused `reduce` layer; CIDAS conversions may keep it.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.reduce\."]

    def __init__(self, config: ClipSegCustomConfig):
        super().__init__(config)
        self.clip = CLIPModel._from_config(
            config.clip_config(), attn_implementation=config._attn_implementation
        )
        for tower, tower_config in (
            (self.clip.vision_model, config.vision_config),
            (self.clip.text_model, config.text_config),
        ):
            if isinstance(getattr(tower.embeddings, "patch_embedding", None), nn.Conv2d):
                tower.embeddings.patch_embedding = PatchConv2d.like(tower.embeddings.patch_embedding)
            if tower_config.hidden_act == "quick_gelu":
                for layer in tower.encoder.layers:
                    layer.mlp.activation_fn = FrozenQuickGELU()
        self.decoder = ClipSegDecoder(config)
        # `register_for_auto_class` records one auto class; segmentation users look for this one too.
        module = __name__.rsplit(".", 1)[-1]
        config.auto_map = {
            **(getattr(config, "auto_map", None) or {}),
            "AutoModelForImageSegmentation": f"{module}.{type(self).__name__}",
        }
        self.post_init()
        self.freeze_backbone()

    # --- weights, freezing, loading ---

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's defaults for the decoder (as the original CLIPSeg); CLIP initialises itself."""
        if isinstance(module, DecoderAttention):
            # nn.MultiheadAttention's init: Xavier over the stacked [3D, D] in-projection, zero biases.
            width = module.q_proj.in_features
            bound = math.sqrt(6.0 / (width + 3 * width))
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                init.uniform_(proj.weight, -bound, bound)
                init.zeros_(proj.bias)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm)):
            module.reset_parameters()

    def freeze_backbone(self) -> None:
        """Freeze CLIP (an adapter on it too). Called after every load path: `from_pretrained` re-creates
        parameters trainable."""
        self.clip.requires_grad_(False)
        self.clip.eval()

    @property
    def backbone_trainable(self) -> bool:
        """Whether any CLIP parameter trains (LoRA, unfrozen blocks): the towers then run with autograd."""
        return any(parameter.requires_grad for parameter in self.clip.parameters())

    def _tower_grad(self) -> Any:
        """No autograd through a frozen CLIP; the caller's mode (training, or no_grad) through a tuned one."""
        return nullcontext() if self.backbone_trainable else torch.no_grad()

    def train(self, mode: bool = True) -> ClipSegCustomModel:
        super().train(mode)
        # A frozen backbone always runs in inference mode; a tuned one trains (its LoRA dropout applies).
        self.clip.train(mode and self.backbone_trainable)
        return self

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """Load a checkpoint of ours, or a CIDAS one (`CIDAS/clipseg-rd64-refined` or a saved
        `CLIPSegForImageSegmentation`; its config is converted), with the backbone frozen; a LoRA adapter saved
        beside the weights (clip_adapter/) is applied."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        adapter = _adapter_folder(source, kwargs) if source is not None else None
        if adapter is not None:
            model.load_clip_adapter(adapter)
        model.freeze_backbone()
        return loaded

    # --- LoRA adapters on CLIP (peft) ---

    def add_clip_adapter(self, lora_config: Any) -> ClipSegCustomModel:
        """Inject peft LoRA layers (a `peft.LoraConfig`, target modules named inside `self.clip`) into CLIP; only
        they train on the backbone."""
        inject_adapter_in_model = _peft("peft").inject_adapter_in_model

        if self.has_clip_adapter:
            raise ValueError(
                "this model already carries a LoRA adapter: merge it first (merge_clip_adapter())"
            )
        inject_adapter_in_model(lora_config, self.clip)
        return self

    @property
    def has_clip_adapter(self) -> bool:
        return bool(_lora_layers(self.clip))

    def load_clip_adapter(self, folder: str | os.PathLike) -> ClipSegCustomModel:
        """Apply the CLIP adapter saved in `folder` (peft's adapter_config.json, adapter_model.safetensors)."""
        from safetensors.torch import load_file

        peft = _peft("peft")
        set_peft_model_state_dict = peft.set_peft_model_state_dict
        self.add_clip_adapter(peft.LoraConfig.from_pretrained(str(folder)))
        weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
        weights = {key.removeprefix(PEFT_PREFIX): value for key, value in weights.items()}
        result = set_peft_model_state_dict(self.clip, weights)
        missing = [key for key in getattr(result, "missing_keys", []) if "lora_" in key]
        if missing or getattr(result, "unexpected_keys", []):
            raise ValueError(
                f"{Path(folder) / ADAPTER_WEIGHTS} does not fit its {ADAPTER_CONFIG} (missing {missing[:3]}, "
                f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]})"
            )
        return self

    def save_clip_adapter(self, save_directory: str | os.PathLike) -> None:
        """Write the CLIP adapter (its config and weights, peft's files) into the folder `save_directory`."""
        from safetensors.torch import save_file

        get_peft_model_state_dict = _peft("peft").get_peft_model_state_dict

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.clip.peft_config["default"].save_pretrained(str(directory))
        weights = {
            PEFT_PREFIX + key: value.detach().contiguous().cpu()
            for key, value in get_peft_model_state_dict(self.clip).items()
        }
        save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    def merge_clip_adapter(self) -> ClipSegCustomModel:
        """Fold the adapter into CLIP's weights (W + scale * B A) and remove its layers, in place: the model
        computes the same with plain layers (and saves, exports and loads without peft)."""
        _unwrap_lora_layers(self.clip, merge=True)
        return self

    def without_clip_adapter(self, merge: bool) -> ClipSegCustomModel:
        """A copy without adapter layers: merged into the weights (`merge=True`), or the weights it started
        from (the copy `save_pretrained` writes beside the adapter's files)."""
        import copy

        plain = copy.deepcopy(self)
        _unwrap_lora_layers(plain.clip, merge=merge)
        return plain

    @classmethod
    def from_clip(cls, clip_name_or_path: str, **config_overrides: Any) -> ClipSegCustomModel:
        """A new model: the weights of any CLIP checkpoint (Hub id or local folder) and a fresh decoder."""
        clip = CLIPModel.from_pretrained(clip_name_or_path)
        from_clip = dict(
            text_config=clip.config.text_config.to_dict(),
            vision_config=clip.config.vision_config.to_dict(),
            projection_dim=clip.config.projection_dim,
            logit_scale_init_value=clip.config.logit_scale_init_value,
        )
        clashes = sorted(set(from_clip) & set(config_overrides))
        if clashes:
            raise ValueError(f"{clashes} come from the CLIP checkpoint and cannot be overridden")
        config = ClipSegCustomConfig(**from_clip, **config_overrides)
        model = cls(config)
        model.clip.load_state_dict(clip.state_dict())
        model.freeze_backbone()
        return model

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """As transformers', refusing a backbone cast apart from the decoder: it would be saved (and reloaded)
        in its training precision, the decoder with it."""
        if self.backbone_dtype != self.decoder_dtype:
            raise ValueError(
                f"the CLIP is {self.backbone_dtype} (cast_backbone) and the decoder {self.decoder_dtype}: save the "
                "trained decoder on the float32 CLIP it started from (reload that and copy model.decoder's "
                "state_dict into it, as run_train.py does), or cast the whole model to one dtype"
            )
        if kwargs.get("push_to_hub"):
            # transformers would upload before the pipeline's file is written next to the weights.
            raise ValueError(
                "save_pretrained(push_to_hub=True) would push the model without its pipeline: save it, then push "
                "with model.push_to_hub(repo_id) (which saves the pipeline with it) or `hf upload`"
            )
        if self.has_clip_adapter:  # the weights it started from, and the adapter beside them in peft's files
            saved = self.without_clip_adapter(merge=False).save_pretrained(*args, **kwargs)
            if kwargs.get("is_main_process", True):
                directory = Path(kwargs.get("save_directory", args[0] if args else "."))
                self.save_clip_adapter(directory / ADAPTER_FOLDER)
            return saved
        saved = super().save_pretrained(*args, **kwargs)
        save_directory = Path(kwargs.get("save_directory", args[0] if args else "."))
        if kwargs.get("is_main_process", True) and (save_directory / ADAPTER_FOLDER).is_dir():
            shutil.rmtree(
                save_directory / ADAPTER_FOLDER
            )  # an earlier save's: it would apply to these weights
        if kwargs.get("is_main_process", True):
            self._save_pipeline(save_directory)
        return saved

    def _save_pipeline(self, save_directory: Path) -> None:
        """The `image-segmentation` pipeline's file next to the weights, and the config entry that makes
        `pipeline("image-segmentation", model=..., trust_remote_code=True)` build it (when the file is beside
        this one: the project's checkout, or a model loaded with it)."""
        source = Path(__file__).with_name(PIPELINE_FILE)
        config_file = save_directory / "config.json"
        config = json.loads(config_file.read_text())
        if (
            not source.is_file()
        ):  # e.g. loaded through trust_remote_code: the config must not name a missing file
            if config.pop("custom_pipelines", None) is not None:
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            return
        shutil.copyfile(source, save_directory / PIPELINE_FILE)
        config["custom_pipelines"] = {
            "image-segmentation": {
                "impl": f"{PIPELINE_FILE.removesuffix('.py')}.ClipSegSegmentationPipeline",
                "pt": ["AutoModel"],
                "type": "multimodal",
            }
        }
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # --- the forward pass ---

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        conditional_pixel_values: torch.Tensor | None = None,
        conditional_embeddings: torch.Tensor | None = None,
        text_weight: torch.Tensor | float | None = None,
        visual_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ClipSegCustomOutput:
        r"""Segment P prompts in I images.

        Args:
            pixel_values: `[I, 3, H, W]` normalised images (H, W multiples of the patch size).
            input_ids, attention_mask: `[P, T]` tokenised phrases.
            conditional_pixel_values: `[P, 3, h, w]` example images (visual prompts), one per prompt; with
                `visual_index`, `[V, 3, h, w]` for the V prompts it names.
            conditional_embeddings: `[P, projection_dim]` precomputed prompt embeddings.
            text_weight: with both phrases and example images, the paper's mix: a prompt's embedding is
                `w * text + (1 - w) * image` (a float, or `[P]`: one weight per prompt).
            visual_index: `[V]` the prompts the example images belong to, when only some prompts have one (the
                paper's PC+ training); the others are their phrase alone.
            image_index: `[P]` which image each prompt belongs to; default: prompt p belongs to image p.
            labels: `[P, H, W]` target masks in [0, 1]; gives the loss.
            loss_mask: `[P, H, W]` bool, the pixels the loss counts (a data set's ignore regions are False);
                default: all of them.
        """
        if kwargs:
            raise TypeError(f"ClipSegCustomModel.forward got unexpected arguments: {sorted(kwargs)}")
        self._check_pixels(pixel_values, "pixel_values")
        # Step 1: the vision tower's activations, once per image, and one conditioning vector per prompt.
        phrases_only = conditional_pixel_values is None and conditional_embeddings is None
        if phrases_only and input_ids is not None and len(input_ids):
            activations, conditional_embeddings = self.tower_features(pixel_values, input_ids, attention_mask)
        else:
            conditional_embeddings = self._conditional_embeddings(
                input_ids,
                attention_mask,
                conditional_pixel_values,
                conditional_embeddings,
                text_weight,
                visual_index,
            )
            activations = self.vision_activations(pixel_values)
        # Step 2: which image each prompt reads; the decoder's precision.
        num_images, num_prompts = pixel_values.shape[0], conditional_embeddings.shape[0]
        image_index = self._check_image_index(image_index, num_images, num_prompts, pixel_values.device)
        if not torch.is_autocast_enabled(pixel_values.device.type):  # e.g. a bf16 backbone, fp32 decoder
            activations = [activation.to(self.decoder_dtype) for activation in activations]
            conditional_embeddings = conditional_embeddings.to(self.decoder_dtype)
        # Step 3: the decoder, once per prompt, and the loss.
        grid = self.token_grid(pixel_values)
        logits, loss = self._decode(activations, conditional_embeddings, image_index, grid, labels, loss_mask)
        return ClipSegCustomOutput(loss=loss, logits=logits, conditional_embeddings=conditional_embeddings)

    def vision_activations(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the extracted vision blocks, `[I, 1 + h*w, width]` each; stops after the last one."""
        with self._tower_grad(), self._backbone_precision(pixel_values.device):
            return self._vision_blocks(pixel_values.to(self.backbone_dtype))

    def _vision_blocks(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        # Apart from vision_activations' no_grad, so that compiling it gives it its own compiled code
        # (no_grad's decorator wrapper would be one code object, and one recompile budget, for both towers).
        vision = self.clip.vision_model
        hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden = vision.pre_layrnorm(hidden)
        wanted = self.config.extract_layers
        found = {}
        for index, block in enumerate(vision.encoder.layers[: wanted[-1] + 1]):
            hidden = block(hidden, None)
            if index in wanted:
                found[index] = hidden
        return [found[index] for index in wanted]

    def text_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CLIP text embeddings `[P, projection_dim]`; phrases longer than the text tower are truncated."""
        input_ids, attention_mask = self._fit_text_length(input_ids, attention_mask)
        with self._tower_grad(), self._backbone_precision(input_ids.device):
            return self._text_features(input_ids, attention_mask)

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def image_embeddings(self, conditional_pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings `[P, projection_dim]` of example images (visual prompts)."""
        self._check_pixels(conditional_pixel_values, "conditional_pixel_values")
        with self._tower_grad(), self._backbone_precision(conditional_pixel_values.device):
            features = self.clip.get_image_features(
                pixel_values=conditional_pixel_values.to(self.backbone_dtype), interpolate_pos_encoding=True
            )
        return features.pooler_output

    def token_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Rows and columns of patch tokens for images of this size."""
        patch = self.config.vision_config.patch_size
        return pixel_values.shape[2] // patch, pixel_values.shape[3] // patch

    def _decode(
        self,
        activations: list[torch.Tensor],
        conditional_embeddings: torch.Tensor,
        image_index: torch.Tensor | None,
        grid: tuple[int, int],
        labels: torch.Tensor | None,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trainable part, one unit for `compile_decoder`: logits `[P, H, W]` and the loss (the mean over
        the pixels `loss_mask` keeps, when given)."""
        logits = self.decoder(activations, conditional_embeddings, image_index, grid)
        if labels is None:
            return logits, None
        if labels.shape != logits.shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)}, the logits {tuple(logits.shape)}")
        if loss_mask is None:
            return logits, F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        if loss_mask.shape != logits.shape:
            raise ValueError(
                f"loss_mask has shape {tuple(loss_mask.shape)}, the logits {tuple(logits.shape)}"
            )
        weight = loss_mask.to(logits.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), weight, reduction="sum"
        )
        return logits, per_pixel / weight.sum().clamp_min(1.0)

    def _conditional_embeddings(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        conditional_pixel_values: torch.Tensor | None,
        conditional_embeddings: torch.Tensor | None,
        text_weight: torch.Tensor | float | None,
        visual_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """One conditioning vector per prompt, from whichever prompts were given."""
        # With visual_index, a batch in which no phrase has an example image brings none: that is fine.
        prompts = (input_ids, conditional_embeddings) + (
            (conditional_pixel_values,) if visual_index is None else ()
        )
        if any(given is not None and len(given) == 0 for given in prompts):
            raise ValueError("the prompt list is empty: give at least one prompt")
        if conditional_embeddings is not None:
            if input_ids is not None or conditional_pixel_values is not None:
                raise ValueError(
                    "pass conditional_embeddings alone, not with input_ids or conditional_pixel_values"
                )
            if (
                conditional_embeddings.ndim != 2
                or conditional_embeddings.shape[1] != self.config.projection_dim
            ):
                raise ValueError(
                    f"conditional_embeddings must be [P, {self.config.projection_dim}], "
                    f"got {tuple(conditional_embeddings.shape)}"
                )
            return conditional_embeddings
        if input_ids is not None and conditional_pixel_values is not None:
            if text_weight is None:
                raise ValueError(
                    "with both input_ids and conditional_pixel_values, give text_weight (the mix)"
                )
            text = self.text_embeddings(input_ids, attention_mask)
            return self._mixed_embeddings(text, conditional_pixel_values, text_weight, visual_index)
        if visual_index is not None:
            raise ValueError("visual_index needs both input_ids and conditional_pixel_values")
        if input_ids is not None:
            return self.text_embeddings(input_ids, attention_mask)
        if conditional_pixel_values is not None:
            return self.image_embeddings(conditional_pixel_values)
        raise ValueError("give a prompt: input_ids, conditional_pixel_values or conditional_embeddings")

    def _mixed_embeddings(
        self,
        text: torch.Tensor,
        examples: torch.Tensor,
        text_weight: torch.Tensor | float,
        visual_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """The paper's mix of phrase and example image, `w * text + (1 - w) * image` in float32: for every prompt,
        or only for the prompts `visual_index` names (its length is a shape, so nothing is read back from the
        device)."""
        weight = torch.as_tensor(text_weight, device=text.device, dtype=torch.float32)
        text = text.float()
        if visual_index is None:
            if len(text) != len(examples):
                raise ValueError("input_ids and conditional_pixel_values must have one row per prompt each")
            weight = weight.reshape(-1, 1) if weight.ndim else weight
            return weight * text + (1 - weight) * self.image_embeddings(examples).float()
        visual_index = torch.as_tensor(visual_index, device=text.device)
        if visual_index.shape != (len(examples),) or visual_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"visual_index must be an integer tensor of shape [{len(examples)}] (one prompt per example "
                f"image), got {visual_index.dtype} {tuple(visual_index.shape)}"
            )
        if not len(examples):
            return text
        weight = weight.index_select(0, visual_index)[:, None] if weight.ndim else weight
        mixed = (
            weight * text.index_select(0, visual_index)
            + (1 - weight) * self.image_embeddings(examples).float()
        )
        return text.index_copy(0, visual_index, mixed)

    def _check_pixels(self, pixels: torch.Tensor, name: str) -> None:
        channels = self.config.vision_config.num_channels
        if pixels.ndim != 4 or pixels.shape[1] != channels:
            raise ValueError(f"{name} must be [N, {channels}, H, W], got shape {tuple(pixels.shape)}")
        patch = self.config.vision_config.patch_size
        if pixels.shape[2] % patch or pixels.shape[3] % patch:
            raise ValueError(
                f"{name} height and width {tuple(pixels.shape[2:])} must be multiples of the patch size {patch}"
            )
        if pixels.shape[0] == 0:
            raise ValueError(f"{name} holds no images")

    @staticmethod
    def _check_image_index(
        image_index: torch.Tensor | None, num_images: int, num_prompts: int, device: torch.device
    ) -> torch.Tensor | None:
        if image_index is None:
            if num_prompts != num_images:
                raise ValueError(
                    f"{num_prompts} prompts for {num_images} images: pass image_index [P] saying which image "
                    "each prompt belongs to"
                )
            return None
        image_index = torch.as_tensor(image_index)
        if image_index.shape != (num_prompts,) or image_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"image_index must be an integer tensor of shape [{num_prompts}] (one entry per prompt), "
                f"got {image_index.dtype} {tuple(image_index.shape)}"
            )
        if image_index.device.type != "cpu":
            # Reading values back would stall an accelerator's queue every step; build image_index on the
            # CPU to have it checked. On the device it is used as given (a negative index counts from the end).
            return image_index.to(device)
        if num_prompts and (int(image_index.min()) < 0 or int(image_index.max()) >= num_images):
            raise ValueError(f"image_index values must lie in [0, {num_images - 1}] for {num_images} images")
        if num_prompts == num_images and torch.equal(image_index, torch.arange(num_images)):
            return None  # one prompt per image in order: no gather needed
        return image_index.to(device)

    def _fit_text_length(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cut token rows to the text tower's length, keeping each row's end-of-text token (CLIP pools there)."""
        limit = self.config.text_config.max_position_embeddings
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [P, T], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] <= limit:
            return input_ids, attention_mask
        eos_id = self.config.text_config.eos_token_id
        if eos_id == 2:  # legacy CLIP configs pool at the highest token id, which is end-of-text
            eos_position = input_ids.argmax(dim=-1)
        else:
            eos_position = (input_ids == eos_id).int().argmax(dim=-1)
        end_tokens = input_ids.gather(1, eos_position[:, None]).squeeze(1)
        cut = input_ids[:, :limit].clone()
        was_cut = eos_position >= limit
        cut[was_cut, -1] = end_tokens[was_cut]
        if attention_mask is not None:
            attention_mask = attention_mask[:, :limit]
        return cut, attention_mask

    # --- high-level inference ---

    @torch.no_grad()
    def predict(
        self,
        images: Any,
        prompts: Any,
        processor: Any = None,
        batch_size: int = 8,
    ) -> list[torch.Tensor]:
        """Probability maps per prompt at each image's original size.

        Args:
            images: a PIL image, an array, a file path (`str` or `Path`) or an http(s) URL (any size; RGBA,
                grayscale etc. are converted to RGB; files and URLs are turned upright by their EXIF
                orientation, as transformers' `load_image` does), or a list of them.
            prompts: for one image, a phrase or example image, or a list of them; for a list of images, a list
                with one such entry per image. An example image is a PIL image, an array, a `Path` or an
                http(s) URL; any other string is a phrase (an empty one is refused).
            processor: the `CLIPSegProcessor` the model was saved with (default: loaded from the model's folder).
                Its tokenizer and normalisation are used, at the model's own input size `config.image_size`:
                the size the model was trained at and `run_eval.py` scores it at, whatever size the processor
                was saved with.
            batch_size: images per forward pass.

        Returns:
            one float tensor `[K, height, width]` per image, K its number of prompts, values in [0, 1].
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        prompt_lists = [prompts] if single else list(prompts)
        if len(prompt_lists) != len(images):
            raise ValueError(
                f"got {len(images)} images but {len(prompt_lists)} prompt lists: give one per image"
            )
        prompt_lists = [p if isinstance(p, (list, tuple)) else [p] for p in prompt_lists]
        if not images or any(len(p) == 0 for p in prompt_lists):
            raise ValueError("every image needs at least one prompt")
        prompt_lists = [
            [read_prompt(p, f"prompts[{k}]" if single else f"prompts[{i}][{k}]") for k, p in enumerate(ps)]
            for i, ps in enumerate(prompt_lists)
        ]
        processor = processor or self._default_processor()
        pil_images = [to_rgb_image(image, f"images[{i}]") for i, image in enumerate(images)]

        results = []
        for start in range(0, len(pil_images), batch_size):
            chunk = pil_images[start : start + batch_size]
            chunk_prompts = prompt_lists[start : start + batch_size]
            results.extend(self._predict_chunk(chunk, chunk_prompts, processor))
        return results

    def _predict_chunk(self, images: list[Image.Image], prompt_lists: list[list], processor: Any) -> list:
        device = self.device
        pixel_values = self._pixels(images, processor)
        flat_prompts = [prompt for prompts in prompt_lists for prompt in prompts]
        image_index = torch.tensor([i for i, prompts in enumerate(prompt_lists) for _ in prompts])
        embeddings = self._embed_prompts(flat_prompts, processor)
        logits = self(
            pixel_values=pixel_values.to(device, self.dtype),
            conditional_embeddings=embeddings,
            image_index=image_index,
        ).logits.float()
        maps, offset = [], 0
        for image, prompts in zip(images, prompt_lists):
            own = logits[offset : offset + len(prompts)]
            offset += len(prompts)
            resized = F.interpolate(own[:, None], size=(image.height, image.width), mode="bilinear")
            maps.append(torch.sigmoid(resized[:, 0]).cpu())
        return maps

    def _embed_prompts(self, prompts: list, processor: Any) -> torch.Tensor:
        """Text phrases through the text tower, example images through the vision tower, in prompt order."""
        device, dtype = self.device, self.dtype
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        visuals = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        embeddings = torch.empty(len(prompts), self.config.projection_dim, device=device, dtype=dtype)
        if texts:
            tokens = processor.tokenizer(
                [prompts[i] for i in texts],
                padding=True,
                truncation=True,
                max_length=self.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
            embeddings[texts] = self.text_embeddings(
                tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            ).to(dtype)
        if visuals:
            examples = [to_rgb_image(prompts[i], f"prompt {i}") for i in visuals]
            pixels = self._pixels(examples, processor)
            embeddings[visuals] = self.image_embeddings(pixels.to(device, dtype)).to(dtype)
        return embeddings

    def _pixels(self, images: list[Image.Image], processor: Any) -> torch.Tensor:
        """The processor's pixel values at `config.image_size`, the one source of the input size: a processor
        saved with another size (a stale preprocessor_config.json) would make predict() disagree with the
        evaluation, so its size is overridden, and one that cannot give that size is refused."""
        size = self.config.image_size
        configured = getattr(processor.image_processor, "size", None) or {}
        if configured.get("height", size) != size or configured.get("width", size) != size:
            logger.warning_once(
                f"the processor resizes images to {configured.get('height')}x{configured.get('width')} but the "
                f"model's config.image_size is {size}: predict() uses {size}x{size}, as training and run_eval.py do"
            )
        pixels = processor.image_processor(
            images=images, size={"height": size, "width": size}, return_tensors="pt"
        )["pixel_values"]
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(
                f"the processor made {tuple(pixels.shape[-2:])} pixel values, not the model's config.image_size "
                f"({size}, {size}): give predict() a processor that resizes to a square, e.g. "
                f"make_processor(tokenizer, image_size={size})"
            )
        return pixels

    def _default_processor(self) -> Any:
        if getattr(self, "_processor", None) is None:
            from transformers import AutoProcessor

            source = self.config.name_or_path
            try:
                self._processor = AutoProcessor.from_pretrained(source)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"predict() needs a processor and none could be loaded from {source!r}: pass processor=..."
                ) from error
        return self._processor

    # --- export to transformers' stock CLIPSeg ---

    def save_as_clipseg(self, save_directory: str, processor: Any = None) -> None:
        """Write a stock `CLIPSegForImageSegmentation` checkpoint (loads in transformers without custom code)."""
        from transformers import CLIPSegForImageSegmentation

        clipseg_config = self.config.to_clipseg_config()
        with torch.device("meta"):
            stock = CLIPSegForImageSegmentation(clipseg_config)
        plain = (
            self.without_clip_adapter(merge=True) if self.has_clip_adapter else self
        )  # stock CLIPSeg has no adapters
        stock.load_state_dict(plain.state_dict(), strict=True, assign=True)
        stock.save_pretrained(save_directory)
        if processor is not None:
            processor.save_pretrained(save_directory)

    # --- speed: a low-precision backbone, compiled towers and decoder, CUDA graphs ---

    def cast_backbone(self, dtype: torch.dtype) -> ClipSegCustomModel:
        """Keep the frozen CLIP in `dtype` (e.g. bfloat16): it then computes purely in that precision, outside
        any autocast, with half the memory traffic of autocast's float32 norms and residuals. The decoder
        keeps its own dtype (float32 master weights for training). Irreversible for the CLIP weights: save
        a model trained this way with its original float32 backbone (run_train.py does)."""
        self.clip.to(dtype)
        return self

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.clip.logit_scale.dtype

    @property
    def decoder_dtype(self) -> torch.dtype:
        return self.decoder.film_mul.weight.dtype

    def _backbone_precision(self, device: torch.device) -> Any:
        """A low-precision backbone computes in its own dtype: autocast would redo its norms and residual
        stream in float32. A float32 backbone follows the caller's autocast, as any module."""
        if self.backbone_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, enabled=False)

    def compile_backbone(self, **compile_options: Any) -> ClipSegCustomModel:
        """`torch.compile` the frozen towers' forward passes (vision blocks and text features). Options go to
        `torch.compile` (e.g. mode="max-autotune-no-cudagraphs"). A copy or an unpickled model compiles its
        own towers again."""
        return self._compile("backbone", compile_options)

    def compile_decoder(self, **compile_options: Any) -> ClipSegCustomModel:
        """`torch.compile` the decoder and the loss (forward and backward): fuses its many small, memory-bound
        operations. Options and copies as `compile_backbone`."""
        return self._compile("decoder", compile_options)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the decoder replays CUDA graphs (compile mode "reduce-overhead"): a training loop then calls
        `torch.compiler.cudagraph_mark_step_begin()` before each step."""
        return getattr(self, "_compile_options", {}).get("decoder", {}).get("mode") == "reduce-overhead"

    def _compile(self, part: str, compile_options: dict[str, Any]) -> ClipSegCustomModel:
        self._compile_options = {**getattr(self, "_compile_options", {}), part: dict(compile_options)}
        graphs = compile_options.get("mode") == "reduce-overhead"
        if part == "backbone" and graphs:
            # The towers' graphs are the project's own (TowerGraph): both towers side by side in one graph.
            compile_options = {k: v for k, v in compile_options.items() if k != "mode"}
            self._tower_graph = TowerGraph(self)
        for name in COMPILED_METHODS[part]:
            compiled = torch.compile(getattr(type(self), name).__get__(self), **compile_options)
            if graphs and part == "decoder":
                compiled = copied_outputs(compiled)
            setattr(self, name, compiled)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # The compiled functions are bound to this instance: a copy must not run this model's modules.
        compiled = {name for names in COMPILED_METHODS.values() for name in names} | {"_tower_graph"}
        return {k: v for k, v in super().__getstate__().items() if k not in compiled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for part, options in state.get("_compile_options", {}).items():
            self._compile(part, options)

    def tower_features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`vision_activations` and `text_embeddings` at once; with `compile_backbone(mode="reduce-overhead")` on
        a GPU both towers run side by side in one CUDA graph (`TowerGraph`)."""
        if not self._graphs_towers(pixel_values):
            return self.vision_activations(pixel_values), self.text_embeddings(input_ids, attention_mask)
        # Cut long phrases here: cutting reads values back (a boolean index), which a graph cannot hold.
        input_ids, attention_mask = self._fit_text_length(input_ids, attention_mask)
        return self._tower_graph(pixel_values, input_ids, attention_mask)

    def _graphs_towers(self, pixel_values: torch.Tensor) -> bool:
        return getattr(self, "_tower_graph", None) is not None and pixel_values.is_cuda


# ----------------------------------------------------------------------------------------------------------
# The processor and its inputs
# ----------------------------------------------------------------------------------------------------------


def _adapter_folder(source: Any, load_options: dict[str, Any]) -> Path | None:
    """The folder of the CLIP adapter saved beside a model's weights (local, or downloaded from the Hub), or
    None when there is none."""
    from transformers.utils import cached_file

    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source) / (load_options.get("subfolder") or "") / ADAPTER_FOLDER
        return folder if (folder / ADAPTER_CONFIG).is_file() else None
    if not isinstance(source, str):
        return None
    passed = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
    hub_options = {k: load_options[k] for k in passed if k in load_options}
    folder = (
        f"{load_options['subfolder']}/{ADAPTER_FOLDER}" if load_options.get("subfolder") else ADAPTER_FOLDER
    )
    # Offline, a repository whose adapter file was never looked up cannot say whether it has one: it loads
    # without (as transformers does for its own adapter files).
    config = cached_file(
        source,
        f"{folder}/{ADAPTER_CONFIG}",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_options,
    )
    if config is None:
        return None
    cached_file(source, f"{folder}/{ADAPTER_WEIGHTS}", **hub_options)  # beside it in the cache
    return Path(config).parent


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The peft LoRA layers inside `module`, by name."""
    try:
        lora_layer = importlib.import_module("peft.tuners.lora").LoraLayer
    except ImportError:  # without peft there can be none
        return []
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, lora_layer)]


def _peft(name: str) -> Any:
    """A peft module, imported only where an adapter is used: transformers' remote-code loader requires every
    package this file names in an import statement, and a model without an adapter needs no peft."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"this model's CLIP adapter needs peft: pip install peft ({error})") from error


def _unwrap_lora_layers(module: nn.Module, merge: bool) -> None:
    """Replace each LoRA layer in `module` by its base layer, the adapter folded in first when `merge`."""
    for name, layer in _lora_layers(module):
        if merge:
            layer.merge()
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config


def to_rgb_image(image: Any, name: str = "image") -> Image.Image:
    """A PIL RGB image from a PIL image of any mode, an array (H, W), (H, W, 1|3|4), uint8 or float in [0, 1],
    or a file path or http(s) URL (`read_image`)."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image, name)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image or an array, got {type(image).__name__}")
    array = image
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"{name}: expected an array (H, W) or (H, W, 3|4), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def read_image(source: str | os.PathLike, name: str = "image") -> Image.Image:
    """The image at a file path or an http(s) URL, decoded now and turned upright by its EXIF orientation (as
    transformers' `load_image`, which reads the URLs, does). One that is missing or does not decode raises a
    ValueError naming it."""
    text = os.fsdecode(source)
    if is_url(text):
        from transformers.image_utils import load_image

        try:
            return load_image(text, timeout=URL_TIMEOUT_SECONDS)
        except Exception as error:  # the network's errors and undecodable content, each its own type
            raise ValueError(f"{name}: {text} could not be read as an image ({error})") from error
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{name}: {text} " + ("is a folder" if path.is_dir() else "does not exist"))
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not later in the processor
            return ImageOps.exif_transpose(opened)  # a copy: the file is closed on return
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: {text} could not be read as an image ({error})") from error


def read_prompt(prompt: Any, name: str = "prompt") -> Any:
    """A prompt as `predict` uses it: a phrase, refused when empty, or an example image. A `Path` or an http(s)
    URL is read as an example image; any other string is a phrase (a file name is a plausible phrase)."""
    if isinstance(prompt, str) and not is_url(prompt):
        if not prompt.strip():
            raise ValueError(f"{name} is an empty phrase: give a phrase or an example image")
        return prompt
    if isinstance(prompt, (str, os.PathLike)):
        return read_image(prompt, name)
    return prompt


def is_url(text: str) -> bool:
    """An http(s) URL, not a phrase: the scheme and no spaces."""
    return text.startswith(("http://", "https://")) and not any(c.isspace() for c in text)


def make_processor(tokenizer: Any, image_size: int = 352) -> Any:
    """The processor saved with every model: CLIP tokenizer + ImageNet-normalised resize to `image_size`."""
    from transformers import CLIPSegProcessor, ViTImageProcessorPil

    image_processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BILINEAR,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Speed machinery: the same values as the plain modules, computed faster
# ----------------------------------------------------------------------------------------------------------


class FrozenQuickGELU(nn.Module):
    """CLIP's quick_gelu, x * sigmoid(1.702 x), with one temporary instead of three when no gradient flows
    (CLIP is frozen): the same values bit for bit, less memory traffic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


class PatchConv2d(nn.Conv2d):
    """CLIP's patch embedding, a convolution whose kernel equals its stride, as one matrix product over the
    image's non-overlapping patches: the parameters (and state-dict keys) of `nn.Conv2d`, the same values
    within float rounding. A GEMM is faster on a GPU than the convolution kernels cuDNN picks for this shape
    (benchmarks/RESULTS.md)."""

    @classmethod
    def like(cls, conv: nn.Conv2d) -> PatchConv2d:
        if (
            conv.kernel_size != conv.stride
            or conv.padding != (0, 0)
            or conv.dilation != (1, 1)
            or conv.groups != 1
        ):
            raise ValueError(f"not a patch embedding (kernel = stride, no padding): {conv}")
        return cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, C_in, H, W]` -> `[B, C_out, H // k, W // k]` (a view of a `[B, patches, C_out]` result)."""
        batch, channels = images.shape[:2]
        kh, kw = self.kernel_size
        rows, cols = images.shape[2] // kh, images.shape[3] // kw
        patches = images[:, :, : rows * kh, : cols * kw].reshape(batch, channels, rows, kh, cols, kw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * kh * kw)
        embedded = F.linear(patches, self.weight.flatten(1), self.bias)
        return embedded.transpose(1, 2).view(batch, self.out_channels, rows, cols)


class PatchTransposedConv2d(nn.ConvTranspose2d):
    """A transposed convolution whose kernel equals its stride: every input pixel writes its own k x k output
    patch, so the layer is one matrix product and a reshuffle of the result. The parameters (and state-dict
    keys) of `nn.ConvTranspose2d`, the same values within float rounding. As a matrix product it runs as one
    GEMM forward and backward, and `torch.compile` takes the whole decoder with it, backward included."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size=stride, stride=stride)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """`[B, C_in, H, W]` -> `[B, C_out, H * k, W * k]`."""
        batch, _, height, width = grid.shape
        k, out = self.stride[0], self.out_channels
        weight = self.weight.flatten(1).t()  # [C_out * k * k, C_in], rows ordered (channel, row, column)
        bias = self.bias.repeat_interleave(k * k)
        patches = F.linear(grid.permute(0, 2, 3, 1), weight, bias)  # [B, H, W, C_out * k * k]
        patches = patches.view(batch, height, width, out, k, k).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(batch, out, height * k, width * k)


def copied_outputs(graphed: Callable) -> Callable:
    """CUDA graphs (compile mode "reduce-overhead") return tensors in memory that their next replay reuses: the
    compiled decoder's logits would change under a caller that keeps them across steps. Copies (a few MB per
    step) outlive the next replay; gradients still flow through them."""

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        return type(value)(copy(v) for v in value) if isinstance(value, (list, tuple)) else value

    @functools.wraps(graphed)
    def call(*args: Any, **kwargs: Any) -> Any:
        return copy(graphed(*args, **kwargs))

    return call


class TowerGraph:
    """Both frozen towers as one CUDA graph per input shape, the text tower on a high-priority side stream beside
    the vision tower: one launch for the towers' hundreds of kernels (the text tower's small kernels are mostly
    launch time), and the text tower's time hidden under the vision tower's. What compile mode
    "reduce-overhead" does to the towers on a GPU. Inputs are copied into the graph's own buffers, outputs out
    of them (a later replay overwrites them). Each graph keeps its buffers: past `max_graphs` shapes (an
    evaluation's batches vary in phrase count) new shapes run the compiled towers without a graph."""

    def __init__(self, model: ClipSegCustomModel, max_graphs: int = 8):
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None  # one memory pool for all shapes' graphs: they never run at the same time
        self.side_stream = self.warmup_stream = None

    def __call__(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        given = (pixel_values, input_ids, attention_mask)
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        # A graph reads the weights where they were at capture: moved or cast weights need a new one.
        clip = self.model.clip
        weights = tuple(
            tower.embeddings.position_embedding.weight.data_ptr()
            for tower in (clip.vision_model, clip.text_model)
        )
        key = (autocast, weights, *((None if t is None else (t.shape, t.dtype, t.device)) for t in given))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.model.vision_activations(pixel_values), self.model.text_embeddings(*given[1:])
            self.graphs[key] = self._capture(given)
        graph, buffers, (activations, text) = self.graphs[key]
        for buffer, tensor in zip(buffers, given):
            if tensor is not None:
                buffer.copy_(tensor)
        graph.replay()
        return [activation.clone() for activation in activations], text.clone()

    def _towers(self, pixel_values, input_ids, attention_mask):
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            text = self.model.text_embeddings(input_ids, attention_mask)
        activations = self.model.vision_activations(pixel_values)
        main.wait_stream(self.side_stream)
        return activations, text

    def _capture(self, given: tuple) -> tuple:
        pixels, input_ids, attention_mask = given
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(pixels.device, priority=-1)
            self.warmup_stream = torch.cuda.Stream(pixels.device)
        buffers = (
            pixels.to(self.model.backbone_dtype, copy=True),
            input_ids.clone(),
            None if attention_mask is None else attention_mask.clone(),
        )
        # Warm up on another stream first, as CUDA graph capture requires: compiles, autotunes, allocates.
        self.warmup_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.warmup_stream):
            for _ in range(3):
                self._towers(*buffers)
        torch.cuda.current_stream().wait_stream(self.warmup_stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a data loader's pin-memory thread) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self._towers(*buffers)
        self.pool = graph.pool()
        return graph, buffers, outputs


ClipSegCustomConfig.register_for_auto_class()
ClipSegCustomModel.register_for_auto_class("AutoModel")

__all__ = ["ClipSegCustomModel", "ClipSegCustomOutput", "make_processor", "to_rgb_image"]
