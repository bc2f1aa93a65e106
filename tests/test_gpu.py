"""What only a CUDA GPU can run: the towers' own CUDA graph (`TowerGraph`, compile mode reduce-overhead).
Skipped without a GPU; benchmarks/gpu_run.sh runs it on a lent one."""

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
