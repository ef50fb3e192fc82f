"""Batched reads give exactly the batches the per-item path gives through the default collate."""

import numpy as np
import pytest
import torch

from bench.data.batched_arrays import ArrayItems, array_loader, collate_fetched


def _arrays(tmp_path, n=37):
    rng = np.random.default_rng(0)
    data = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float16, shape=(n, 3, 2, 2))
    data[:] = rng.standard_normal((n, 3, 2, 2))
    data.flush()
    data = np.load(tmp_path / "d.npy", mmap_mode="r")
    return data, rng.integers(0, 2, (n, 5)).astype(np.uint8), rng.random((n, 5)) < 0.2


def test_shuffled_batches_match_the_default_per_item_loader(tmp_path):
    items = ArrayItems(*_arrays(tmp_path))
    reference = torch.utils.data.DataLoader(
        [items[i] for i in range(len(items))], batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    batched = array_loader(items, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    pairs = list(zip(reference, batched, strict=True))
    assert len(pairs) == 5  # 37 items: four of 8 and one of 5
    for (x, y, z), (bx, by, bz) in pairs:
        assert bx.dtype == torch.float16 and by.dtype == torch.float32 and bz.dtype == torch.bool
        assert torch.equal(x, bx) and torch.equal(y, by) and torch.equal(z, bz)


def test_items_read_the_arrays_row_by_row(tmp_path):
    data, targets, ignore = _arrays(tmp_path)
    x, y, z = ArrayItems(data, targets, ignore)[4]
    assert np.array_equal(x.numpy(), data[4])
    assert y.tolist() == targets[4].astype(float).tolist() and z.tolist() == ignore[4].tolist()


def test_misaligned_arrays_and_a_foreign_batch_are_refused(tmp_path):
    data, targets, ignore = _arrays(tmp_path)
    with pytest.raises(ValueError, match="disagree on N"):
        ArrayItems(data, targets[:-1], ignore)
    with pytest.raises(TypeError, match="FetchedBatch"):
        collate_fetched([(torch.zeros(1), torch.zeros(1), torch.zeros(1))])
