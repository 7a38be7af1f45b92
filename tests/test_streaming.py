"""Streaming from files and folders: the epoch plan, sharding, the split, resuming, errors."""

import math
import signal
import subprocess
import time

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cropyield import CropYieldDataModule, CropYieldError, CropYieldRegressor, LeastSquaresRegressor, load_regressor
from cropyield.batches import Chunk, Chunks, EpochPermutation, GatheredBatches
from cropyield.files import data_files, read_table
from cropyield.pieces import list_pieces
from cropyield.solution import solve
from cropyield.streaming import _BLOCKS_AHEAD, Blocks, StreamedBatches, StreamSource, held_out

from .conftest import BIN, assert_one_line_error, run, write_csv
from .test_model import synthetic

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

COLUMNS = ["temp", "rainfall", "humidity", "apples", "oranges"]


def table(rows: int, seed: int, first: int = 0) -> np.ndarray:
    """Distinct rows (the first column numbers them) from a known linear model plus noise."""
    rng = np.random.default_rng(seed)
    x = np.c_[np.arange(first, first + rows), rng.normal(90, 30, rows), rng.normal(55, 12, rows)]
    y = x @ np.array([[0.01, 0.8, 0.7], [0.02, 0.8, 0.9]]).T + rng.normal(0, 1, (rows, 2))
    return np.c_[x, y].astype(np.float32)


def write_folder(folder, sizes=(700, 1300, 2000), row_group=250, csv_last=False):
    """Files of unequal sizes, Parquet (the last one CSV with ``csv_last``), rows numbered across them."""
    folder.mkdir(parents=True, exist_ok=True)
    parts, first = [], 0
    for k, n in enumerate(sizes):
        rows = table(n, seed=k, first=first)
        first += n
        parts.append(rows)
        if csv_last and k == len(sizes) - 1:
            write_csv(folder / f"part-{k}.csv", COLUMNS, rows.tolist())
        else:
            arrow = pa.table({c: rows[:, j] for j, c in enumerate(COLUMNS)})
            pq.write_table(arrow, folder / f"part-{k}.parquet", row_group_size=row_group, write_page_checksum=True)
    return np.concatenate(parts)


def served(loader, epoch=0) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [torch.cat(batch, dim=1) for batch in loader]


def test_a_folder_is_its_files_in_sorted_order(tmp_path):
    expected = write_folder(tmp_path / "d", csv_last=True)
    dm = CropYieldDataModule(data_path=str(tmp_path / "d"))
    dm.setup("fit")
    x, y = dm.training_rows()
    assert torch.equal(torch.cat([x, y], 1), torch.from_numpy(expected))
    parts = [read_table(p, COLUMNS) for p in data_files(tmp_path / "d")]
    assert np.array_equal(np.concatenate(parts), expected)


