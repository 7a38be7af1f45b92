"""The pieces streaming reads: a Parquet row group into reused blocks as Arrow decodes it, with
its rows whatever the sizes of Arrow's batches, and a non-finite value named by its row and column."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cropyield import CropYieldError
from cropyield.pieces import list_pieces, read_piece, read_piece_blocks
from cropyield.streaming import Blocks

from .test_streaming import COLUMNS, table


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_streamed_piece_with_a_nan_or_infinite_value_names_its_row_and_column(tmp_path, bad):
    rows = table(600, seed=5)
    rows[437, 2] = bad  # in the second row group (250 rows each), column 'humidity'
    pq.write_table(pa.table(dict(zip(COLUMNS, rows.T, strict=True))), tmp_path / "d.parquet", row_group_size=250)
    pieces = list_pieces([tmp_path / "d.parquet"], COLUMNS)
    for order, dtype in (("C", np.float32), ("F", np.float64)):
        assert np.array_equal(read_piece(pieces[0], COLUMNS, dtype, order), rows[:250].astype(dtype))
        with pytest.raises(CropYieldError, match=r"d\.parquet, row 438, column 'humidity': value is empty, NaN"):
            read_piece(pieces[1], COLUMNS, dtype, order, keep_float32=order == "F")
    # Read in blocks of 100 rows (the exact pass's way): the bad value is in the second block.
    blocks = list(read_piece_blocks(pieces[0], COLUMNS, np.float64, Blocks(100, 5), keep_float32=True))
    assert [len(b) for b in blocks] == [100, 100, 50] and np.array_equal(np.concatenate(blocks), rows[:250])
    later = read_piece_blocks(pieces[1], COLUMNS, np.float64, Blocks(100, 5), keep_float32=True)
    assert np.array_equal(next(later), rows[250:350])  # rows 251-350 are served before the bad one is read
    with pytest.raises(CropYieldError, match=r"d\.parquet, row 438, column 'humidity': value is empty, NaN"):
        next(later)


def test_a_piece_read_in_blocks_is_its_rows_whatever_the_sizes_of_arrows_batches(tmp_path, monkeypatch):
    rows = table(600, seed=6)
    pq.write_table(pa.table(dict(zip(COLUMNS, rows.T, strict=True))), tmp_path / "d.parquet", row_group_size=250)
    pieces = list_pieces([tmp_path / "d.parquet"], COLUMNS, limit_rows=480)  # the second piece: 230 of 250 rows
    iter_batches = pq.ParquetFile.iter_batches

    def odd_sizes(self, batch_size, **kwargs):  # Arrow's batches of 37 rows, not the blocks' 100
        return iter_batches(self, 37, **kwargs)

    for batches in (iter_batches, odd_sizes):
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", batches)
        for piece, expected in zip(pieces, (rows[:250], rows[250:480]), strict=True):
            blocks = list(read_piece_blocks(piece, COLUMNS, np.float64, Blocks(100, 5), keep_float32=True))
            assert [len(b) for b in blocks] == [100, 100, len(expected) - 200]
            assert all(b.dtype == np.float32 for b in blocks) and np.array_equal(np.concatenate(blocks), expected)


def test_a_local_piece_is_served_block_by_block_as_arrow_decodes_it(tmp_path, monkeypatch):
    rows = table(1000, seed=7)
    pq.write_table(pa.table(dict(zip(COLUMNS, rows.T, strict=True))), tmp_path / "d.parquet")
    (piece,) = list_pieces([tmp_path / "d.parquet"], COLUMNS)
    iter_batches, decoded = pq.ParquetFile.iter_batches, []

    def counted(self, batch_size, **kwargs):
        for batch in iter_batches(self, batch_size, **kwargs):
            decoded.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    blocks = read_piece_blocks(piece, COLUMNS, np.float64, Blocks(100, 5), keep_float32=True)
    assert np.array_equal(next(blocks), rows[:100]) and sum(decoded) == 100  # the first block, the rest not yet read
    assert np.array_equal(np.concatenate([rows[:100], *blocks]), rows) and sum(decoded) == 1000
