"""What only a CUDA GPU can run: the towers' own CUDA graph (`TowerGraph`, compile mode reduce-overhead), and a
training step that never waits for the device. Skipped without a GPU; benchmarks/gpu_run.sh runs it on a GPU machine."""

import copy

import pytest
import torch

from modeling_clipseg_custom import ClipSegCustomModel
from tests.test_model import tiny_config, token_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(model, pixels, ids, autocast):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits.float(), out.conditional_embeddings.float()


@pytest.mark.parametrize("bf16_backbone", [False, True])
def test_tower_graph_gives_the_eager_towers_results(bf16_backbone):
    torch.manual_seed(0)
    eager = ClipSegCustomModel(tiny_config(decoder_dropout=0.0)).cuda().eval()
    if bf16_backbone:
        eager.cast_backbone(torch.bfloat16)
    # The eager backend: dynamo traces the towers, the graph captures them, no C++ toolchain needed.
    graphed = copy.deepcopy(eager).compile_backbone(backend="eager", mode="reduce-overhead")
    generator = torch.Generator().manual_seed(3)
    kept = []
    for images, length in ((3, 7), (2, 5), (3, 7), (3, 7)):
        pixels = torch.randn(images, 3, 64, 64, generator=generator).cuda()
        ids = token_ids(images, length, seed=images + length + len(kept)).cuda()
        expected = run(eager, pixels, ids, autocast=bf16_backbone)
        got = run(graphed, pixels, ids, autocast=bf16_backbone)
        kept.append((got, expected))
        for value, reference in zip(got, expected):
            assert torch.allclose(value, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())
    # Outputs are copies: later replays did not change earlier results.
    for got, expected in kept:
        assert torch.allclose(got[0], expected[0], rtol=1e-3, atol=1e-3 * expected[0].abs().max().item())
    assert len(graphed._tower_graph.graphs) == 2  # one graph per input shape
    # Moved weights (here: cast) are read from their new place: a new graph.
    graphed.cast_backbone(torch.float16)
    run(graphed, pixels, ids, autocast=False)
    assert len(graphed._tower_graph.graphs) == 3


@pytest.mark.parametrize("example_images", [False, True])
def test_a_training_step_issues_no_synchronising_call(example_images):
    """run_train.py's step from a pinned host batch: the copy in, forward, backward, the device-side skip of a
    non-finite step and the fused optimizer, with PyTorch's sync debug mode turned to errors; with an example
    image mixed into one phrase's prompt (PC+) too."""

    from accelerate import Accelerator

    from clipseg_tools.training import LossTally, make_optimizer, training_step

    torch.manual_seed(0)
    model = ClipSegCustomModel(tiny_config()).cuda()
    trainable = [p for p in model.parameters() if p.requires_grad]
    accelerator = Accelerator(mixed_precision="bf16")
    model, optimizer = accelerator.prepare(model, make_optimizer(trainable, 1e-3, 1e-4))
    tally = LossTally.on(accelerator.device)
    batch = {
        "pixel_values": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8).pin_memory(),
        "input_ids": token_ids(2, 7, seed=1).pin_memory(),
        "attention_mask": torch.ones(2, 7, dtype=torch.long).pin_memory(),
        "image_index": torch.tensor([0, 1]).pin_memory(),
        "labels": (torch.rand(2, 64, 64) > 0.5).pin_memory(),
    }
    if example_images:
        batch["conditional_pixel_values"] = torch.randint(
            0, 256, (1, 3, 64, 64), dtype=torch.uint8
        ).pin_memory()
        batch["visual_index"] = torch.tensor([1]).pin_memory()
        batch["text_weight"] = torch.tensor([1.0, 0.3]).pin_memory()
    before = [p.detach().clone() for p in trainable]
    for _ in range(2):  # warm-up: optimizer state, cached allocations
        training_step(accelerator, model, optimizer, batch, tally, max_grad_norm=1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(accelerator, model, optimizer, batch, tally, max_grad_norm=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tally.batches.item() == 3 and tally.skipped.item() == 0
    assert not any(torch.equal(a, b) for a, b in zip(before, trainable))


def test_batches_from_reused_buffers_arrive_pinned():
    """run_train.py's loader on a GPU: the ring's copy out of a worker's buffer is the pinned copy the loader
    would make (the loader's own pinning is off here, so the ring's is what is checked)."""
    from torch.utils.data import DataLoader

    from clipseg_tools import handover
    from clipseg_tools.handover import SharedBatchRing

    handover._MAPPED.clear()
    batches = [
        {"pixel_values": torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2),
         "image_index": torch.tensor([0, 1, 1])}
        for _ in range(5)
    ]  # fmt: skip
    loader = DataLoader(
        batches,
        batch_size=None,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=SharedBatchRing(dict, pin_memory=True),
    )
    for received, expected in zip(loader, batches):
        for name, value in expected.items():
            assert received[name].is_pinned() and torch.equal(received[name], value), name
        assert received["pixel_values"].stride() == expected["pixel_values"].stride()
    assert handover._MAPPED  # the batches came through the worker's buffers
