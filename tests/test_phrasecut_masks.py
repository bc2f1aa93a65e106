"""Task masks drawn from polygons the way PhraseCut's official evaluator draws them."""

import numpy as np

from phrasecut_dataset import polygons_to_mask

# A 10x8 image. Vertices are truncated with int(), so this quadrilateral becomes the rectangle
# (1,1)-(6,5); the boundary counts, so it covers columns 1..6 and rows 1..5: 6 * 5 = 30 pixels.
QUAD = [[1.5, 1.2], [6.9, 1.7], [6.2, 5.8], [1.1, 5.3]]


def test_quadrilateral_with_float_vertices_counted_by_hand():
    mask = polygons_to_mask([[QUAD]], height=8, width=10)
    assert mask.shape == (8, 10) and mask.dtype == bool
    assert mask.sum() == 30
    assert mask[1:6, 1:7].all()


def test_triangle_includes_its_boundary():
    # (0,0),(3,0),(0,3): the pixels with x + y <= 3, i.e. 4 + 3 + 2 + 1 = 10.
    mask = polygons_to_mask([[[[0.0, 0.0], [3.9, 0.2], [0.4, 3.7]]]], height=8, width=10)
    expected = np.add.outer(np.arange(8), np.arange(10)) <= 3
    np.testing.assert_array_equal(mask, expected)


def test_union_over_polygons_and_instances_counts_overlap_once():
    # Instance 0: the triangle above (10 px) and the rectangle cols 2..5 x rows 1..2 (8 px), sharing
    # pixel (x=2, y=1): 17. Instance 1: cols 7..9 x rows 5..7 (9 px). Total 26.
    instances = [
        [[[0.0, 0.0], [3.9, 0.2], [0.4, 3.7]], [[2.2, 1.3], [5.8, 1.1], [5.1, 2.9], [2.6, 2.4]]],
        [[[7.5, 5.5], [9.99, 5.2], [9.3, 7.9], [7.2, 7.6]]],
    ]
    assert polygons_to_mask(instances, 8, 10).sum() == 26
    # A flat list of polygons (as the official evaluator passes them) gives the same mask.
    flat = instances[0] + instances[1]
    np.testing.assert_array_equal(polygons_to_mask(flat, 8, 10), polygons_to_mask(instances, 8, 10))


def test_points_outside_are_clipped_and_degenerate_polygons_ignored():
    # Negative coordinates truncate toward zero (int(-0.5) == 0): the whole 10x8 image.
    assert polygons_to_mask([[[[-0.5, -0.5], [9.5, -0.5], [9.5, 7.5], [-0.5, 7.5]]]], 8, 10).all()
    assert polygons_to_mask([[[[-5, -5], [-1, -5], [-1, -1]]]], 8, 10).sum() == 0
    assert polygons_to_mask([[[[3.0, 3.0]]]], 8, 10).sum() == 0  # one point: skipped, as officially
    assert polygons_to_mask([], 8, 10).sum() == 0


def test_numpy_float32_polygons_are_accepted():
    mask = polygons_to_mask([[np.asarray(QUAD, dtype=np.float32)]], 8, 10)
    assert mask.sum() == 30
