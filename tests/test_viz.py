"""Pictures: colour overlays of label maps and the learned regions (paper Figs. 6 and 8)."""

import numpy as np
import pytest
import torch

from conftest import TINY_VIT
from regproxy_cli import build_model
from regproxy_cli.images import load_image, save_png_atomic
from regproxy_cli.viz import (
    REGION_ALPHA,
    colorize,
    line_colours,
    line_width,
    overlay,
    region_boundaries,
    region_map,
    region_owners,
    thicken,
    token_colours,
)

RNG = np.random.default_rng(0)


def test_colorize_and_overlay():
    labels = np.array([[0, 1], [2, 1]])
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    np.testing.assert_array_equal(colorize(labels, palette)[1, 0], [0, 0, 255])
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, labels, palette, alpha=0.5)
    assert blended.dtype == np.uint8
    np.testing.assert_array_equal(blended[0, 0], [178, 50, 50])  # round(0.5 * 100 + 0.5 * 255) = 178
    np.testing.assert_array_equal(overlay(image, labels, palette, alpha=0.0), image)
    with pytest.raises(ValueError):
        colorize(np.array([[3]]), palette)


def one_hot_affinity(neighbour: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(9, h, w, Hg, Wg) affinity giving every sub-pixel (i, j) of every token the neighbour ``neighbour[i, j]``."""
    sub_h, sub_w = neighbour.shape
    affinity = np.zeros((9, sub_h, sub_w, *grid), dtype=np.float32)
    for i in range(sub_h):
        for j in range(sub_w):
            affinity[neighbour[i, j], i, j] = 1
    return affinity


def test_centre_ownership_has_boundaries_only_on_the_token_grid():
    stride, grid = 16, (3, 4)
    image = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # not a multiple of the stride: cropped
    affinity = one_hot_affinity(np.full((4, 4), 4), grid)
    owners = region_owners(affinity, stride, (40, 60))
    np.testing.assert_array_equal(owners, (np.arange(40)[:, None] // 16) * 4 + np.arange(60)[None, :] // 16)
    edges = np.argwhere(region_boundaries(owners))
    assert len(edges) and np.all((edges[:, 0] % stride == stride - 1) | (edges[:, 1] % stride == stride - 1))
    picture = region_map(image, torch.from_numpy(affinity), stride)
    assert picture.shape == (40, 60, 3) and picture.dtype == np.uint8
    _assert_drawn(picture, image, owners, grid_w=4, lines=region_boundaries(owners))


def _assert_drawn(picture, image, owners, grid_w, lines):
    """Interior: the photo tinted with each owner's token colour at REGION_ALPHA; lines: white on dark, black on
    light, judged on the tinted picture."""
    tinted = (1 - REGION_ALPHA) * image.astype(np.float64) + REGION_ALPHA * token_colours(owners, grid_w)
    tinted = np.rint(tinted).clip(0, 255).astype(np.uint8)
    assert np.abs(picture[~lines].astype(int) - tinted[~lines]).max() <= 1
    np.testing.assert_array_equal(picture[lines], line_colours(tinted)[lines])
    assert set(map(tuple, picture[lines])) <= {(0, 0, 0), (255, 255, 255)}


def test_lines_stay_visible_on_large_pictures():
    assert line_width((128, 128)) == line_width((1000, 1499)) == 1
    assert line_width((3000, 4000)) == 4
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    assert thicken(mask, 3).sum() == 9 and thicken(mask, 4).sum() == 16 and thicken(mask, 1).sum() == 1
    edge = np.zeros((5, 5), dtype=bool)
    edge[0, 0] = True
    assert thicken(edge, 3)[:2, :2].all() and not thicken(edge, 3)[4].any()  # no wrap-around


def test_checkerboard_ownership_draws_boundaries_inside_tokens():
    checker = np.where((np.arange(4)[:, None] + np.arange(4)[None, :]) % 2 == 0, 4, 5)  # centre / right neighbour
    owners = region_owners(one_hot_affinity(checker, (2, 2)), 16, (32, 32))
    edges = region_boundaries(owners)
    assert edges[0, 3] and edges[3, 0]  # between the 4x4-pixel sub-pixel cells of token (0, 0)
    # Right neighbours of the last column fall outside the grid and are clipped to the token itself.
    assert not edges[0:15, 16:31].any()


def test_region_map_of_a_model(tmp_path):
    model = build_model(TINY_VIT, 3).eval()
    image = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        affinity = model.forward_all(x).affinity
    picture = region_map(image, affinity, 16)
    assert picture.shape == (40, 50, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(region_map(image, affinity[0], 16), picture)  # a leading batch of 1 is accepted
    owners = region_owners(affinity[0], 16, (40, 50))
    edges = region_boundaries(owners)
    assert edges.any() and (~edges).any()
    _assert_drawn(picture, image, owners, grid_w=affinity.shape[-1], lines=edges)
    save_png_atomic(tmp_path / "regions.png", picture)
    np.testing.assert_array_equal(load_image(tmp_path / "regions.png"), picture)
