"""The training-minibatch sampler that every real run uses: uniform over the whole training set."""

import numpy as np
import pytest

from influence import archive
from influence.errors import UserError
from influence.sampling import ArchiveSource, MinibatchSampler

SIZE = (2, 2)


def write_train(path, counts):
    """A train archive whose image i has every pixel equal to i (so a read proves which image came)."""
    index = 0
    with archive.TrainWriter(path, image_size=SIZE) as writer:
        for label, count in enumerate(counts):
            for start in range(0, count, 3):  # several stored batches per label
                n = min(3, count - start)
                images = np.stack([np.full(SIZE + (3,), index + k, dtype=np.uint8) for k in range(n)])
                writer.add_batch(label, images, [f"{label}/{index + k}" for k in range(n)])
                index += n
        writer.finish({"classes": [{"label": label, "name": str(label)} for label in range(len(counts))]})
        writer.close()
        writer.commit()
    return index


def test_archive_minibatches_are_uniform_over_every_image_and_label(tmp_path):
    """Every image of every label is drawn about equally often; pixels stay with their labels."""
    total = write_train(tmp_path / "train.npz", [7, 11, 5, 9])  # 32 images in 4 labels
    with archive.open_train(tmp_path / "train.npz") as train:
        labels = np.asarray(train.labels)
        sampler = MinibatchSampler(ArchiveSource(train, lambda images: images.astype(np.float32)), 4, seed=(1, 2))
        counts = np.zeros(total)
        draws = 2000
        for _ in range(draws):
            x, y = next(sampler)
            ids = x[:, 0, 0, 0].astype(int)
            assert len(set(ids)) == 4  # distinct within a minibatch
            np.testing.assert_array_equal(y, labels[ids])
            counts[ids] += 1
    expected = draws * 4 / total  # 250 per image
    # Binomial(2000, 1/8) per image: std ~14.8; 5 std either side fails a biased sampler
    # (one that favours a label or a stored batch shifts counts by far more).
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - 4 / total)))
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70  # 31 degrees of freedom: p < 1e-4 above 70


def test_reseeding_replays_the_stream_and_full_batches_are_the_whole_set():
    x = np.arange(20, dtype=np.float32)[:, None]
    y = np.arange(20) % 3
    sampler = MinibatchSampler.from_arrays(x, y, 5)
    sampler.reseed(3, 1, 4)
    first = [sampler.next_indices() for _ in range(3)]
    sampler.reseed(3, 1, 4)
    np.testing.assert_array_equal(first, [sampler.next_indices() for _ in range(3)])
    sampler.reseed(3, 1, 5)
    assert not np.array_equal(first[0], sampler.next_indices()) or not np.array_equal(first[1], sampler.next_indices())
    full = MinibatchSampler.from_arrays(x, y, 50)
    assert full.full_batch
    np.testing.assert_array_equal(next(full)[1], y)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_sizes_are_refused(batch_size):
    with pytest.raises(UserError, match="batch size"):
        MinibatchSampler.from_arrays(np.zeros((4, 1)), np.zeros(4), batch_size)
