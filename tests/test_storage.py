"""Data read from URLs (a local S3 server): the same rows as from local files, ranged reads, retries
and one-line errors naming the URL."""

import io
import os
import re
import subprocess
import threading
import time

import lightning as L
import numpy as np
import pytest
import torch

from cropyield import load_regressor, storage
from cropyield.checkpoint_io import AtomicCheckpointIO
from cropyield.data import CropYieldDataModule
from cropyield.errors import CropYieldError
from cropyield.files import data_files, read_columns, read_table
from cropyield.inference import LinearPredictor, read_checkpoint
from cropyield.model import CropYieldRegressor
from cropyield.pieces import list_pieces, read_piece

from .conftest import BIN, ROOT_DIR, assert_one_line_error, moto_server, run, s3_filesystem, upload, write_csv
from .test_streaming import COLUMNS, write_folder


def test_storage_tells_urls_from_local_paths():
    assert storage.is_url("s3://crops/a.csv") and storage.is_url("gs://b/k") and storage.is_url("hdfs://nn:8020/x")
    assert not storage.is_url("crops/a.csv") and not storage.is_url("/tmp/s3:/x") and not storage.is_url("C:\\d.csv")
    assert storage.location("s3://crops/d/") == "s3://crops/d/"  # Path would make it s3:/crops/d
    assert storage.suffix("s3://crops/d/Part.PARQUET") == ".parquet" and storage.name("s3://crops/d/") == "d"


def test_read_table_from_s3_equals_the_local_file(tmp_path, bucket):
    rows = write_folder(tmp_path / "d", sizes=(300,), row_group=64)
    write_csv(tmp_path / "d.csv", COLUMNS, rows.tolist())
    for local in (tmp_path / "d" / "part-0.parquet", tmp_path / "d.csv"):
        url = upload(local, f"{bucket}/in/{local.name}")
        assert read_columns(url) == list(COLUMNS)
        assert np.array_equal(read_table(url, COLUMNS[::-1]), rows[:, ::-1])


def test_an_s3_folder_lists_and_reads_the_same_pieces_as_a_local_one(tmp_path, bucket):
    write_folder(tmp_path / "d", sizes=(200, 300), row_group=64, csv_last=True)
    url = upload(tmp_path / "d", f"{bucket}/crops/")
    files = data_files(url)
    assert files == [f"{bucket}/crops/part-0.parquet", f"{bucket}/crops/part-1.csv"]
    remote = list_pieces(files, COLUMNS, csv_block_bytes=4096)
    local = list_pieces(data_files(tmp_path / "d"), COLUMNS, csv_block_bytes=4096)
    assert [(p.rows, p.first_row, p.row_group, p.start, p.stop) for p in remote] == [
        (p.rows, p.first_row, p.row_group, p.start, p.stop) for p in local
    ]
    assert len(remote) > 5
    for a, b in zip(remote, local, strict=True):
        assert np.array_equal(read_piece(a, COLUMNS), read_piece(b, COLUMNS))


def test_a_url_piece_read_in_blocks_is_retried_whole_so_no_row_is_served_twice(tmp_path, bucket, monkeypatch):
    import pyarrow.parquet as pq

    from cropyield.pieces import read_piece_blocks
    from cropyield.streaming import Blocks

    rows = write_folder(tmp_path / "d", sizes=(500,), row_group=500)
    (piece,) = list_pieces(data_files(upload(tmp_path / "d", f"{bucket}/crops/")), COLUMNS)
    iter_batches, tries = pq.ParquetFile.iter_batches, []

    def dropped_once(self, batch_size, **kwargs):  # the connection drops after the first batch, once
        tries.append(1)
        for i, batch in enumerate(iter_batches(self, batch_size, **kwargs)):
            if i == 1 and len(tries) == 1:
                raise OSError("AWS Error NETWORK_CONNECTION: connection reset by peer")
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", dropped_once)
    blocks = list(read_piece_blocks(piece, COLUMNS, np.float64, Blocks(100, 5), keep_float32=True))
    assert len(tries) == 2 and [len(b) for b in blocks] == [100] * 5
    assert np.array_equal(np.concatenate(blocks), rows)


def _fit(data_path, **kwargs):
    L.seed_everything(3)
    dm = CropYieldDataModule(data_path=data_path, batch_size=40, standardize=True, seed=5, **kwargs)
    model = CropYieldRegressor(in_features=3, out_features=2, lr=0.05, standardize=True)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, dm)
    return model.linear.weight.detach().clone(), model.linear.bias.detach().clone()


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_a_fit_from_s3_equals_the_fit_from_local_files(tmp_path, bucket, streaming):
    write_folder(tmp_path / "d", sizes=(400, 300), row_group=100, csv_last=True)
    url = upload(tmp_path / "d", f"{bucket}/d/")
    extra = {"streaming": True, "shuffle_buffer": 200} if streaming else {}
    remote, local = _fit(url, **extra), _fit(str(tmp_path / "d"), **extra)
    assert all(torch.equal(a, b) for a, b in zip(remote, local, strict=True))


