"""Training and evaluation samples: crops, negatives, phrases per image, visual prompts, determinism."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_tools.batching import (
    EpochSampler,
    EvaluationImages,
    PhraseIndex,
    TrainingOptions,
    TrainingSamples,
    collate_training,
    random_square_crop,
    row_masks,
    task_mask,
    tokenize,
    visual_prompt,
)
from clipseg_tools.data import shrink_images
from clipseg_tools.prompts import TEMPLATES, apply_template
from clipseg_tools.tiny_clip import build_word_tokenizer
from clipseg_tools.transforms import (
    decode_image,
    image_to_tensor,
    image_to_uint8,
    model_inputs,
    normalize_pixels,
    pack_masks,
    stack_images,
    unpack_masks,
)


def samples(split, **options):
    return TrainingSamples(split, PhraseIndex.from_dataset(split), TrainingOptions(image_size=64, **options))


def test_phrase_index_points_at_every_task(train_split):
    index = PhraseIndex.from_dataset(train_split)
    expected = [task["phrase"] for row in train_split for task in row["tasks"]]
    assert index.phrases == expected
    for t in (0, len(expected) // 2, len(expected) - 1):
        row = train_split[int(index.row_of_task[t])]
        assert row["tasks"][int(index.task_in_row[t])]["phrase"] == expected[t]
    assert sum(len(v) for v in index.tasks_by_phrase.values()) == len(expected)


def test_square_crop_keeps_enough_of_the_mask():
    mask = np.zeros((100, 300), dtype=bool)
    mask[40:60, 250:290] = True  # 800 pixels, only at the right
    rng = np.random.default_rng(0)
    for _ in range(20):
        top, left, side = random_square_crop(mask, rng, tries=50, min_fraction=0.02)
        assert (top, side) == (0, 100)
        assert mask[:, left : left + side].sum() > 0.02 * mask.size
    hopeless = np.zeros((100, 300), dtype=bool)
    hopeless[0, 299] = True  # one pixel: no crop reaches 5%, the best one keeps it
    top, left, side = random_square_crop(hopeless, np.random.default_rng(1), tries=200)
    assert hopeless[top : top + side, left : left + side].sum() == 1


def test_samples_are_a_pure_function_of_seed_epoch_and_index(train_split):
    data = samples(train_split, phrases_per_image=2, negative_prob=0.5, seed=7)
    first, again = data[3], data[3]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["phrases"] == again["phrases"]
    other_epoch = data[3 + len(data)]
    assert not (
        torch.equal(first["pixel_values"], other_epoch["pixel_values"])
        and first["phrases"] == other_epoch["phrases"]
    )
    assert first["pixel_values"].shape == (3, 64, 64) and first["masks"].shape == (2, 64, 64)


def test_phrases_come_from_the_anchor_image_and_negatives_are_absent(train_split):
    index = PhraseIndex.from_dataset(train_split)
    data = samples(
        train_split, phrases_per_image=3, negative_prob=0.0, prompt_template="plain", random_crop=False
    )
    for anchor in range(0, len(index), 5):
        item = data[anchor]
        own = {t["phrase"] for t in train_split[int(index.row_of_task[anchor])]["tasks"]}
        assert item["phrases"][0] == index.phrases[anchor]
        assert set(item["phrases"]) <= own
        assert item["masks"][0].any()
    negatives = samples(train_split, negative_prob=1.0, prompt_template="plain")
    for anchor in range(0, len(index), 7):
        item = negatives[anchor]
        own = {t["phrase"] for t in train_split[int(index.row_of_task[anchor])]["tasks"]}
        assert item["phrases"][0] not in own and not item["masks"][0].any()


def test_visual_prompts_come_with_text_weights(train_split):
    data = samples(train_split, phrases_per_image=2, visual_prompts=True, mix_text_min=0.1, mix_text_max=0.4)
    mixed = 0
    for item in (data[i] for i in range(len(data))):
        index, weights = item["visual_index"].tolist(), item["text_weight"].tolist()
        assert len(weights) == len(item["phrases"]) == 2
        assert len(item["conditional_pixel_values"]) == len(index) and all(
            tuple(v.shape) == (3, 64, 64) for v in item["conditional_pixel_values"]
        )
        assert all((0.1 <= w <= 0.4) if k in index else w == 1.0 for k, w in enumerate(weights))
        mixed += len(index)
    assert 0 < mixed < 2 * len(data)  # some phrases have an example image elsewhere, some do not


def test_collated_visual_prompts_point_at_their_phrases(train_split, tmp_path):
    data = samples(train_split, phrases_per_image=2, visual_prompts=True)
    items = [data[i] for i in range(6)]
    tokenizer = build_word_tokenizer(["red", "circle"], tmp_path, max_length=16)
    batch = collate_training(items, tokenizer=tokenizer, max_length=16)
    visuals = [
        (k, v)
        for item in items
        for k, v in zip(item["visual_index"].tolist(), item["conditional_pixel_values"])
    ]
    starts = np.cumsum([0] + [len(item["phrases"]) for item in items])
    expected_index = [start + k for item, start in zip(items, starts) for k in item["visual_index"].tolist()]
    assert visuals and batch["visual_index"].tolist() == expected_index
    assert batch["conditional_pixel_values"].shape == (len(visuals), 3, 64, 64)
    assert all(torch.equal(batch["conditional_pixel_values"][i], v) for i, (_, v) in enumerate(visuals))
    assert torch.equal(batch["text_weight"], torch.cat([item["text_weight"] for item in items]))


def test_visual_prompt_darkens_the_background_and_crops_to_the_object():
    image = Image.new("RGB", (100, 80), (200, 200, 200))
    mask = np.zeros((80, 100), dtype=bool)
    mask[20:40, 30:70] = True
    prompt = np.asarray(visual_prompt(image, mask, 32)).astype(float)
    assert prompt.shape == (32, 32, 3)
    assert prompt[16, 16].mean() > 150  # the object, kept
    assert prompt[0, 0].mean() < 30  # padding and darkened background


def test_collate_flattens_phrases_with_their_image_index(train_split, tmp_path):
    tokenizer = build_word_tokenizer(["red", "circle"], tmp_path, max_length=8)
    data = samples(train_split, phrases_per_image=2)
    batch = collate_training([data[0], data[1], data[2]], tokenizer, max_length=8)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    # uint8 pixels and bool masks travel; `model_inputs` makes them the model's float inputs on the device.
    assert batch["pixel_values"].dtype == torch.uint8 and batch["labels"].dtype == torch.bool
    inputs = model_inputs(batch, "cpu")
    assert inputs["pixel_values"].dtype == torch.float32 and inputs["labels"].dtype == torch.float32
    assert torch.equal(inputs["labels"], batch["labels"].float())
    assert torch.equal(inputs["pixel_values"], normalize_pixels(batch["pixel_values"]))
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] <= 8


@pytest.mark.parametrize("stored_at_model_size", [False, True])
def test_training_pixels_are_the_cropped_and_resized_image(train_split, stored_at_model_size):
    """The samples crop and resize arrays (views, no transposing copy): the pixels that PIL's crop and resize
    of the decoded image give, at the crop the sample's own generator draws first."""
    split = shrink_images(train_split, 64) if stored_at_model_size else train_split
    data = samples(split, seed=2)
    for item in range(4):
        row = split[int(data.index.row_of_task[item])]
        task = row["tasks"][int(data.index.task_in_row[item])]
        image = decode_image(row["image"])
        anchor_mask = task_mask(task, row, image.height, image.width)
        top, left, side = random_square_crop(anchor_mask, np.random.default_rng([2, 0, item]))
        crop = image.crop((left, top, left + side, top + side))
        expected = np.array(crop if crop.size == (64, 64) else crop.resize((64, 64), Image.BILINEAR))
        sample = data[item]
        assert torch.equal(sample["pixel_values"], torch.from_numpy(expected).permute(2, 0, 1))
        assert sample["masks"].shape == (1, 64, 64)


