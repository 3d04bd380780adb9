"""One preprocessing for every mode and size: L, RGB, RGBA, 16-bit and non-square give the same array."""
import io

import numpy as np
import pytest
from PIL import Image

from vision.preprocess import DEFAULTS, cam_to_scan, prepare_bytes
from tests.conftest import EXAMPLES

GRAY = EXAMPLES / "glioma" / "Tr-gl_0207.jpg"  # 512 x 512, mode L


def encode(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gray():
    with Image.open(GRAY) as im:
        return im.convert("L")


def test_rgb_rgba_and_16_bit_twins_give_the_grayscale_array(gray):
    base = prepare_bytes(encode(gray)).array
    arr16 = (np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16)
    variants = {
        "RGB": encode(gray.convert("RGB")),
        "RGBA": encode(gray.convert("RGBA")),
        "I;16": encode(Image.fromarray(arr16)),
    }
    for mode, data in variants.items():
        np.testing.assert_allclose(prepare_bytes(data).array, base, atol=1e-5, err_msg=mode)


def test_non_square_scans_are_padded_to_a_square_head_crop(gray):
    wide = Image.new("L", (700, 512))
    wide.paste(gray, (94, 0))
    prepared = prepare_bytes(encode(wide))
    reference = prepare_bytes(encode(gray))

    assert prepared.array.shape == (DEFAULTS["size"], DEFAULTS["size"], 1)
    np.testing.assert_allclose(prepared.array, reference.array, atol=1e-5)
    assert prepared.box[0] - reference.box[0] == 94


def test_a_heatmap_returns_to_the_scans_own_grid_where_the_crop_was():
    cam = np.ones((16, 16), np.float32)
    out = cam_to_scan(cam, (10, -5, 110, 95), 200, 80)

    assert out.shape == (80, 200)
    assert out[:, 10:110].min() == 1.0 and out[:, :10].max() == 0 and out[:, 110:].max() == 0


def test_equalisation_spreads_the_head_evenly_over_0_to_1_keeping_its_order_and_a_black_background(gray):
    data = encode(gray)
    scaled = prepare_bytes(data).array[..., 0]
    equalised = prepare_bytes(data, dict(DEFAULTS, equalise=True)).array[..., 0]
    head = equalised > 0

    np.testing.assert_allclose(np.quantile(equalised[head], [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75], atol=0.01)
    assert equalised.max() == 1.0
    unclipped = head & (scaled < 1.0)  # the percentile scale clips the brightest 0.5% to ties at 1
    order = np.argsort(scaled[unclipped], kind="stable")
    brighter = np.diff(scaled[unclipped][order]) > 0  # float32 division can round neighbours to a tie
    assert np.all(np.diff(equalised[unclipped][order])[brighter] >= 0)
    assert equalised[scaled == 0].max() == 0