def test_bad_urls_are_one_line_errors_naming_them(tmp_path, bucket):
    with pytest.raises(CropYieldError, match=f"^{bucket}/nothing.csv: no such file or folder$"):
        data_files(f"{bucket}/nothing.csv")
    write_csv(tmp_path / "bad.csv", COLUMNS, [[1, 2, 3, 4, 5], [1, "x", 3, 4, 5]])
    url = upload(tmp_path / "bad.csv", f"{bucket}/bad.csv")
    with pytest.raises(CropYieldError, match=f"^{url}, line 3, column 'rainfall': 'x' is not a number$"):
        read_table(url, COLUMNS)
    result = run("cropyield", "fit", "--data.data_path", f"{bucket}/none/", cwd=tmp_path, check_rc=None)
    assert_one_line_error(result, f"{bucket}/none/: no such file or folder")


def test_a_url_without_a_filesystem_library_names_what_to_install():
    with pytest.raises(CropYieldError, match=r"^nosuch://b: no filesystem for this URL"):
        data_files("nosuch://b/k.csv")


def test_retried_retries_what_its_predicate_names_and_says_what_failed(monkeypatch):
    monkeypatch.setenv("CROPYIELD_RETRY_SECONDS", "2")  # tries at 0, 0.25 and 0.75 s
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "done"

    # The default predicate: OSErrors that read as the network's, for URLs only.
    assert storage.retried("s3://b/k", flaky) == "done" and len(calls) == 3
    assert calls[2] - calls[1] >= 2 * (calls[1] - calls[0]) * 0.9  # the pause doubles
    calls.clear()
    with pytest.raises(ConnectionError):
        storage.retried("local/k", flaky)  # a local path's errors are never the network's
    assert len(calls) == 1

    def lasting():
        raise RuntimeError("botocore: could not connect")

    monkeypatch.setenv("CROPYIELD_RETRY_SECONDS", "1")

    with pytest.raises(CropYieldError, match=r"^s3://b/k: cannot be reached") as caught:
        storage.retried("s3://b/k", lasting, retry_if=lambda err: isinstance(err, RuntimeError))
    assert str(caught.value) == "s3://b/k: cannot be reached (botocore: could not connect); retried for 1 s"
    start = time.monotonic()
    with pytest.raises(CropYieldError) as caught:
        storage.retried("s3://b/k", lasting, retry_if=lambda err: True, failure="cannot save", kept=", kept")
    assert str(caught.value) == "s3://b/k: cannot save (botocore: could not connect); retried for 1 s, kept"
    assert 0.25 <= time.monotonic() - start < 5
    with pytest.raises(RuntimeError):  # not worth retrying: as it is, at once
        storage.retried("s3://b/k", lasting, retry_if=lambda err: False)


@pytest.mark.slow
def test_an_unreachable_store_is_retried_then_one_line_naming_the_url(tmp_path, monkeypatch):
    rows = write_folder(tmp_path / "d", sizes=(100,), row_group=50)
    with moto_server() as server:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", allow_bucket_creation=True).create_dir("gone")
        url = upload(tmp_path / "d" / "part-0.parquet", "s3://gone/part-0.parquet")
        pieces = list_pieces(data_files(url), COLUMNS)
    # The server is down for good: reported within the retry time, naming the URL.
    monkeypatch.setenv("CROPYIELD_RETRY_SECONDS", "1")
    start = time.monotonic()
    with pytest.raises(CropYieldError, match=r"^s3://gone/part-0.parquet: cannot be reached \(.*\); retried for 1 s$"):
        read_piece(pieces[0], COLUMNS)
    assert time.monotonic() - start < 30
    # Down for a moment: the read waits for it (moto's state lives in this process, so it comes back whole).
    monkeypatch.setenv("CROPYIELD_RETRY_SECONDS", "60")
    back = moto_server(port)
    restart = threading.Timer(2.0, back.__enter__)
    restart.start()
    try:
        start = time.monotonic()
        assert np.array_equal(read_piece(pieces[1], COLUMNS), rows[50:])
    finally:
        restart.join()
        back.__exit__(None, None, None)


