"""Crops of photographs: grid tiles and seeded random crops."""

import numpy as np
from PIL import Image

from datasets_tools.crops import cut, grid_tiles, random_crop_boxes, random_crops


def test_grid_is_centred_row_by_row():
    tiles = grid_tiles(2600, 2100, 1024)
    assert [(t.row, t.col) for t in tiles] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert tiles[0].box == (276, 26, 1300, 1050) and tiles[-1].box == (1300, 1050, 2324, 2074)
    assert grid_tiles(1000, 3000, 1024) == []


def test_square_crops_keep_their_recorded_boxes():
    # Golden boxes of the draw the finetune proof cuts its crops with (its README figures depend on them).
    crops = random_crop_boxes([(1280, 853)], 3, 7, 256, (0.45, 0.9))
    assert [c.box for c in crops] == [(450, 207, 1073, 830), (500, 38, 1181, 719), (222, 310, 721, 809)]
    assert all(c.size == (256, 256) and c.source == 0 for c in crops)


def test_random_crops_without_upscaling():
    sizes = [(1280, 1024), (2560, 1600), (1400, 1100)]
    crops = random_crop_boxes(sizes, 60, 0, (1024, 1400), (0.0, 1.0), upscale=False)
    assert [c.source for c in crops[:3]] == [0, 1, 2]  # every source once before any repeats
    for c in crops:
        width, height = sizes[c.source]
        left, top, right, bottom = c.box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left >= c.size[0] and bottom - top >= c.size[1]
        assert min(c.size) >= 1024 and abs((right - left) / (bottom - top) - c.size[0] / c.size[1]) < 0.01
    assert random_crop_boxes(sizes, 10, 0, (1024, 1400), (0.0, 1.0), upscale=False) == crops[:10]


def test_cut_resizes_to_the_crop_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    crops = random_crops(image, 4, 32, 1, (0.5, 1.0))
    assert [im.size for im in crops] == [(32, 32)] * 4
    box = random_crop_boxes([image.size], 1, 1, 32, (0.5, 1.0))[0]
    assert np.array_equal(np.asarray(cut(image, box)), np.asarray(crops[0]))
