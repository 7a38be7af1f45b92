"""Safe checkpoint loading and prediction from Python."""

import pickle
import zipfile

import lightning as L
import numpy as np
import pytest
import torch

from cropyield import (
    INPUTS,
    CropYieldDataModule,
    CropYieldError,
    CropYieldRegressor,
    ManualSGDRegressor,
    load_regressor,
    predict,
)
from cropyield.inference import LinearPredictor, read_checkpoint


def fitted_checkpoint(path, cls=CropYieldRegressor, quiet=None, **dm_kwargs):
    """A checkpoint written by plain Trainer code."""
    L.seed_everything(1, verbose=False)
    model = cls(standardize=dm_kwargs.get("standardize", False), lr=1e-2 if dm_kwargs.get("standardize") else 1e-5)
    trainer = L.Trainer(max_epochs=3, **quiet)
    trainer.fit(model, CropYieldDataModule(**dm_kwargs))
    trainer.save_checkpoint(path)
    return model


class CreatesFile:
    """Unpickling this would create a file: the payload of a malicious checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("cls", [CropYieldRegressor, ManualSGDRegressor])
@pytest.mark.parametrize("standardize", [False, True])
def test_load_regressor_restores_the_variant_in_eval_mode(tmp_path, quiet, cls, standardize):
    trained = fitted_checkpoint(tmp_path / "m.ckpt", cls, quiet, standardize=standardize).eval()
    loaded = load_regressor(tmp_path / "m.ckpt")
    assert type(loaded) is cls and not loaded.training
    with torch.no_grad():
        expected = trained(INPUTS)
    assert torch.equal(predict(loaded, INPUTS), expected)
    assert torch.equal(predict(LinearPredictor.from_checkpoint(tmp_path / "m.ckpt"), INPUTS), expected)
    if standardize:
        assert not torch.equal(loaded.feature_mean, torch.zeros(3))


def test_predict_accepts_lists_arrays_and_tensors():
    model = CropYieldRegressor()
    with torch.no_grad():
        expected = model(torch.tensor([[75.0, 63.0, 44.0]]))
    for rows in ([[75, 63, 44]], [75, 63, 44], np.array([[75, 63, 44]]), torch.tensor([[75.0, 63.0, 44.0]])):
        got = predict(model, rows)
        assert got.dtype == torch.float32 and got.shape == (1, 2)
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1, 2]], "expected 3 values per row"),
        ([[1, 2, 3], [4, 5]], "rows of equal length"),
        ([["a", 2, 3]], "must be numbers"),
        ([[1, float("nan"), 3]], "finite"),
        ([[1, float("inf"), 3]], "finite"),
    ],
)
def test_predict_rejects_bad_rows(rows, message):
    with pytest.raises(CropYieldError, match=message):
        predict(CropYieldRegressor(), rows)


def test_missing_directory_and_non_checkpoint_files(tmp_path):
    with pytest.raises(CropYieldError, match="no such checkpoint"):
        load_regressor(tmp_path / "nope.ckpt")
    with pytest.raises(CropYieldError, match="is a directory"):
        load_regressor(tmp_path)
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(CropYieldError, match="not a PyTorch checkpoint"):
        load_regressor(tmp_path / "notes.ckpt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.ckpt")
    with pytest.raises(CropYieldError, match="not a cropyield checkpoint"):
        load_regressor(tmp_path / "other.ckpt")


def test_truncated_checkpoints_are_refused(tmp_path, quiet):
    fitted_checkpoint(tmp_path / "m.ckpt", quiet=quiet)
    data = (tmp_path / "m.ckpt").read_bytes()
    for keep in (0.1, 0.5, 0.9, 0.99):
        (tmp_path / "cut.ckpt").write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CropYieldError):
            load_regressor(tmp_path / "cut.ckpt")


def test_a_bit_flip_anywhere_is_refused_or_harmless(tmp_path, quiet):
    model = CropYieldRegressor()
    L.Trainer(max_epochs=1, **quiet).fit(model, CropYieldDataModule())
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "m.ckpt")
    original = read_checkpoint(tmp_path / "m.ckpt")
    data = bytearray((tmp_path / "m.ckpt").read_bytes())
    refused = 0
    for position in range(0, len(data), 3):
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        (tmp_path / "f.ckpt").write_bytes(flipped)
        try:
            loaded = read_checkpoint(tmp_path / "f.ckpt")
        except CropYieldError:
            refused += 1
            continue
        # Not refused: then the flip hit bytes that carry no content (zip padding, unused fields).
        assert loaded.keys() == original.keys()
        assert loaded["hyper_parameters"] == original["hyper_parameters"]
        for name, tensor in original["state_dict"].items():
            assert torch.equal(loaded["state_dict"][name], tensor), position
    assert refused > len(data) // 6


def test_inconsistent_shape_is_refused(tmp_path, quiet):
    fitted_checkpoint(tmp_path / "m.ckpt", quiet=quiet)
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    checkpoint["state_dict"]["linear.weight"] = torch.zeros(2, 4)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CropYieldError, match=r"shape \(2, 4\).*\(2, 3\)"):
        load_regressor(tmp_path / "bad.ckpt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["state_dict"].update(feature_mean=torch.zeros(4)), "feature_mean does not hold 3 values"),
        (lambda c: c["hyper_parameters"].update(target_names=["apples"]), "target_names must be 2 names"),
        (lambda c: c["state_dict"].pop("linear.bias"), "not a cropyield checkpoint"),
    ],
)
def test_inconsistent_contents_are_refused(tmp_path, quiet, change, message):
    fitted_checkpoint(tmp_path / "m.ckpt", quiet=quiet)
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    for load in (load_regressor, LinearPredictor.from_checkpoint):
        with pytest.raises(CropYieldError, match=message):
            load(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("where", ["hyper_parameters", "state_dict", "top_level"])
def test_pickled_payloads_are_refused_without_side_effects(tmp_path, quiet, where):
    fitted_checkpoint(tmp_path / "m.ckpt", quiet=quiet)
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    marker = tmp_path / "pwned"
    if where == "top_level":
        checkpoint = CreatesFile(marker)
    else:
        checkpoint[where]["evil"] = CreatesFile(marker)
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CropYieldError, match="refused") as info:
        load_regressor(tmp_path / "evil.ckpt")
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()
    # The payload is real: plain unpickling runs it.
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()


def test_checkpoint_is_a_zip_with_crcs(tmp_path, quiet):
    fitted_checkpoint(tmp_path / "m.ckpt", quiet=quiet)
    with zipfile.ZipFile(tmp_path / "m.ckpt") as archive:
        assert archive.testzip() is None
        assert all(info.CRC for info in archive.infolist() if info.file_size)
