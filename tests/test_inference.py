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
from cropyield.callbacks import CSVPredictionWriter
from cropyield.inference import LinearPredictor, read_checkpoint
from cropyield.predict_cli import main

from .conftest import assert_one_line_error, run


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


# --- the cropyield-predict command's output ------------------------------------------------------


@pytest.fixture
def tutorial_ckpt(tmp_path, quiet):
    fitted_checkpoint(tmp_path / "m.ckpt", quiet=quiet)
    return tmp_path / "m.ckpt"


def expected_predictions(ckpt, rows) -> list[list[str]]:
    """The Lightning model's predictions (another code path than the command's), as the command writes them."""
    with torch.no_grad():
        preds = load_regressor(ckpt)(torch.tensor(rows, dtype=torch.float32))
    return [[repr(v) for v in row] for row in preds.tolist()]


def test_predict_command_refuses_an_out_that_names_its_input(tmp_path, tutorial_ckpt):
    regions = tmp_path / "regions.csv"
    regions.write_bytes(b"temp,rainfall,humidity\n75,63,44\n")
    (tmp_path / "link.csv").symlink_to(regions)
    (tmp_path / "sub").mkdir()
    checkpoint = tutorial_ckpt.read_bytes()
    for out in ("regions.csv", "./sub/../regions.csv", str(regions), "link.csv"):
        result = run("cropyield-predict", "--ckpt", tutorial_ckpt, "--csv", "regions.csv", "--out", out, cwd=tmp_path,
                     check_rc=None)  # fmt: skip
        assert_one_line_error(result, f"--out {out}", "is the --csv input")
        assert regions.read_bytes() == b"temp,rainfall,humidity\n75,63,44\n"
    result = run(
        "cropyield-predict", "--ckpt", "m.ckpt", "75", "63", "44", "--out", "m.ckpt", cwd=tmp_path, check_rc=None
    )
    assert_one_line_error(result, "--out m.ckpt is the checkpoint")
    assert tutorial_ckpt.read_bytes() == checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "m.ckpt", "regions.csv", "sub"]


def test_predict_command_out_keeps_every_input_column_as_the_input_wrote_it(tmp_path, tutorial_ckpt, capsys):
    # Another column order, a name to join on (quoted, with a comma), a BOM, CRLF line ends, a blank
    # line, values float32 cannot hold exactly, a target already present: the input's bytes are kept.
    bom, header = "\ufeff".encode(), b'id,"name",humidity,temp,rainfall,apples'
    records = [b'7,"Nord, haut",44,75,2685.6,1.5', b"8,Sud,50.10,80,70,0.1", b'9,"a ""b""",0.3,1e2,-0.0,7']
    text = bom + header + b"\r\n" + records[0] + b"\r\n\r\n" + records[1] + b"\r\n" + records[2]  # no last line end
    (tmp_path / "regions.csv").write_bytes(text)
    main(["--ckpt", str(tutorial_ckpt), "--csv", str(tmp_path / "regions.csv"), "--out", str(tmp_path / "out.csv")])
    assert capsys.readouterr().out == f"wrote 3 predictions to {tmp_path / 'out.csv'}\n"
    preds = [
        ",".join(p).encode()
        for p in expected_predictions(tutorial_ckpt, [[75, 2685.6, 44], [80, 70, 50.1], [100, 0, 0.3]])
    ]
    assert (tmp_path / "out.csv").read_bytes() == (
        bom + header + b",predicted_apples,predicted_oranges\r\n"
        + records[0] + b"," + preds[0] + b"\r\n"
        + records[1] + b"," + preds[1] + b"\r\n"
        + records[2] + b"," + preds[2] + b"\n"
    )  # fmt: skip
    assert (tmp_path / "regions.csv").read_bytes() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "out.csv", "regions.csv"]


def test_predict_command_out_from_values_and_from_parquet(tmp_path, tutorial_ckpt, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    main(["--ckpt", str(tutorial_ckpt), "75", "63", "44.0", "8e1", "70", "50", "--out", str(tmp_path / "v.csv")])
    preds = expected_predictions(tutorial_ckpt, [[75, 63, 44], [80, 70, 50]])
    assert (tmp_path / "v.csv").read_text() == (
        "temp,rainfall,humidity,apples,oranges\n" + f"75,63,44.0,{','.join(preds[0])}\n8e1,70,50,{','.join(preds[1])}\n"
    )
    columns = {
        "region": ["a, b", "c"],
        "rainfall": pa.array([2685.6, 70.0], pa.float32()),
        "temp": [75, 80],
        "humidity": [44.5, 50.0],
    }
    pq.write_table(pa.table(columns), tmp_path / "r.parquet")
    main(["--ckpt", str(tutorial_ckpt), "--csv", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "p.csv")])
    preds = expected_predictions(tutorial_ckpt, [[75, 2685.6, 44.5], [80, 70, 50]])
    assert (tmp_path / "p.csv").read_text() == (
        "region,rainfall,temp,humidity,apples,oranges\n"
        f'"a, b",2685.6,75,44.5,{",".join(preds[0])}\nc,70,80,50,{",".join(preds[1])}\n'
    )
    capsys.readouterr()