def test_batches_store_images_channels_last_and_the_device_gets_them_contiguous():
    rng = np.random.default_rng(6)
    arrays = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(3)]
    images = [image_to_uint8(a) for a in arrays]
    batch = stack_images(images)
    assert batch.shape == (3, 3, 20, 20) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([torch.from_numpy(a.transpose(2, 0, 1).copy()) for a in arrays]))
    normalized = normalize_pixels(batch)
    assert normalized.is_contiguous() and torch.equal(normalized, normalize_pixels(batch.contiguous()))


def test_packed_labels_reach_the_device_as_the_masks_they_were(train_split, tmp_path):
    rng = np.random.default_rng(7)
    for width in (1, 8, 20, 64):
        masks = torch.from_numpy(rng.random((3, 5, width)) > 0.5)
        packed = pack_masks(masks)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 5, (width + 7) // 8)
        assert torch.equal(unpack_masks(packed, width), masks)
    tokenizer = build_word_tokenizer(["red", "circle"], tmp_path, max_length=8)
    items = [samples(train_split, phrases_per_image=2)[i] for i in range(3)]
    plain = collate_training(items, tokenizer, max_length=8)
    packed = collate_training(items, tokenizer, max_length=8, pack_labels=True)
    assert "labels" not in packed and packed["packed_labels"].shape == (6, 64, 8)
    expected, got = model_inputs(plain, "cpu"), model_inputs(packed, "cpu")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_epoch_sampler_permutes_each_epoch_and_encodes_it():
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    sampler.set_epoch(2)
    second = list(sampler)
    assert sorted(second) == list(range(20, 30)) and [i - 20 for i in second] != first


