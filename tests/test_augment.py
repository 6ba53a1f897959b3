"""Batched augmentations: ranges, probabilities, exact Cutout geometry, seeding, no val augmentation."""
import pytest
import torch

from data_zoo import Augmenter, iterate_batches, load_bundle
from data_zoo.augment import crop, cutout, flip

ZERO_FILL = torch.zeros(3)


def index_images(n: int) -> torch.Tensor:
    """Images whose pixel value encodes its own row and column: a crop's offset can be read back."""
    rows = torch.arange(32).view(1, 1, 32, 1).float()
    cols = torch.arange(32).view(1, 1, 1, 32).float()
    return (1 + rows * 32 + cols).expand(n, 3, 32, 32).clone()


def test_crop_offsets_stay_within_four_pixels_and_cover_the_range():
    x = index_images(2000)
    out = crop(x, torch.Generator().manual_seed(0), ZERO_FILL, padding=4)
    centre = out[:, 0, 16, 16]  # original pixel (16 + dy, 16 + dx): always inside the image
    dy, dx = ((centre - 1) // 32 - 16).long(), ((centre - 1) % 32 - 16).long()
    assert dy.min() == -4 and dy.max() == 4 and dx.min() == -4 and dx.max() == 4
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 81  # every offset happens
    # Padding is the fill value (zero here): pixels shifted in from outside the image.
    i = int(torch.nonzero((dy == 4) & (dx == 0))[0])
    assert (out[i, :, -4:, :] == 0).all() and (out[i, :, :-4, :] != 0).all()


def test_flip_happens_to_about_half_the_images():
    x = index_images(4000)
    out = flip(x, torch.Generator().manual_seed(0), ZERO_FILL)
    flipped = (out[:, 0, 0, 0] != x[:, 0, 0, 0])
    assert 0.45 < flipped.float().mean() < 0.55
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])


def test_cutout_zeroes_exactly_one_clipped_16x16_square_centred_anywhere():
    x = torch.ones(3000, 3, 32, 32)
    out = cutout(x, torch.Generator().manual_seed(0), ZERO_FILL, length=16, n_holes=1)
    mask = out[:, 0] == 0
    assert torch.equal(mask, (out == 0).all(1))  # same square in every channel
    centres = []
    for m in mask:
        rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
        assert m.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()
        top, left = int(rows[0]), int(cols[0])
        cy = top + 8 if len(rows) == 16 or top > 0 else int(rows[-1]) + 1 - 8
        cx = left + 8 if len(cols) == 16 or left > 0 else int(cols[-1]) + 1 - 8
        assert len(rows) == min(cy + 8, 32) - max(cy - 8, 0) and len(cols) == min(cx + 8, 32) - max(cx - 8, 0)
        centres.append((cy, cx))
    ys, xs = zip(*centres)
    assert min(ys) == 0 and max(ys) == 31 and min(xs) == 0 and max(xs) == 31  # centre anywhere, square clipped
    assert any(len(torch.nonzero(m.any(1))) == 16 and len(torch.nonzero(m.any(0))) == 16 for m in mask)


@pytest.mark.parametrize("spec", ["cropflip", "cutout", ["flip", "cutout"]])
def test_same_seed_same_batch_other_seed_different(spec):
    x = torch.randn(64, 3, 32, 32)
    aug = Augmenter(spec)
    a, b = aug(x, torch.Generator().manual_seed(7)), aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_augmentation_lists_known_names():
    with pytest.raises(KeyError, match="unknown augmentation 'mixup'; known: cropflip, cutout, none"):
        Augmenter("mixup")


def test_validation_and_test_batches_are_never_augmented():
    bundle = load_bundle({"name": "synthetic", "n_train": 200, "n_test": 60, "val_fraction": 0.25})
    for split in (bundle.val, bundle.test):
        xs, ys, idx = zip(*iterate_batches(bundle, split, 32))  # what evaluation and prediction use
        assert torch.equal(torch.cat(xs), bundle.normalise(split.x)) and torch.equal(torch.cat(idx), split.index)
    # Training batches with an augmenter differ from the plain images.
    x, _, idx = next(iterate_batches(bundle, bundle.train, 32, torch.Generator().manual_seed(0), Augmenter("cutout", fill=bundle.black())))
    assert not torch.equal(x, bundle.normalise(bundle.train.x[torch.searchsorted(bundle.train.index, idx)]))


def test_epoch_order_is_seeded():
    bundle = load_bundle({"name": "synthetic", "n_train": 200, "n_test": 60, "val_fraction": 0.0})
    order = lambda s: torch.cat([i for _, _, i in iterate_batches(bundle, bundle.train, 50, torch.Generator().manual_seed(s))])
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == sorted(bundle.train.index.tolist())
