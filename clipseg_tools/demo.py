"""The offline demo behind `python run_train.py --demo`.

Without network access there are no CLIP weights and no PhraseCut, so the demo makes both:
1. a synthetic PhraseCut in the real on-disk format (the project's writer);
2. a small CLIP with a locally made tokenizer, given a short contrastive pre-training on object crops and
   their phrases from the synthetic training images (a random CLIP gives the decoder little to read).
Both are cached, so later runs start training at once. Then the normal training path runs, with a
recipe scaled to a 2-core CPU, evaluates on the held-out synthetic test images and saves sample pictures.
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
import torch.nn.functional as F
from PIL import Image

from phrasecut_dataset import (
    decode_image,
    image_to_tensor,
    load_phrasecut,
    synthetic_vocabulary,
    write_synthetic_phrasecut,
)

from .prompts import TEMPLATES
from .tiny_clip import build_word_tokenizer, tiny_clip_configs

DEMO_VERSION = 1
DEMO_SPLITS = {"val": 100, "test": 200}
CLIP_SETTINGS = dict(width=96, layers=4, heads=4, patch_size=8, pretrain_image_size=64, max_positions=24)
PRETRAIN = dict(steps=400, batch_size=128, learning_rate=2e-3, crop_size=64, seed=0)

# The recipe the demo trains with (what a 2-core CPU can do in a few minutes); everything else is the
# script's defaults. Real training keeps the paper's recipe.
DEMO_RECIPE = dict(
    image_size=128,
    reduce_dim=64,
    decoder_intermediate_size=256,
    extract_layers=[1, 2, 3],
    plain_head=False,
    decoder_dropout=0.0,
    init_output_bias=-2.5,
    per_device_train_batch_size=32,
    phrases_per_image=2,
    max_train_steps=700,
    learning_rate=5e-3,
    min_learning_rate=1e-4,
    num_warmup_steps=50,
    weight_decay=1e-4,
    prompt_template="plain",
    dataloader_num_workers=1,
    checkpointing_steps=350,
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
        print(f"Writing the synthetic dataset to {data_dir} ...")
        write_synthetic_phrasecut(
            data_dir, {"train": args.demo_images, **DEMO_SPLITS}, seed=0, overwrite=True
        )
    clip_dir = root / f"clip_{_clip_key(args.demo_images)}"
    if not (clip_dir / "model.safetensors").is_file():
        pretrain_small_clip(data_dir, clip_dir, root / "prepared")
    for key, value in DEMO_RECIPE.items():
        setattr(args, key, value)
    args.data_dir, args.dataset_name = str(data_dir), None
    args.cache_dir = str(root / "prepared")
    args.clip_model_name_or_path = str(clip_dir)
    args.card_notes = (
        "**Demo model.** Trained by `python run_train.py --demo` on synthetic images of coloured shapes with a "
        "small CLIP pre-trained on the same synthetic data: it shows the pipeline works end to end and "
        "learns; it is not a useful segmentation model for real photos."
    )
    return args


def _clip_key(num_images: int) -> str:
    settings = json.dumps([DEMO_VERSION, num_images, CLIP_SETTINGS, PRETRAIN], sort_keys=True)
    return hashlib.sha1(settings.encode()).hexdigest()[:10]


def demo_words() -> list[str]:
    template_words = {w.strip(".{}") for t in TEMPLATES["shuffle+"] for w in t.split()}
    return sorted(set(synthetic_vocabulary()) | {w for w in template_words if w})


def object_crops(train_split: Any, crop_size: int) -> tuple[torch.Tensor, list[str]]:
    """One crop per single-instance task (the object with some context) and its phrase."""
    crops, phrases = [], []
    for row in train_split:
        image = decode_image(row["image"])
        for task in row["tasks"]:
            if len(task["instance_boxes"]) != 1:
                continue
            x, y, w, h = task["instance_boxes"][0]
            cx, cy, half = x + w / 2, y + h / 2, 0.75 * max(w, h)
            box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
            crops.append(image_to_tensor(image.crop(box).resize((crop_size, crop_size), Image.BILINEAR)))
            phrases.append(task["phrase"])
    return torch.stack(crops), phrases


def pretrain_small_clip(data_dir: Path, clip_dir: Path, cache_dir: Path) -> None:
    """Contrastive pre-training (CLIP's objective, phrases with the same text count as matches)."""
    from transformers import CLIPConfig, CLIPModel

    start = time.perf_counter()
    tokenizer = build_word_tokenizer(demo_words(), clip_dir, max_length=CLIP_SETTINGS["max_positions"])
    configs = tiny_clip_configs(tokenizer, **CLIP_SETTINGS)
    torch.manual_seed(PRETRAIN["seed"])
    clip = CLIPModel(CLIPConfig(**configs))
    train = load_phrasecut(data_dir, cache_dir=cache_dir, splits=["train"])["train"]
    crops, phrases = object_crops(train, PRETRAIN["crop_size"])
    tokens = tokenizer(phrases, padding=True, return_tensors="pt")
    print(f"Pre-training the small CLIP on {len(phrases)} object crops ({PRETRAIN['steps']} steps) ...")
    optimizer = torch.optim.AdamW(clip.parameters(), lr=PRETRAIN["learning_rate"], weight_decay=0.1)
    rng = np.random.default_rng(PRETRAIN["seed"])
    phrase_ids = np.unique(phrases, return_inverse=True)[1]
    clip.train()
    loss = torch.tensor(float("nan"))
    for step in range(PRETRAIN["steps"]):
        pick = torch.from_numpy(rng.choice(len(phrases), size=PRETRAIN["batch_size"], replace=False))
        out = clip(
            input_ids=tokens["input_ids"][pick],
            attention_mask=tokens["attention_mask"][pick],
            pixel_values=crops[pick],
        )
        same = torch.from_numpy(
            phrase_ids[pick.numpy()][:, None] == phrase_ids[pick.numpy()][None, :]
        ).float()
        target = same / same.sum(1, keepdim=True)
        logits = out.logits_per_image
        loss = -0.5 * (
            (target * F.log_softmax(logits, 1)).sum(1).mean()
            + (target * F.log_softmax(logits.t(), 1)).sum(1).mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = (
                PRETRAIN["learning_rate"] * 0.5 * (1 + math.cos(math.pi * (step + 1) / PRETRAIN["steps"]))
            )
    clip.eval()
    partial_dir = clip_dir.with_name(clip_dir.name + ".partial")
    clip.save_pretrained(partial_dir)
    tokenizer.save_pretrained(partial_dir)
    for item in partial_dir.iterdir():
        os.replace(item, clip_dir / item.name)
    partial_dir.rmdir()
    print(
        f"Small CLIP ready in {time.perf_counter() - start:.0f} s (final contrastive loss {loss.item():.3f}): {clip_dir}"
    )


def save_sample_predictions(
    model: Any, processor: Any, split: Any, output_dir: Path, count: int = 6
) -> list[Path]:
    """Pictures of a few held-out images: the image, then each phrase's heat map beside its ground truth."""
    from phrasecut_dataset import polygons_to_mask

    folder = output_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(count, len(split))):
        row = split[i]
        image = decode_image(row["image"])
        phrases = [task["phrase"] for task in row["tasks"]]
        maps = model.predict(image, phrases, processor=processor)[0]
        tiles = [image]
        for task, heat in zip(row["tasks"], maps):
            gt = polygons_to_mask(task["polygons"], image.height, image.width)
            tiles.append(_heat_tile(heat.numpy()))
            tiles.append(Image.fromarray((gt * 255).astype(np.uint8)).convert("RGB"))
        sheet = Image.new("RGB", (sum(t.width for t in tiles), image.height), "white")
        x = 0
        for tile in tiles:
            sheet.paste(tile, (x, 0))
            x += tile.width
        path = folder / f"{i:02d}_{row['image_id']}.png"
        sheet.save(path)
        (folder / f"{i:02d}_{row['image_id']}.txt").write_text("\n".join(phrases) + "\n")
        paths.append(path)
    return paths


def _heat_tile(probabilities: np.ndarray) -> Image.Image:
    """Probabilities in [0, 1] as a red (high) to blue (low) picture."""
    value = np.clip(probabilities, 0, 1)
    rgb = np.stack([value, np.zeros_like(value), 1 - value], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))
