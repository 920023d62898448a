"""Image preprocessing equals the official torchvision eval transform (docs/model.md §4.2, 5.3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from albef.model.config import CLIP_MEAN, CLIP_STD
from albef.model.image import load_image, preprocess


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)


@pytest.mark.parametrize("size", [(120, 80), (384, 384), (517, 300)])
def test_preprocess_equals_torchvision_bit_for_bit(size: tuple[int, int], tmp_path) -> None:
    import torch
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    path = tmp_path / "x.jpg"
    _photo(1, size).save(path, quality=90)
    official = transforms.Compose(
        [
            transforms.Resize((96, 96), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    ref = official(Image.open(path).convert("RGB")).numpy()
    ours = preprocess([path], 96)[0]
    assert ours.dtype == np.float32 and ours.shape == (3, 96, 96)
    assert np.array_equal(ours, ref), float(np.abs(ours - ref).max())
    assert torch.is_tensor(torch.from_numpy(ours))


def test_sources_agree(tmp_path) -> None:
    img = _photo(2, (64, 48))
    path = tmp_path / "a.png"
    img.save(path)
    a = preprocess([path, path.read_bytes(), img], 32)
    assert np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2])


def test_modes_convert_to_rgb() -> None:
    grey16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    rgb = load_image(grey16)
    assert rgb.mode == "RGB"
    arr = np.asarray(rgb)
    assert arr.min() < 20 and arr.max() > 235  # a 16-bit ramp keeps its range instead of clipping to white
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0] * 256)
    assert np.asarray(load_image(pal))[0, 0].tolist() == [255, 0, 0]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    r, g, b = np.asarray(load_image(buf.getvalue()))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60
