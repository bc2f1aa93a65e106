"""The offline demo behind `python run_train.py --demo`.

Without network access there are no CLIP weights and no PhraseCut, so the demo makes both:
1. a synthetic PhraseCut in the real on-disk format (the project's writer);
2. a small CLIP built from a config, with a CLIP tokenizer made locally for the synthetic words, given a
   short contrastive pre-training (CLIP's own objective) on single shapes captioned "<colour> <shape>": a
   random frozen CLIP gives the decoder little to read, and the recipe below would need many more steps.
Both are cached, so later runs start training at once. Then the normal training path runs, with a recipe
scaled to a 2-core CPU, evaluates on the held-out synthetic test images and saves sample pictures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from phrasecut_dataset import synthetic_vocabulary, write_synthetic_phrasecut
from phrasecut_dataset.synthetic import single_object_images

from .batching import row_masks
from .files import atomic_folder
from .pictures import captioned
from .prompts import TEMPLATES
from .tiny_clip import build_word_tokenizer, tiny_clip_configs
from .transforms import decode_image, image_to_tensor

logger = logging.get_logger(__name__)

DEMO_VERSION = 2
DEMO_SPLITS = {"val": 100, "test": 200}
CLIP_SETTINGS = dict(width=96, layers=4, heads=4, patch_size=8, pretrain_image_size=64, max_positions=24)
PRETRAIN = dict(images=4000, steps=300, batch_size=128, learning_rate=1e-3, warmup_steps=30, seed=0)

# The recipe the demo trains with (what a 2-core CPU does in a few minutes); everything else is the
# script's defaults. Real training keeps the paper's recipe.
DEMO_RECIPE = dict(
    image_size=128,
    reduce_dim=64,
    decoder_intermediate_size=256,
    extract_layers=[1, 2, 3],
    plain_head=False,
    decoder_dropout=0.0,
    init_output_bias=-2.5,  # the foreground prior: the decoder need not first learn "mostly background"
    per_device_train_batch_size=32,
    phrases_per_image=1,
    max_train_steps=1000,
    learning_rate=5e-3,
    min_learning_rate=1e-4,
    num_warmup_steps=50,
    weight_decay=1e-4,
    prompt_template="plain",
    dataloader_num_workers=1,
    checkpointing_steps=500,
    eval_steps=0,
    max_eval_images=0,
    per_device_eval_batch_size=16,
    validation_split="test",
)


def cache_root() -> Path:
    return Path(os.environ.get("CLIPSEG_DEMO_CACHE", Path.home() / ".cache" / "clipseg_finetune" / "demo"))


def prepare_demo(args: argparse.Namespace) -> argparse.Namespace:
    """Write (or reuse) the synthetic data and the small CLIP; point `args` at them with the demo recipe."""
    root = cache_root()
    data_dir = root / f"data_v{DEMO_VERSION}_{args.demo_images}"
    if not (data_dir / "image_data_split.json").is_file():
        logger.info(f"Writing the synthetic dataset to {data_dir}")
        write_synthetic_phrasecut(
            data_dir, {"train": args.demo_images, **DEMO_SPLITS}, seed=0, overwrite=True
        )
    clip_dir = root / f"clip_{_clip_key()}"
    if not (clip_dir / "model.safetensors").is_file():
        build_small_clip(clip_dir)
    for key, value in DEMO_RECIPE.items():
        setattr(args, key, value)
    args.data_dir, args.dataset_name = str(data_dir), None
    args.cache_dir = str(root / "prepared")
    args.clip_model_name_or_path = str(clip_dir)
    args.card_notes = (
        "**Demo model.** Trained by `python run_train.py --demo` on synthetic images of coloured shapes, on a "
        "small CLIP pre-trained for a minute on synthetic shapes: it shows the pipeline works end to end and "
        "learns; it is not a useful segmentation model for real photos."
    )
    return args


def _clip_key() -> str:
    settings = json.dumps([DEMO_VERSION, CLIP_SETTINGS, PRETRAIN, demo_words()], sort_keys=True)
    return hashlib.sha1(settings.encode()).hexdigest()[:10]


def demo_words() -> list[str]:
    """The synthetic phrases' words plus those of the prompt templates: one token each."""
    template_words = {w.strip(".{}") for t in TEMPLATES["shuffle+"] for w in t.split()}
    return sorted(set(synthetic_vocabulary()) | {w for w in template_words if w})