def test_evaluation_images_keep_every_phrase_of_the_whole_image(train_split):
    images = EvaluationImages(train_split, 64, rows=[0, 1])
    item = images[1]
    row = train_split[1]
    assert item["phrases"] == [t["phrase"] for t in row["tasks"]]
    assert item["native_masks"].shape == (len(row["tasks"]), row["height"], row["width"])
    assert item["masks"].shape == (len(row["tasks"]), 64, 64)


def test_prompt_templates():
    rng = np.random.default_rng(0)
    assert apply_template("red circle", "plain", rng) == "red circle"
    assert apply_template("red circle", "fixed", rng) == "a photo of a red circle."
    drawn = {apply_template("x", "shuffle+", rng) for _ in range(300)}
    assert drawn == {t.format("x") for t in TEMPLATES["shuffle+"]}
    with pytest.raises(ValueError, match="unknown prompt template set 'fancy'"):
        apply_template("x", "fancy", rng)


def test_pixels_normalised_on_the_device_equal_the_processors_bit_for_bit():
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    on_device = normalize_pixels(torch.stack([image_to_uint8(image) for image in images]))
    in_worker = torch.stack([image_to_tensor(image) for image in images])
    assert torch.equal(on_device, in_worker)


def test_padding_rounded_up_changes_no_text_embedding(tiny_clip_dir):
    """run_train.py --compile pads phrases to a multiple of 16 tokens (few shapes to compile): the same
    embeddings as padding to the longest phrase, and never longer than the text tower."""
    from transformers import AutoTokenizer

    from modeling_clipseg_custom import ClipSegCustomModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    model = ClipSegCustomModel.from_clip(str(tiny_clip_dir), image_size=32, extract_layers=[0, 1]).eval()
    phrases = ["red circle", "small blue square left of the big green triangle", "star"]
    longest = tokenize(tokenizer, phrases, max_length=16)
    rounded = tokenize(tokenizer, phrases, max_length=16, pad_to_multiple_of=5)
    capped = tokenize(tokenizer, phrases, max_length=16, pad_to_multiple_of=10)
    length = longest["input_ids"].shape[1]
    assert 10 < length < 15  # so that 5 rounds up within the tower's 16 and 10 would pass it
    assert rounded["input_ids"].shape[1] == 15 and capped["input_ids"].shape[1] == 16
    assert (rounded["attention_mask"][:, length:] == 0).all()
    with torch.no_grad():
        expected = model.text_embeddings(longest["input_ids"], longest["attention_mask"])
        for tokens in (rounded, capped):
            got = model.text_embeddings(tokens["input_ids"], tokens["attention_mask"])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            # The training step leaves the mask out (the tokens are padded on the right): the same embeddings.
            unmasked = model.text_embeddings(tokens["input_ids"])
            torch.testing.assert_close(unmasked, expected, rtol=1e-5, atol=1e-6)
    tokenizer.padding_side = "left"  # a tokenizer set to pad on the left is overruled
    assert torch.equal(tokenize(tokenizer, phrases, max_length=16)["input_ids"], longest["input_ids"])


def test_row_masks_rasterises_every_task_at_the_image_size():
    row = {
        "height": 8,
        "width": 10,
        "tasks": [
            {"polygons": [[[[1.5, 1.2], [6.9, 1.7], [6.2, 5.8], [1.1, 5.3]]]]},
            {"polygons": [[[[0.0, 0.0], [3.9, 0.2], [0.4, 3.7]]]]},
        ],
    }
    native = row_masks(row)
    assert native.shape == (2, 8, 10)
    assert native.sum(axis=(1, 2)).tolist() == [30, 10]
    np.testing.assert_array_equal(row_masks(row, size=(8, 10)), native)  # the decoded image's size