def test_predict_command_out_failing_midway_leaves_the_previous_file(tmp_path, tutorial_ckpt, monkeypatch, capsys):
    (tmp_path / "out.csv").write_text("an earlier run's predictions\n")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cropyield.inference.os.fsync", full)
    with pytest.raises(SystemExit) as info:
        main(["--ckpt", str(tutorial_ckpt), "75", "63", "44", "--out", str(tmp_path / "out.csv")])
    assert info.value.code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (tmp_path / "out.csv").read_text() == "an earlier run's predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "out.csv"]


def test_predict_command_prints_the_unit_the_checkpoint_records(tmp_path, tutorial_ckpt, quiet, capsys):
    def printed(ckpt, *extra):
        main(["--ckpt", str(ckpt), "75", "63", "44", *extra])
        return capsys.readouterr().out.strip().split(" -> ")[1]

    assert torch.load(tutorial_ckpt, weights_only=True)["hyper_parameters"]["units"] == "tons per hectare"
    assert printed(tutorial_ckpt).endswith(" (tons per hectare)")
    assert printed(tutorial_ckpt, "--units", "kg").endswith(" (kg)")
    assert "(" not in printed(tutorial_ckpt, "--units", "")
    csv = tmp_path / "hg.csv"
    csv.write_text(
        "temp,rainfall,humidity,apples,oranges\n" + "".join(f"{i},{i * 2},{i % 3},{i},{-i}\n" for i in range(9))
    )
    fitted_checkpoint(tmp_path / "file.ckpt", quiet=quiet, data_path=str(csv))
    assert torch.load(tmp_path / "file.ckpt", weights_only=True)["hyper_parameters"]["units"] is None
    assert "(" not in printed(tmp_path / "file.ckpt")
    assert printed(tmp_path / "file.ckpt", "--units", "hg/ha").endswith(" (hg/ha)")
    model = CropYieldRegressor(units="hg/ha")
    L.Trainer(max_epochs=1, **quiet).fit(model, CropYieldDataModule())
    assert model.hparams.units == "hg/ha"  # given: kept over the data module's
    # A checkpoint from before units were recorded: the tutorial's unit for the tutorial's names only.
    for names, unit in ((None, "tons per hectare"), (["a", "b", "c"], None)):
        old = torch.load(tutorial_ckpt, weights_only=True)
        del old["hyper_parameters"]["units"]
        if names:
            old["hyper_parameters"]["feature_names"] = names
        torch.save(old, tmp_path / "old.ckpt")
        assert LinearPredictor.from_checkpoint(tmp_path / "old.ckpt").units == unit
        shown = printed(tmp_path / "old.ckpt")
        assert shown.endswith(f" ({unit})") if unit else "(" not in shown


def test_prediction_writer_never_overwrites_the_data_and_writes_atomically(tmp_path, quiet):
    data = tmp_path / "d.csv"
    data.write_text("temp,rainfall,humidity,apples,oranges\n1,2,3,4,5\n6,7,8,9,10\n")
    model = CropYieldRegressor()
    for out in (data, tmp_path / "link.csv"):
        if out != data:
            out.symlink_to(data)
        trainer = L.Trainer(callbacks=[CSVPredictionWriter(str(out))], **quiet)
        with pytest.raises(CropYieldError, match="would overwrite or join the data"):
            trainer.predict(model, CropYieldDataModule(data_path=str(data)))
        assert data.read_text() == "temp,rainfall,humidity,apples,oranges\n1,2,3,4,5\n6,7,8,9,10\n"
    (tmp_path / "p.csv").write_text("earlier\n")

    class Fails(CropYieldRegressor):
        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                raise RuntimeError("failed midway")
            return super().predict_step(batch, batch_idx)

    trainer = L.Trainer(callbacks=[CSVPredictionWriter(str(tmp_path / "p.csv"))], **quiet)
    with pytest.raises(RuntimeError, match="failed midway"):
        trainer.predict(Fails(), CropYieldDataModule(batch_size=1, data_path=str(data)))
    assert (tmp_path / "p.csv").read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "link.csv", "p.csv"]