def build_small_clip(clip_dir: Path) -> None:
    """A small CLIP from a config, pre-trained briefly, saved like a Hub checkpoint (config, weights,
    tokenizer); written to a temporary folder first, then renamed."""
    from transformers import CLIPConfig, CLIPModel

    start = time.perf_counter()
    with atomic_folder(clip_dir) as staging:
        tokenizer = build_word_tokenizer(demo_words(), staging, max_length=CLIP_SETTINGS["max_positions"])
        torch.manual_seed(PRETRAIN["seed"])
        clip = CLIPModel(CLIPConfig(**tiny_clip_configs(tokenizer, **CLIP_SETTINGS)))
        loss = pretrain_contrastive(clip, tokenizer)
        clip.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    logger.info(
        f"Small CLIP ready in {time.perf_counter() - start:.0f} s (contrastive loss {loss:.2f}): {clip_dir}"
    )


def pretrain_contrastive(clip: Any, tokenizer: Any) -> float:
    """CLIP's symmetric contrastive loss; captions that are equal count as matches. Returns the last loss."""
    images, captions = single_object_images(
        PRETRAIN["images"], seed=PRETRAIN["seed"], size=CLIP_SETTINGS["pretrain_image_size"]
    )
    pixels = torch.stack([image_to_tensor(image) for image in images])
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    caption_ids = torch.from_numpy(np.unique(captions, return_inverse=True)[1])
    optimizer = torch.optim.AdamW(clip.parameters(), lr=PRETRAIN["learning_rate"], weight_decay=0.1)
    steps, warmup = PRETRAIN["steps"], PRETRAIN["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * (s + 1) / steps))
    )
    generator = torch.Generator().manual_seed(PRETRAIN["seed"])
    clip.train()
    progress = tqdm(range(steps), desc="pre-training the small CLIP (contrastive, synthetic shapes)")
    for step in progress:
        pick = torch.randperm(len(captions), generator=generator)[: PRETRAIN["batch_size"]]
        out = clip(
            input_ids=tokens["input_ids"][pick],
            attention_mask=tokens["attention_mask"][pick],
            pixel_values=pixels[pick],
        )
        same = (caption_ids[pick, None] == caption_ids[None, pick]).float()
        target = same / same.sum(1, keepdim=True)
        logits = out.logits_per_image
        loss = -0.5 * (
            (target * logits.log_softmax(1)).sum(1).mean()
            + (target * logits.t().log_softmax(1)).sum(1).mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            progress.set_postfix(loss=f"{loss.item():.2f}")
    clip.eval()
    return float(loss.detach())


def save_sample_predictions(
    model: Any, processor: Any, split: Any, output_dir: Path, count: int = 6
) -> list[Path]:
    """Pictures of a few held-out images: the image, then each phrase's heat map beside its ground truth."""
    with atomic_folder(output_dir / "samples") as staging:
        names = [draw_sample(model, processor, split[i], i, staging) for i in range(min(count, len(split)))]
    return [output_dir / "samples" / name for name in names]


def draw_sample(model: Any, processor: Any, row: dict, i: int, folder: Path) -> str:
    """One sample picture, each heat map captioned with its phrase and score (highest probability), and the
    phrases, a line each, in a text file beside it; returns its name."""
    image = decode_image(row["image"])
    phrases = [task["phrase"] for task in row["tasks"]]
    maps = model.predict(image, phrases, processor=processor)[0]
    tiles, captions = [image], ["image"]
    for phrase, truth, heat in zip(phrases, row_masks(row, size=(image.height, image.width)), maps):
        tiles += [_heat_tile(heat.numpy()), Image.fromarray((truth * 255).astype(np.uint8)).convert("RGB")]
        captions += [f'"{phrase}" {float(heat.max()):.2f}', "its ground truth"]
    sheet = captioned(tiles, captions)
    name = f"{i:02d}_{row['image_id']}"
    sheet.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("\n".join(phrases) + "\n")
    return f"{name}.png"


def _heat_tile(probabilities: np.ndarray) -> Image.Image:
    """Probabilities in [0, 1] as a red (high) to blue (low) picture."""
    value = np.clip(probabilities, 0, 1)
    rgb = np.stack([value, np.zeros_like(value), 1 - value], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))
