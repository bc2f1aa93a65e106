"""Configuration of the CLIPSeg model: a frozen CLIP plus a small FiLM-conditioned transformer decoder.

The defaults describe the `CIDAS/clipseg-rd64-refined` architecture (CLIP ViT-B/16 at 352 px, layers 3/6/9,
reduce_dim 64, the refined head). `CIDAS/clipseg-rd64` is `use_complex_transposed_convolution=False`,
`CIDAS/clipseg-rd16` is that plus `reduce_dim=16`.

The file is self-contained (it imports only transformers) because it is copied next to the weights for
`trust_remote_code` loading.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PretrainedConfig

# CLIP ViT-B/16 vision tower, the backbone of every CIDAS checkpoint (transformers' default is patch 32).
VIT_B16_VISION = {"patch_size": 16}

# Fields that mean the same thing, under the same name, in transformers' `CLIPSegConfig`.
SHARED_CLIPSEG_FIELDS = (
    "projection_dim",
    "logit_scale_init_value",
    "extract_layers",
    "reduce_dim",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "conditional_layer",
    "use_complex_transposed_convolution",
)


SUB_CONFIGS = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}


def refined_head_strides(patch_size: int) -> tuple[int, int]:
    """Strides of a new refined head's two transposed convolutions; together they upsample by `patch_size`,
    so the logits have the input's size.

    The second stride is the largest divisor of the patch size not above its square root, so patch 16 gives
    (4, 4) as in the CIDAS weights, patch 32 gives (8, 4) and patch 8 gives (4, 2). (transformers' CLIPSeg uses
    `patch_size // 4` twice, which upsamples by the patch size only for patch 16; a checkpoint imported from
    it keeps its own strides, see `from_clipseg_config`.)
    """
    second = max(d for d in range(1, int(patch_size**0.5) + 1) if patch_size % d == 0)
    return patch_size // second, second


def stock_refined_head_strides(patch_size: int) -> list[int]:
    """The strides transformers' `CLIPSegForImageSegmentation` gives its refined head."""
    return [patch_size // 4, patch_size // 4]


class ClipSegCustomConfig(PretrainedConfig):
    r"""Every hyper-parameter of the model, with the CLIP text and vision configs nested.

    Args:
        text_config (`dict` or `CLIPTextConfig`): the CLIP text tower.
        vision_config (`dict` or `CLIPVisionConfig`): the CLIP vision tower (default: ViT-B/16).
        projection_dim (`int`): size of CLIP's joint embedding, the FiLM conditioning input.
        logit_scale_init_value (`float`): CLIP's contrastive temperature (kept for checkpoint compatibility).
        extract_layers (`list[int]`): vision blocks (0-based, strictly increasing) whose outputs feed the
            decoder; the deepest one is read first. The vision tower stops after the last of them.
        reduce_dim (`int`): the decoder width D.
        decoder_num_attention_heads (`int`): attention heads of each decoder block (must divide D).
        decoder_intermediate_size (`int`): feed-forward size of each decoder block.
        decoder_dropout (`float`): dropout inside the decoder blocks, active in training only (the original
            CLIPSeg trained with PyTorch's default of 0.1; evaluation is unaffected).
        conditional_layer (`int`): index of the decoder block before which FiLM conditioning is applied.
        use_complex_transposed_convolution (`bool`): the refined head (conv 3x3 + two transposed
            convolutions) instead of one transposed convolution of the patch size.
        refined_head_strides (`list[int]`): the refined head's two strides (and kernel sizes). Default: two
            that multiply to the patch size (`refined_head_strides()`); a checkpoint imported from transformers'
            CLIPSeg keeps its `patch_size // 4` twice, so that it gives the logits it gave there.
        image_size (`int`): side of the square input the processor resizes images to.

    Example:

    ```python
    >>> from configuration import ClipSegCustomConfig
    >>> from modeling_clipseg_custom import ClipSegCustomModel

    >>> config = ClipSegCustomConfig()  # the CIDAS/clipseg-rd64-refined architecture
    >>> model = ClipSegCustomModel(config)  # random weights; from_pretrained / from_clip load real ones
    >>> config.vision_config.patch_size, config.extract_layers, config.refined_head_strides
    (16, [3, 6, 9], [4, 4])
    >>> rd16 = ClipSegCustomConfig(reduce_dim=16, use_complex_transposed_convolution=False)  # CIDAS/clipseg-rd16
    ```
    """

    model_type = "clipseg_custom"
    sub_configs_defaults = SUB_CONFIGS

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    extract_layers: list[int] | tuple[int, ...] = (3, 6, 9)
    reduce_dim: int = 64
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 2048
    decoder_dropout: float = 0.1
    conditional_layer: int = 0
    use_complex_transposed_convolution: bool = True
    refined_head_strides: list[int] | tuple[int, int] | None = None
    image_size: int = 352

    def __post_init__(self, **kwargs: Any) -> None:
        if self.vision_config is None:
            self.vision_config = dict(VIT_B16_VISION)
        for key, config_class in SUB_CONFIGS.items():  # transformers that reads `sub_configs` builds none
            value = getattr(self, key)
            if value is None or isinstance(value, dict):
                setattr(self, key, config_class(**(value or {})))
        self.extract_layers = [int(layer) for layer in self.extract_layers]
        if self.refined_head_strides is None:
            patch = self.vision_config.patch_size
            self.refined_head_strides = (
                list(refined_head_strides(patch)) if isinstance(patch, int) and patch > 0 else []
            )
        self.refined_head_strides = [int(stride) for stride in self.refined_head_strides]
        super().__post_init__(**kwargs)
        self.check_values()

    def check_values(self) -> None:
        """Reject values the model cannot be built from, naming the field."""
        depth = self.vision_config.num_hidden_layers
        patch = self.vision_config.patch_size
        layers = self.extract_layers
        problems = []
        if not layers:
            problems.append("extract_layers is empty: give at least one vision block index")
        elif any(b <= a for a, b in zip(layers, layers[1:])):
            problems.append(f"extract_layers {layers} must be strictly increasing")
        elif layers[0] < 0 or layers[-1] >= depth:
            problems.append(
                f"extract_layers {layers} reach beyond the vision tower: its blocks are 0..{depth - 1}"
            )
        if self.reduce_dim < 1 or self.decoder_num_attention_heads < 1:
            problems.append("reduce_dim and decoder_num_attention_heads must be positive")
        elif self.reduce_dim % self.decoder_num_attention_heads:
            problems.append(
                f"decoder_num_attention_heads ({self.decoder_num_attention_heads}) does not divide "
                f"reduce_dim ({self.reduce_dim})"
            )
        if self.use_complex_transposed_convolution and self.reduce_dim < 2:
            problems.append("the refined head halves reduce_dim, so it needs reduce_dim >= 2")
        strides = self.refined_head_strides
        if self.use_complex_transposed_convolution and (len(strides) != 2 or min(strides) < 1):
            problems.append(f"refined_head_strides {strides} must be two positive integers")
        if self.decoder_intermediate_size < 1:
            problems.append("decoder_intermediate_size must be positive")
        if not 0.0 <= self.decoder_dropout < 1.0:
            problems.append(f"decoder_dropout must be in [0, 1), got {self.decoder_dropout}")
        if layers and not 0 <= self.conditional_layer < len(layers):
            problems.append(
                f"conditional_layer {self.conditional_layer} must index one of the {len(layers)} decoder blocks"
            )
        if not isinstance(patch, int) or patch < 1:
            problems.append(f"vision_config.patch_size must be one positive integer, got {patch!r}")
        elif self.image_size < patch or self.image_size % patch:
            problems.append(f"image_size {self.image_size} must be a multiple of the patch size {patch}")
        if problems:
            raise ValueError("Invalid ClipSegCustomConfig: " + "; ".join(problems) + ".")

    def clip_config(self) -> CLIPConfig:
        """The config of the frozen CLIP part (transformers' `CLIPModel`)."""
        return CLIPConfig(
            text_config=self.text_config.to_dict(),
            vision_config=self.vision_config.to_dict(),
            projection_dim=self.projection_dim,
            logit_scale_init_value=self.logit_scale_init_value,
        )

    # --- conversion to and from transformers' CLIPSegConfig (the CIDAS checkpoints' format) ---

    @classmethod
    def from_clipseg_config(cls, clipseg_config: Any, **overrides: Any) -> ClipSegCustomConfig:
        """Build ours from a transformers `CLIPSegConfig` (or its dict), e.g. a CIDAS checkpoint's."""
        from transformers import CLIPSegConfig

        if isinstance(clipseg_config, dict):
            clipseg_config = CLIPSegConfig.from_dict(_without_bookkeeping(clipseg_config))
        fields = {name: getattr(clipseg_config, name) for name in SHARED_CLIPSEG_FIELDS}
        fields["text_config"] = _tower_dict(clipseg_config.text_config)
        fields["vision_config"] = _tower_dict(clipseg_config.vision_config)
        # Our exports record the input size; CIDAS configs do not (their processors resize to 352).
        fields["image_size"] = getattr(clipseg_config, "image_size", cls.image_size)
        fields["refined_head_strides"] = stock_refined_head_strides(clipseg_config.vision_config.patch_size)
        # transformers' CLIPSeg decoder has no dropout; ours defaults to the original's 0.1 for training.
        return cls(**{**fields, **overrides})

    def to_clipseg_config(self, check_head: bool = True) -> Any:
        """The equivalent transformers `CLIPSegConfig`, for export to a stock checkpoint. `check_head=False`
        allows a refined head transformers cannot build (a config beside graphs that compute the head, as the
        transformers.js export writes, not beside weights)."""
        from transformers import CLIPSegConfig

        patch = self.vision_config.patch_size
        stock = stock_refined_head_strides(patch)
        if check_head and self.use_complex_transposed_convolution and self.refined_head_strides != stock:
            raise ValueError(
                f"transformers' CLIPSeg builds the refined head with strides patch_size // 4 twice ({stock} for patch "
                f"size {patch}), which only fits patch size 16 or a model imported from it; this model's head has "
                f"strides {self.refined_head_strides}, so it cannot be exported to a stock "
                "CLIPSegForImageSegmentation (use it with trust_remote_code instead)"
            )
        fields = {name: getattr(self, name) for name in SHARED_CLIPSEG_FIELDS}
        return CLIPSegConfig(
            text_config=_tower_dict(self.text_config),
            vision_config=_tower_dict(self.vision_config),
            image_size=self.image_size,  # an extra attribute transformers keeps and ignores
            **fields,
        )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """Read a config; a CIDAS-format (`model_type: clipseg`) config is converted on the way in."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "clipseg":
            config_dict = cls.from_clipseg_config(config_dict).to_dict()
        return config_dict, kwargs


def _tower_dict(tower_config: Any) -> dict:
    """A CLIP tower config as a plain dict, without the keys that tie it to one model type."""
    as_dict = tower_config if isinstance(tower_config, dict) else tower_config.to_dict()
    return _without_bookkeeping(as_dict)


def _without_bookkeeping(config_dict: dict) -> dict:
    skip = {"model_type", "transformers_version", "architectures", "_name_or_path", "auto_map"}
    return {key: value for key, value in config_dict.items() if key not in skip}


__all__ = ["ClipSegCustomConfig", "refined_head_strides", "stock_refined_head_strides"]


# transformers without `sub_configs_defaults` reads the nested configs' classes from `sub_configs`.
if "sub_configs_defaults" not in vars(PretrainedConfig):
    ClipSegCustomConfig.sub_configs = SUB_CONFIGS

# Known to AutoConfig in every process that imports this file (the project's scripts, and `AutoModel` with
# `trust_remote_code`): loading a saved folder's processor or tokenizer, which reads its config.json, then
# asks no trust_remote_code question.
AutoConfig.register(ClipSegCustomConfig.model_type, ClipSegCustomConfig, exist_ok=True)
