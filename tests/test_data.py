"""The data module: the tutorial's loader exactly, files, splits, the fast path and its sharding."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from cropyield import FEATURE_NAMES, INPUTS, TARGET_NAMES, TARGETS, CropYieldDataModule, CropYieldError
from cropyield.batches import EpochPermutation, GatheredBatches, SlicedBatches

from .conftest import write_csv


def batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_embedded_data_is_the_tutorials():
    assert INPUTS.dtype == TARGETS.dtype == torch.float32
    assert INPUTS.shape == (15, 3) and TARGETS.shape == (15, 2)
    assert INPUTS[:5].tolist() == [[73, 67, 43], [91, 88, 64], [87, 134, 58], [102, 43, 37], [69, 96, 70]]
    assert TARGETS[:5].tolist() == [[56, 70], [81, 101], [119, 133], [22, 37], [103, 119]]
    assert INPUTS[14].tolist() == [68, 97, 70] and TARGETS[14].tolist() == [102, 120]
    assert (FEATURE_NAMES, TARGET_NAMES) == (("temp", "rainfall", "humidity"), ("apples", "oranges"))


def test_default_train_loader_is_the_tutorials_dataloader():
    dm = CropYieldDataModule()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and isinstance(loader.dataset, TensorDataset)
    assert isinstance(loader.sampler, RandomSampler) and loader.batch_size == 5
    torch.manual_seed(5)
    ours = batches(loader) + batches(loader)
    torch.manual_seed(5)
    reference = DataLoader(TensorDataset(INPUTS, TARGETS), 5, shuffle=True)
    expected = batches(reference) + batches(reference)
    assert len(ours) == len(expected) == 6
    for (x, y), (rx, ry) in zip(ours, expected, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("loader", ["val_dataloader", "test_dataloader", "predict_dataloader"])
def test_evaluation_loaders_go_over_the_rows_in_order_without_touching_the_global_rng(loader):
    dm = CropYieldDataModule()
    dm.setup("predict" if loader == "predict_dataloader" else "fit")
    state = torch.get_rng_state()
    got = batches(getattr(dm, loader)())
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(getattr(dm, loader)().sampler, SequentialSampler)
    assert torch.equal(torch.cat([x for x, _ in got]), INPUTS)
    assert torch.equal(torch.cat([y for _, y in got]), TARGETS)


def test_csv_with_custom_columns_in_any_order(tmp_path):
    rows = [[i, 2 * i, 3 * i + 0.5, i % 4, 10 - i] for i in range(12)]
    path = write_csv(tmp_path / "d.csv", ["a", "y1", "b", "c", "y2"], rows)
    dm = CropYieldDataModule(csv_path=str(path), target_names=["y2", "y1"])
    assert dm.feature_names == ("a", "b", "c") and (dm.num_features, dm.num_targets) == (3, 2)
    dm.setup("fit")
    x, y = dm.training_rows()
    table = np.array(rows, dtype=np.float32)
    assert torch.equal(x, torch.from_numpy(table[:, [0, 2, 3]]))
    assert torch.equal(y, torch.from_numpy(table[:, [4, 1]]))


def test_tutorial_csv_gives_the_embedded_tensors(tutorial_csv):
    dm = CropYieldDataModule(data_path=str(tutorial_csv))
    dm.setup("fit")
    x, y = dm.training_rows()
    assert torch.equal(x, INPUTS) and torch.equal(y, TARGETS)


def test_parquet_is_read_by_extension(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    table = pa.table({"temp": INPUTS[:, 0].double().numpy(), "rainfall": INPUTS[:, 1].numpy(),
                      "humidity": INPUTS[:, 2].numpy().astype("int64"), "apples": TARGETS[:, 0].numpy(),
                      "oranges": TARGETS[:, 1].numpy()})  # fmt: skip
    pq.write_table(table, tmp_path / "d.parquet")
    dm = CropYieldDataModule(data_path=str(tmp_path / "d.parquet"))
    dm.setup("fit")
    x, y = dm.training_rows()
    assert torch.equal(x, INPUTS) and torch.equal(y, TARGETS)


def test_from_tensors_accepts_numpy_and_names_columns():
    dm = CropYieldDataModule.from_tensors(np.ones((6, 4)), np.zeros((6, 1)), batch_size=2, shuffle=False)
    assert dm.feature_names == ("feature_0", "feature_1", "feature_2", "feature_3")
    assert dm.target_names == ("target_0",)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (2, 4) and y.shape == (2, 1)
    tutorial = CropYieldDataModule.from_tensors(INPUTS, TARGETS)
    assert tutorial.feature_names == FEATURE_NAMES


def test_validation_split_is_seeded_disjoint_and_complete():
    dm = CropYieldDataModule(val_fraction=0.2, seed=3)
    dm.setup("fit")
    train_x, _ = dm.training_rows()
    val_x = torch.cat([x for x, _ in dm.val_dataloader()])
    assert (len(train_x), len(val_x)) == (12, 3)
    rows = sorted(map(tuple, torch.cat([train_x, val_x]).tolist()))
    assert rows == sorted(map(tuple, INPUTS.tolist()))
    again = CropYieldDataModule(val_fraction=0.2, seed=3)
    again.setup("fit")
    assert torch.equal(again.training_rows()[0], train_x)
    other = CropYieldDataModule(val_fraction=0.2, seed=4)
    other.setup("fit")
    assert not torch.equal(other.training_rows()[0], train_x)


def test_limit_rows_gives_the_from_scratch_data():
    dm = CropYieldDataModule(limit_rows=5, shuffle=False)
    dm.setup("fit")
    (x, y), *rest = list(dm.train_dataloader())
    assert torch.equal(x, INPUTS[:5]) and torch.equal(y, TARGETS[:5]) and not rest


def test_standardize_computes_training_statistics():
    dm = CropYieldDataModule(standardize=True)
    dm.setup("fit")
    torch.testing.assert_close(dm.feature_mean, INPUTS.mean(0))
    torch.testing.assert_close(dm.feature_std, INPUTS.std(0, correction=0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"feature_names": ["temp", "wind"]}, "missing column"),
        ({"feature_names": ["temp", "apples"]}, "both a feature and a target"),
        ({"data_path": "a.csv", "csv_path": "b.csv"}, "not both"),
    ],
)
def test_bad_arguments_raise_cropyield_error(kwargs, message):
    with pytest.raises(CropYieldError, match=message):
        CropYieldDataModule(**kwargs)


def test_one_row_is_too_few_to_train():
    with pytest.raises(CropYieldError, match="1 rows are too few"):
        CropYieldDataModule(limit_rows=1).setup("fit")


def test_too_few_rows_for_the_split():
    dm = CropYieldDataModule(limit_rows=3, val_fraction=0.5)
    with pytest.raises(CropYieldError, match="too few"):
        dm.setup("fit")


def test_fast_path_is_chosen_by_size_and_gathers_one_permutation_per_epoch():
    rows = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    small = CropYieldDataModule.from_tensors(rows[:, :3], rows[:, 3:])
    small.setup("fit")
    assert isinstance(small.train_dataloader(), DataLoader)
    dm = CropYieldDataModule.from_tensors(rows[:, :3], rows[:, 3:], batch_size=4, seed=9, fast_path_min_rows=10)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, GatheredBatches) and len(loader) == 3
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(9 + 2))
    loader.sampler.set_epoch(2)
    got = list(loader)
    assert [len(x) for x, _ in got] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in got]), rows[expected, :3])
    assert torch.equal(torch.cat([y for _, y in got]), rows[expected, 3:])
    assert isinstance(dm.val_dataloader(), SlicedBatches)


def test_epoch_permutation_shards_are_disjoint_and_equal_across_ranks():
    shards = [
        EpochPermutation(11, 2, True, seed=1, rank=r, world_size=3).indices(0, torch.device("cpu")) for r in range(3)
    ]
    assert [len(s) for s in shards] == [3, 3, 3]
    together = torch.cat(shards)
    assert len(set(together.tolist())) == 9
    again = EpochPermutation(11, 2, True, seed=1, rank=1, world_size=3).indices(0, torch.device("cpu"))
    assert torch.equal(again, shards[1])


def test_sliced_batches_cover_each_rank_share_in_order():
    rows = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    parts = [torch.cat([x for x, _ in SlicedBatches(rows, 1, 2, r, 2)]) for r in range(2)]
    assert torch.equal(torch.cat(parts), rows[:, :1])


def test_state_dict_restores_the_shuffling_rng():
    dm = CropYieldDataModule()
    state = dm.state_dict()
    expected = torch.rand(3)
    dm.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected)
