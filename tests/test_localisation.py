"""The label-free heatmap check: a peak's depth inside the head."""
import numpy as np

from training.localisation import head_mask, peak_depth


def disc(size=100, radius=40):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2).astype(np.float32)


def test_the_head_mask_is_the_largest_bright_component_with_holes_filled():
    gray = disc() * 200
    gray[45:55, 45:55] = 0  # a dark ventricle inside the head
    gray[0:3, 0:3] = 255  # a bright speck in the background
    mask = head_mask(gray)

    assert mask[50, 50] and not mask[1, 1]
    assert mask.sum() == (disc() > 0).sum()


def test_a_peak_at_the_centre_is_half_the_radius_deep_and_one_outside_is_zero():
    mask = disc() > 0
    centre, outside = np.zeros((100, 100)), np.zeros((100, 100))
    centre[50, 50], outside[2, 2] = 1.0, 1.0

    assert abs(peak_depth(centre, mask) - 40 / 81) < 0.02  # 40 px from the edge of an 81 px head
    assert peak_depth(outside, mask) == 0.0