def _objects(url: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return sorted("s3://" + key for key in fs.find(url.removeprefix("s3://")))


@pytest.mark.slow
def test_a_fit_on_s3_keeps_checkpoints_and_logs_there_and_resumes_from_its_last(tmp_path, bucket):
    root, work, local = f"{bucket}/run", tmp_path / "work", tmp_path / "local"
    work.mkdir(), local.mkdir()
    run("cropyield", "fit", "--trainer.default_root_dir", root, "--trainer.max_epochs", 3, cwd=work)
    assert list(work.iterdir()) == []  # nothing written locally
    objects = _objects(root)
    for key in (
        "checkpoints/last.ckpt",
        "lightning_logs/version_0/metrics.csv",
        "lightning_logs/version_0/config.yaml",
    ):
        assert f"{root}/{key}" in objects
    result = run("cropyield", "fit", "--trainer.default_root_dir", root, "--trainer.max_epochs", 6,
                 "--ckpt_path", "last", cwd=work)  # fmt: skip
    assert list(work.iterdir()) == []
    # Resumed from the bucket's last.ckpt (a fit started over would end with the same weights).
    assert f"Restoring states from the checkpoint path at {root}/checkpoints/last.ckpt" in result.stdout + result.stderr
    run("cropyield", "fit", "--trainer.max_epochs", 6, cwd=local)  # the same 6 epochs, uninterrupted
    resumed, uninterrupted = (
        load_regressor(f"{root}/checkpoints/last.ckpt"),
        load_regressor(local / "checkpoints" / "last.ckpt"),
    )
    for name in ("weight", "bias"):
        assert torch.equal(getattr(resumed.linear, name), getattr(uninterrupted.linear, name))
    assert read_checkpoint(f"{root}/checkpoints/last.ckpt")["epoch"] == 5
    assert "Final training MSE" in result.stdout
    predicted = run("cropyield-predict", "--ckpt", f"{root}/checkpoints/last.ckpt", "73", "67", "43", cwd=work)
    expected = run("cropyield-predict", "--ckpt", local / "checkpoints" / "last.ckpt", "73", "67", "43", cwd=local)
    assert predicted.stdout == expected.stdout and predicted.stdout.strip()
    served = LinearPredictor.from_checkpoint(f"{root}/checkpoints/last.ckpt")  # what cropyield-serve loads
    x = torch.tensor([[73.0, 67.0, 43.0]])
    assert torch.equal(served(x), LinearPredictor.from_checkpoint(local / "checkpoints" / "last.ckpt")(x))


def _read_objects(urls) -> dict[str, bytes]:
    fs = s3_filesystem()
    out = {}
    for url in urls:
        with fs.open_input_file(url.removeprefix("s3://")) as f:
            out[url.rsplit("/", 1)[-1]] = f.read()
    return out


@pytest.mark.slow
def test_a_fresh_fit_on_s3_keeps_the_earlier_runs_checkpoints_under_its_version(tmp_path, bucket):
    root = f"{bucket}/run"
    run("cropyield", "fit", "--trainer.default_root_dir", root, "--trainer.max_epochs", 3, cwd=tmp_path)
    before = _read_objects(_objects(f"{root}/checkpoints"))
    assert sorted(before) == ["best-epoch002.ckpt", "last.ckpt"]
    result = run("cropyield", "fit", "--trainer.default_root_dir", root, "--trainer.max_epochs", 2, cwd=tmp_path)
    kept = f"{root}/checkpoints/version_0"
    lines = [line for line in result.stdout.splitlines() if "kept in" in line]
    assert lines == [f"cropyield: the earlier run's checkpoints (best-epoch002.ckpt, last.ckpt) are kept in {kept}/"]
    assert _read_objects(_objects(kept)) == before  # byte for byte
    objects = _objects(root)
    assert sorted(o for o in objects if o.startswith(f"{root}/checkpoints/") and not o.startswith(kept)) == [
        f"{root}/checkpoints/best-epoch001.ckpt",
        f"{root}/checkpoints/last.ckpt",
    ]
    assert read_checkpoint(f"{root}/checkpoints/last.ckpt")["epoch"] == 1  # the newest run's
    assert f"{root}/lightning_logs/version_1/metrics.csv" in objects
    assert list(tmp_path.iterdir()) == []  # nothing written locally
    # Resuming keeps its own checkpoints in place.
    result = run("cropyield", "fit", "--trainer.default_root_dir", root, "--trainer.max_epochs", 3,
                 "--ckpt_path", "last", cwd=tmp_path)  # fmt: skip
    assert "kept in" not in result.stdout
    assert f"Restoring states from the checkpoint path at {root}/checkpoints/last.ckpt" in result.stdout + result.stderr
    names = ("best-epoch002.ckpt", "last.ckpt")
    assert _objects(f"{root}/checkpoints") == sorted(
        f"{folder}/{n}" for folder in (kept, f"{root}/checkpoints") for n in names
    )


def test_a_checkpoint_upload_that_does_not_read_back_intact_keeps_the_previous_one(tmp_path, bucket, monkeypatch):
    import fsspec

    io = AtomicCheckpointIO()
    url = f"{bucket}/ckpt/last.ckpt"
    first = {"state_dict": {"linear.weight": torch.ones(2, 3)}, "epoch": 1}
    io.save_checkpoint(first, url)
    assert torch.equal(io.load_checkpoint(url)["state_dict"]["linear.weight"], torch.ones(2, 3))
    fs = fsspec.core.url_to_fs(url)[0]  # the instance the plugin uses (fsspec caches them)
    pipe = fs.pipe_file
    monkeypatch.setattr(fs, "pipe_file", lambda path, value, **kw: pipe(path, value[:-100], **kw))  # cut short
    with pytest.raises(CropYieldError, match=f"^{url}: the uploaded checkpoint did not read back intact"):
        io.save_checkpoint({**first, "epoch": 2}, url)
    assert io.load_checkpoint(url)["epoch"] == 1  # the previous checkpoint, whole
    assert _objects(f"{bucket}/ckpt") == [url]  # no temporary object left
    with pytest.raises(CropYieldError, match=f"^{bucket}/ckpt/none.ckpt: no such checkpoint file$"):
        read_checkpoint(f"{bucket}/ckpt/none.ckpt")


def _fit_through_an_outage(tmp_path, name, data, outage: float | None, retry_seconds: float):
    """A streamed fit from the store, checkpoints there too; the server stops at step 3 for ``outage``
    seconds (``None``: for good). Returns the fit's (rc, stdout, stderr) and seconds from the stop to its end."""
    with moto_server() as server:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {"AWS_ENDPOINT_URL": endpoint, "CROPYIELD_RETRY_SECONDS": str(retry_seconds)}
        env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT_DIR), os.environ.get("PYTHONPATH")]))
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True, access_key="testing",
                          secret_key="testing").create_dir(name)  # fmt: skip
        url = upload(data, f"s3://{name}/data/", endpoint)
    work = tmp_path / name
    work.mkdir()
    with moto_server(port):
        fit = subprocess.Popen(
            [str(BIN / "cropyield"), "fit", "--data.data_path", url, "--data.streaming", "true",
             "--data.batch_size", "20", "--data.shuffle_buffer", "40", "--data.standardize", "true",
             "--model.lr", "0.05", "--trainer.max_epochs", "2", "--checkpoint.dirpath", f"s3://{name}/ckpt",
             "--checkpoint.every_n_train_steps", "2", "--data.steps_per_call", "1",
             "--trainer.callbacks+=tests.node_helpers.SlowSteps"],
            cwd=work, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 200
        while not ((work / "step").exists() and int((work / "step").read_text() or 0) >= 3):
            assert time.monotonic() < deadline and fit.poll() is None, fit.communicate()
            time.sleep(0.05)
    stopped = time.monotonic()
    if outage is not None:
        time.sleep(outage)
        with moto_server(port):
            out, err = fit.communicate(timeout=300)
    else:
        out, err = fit.communicate(timeout=300)
    ended = time.monotonic() - stopped
    with moto_server(port):  # moto's state lives in this process: the bucket is back, whole
        with s3_filesystem(endpoint).open_input_file(f"{name}/ckpt/last.ckpt") as f:
            last = torch.load(io.BytesIO(f.read()), weights_only=True)
    return (fit.returncode, out, err), ended, last


@pytest.mark.slow
def test_a_fit_carries_on_through_a_short_outage_and_a_lasting_one_is_one_line(tmp_path):
    write_folder(tmp_path / "d", sizes=(300,), row_group=20)
    (rc, _, err), _, through = _fit_through_an_outage(tmp_path, f"outage-{os.getpid()}", tmp_path / "d", 3.0, 60)
    assert rc == 0, err
    (rc, _, err), _, calm = _fit_through_an_outage(tmp_path, f"calm-{os.getpid()}", tmp_path / "d", 0.0, 60)
    assert rc == 0, err
    for name in ("linear.weight", "linear.bias"):  # the same fit as one the outage did not touch
        assert torch.equal(through["state_dict"][name], calm["state_dict"][name])
    (rc, _, err), ended, last = _fit_through_an_outage(tmp_path, f"gone-{os.getpid()}", tmp_path / "d", None, 3)
    assert rc != 0 and ended < 60
    lines = [line for line in err.splitlines() if line.startswith("cropyield: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(
        rf"cropyield: error: s3://gone-{os.getpid()}/\S+: cannot (be reached|save the checkpoint)", lines[0]
    )
    assert last["global_step"] >= 2  # the last checkpoint saved before the store went away, intact
