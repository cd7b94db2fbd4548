import random

import pytest
import torch
from PIL import Image

from sdxl_trainer.prep.transforms import apply_crop, flipped_crop_left, plan_crop, to_tensor


@pytest.mark.parametrize("w,h,bw,bh", [(300, 200, 128, 96), (100, 400, 64, 256), (128, 128, 128, 128), (50, 70, 128, 192)])
def test_crop_covers_bucket_and_stays_inside(w, h, bw, bh):
    crop = plan_crop(width=w, height=h, bucket_width=bw, bucket_height=bh)
    assert crop.resized_width >= bw and crop.resized_height >= bh
    # one side matches the bucket exactly: scale-to-cover, never more
    assert crop.resized_width == bw or crop.resized_height == bh
    assert 0 <= crop.left <= crop.resized_width - bw and 0 <= crop.top <= crop.resized_height - bh
    out = apply_crop(Image.new("RGB", (w, h), (10, 20, 30)), crop, bucket_width=bw, bucket_height=bh)
    assert out.size == (bw, bh)


def test_center_crop_is_centered_and_random_crop_reproducible():
    crop = plan_crop(width=400, height=100, bucket_width=128, bucket_height=64)
    assert (crop.resized_width, crop.resized_height) == (256, 64)
    assert (crop.top, crop.left) == (0, 64)
    a = [plan_crop(width=400, height=100, bucket_width=128, bucket_height=64, mode="random", rng=random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(ValueError):
        plan_crop(width=400, height=100, bucket_width=128, bucket_height=64, mode="random")


def test_flipped_crop_mirrors_window():
    crop = plan_crop(width=400, height=100, bucket_width=128, bucket_height=64, mode="random", rng=random.Random(1))
    assert flipped_crop_left(crop, bucket_width=128) == 256 - 128 - crop.left


def test_to_tensor_range():
    img = Image.new("RGB", (4, 2), (0, 255, 128))
    t = to_tensor(img)
    assert t.shape == (3, 2, 4)
    assert torch.allclose(t[:, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    with pytest.raises(ValueError):
        to_tensor(img.convert("L"))