def write_mixed_folder(folder) -> np.ndarray:
    """write_folder's rows, but each file holds the columns in its own order, with unused extra ones:
    Parquet with a numeric ``weight``, a 3-block CSV with a quoted text ``region`` holding commas."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [table(n, seed=k, first=first) for k, (n, first) in enumerate([(700, 0), (1300, 700), (300, 2000)])]
    orders = [[4, 2, 0, 3, 1], [1, 3, 0, 4, 2], [3, 0, 4, 1, 2]]
    for k in (0, 1):
        arrow = {COLUMNS[j]: rows[k][:, j] for j in orders[k]}
        arrow["weight"] = np.full(len(rows[k]), 7.0 + k)
        pq.write_table(pa.table(arrow), folder / f"part-{k}.parquet", row_group_size=250)
    header = ["region", *(COLUMNS[j] for j in orders[2])]
    lines = [",".join(header)] + [f'"r{i}, north",' + ",".join(repr(float(v)) for v in r[orders[2]]) for i, r in
                                  enumerate(rows[2])]  # fmt: skip
    (folder / "part-2.csv").write_text("\n".join(lines) + "\n")
    return np.concatenate(rows)


def test_a_folder_is_read_by_column_name_in_memory_and_streamed(tmp_path):
    expected = torch.from_numpy(write_mixed_folder(tmp_path / "d"))
    names = {"feature_names": COLUMNS[:3], "target_names": COLUMNS[3:]}
    dm = CropYieldDataModule(data_path=str(tmp_path / "d"), **names)
    dm.setup("fit")
    assert torch.equal(torch.cat(dm.training_rows(), 1), expected)
    streamed = CropYieldDataModule(data_path=str(tmp_path / "d"), streaming=True, batch_size=128, **names)
    streamed.setup("predict")
    assert torch.equal(torch.cat([torch.cat(batch, 1) for batch in streamed.predict_dataloader()]), expected)
    # CSV blocks after the first are parsed with their own file's header too.
    pieces = list_pieces(data_files(tmp_path / "d"), COLUMNS, csv_block_bytes=4096)
    assert sum(p.path.endswith(".csv") for p in pieces) >= 3
    source = StreamSource(pieces, COLUMNS, 0.0, seed=0)
    assert torch.equal(torch.from_numpy(np.concatenate([source.read(i) for i in range(len(pieces))])), expected)


def test_a_folder_file_missing_a_column_or_with_one_more_than_the_first_is_named(tmp_path):
    write_folder(tmp_path / "d")
    write_csv(tmp_path / "d" / "zz.csv", ["temp", "rain", "humidity", "apples", "oranges"], [[1, 2, 3, 4, 5]])
    for streaming in (False, True):
        with pytest.raises(CropYieldError, match=r"zz\.csv: missing column\(s\) \['rainfall'\]") as info:
            CropYieldDataModule(data_path=str(tmp_path / "d"), streaming=streaming)
        assert "\n" not in str(info.value)
    write_csv(tmp_path / "d" / "zz.csv", [*COLUMNS, "rain"], [[1, 2, 3, 4, 5, 6]])
    # Features taken from the first file: a column only some files hold could be one of them.
    with pytest.raises(CropYieldError, match=r"zz\.csv: has column\(s\) \['rain'\] that part-0\.parquet lacks"):
        CropYieldDataModule(data_path=str(tmp_path / "d"))
    # Named features: the extra column is ignored.
    dm = CropYieldDataModule(data_path=str(tmp_path / "d"), feature_names=COLUMNS[:3])
    dm.setup("fit")
    assert torch.cat(dm.training_rows(), 1)[-1].tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("shuffle", [True, False])
def test_streaming_serves_every_row_once_per_epoch_reproducibly(tmp_path, shuffle):
    rows = write_folder(tmp_path / "d", csv_last=True)
    pieces = list_pieces(data_files(tmp_path / "d"), COLUMNS, csv_block_bytes=4096)
    source = StreamSource(pieces, COLUMNS, 0.0, seed=3)
    loader = StreamedBatches(source, 3, batch_size=64, shuffle=shuffle, seed=3, shuffle_buffer=500)
    epochs = [torch.cat(served(loader, e)) for e in range(2)]
    for got in epochs:
        assert got.shape == rows.shape and len(served(loader)) == len(loader) == -(-len(rows) // 64)
        assert torch.equal(got[got[:, 0].argsort()], torch.from_numpy(rows))
    again = StreamedBatches(source, 3, batch_size=64, shuffle=shuffle, seed=3, shuffle_buffer=500)
    assert torch.equal(torch.cat(served(again, 1)), epochs[1])
    assert torch.equal(epochs[0], epochs[1]) != shuffle
    if not shuffle:
        assert torch.equal(epochs[0], torch.from_numpy(rows))


def test_ddp_shares_are_disjoint_and_serve_the_same_number_of_batches(tmp_path):
    rows = write_folder(tmp_path / "d")
    source = StreamSource(list_pieces(data_files(tmp_path / "d"), COLUMNS), COLUMNS, 0.0, seed=0)
    for world in (2, 3):
        loaders = [StreamedBatches(source, 3, 50, True, 0, rank, world, shuffle_buffer=300) for rank in range(world)]
        shares = [served(loader, epoch=1) for loader in loaders]
        assert len({len(share) for share in shares}) == 1
        ids = [set(torch.cat(share)[:, 0].tolist()) for share in shares]
        assert sum(len(i) for i in ids) == len(set().union(*ids)) == world * loaders[0].quota
        # What is left out is at most (world - 1) pieces' worth, with 250-row row groups.
        assert len(rows) - world * loaders[0].quota <= (world - 1) * 250 + world
        exact = [StreamedBatches(source, 3, 50, True, 0, rank, world, exact_pass=True) for rank in range(world)]
        shares = [served(loader) for loader in exact]
        assert len({len(share) for share in shares}) == 1
        together = torch.cat([torch.cat(share) for share in shares])
        assert torch.equal(together[together[:, 0].argsort()], torch.from_numpy(rows))


def test_held_out_rows_are_stable_disjoint_and_about_the_fraction(tmp_path):
    rows = write_folder(tmp_path / "d")
    pieces = list_pieces(data_files(tmp_path / "d"), COLUMNS)
    source = StreamSource(pieces, COLUMNS, 0.2, seed=5)
    val = np.concatenate([source.read(i, "val") for i in range(len(pieces))])
    train = np.concatenate([source.read(i, "train") for i in range(len(pieces))])
    assert len(val) + len(train) == len(rows) and not set(val[:, 0]) & set(train[:, 0])
    assert abs(len(val) / len(rows) - 0.2) < 0.03
    # The same rows held out whatever the pieces (another row-group size) and the processes.
    write_folder(tmp_path / "e", row_group=333)
    other_pieces = list_pieces(data_files(tmp_path / "e"), COLUMNS)
    other = StreamSource(other_pieces, COLUMNS, 0.2, seed=5)
    assert len(other_pieces) != len(pieces)
    assert np.array_equal(np.concatenate([other.read(i, "val") for i in range(len(other_pieces))]), val)
    for world in (1, 2):
        loaders = [StreamedBatches(source, 3, 64, True, 5, r, world, shuffle_buffer=256) for r in range(world)]
        trained = set(torch.cat([torch.cat(served(loader, 2)) for loader in loaders])[:, 0].tolist())
        assert not trained & set(val[:, 0].tolist())
    assert not np.array_equal(held_out(pieces[2], 5, 0.2), held_out(pieces[2], 6, 0.2))  # another seed, other rows


@pytest.mark.parametrize("kind", ["streamed", "gathered", "chunks of 3"])
def test_a_loader_restored_mid_epoch_serves_exactly_the_rest(tmp_path, kind):
    rows = write_folder(tmp_path / "d")

    def make(epoch):
        if kind == "streamed":
            source = StreamSource(list_pieces(data_files(tmp_path / "d"), COLUMNS), COLUMNS, 0.0, seed=1)
            loader = StreamedBatches(source, 3, 64, True, 1, shuffle_buffer=320)
        else:
            loader = GatheredBatches(torch.from_numpy(rows), 3, EpochPermutation(len(rows), 64, True, seed=1))
            loader = Chunks(loader, 3) if kind.startswith("chunks") else loader
        loader.sampler.set_epoch(epoch)
        return loader

    def flat(items):  # the rows of each batch, a chunk's batches one by one
        return [torch.cat(b, 1) for item in items for b in (item if isinstance(item, Chunk) else [item])]

    batches = flat(make(2))
    # `stop` batches trained on: 7 ends inside a chunk of 3, as max_steps can cut one short.
    for stop in (1, 4, 5, 7, len(batches) - 1, len(batches)):
        loader, trained = make(2), [0]
        loader.progress = lambda trained=trained: trained[0]  # what the Trainer counts (chunks: its steps)
        iterator, fetched = iter(loader), 0
        while fetched <= stop and fetched < len(batches):  # the Trainer fetches one item ahead
            item = next(iterator)
            fetched += len(item) if isinstance(item, Chunk) else 1
        trained[0] = stop
        resumed = make(0)  # a new process: the epoch comes from the state
        resumed.load_state_dict(loader.state_dict())
        rest = flat(resumed)
        expected = batches[stop:] if stop < len(batches) else flat(make(3))
        assert len(rest) == len(expected) and all(torch.equal(a, b) for a, b in zip(rest, expected, strict=True))


@pytest.mark.parametrize("chunks", [False, True])
def test_a_restored_position_holds_whatever_epoch_the_trainer_counts(chunks):
    # Lightning counts an epoch that max_steps stopped as done and resumes one epoch ahead: the
    # restored loader still serves the rest of its own epoch, then the epochs after it in order.
    rows = torch.arange(200.0).reshape(50, 4)

    def make():
        loader = GatheredBatches(rows, 3, EpochPermutation(len(rows), 4, True, seed=1))
        return Chunks(loader, 3) if chunks else loader

    def flat(items):
        return [torch.cat(b, 1) for item in items for b in (item if isinstance(item, Chunk) else [item])]

    def epoch(n):
        loader = make()
        loader.sampler.set_epoch(n)
        return flat(loader)

    loader = make()
    loader.load_state_dict({"epoch": 0, "batches": 5})
    served = []
    for trainer_epoch in (1, 2):
        loader.sampler.set_epoch(trainer_epoch)
        served += flat(loader)
    expected = epoch(0)[5:] + epoch(1)
    assert len(served) == len(expected) and all(torch.equal(a, b) for a, b in zip(served, expected, strict=True))


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_a_run_stopped_by_max_steps_and_resumed_takes_the_uninterrupted_runs_batches(quiet, tmp_path, steps_per_call):
    x, y = synthetic(1000, std=3.0, offset=20.0)

    def fit(max_steps, ckpt_path=None):
        dm = CropYieldDataModule.from_tensors(x, y, batch_size=64, seed=5, fast_path_min_rows=100,
                                              steps_per_call=steps_per_call)  # fmt: skip
        torch.manual_seed(0)
        model, trainer = CropYieldRegressor(), L.Trainer(max_steps=max_steps, **quiet)
        trainer.fit(model, dm, ckpt_path=ckpt_path, weights_only=True)
        return trainer, model

    trainer, _ = fit(5)  # stops inside the first epoch (16 batches), which Lightning then counts as done
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    resumed = fit(20, tmp_path / "stopped.ckpt")[1]
    uninterrupted = fit(20)[1]
    assert torch.equal(resumed.linear.weight, uninterrupted.linear.weight)
    assert torch.equal(resumed.linear.bias, uninterrupted.linear.bias)


def test_statistics_standardize_and_the_exact_fit_agree_streamed_and_in_memory(tmp_path):
    write_folder(tmp_path / "d", csv_last=True)
    results = []
    for streaming in (False, True):
        L.seed_everything(0, verbose=False)
        dm = CropYieldDataModule(data_path=str(tmp_path / "d"), streaming=streaming, batch_size=256, standardize=True)
        model = LeastSquaresRegressor(standardize=True)
        L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu").fit(model, dm)  # fmt: skip
        results.append((dm.statistics(), dm.feature_mean, model.linear.weight.detach().clone()))
    (a, mean_a, w_a), (b, mean_b, w_b) = results
    assert float(a.count) == float(b.count) == 4000
    for got, expected in zip(a.feature_scale(), b.feature_scale(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(solve(a).weight, solve(b).weight, rtol=1e-10, atol=0)
    assert torch.equal(mean_a, mean_b)
    torch.testing.assert_close(w_a, w_b, rtol=1e-6, atol=1e-6)


def test_statistics_cost_a_pass_only_when_streamed_and_not_yet_taken(tmp_path):
    write_folder(tmp_path / "d")
    in_memory = CropYieldDataModule(data_path=str(tmp_path / "d"))
    in_memory.setup("fit")
    streamed = CropYieldDataModule(data_path=str(tmp_path / "d"), streaming=True)
    streamed.setup("fit")
    assert in_memory.statistics_in_hand and not streamed.statistics_in_hand
    streamed.statistics()
    assert streamed.statistics_in_hand


@pytest.mark.slow
def test_streamed_standardized_sgd_ends_within_one_percent_of_in_memory(tmp_path):
    write_folder(tmp_path / "d", sizes=(20_000, 30_000, 10_000), row_group=5000)
    final = {}
    for streaming in ("false", "true"):
        (tmp_path / streaming).mkdir()
        args = ["--config", "fast.yaml", "--data.data_path", tmp_path / "d", "--data.streaming", streaming,
                "--data.batch_size", "256", "--trainer.max_epochs", "2", "--data.shuffle_buffer", "20000",
                "--trainer.limit_val_batches", "0"]  # fmt: skip
        result = run("cropyield", "fit", *args, cwd=tmp_path / streaming)
        final[streaming] = float(result.stdout.split("Final training MSE: ")[1].split()[0])
    assert abs(final["true"] / final["false"] - 1) < 0.01, final


def fit_killed_mid_epoch_then_resumed(folder, args, at_step):
    """Runs `cropyield fit`, SIGKILLs it once a step checkpoint past ``at_step`` exists, resumes it."""
    command = [str(BIN / "cropyield"), "fit", *map(str, args)]
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if torch.load(last, weights_only=True)["global_step"] >= at_step:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    reached = torch.load(last, weights_only=True)
    loader_state = reached["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    result = run("cropyield", "fit", *args, "--ckpt_path", "last", cwd=folder)
    assert "Restored all states" in result.stdout and "not resumable" not in result.stderr, result.stderr
    return reached["global_step"], loader_state


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [True, False], ids=["streamed_folder", "in_memory_fast_path"])
def test_sigkill_mid_epoch_then_resume_neither_repeats_nor_skips_a_row(tmp_path, streaming):
    write_folder(tmp_path / "d", sizes=(4000, 6000, 2000), row_group=1000)
    args = ["--data.data_path", tmp_path / "d", "--data.batch_size", "20", "--trainer.max_epochs", "3",
            "--checkpoint.every_n_train_steps", "7", "--trainer.limit_val_batches", "0", "--data.standardize", "true",
            "--model.lr", "0.01"]  # fmt: skip
    args += (
        ["--data.streaming", "true", "--data.shuffle_buffer", "1500"]
        if streaming
        else ["--data.fast_path_min_rows", "100", "--checkpoint.every_n_train_steps", "8"]  # chunks of 8 batches
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    run("cropyield", "fit", *args, cwd=tmp_path / "full")
    step, state = fit_killed_mid_epoch_then_resumed(tmp_path / "killed", args, at_step=800)
    assert step % 600 and 0 < state["batches"] < 600, (step, state)  # killed in the middle of an epoch
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == resumed["global_step"] == 3 * 600  # the final weights are in last.ckpt
    for name in ("linear.weight", "linear.bias"):
        assert torch.equal(full["state_dict"][name], resumed["state_dict"][name])


def test_last_ckpt_holds_the_final_step_between_step_checkpoints(tmp_path):
    result = run("cropyield", "fit", "--trainer.max_epochs", "5", "--checkpoint.every_n_train_steps", "4",
                 "--trainer.limit_val_batches", "0", cwd=tmp_path)  # fmt: skip
    assert "Final training MSE" in result.stdout
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 15  # 5 epochs of 3 batches; step checkpoints fell on 4, 8, 12


@pytest.fixture
def previous(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"previous run")
    return folder / "last.ckpt"


def test_a_corrupt_row_group_met_mid_pass_is_one_line_and_writes_nothing(tmp_path, previous):
    write_folder(tmp_path / "d", row_group=250)
    path = tmp_path / "d" / "part-2.parquet"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # a data page in the middle of the file; the footer intact
    path.write_bytes(bytes(data))
    result = run("cropyield", "fit", "--config", "exact.yaml", "--data.data_path", "d", "--data.streaming", "true",
                 "--data.batch_size", "100", cwd=tmp_path, check_rc=None)  # fmt: skip
    assert_one_line_error(result, "cropyield: error:", "part-2.parquet", "row group")
    assert [p.name for p in previous.parent.iterdir()] == ["last.ckpt"] and previous.read_bytes() == b"previous run"


def test_a_bad_cell_in_a_late_csv_block_names_its_line_and_column(tmp_path, previous):
    rows = table(3000, seed=0).tolist()
    rows[2500][1] = "abc"
    write_csv(tmp_path / "d.csv", COLUMNS, rows)
    dm = CropYieldDataModule(data_path=str(tmp_path / "d.csv"), streaming=True)
    pieces = list_pieces(dm._files, COLUMNS, csv_block_bytes=4096)
    assert len(pieces) > 10
    result = run("cropyield", "fit", "--data.data_path", "d.csv", "--data.streaming", "true", "--data.batch_size",
                 "100", "--trainer.max_epochs", "1", cwd=tmp_path, check_rc=None)  # fmt: skip
    assert_one_line_error(result, "cropyield: error:", "d.csv, line 2502, column 'rainfall': 'abc' is not a number")
    assert previous.read_bytes() == b"previous run"


def test_streaming_needs_a_path_and_predicts_like_in_memory(tmp_path, quiet):
    with pytest.raises(CropYieldError, match="streaming=True reads files"):
        CropYieldDataModule(streaming=True)
    write_folder(tmp_path / "d")
    model = CropYieldRegressor()
    outputs = []
    for streaming in (False, True):
        dm = CropYieldDataModule(data_path=str(tmp_path / "d"), streaming=streaming, batch_size=128)
        outputs.append(torch.cat(L.Trainer(**quiet).predict(model, dm)))
    assert torch.equal(outputs[0], outputs[1]) and len(outputs[0]) == 4000


def test_a_checkpoint_from_the_middle_of_an_exact_pass_resumes_it(tmp_path, quiet):
    write_folder(tmp_path / "d")

    def fit(model, ckpt_path=None):
        every = ModelCheckpoint(tmp_path / "ckpts", "{step}", every_n_train_steps=5, save_top_k=-1)
        options = {**quiet, "enable_checkpointing": True, "callbacks": [every]}
        dm = CropYieldDataModule(data_path=str(tmp_path / "d"), streaming=True, batch_size=300)
        L.Trainer(max_epochs=1, **options).fit(model, dm, ckpt_path=ckpt_path)
        return model

    whole = fit(LeastSquaresRegressor())
    middle = tmp_path / "ckpts" / "step=5.ckpt"  # 5 batches of the pass read
    # One batch per row group (250, 250, 200 rows in file 0; 250, 250 in file 1): 1,200 rows.
    assert torch.load(middle, weights_only=True)["cropyield"]["partial_pass"]["count"] == 1200
    with pytest.raises(CropYieldError, match="middle of an exact least-squares pass"):
        load_regressor(middle)
    resumed = fit(LeastSquaresRegressor(), ckpt_path=middle)
    torch.testing.assert_close(resumed.linear.weight, whole.linear.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.linear.bias, whole.linear.bias, rtol=1e-6, atol=1e-6)
    assert resumed.factor.count == 4000


def test_exact_reads_of_float32_parquet_stay_float32_and_give_the_float64_factor(tmp_path):
    from cropyield.pieces import read_piece
    from cropyield.reference import QRFactor

    rows = np.random.default_rng(4).normal([80, 90, 55, 60, 70], [10, 20, 5, 8, 9], (3000, 5)).astype(np.float32)
    pq.write_table(pa.table(dict(zip(COLUMNS, rows.T, strict=True))), tmp_path / "d.parquet", row_group_size=700)
    pieces = list_pieces([tmp_path / "d.parquet"], COLUMNS)
    source = StreamSource(pieces, COLUMNS, 0.0, seed=0, dtype=torch.float64)
    assert source.read(0).dtype == np.float32 and np.array_equal(source.read(0), rows[:700])
    expected = QRFactor.empty(3, 2)
    for piece in pieces:  # the same rows widened to float64 before the accumulator sees them
        expected = expected.update(torch.from_numpy(read_piece(piece, COLUMNS, np.float64)))
    got = source.statistics(3)
    for name in ("count", "shift", "scale", "r", "low", "high"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_blocks_hand_a_block_out_again_only_once_nothing_refers_to_it():
    blocks = Blocks(4, 2)
    first = blocks.take(3, np.float32)
    assert first.shape == (3, 2) and first.strides == (4, 16) and first.dtype == np.float32  # by columns
    first_at = first.ctypes.data
    held = torch.from_numpy(first)[1:]  # a tensor of a view of the block
    del first
    second = blocks.take(4, np.float32)  # the first block is still held: another one
    second_at = second.ctypes.data
    assert not np.shares_memory(second, held.numpy())
    wide = blocks.take(4, np.float64)  # a float64 block of its own
    assert wide.dtype == np.float64 and wide.ctypes.data not in (first_at, second_at)
    del second
    assert blocks.take(4, np.float32).ctypes.data == second_at  # let go: handed out again
    del held
    assert blocks.take(1, np.float32).ctypes.data == first_at


def test_the_exact_pass_serves_the_files_rows_in_order_and_reuses_only_blocks_let_go(tmp_path):
    # 9 row groups of at most 250 rows, then a CSV file of 2,000 (read whole, in float64, then copied)
    expected = torch.from_numpy(write_folder(tmp_path / "d", csv_last=True)).double()
    pieces = list_pieces(data_files(tmp_path / "d"), COLUMNS)
    source = StreamSource(pieces, COLUMNS, 0.0, seed=0, dtype=torch.float64)
    batches = StreamedBatches(source, 3, batch_size=100, shuffle=False, seed=0, exact_pass=True)
    kept = [torch.cat(batch, dim=1) for batch in batches]  # every batch held to the end: none overwritten
    assert [len(b) for b in kept[:3]] == [100, 100, 50] and {b.dtype for b in kept} == {torch.float32, torch.float64}
    assert torch.equal(torch.cat(kept).double(), expected)
    blocks, at = set(), 0
    for x, y in batches:  # each batch let go at once: a few blocks hold every piece in turn
        blocks.add(x.untyped_storage().data_ptr())
        assert torch.equal(torch.cat([x, y], dim=1).double(), expected[at : at + len(x)])
        at += len(x)
    # At most the blocks read ahead and two in use (the current batch's, the one before until let go).
    assert at == len(expected) and len(blocks) <= _BLOCKS_AHEAD + 2 < math.ceil(len(expected) / 100)


def test_read_ahead_makes_at_most_depth_items_ahead_and_closes_what_it_reads():
    from cropyield.streaming import read_ahead

    made, closed = [], []

    def items():
        try:
            for i in range(100):
                made.append(i)
                yield i
        finally:
            closed.append(True)

    stream = read_ahead(items(), depth=3)
    assert next(stream) == 0
    time.sleep(0.3)  # the thread has had time to run ahead: it stops once 3 wait
    assert made == [0, 1, 2, 3]
    stream.close()  # stops the thread, which closes the generator (its files, its own thread)
    assert closed == [True] and len(made) == 4
    with pytest.raises(ZeroDivisionError):  # an error in the thread reaches the consumer in order
        list(read_ahead(range(3), lambda i: 1 // (2 - i)))
