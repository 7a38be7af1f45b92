"""File reading: every bad input is a one-line CropYieldError naming file, line and column."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cropyield import CropYieldError
from cropyield.files import check_files, data_files, read_table

COLUMNS = ["temp", "rainfall", "humidity", "apples", "oranges"]
HEADER = "temp,rainfall,humidity,apples,oranges\n"

# name -> (file bytes, fragments the message must hold besides the file name)
BAD_FILES = {
    "empty": (b"", ["empty"]),
    "header_only": (HEADER.encode(), ["no data rows"]),
    "missing_column": (b"temp,rainfall,apples,oranges\n1,2,3,4\n", ["missing column", "humidity"]),
    "duplicate_columns": (b"temp,temp,rainfall,humidity,apples,oranges\n1,1,2,3,4,5\n", ["duplicate", "temp"]),
    "non_numeric": ((HEADER + "1,2,3,4,5\n1,abc,3,4,5\n").encode(), ["line 3", "'rainfall'", "not a number"]),
    "empty_cell": ((HEADER + "1,2,3,4,5\n1,2,,4,5\n").encode(), ["line 3", "'humidity'", "empty"]),
    "nan": ((HEADER + "1,2,3,nan,5\n").encode(), ["line 2", "'apples'"]),
    "inf": ((HEADER + "1,2,3,4,5\n1,2,3,4,inf\n").encode(), ["line 3", "'oranges'", "finite"]),
    "too_large_for_float32": ((HEADER + "1,2,3,4,1e39\n").encode(), ["line 2", "'oranges'", "float32"]),
    "ragged_row": ((HEADER + "1,2,3,4,5\n1,2,3,4\n").encode(), ["line 3", "expected 5 values", "got 4"]),
    "wrong_delimiter": (b"temp;rainfall;humidity;apples;oranges\n1;2;3;4;5\n", ["missing column", "comma-separated"]),
    "binary_garbage": (bytes(range(256)) * 4, ["not a readable UTF-8 CSV"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_csv_raises_one_line_error_naming_file_and_place(tmp_path, case):
    content, fragments = BAD_FILES[case]
    path = tmp_path / f"{case}.csv"
    path.write_bytes(content)
    with pytest.raises(CropYieldError) as info:
        read_table(path, COLUMNS)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CropYieldError, match="no such file"):
        read_table(tmp_path / "nope.csv", COLUMNS)
    with pytest.raises(CropYieldError, match="is a directory"):
        read_table(tmp_path, COLUMNS)


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(CropYieldError, match="unsupported file type"):
        read_table(tmp_path / "d.xlsx", COLUMNS)


def test_utf8_bom_and_blank_lines_just_work(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("\ufeff" + HEADER + "1,2,3,4,5\n\n6,7,8,9,10\n").encode())
    table = read_table(path, COLUMNS)
    assert table.dtype == np.float32 and table.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


def test_standard_library_reader_gives_the_same_table(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text(HEADER + "".join(f"{i},{i / 3},{-i},{i * 1e3},{i % 7}\n" for i in range(50)))
    fast = read_table(path, COLUMNS[::-1])
    monkeypatch.setattr("cropyield.files._pyarrow", lambda: None)
    slow = read_table(path, COLUMNS[::-1])
    assert np.array_equal(fast, slow) and fast.flags.c_contiguous


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr("cropyield.files._pyarrow", lambda: None)
    with pytest.raises(CropYieldError, match=r"pip install 'cropyield\[arrow\]'"):
        read_table(tmp_path / "d.parquet", COLUMNS)


def test_parquet_bad_values_name_row_and_column(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    good = {c: [1.0, 2.0, 3.0] for c in COLUMNS}
    pq.write_table(pa.table({**good, "rainfall": [1.0, None, 3.0]}), tmp_path / "null.parquet")
    with pytest.raises(CropYieldError, match=r"row 2, column 'rainfall'"):
        read_table(tmp_path / "null.parquet", COLUMNS)
    pq.write_table(pa.table({**good, "apples": ["a", "b", "c"]}), tmp_path / "text.parquet")
    with pytest.raises(CropYieldError, match=r"column 'apples': has type string"):
        read_table(tmp_path / "text.parquet", COLUMNS)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CropYieldError, match="not a readable Parquet file"):
        read_table(tmp_path / "junk.parquet", COLUMNS)


def _check_result_or_error(path, columns):
    try:
        table = read_table(path, columns)
    except CropYieldError as err:
        assert "\n" not in str(err)
        return
    assert table.dtype == np.float32 and table.ndim == 2 and table.shape[1] == len(columns)
    assert len(table) > 0 and np.isfinite(table).all()


cells = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
    st.sampled_from(["", " ", "nan", "NA", "1e40", "-0", "1_0", '"3"', "0x10"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6))
def test_property_csv_like_text_gives_a_float32_table_or_cropyield_error(tmp_path, rows):
    path = tmp_path / "p.csv"
    path.write_text("a,b,c\n" + "\n".join(",".join(row) for row in rows), encoding="utf-8", errors="surrogatepass")
    _check_result_or_error(path, ["a", "c"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
)
def test_property_arbitrary_bytes_give_a_float32_table_or_cropyield_error(tmp_path, content):
    path = tmp_path / "p.csv"
    path.write_bytes(content)
    _check_result_or_error(path, ["a"])
    (tmp_path / "p.parquet").write_bytes(content)
    _check_result_or_error(tmp_path / "p.parquet", ["a"])


def test_check_files_reads_columns_by_name_in_any_order(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.csv").write_text(HEADER + "1,2,3,4,5\n")
    (folder / "b.csv").write_text("oranges,id,humidity,temp,apples,rainfall\n5,x,3,1,4,2\n")
    (folder / "c.csv").write_text("temp,humidity,apples,oranges\n1,3,4,5\n")
    files = data_files(folder)
    assert [f.name for f in files] == ["a.csv", "b.csv", "c.csv"]
    check_files(files[:2], COLUMNS)  # b.csv: another order, an unused column
    assert read_table(files[1], COLUMNS).tolist() == read_table(files[0], COLUMNS).tolist()
    with pytest.raises(CropYieldError, match=r"b\.csv: has column\(s\) \['id'\] that a\.csv lacks"):
        check_files(files[:2], COLUMNS, same_as=COLUMNS)
    with pytest.raises(CropYieldError, match=r"c\.csv: missing column\(s\) \['rainfall'\]"):
        check_files(files, COLUMNS)


def quoted_rows(count: int) -> list[list[str]]:
    """Numbers, quoted or not, beside an unused text column whose values hold commas, doubled quotes
    and newlines; cut at its newline, ``q\n7,8,9,w`` reads as two whole rows (``7,8,9`` a made-up one)."""
    notes = ["Rice, paddy", 'He said "hi", then left', "q\n7,8,9,w", "plain", "r\r\n7,8,9,w"]
    return [[str(i), f"{i % 97 + 0.5}", str(2 * i), notes[i % len(notes)]] for i in range(count)]


def write_quoted(path, rows, quoting) -> np.ndarray:
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n", quoting=quoting).writerows([["x", "y", "z", "note"], *rows])
    return np.array([[float(v) for v in r[:3]] for r in rows], dtype=np.float32)


@pytest.mark.parametrize("quoting", ["minimal", "all"])
def test_quoted_values_parse_on_every_numeric_reader_path(tmp_path, monkeypatch, quoting):
    import csv

    from cropyield import files
    from cropyield import pieces as piece_reader
    from cropyield.pieces import list_pieces, read_piece

    path = tmp_path / "q.csv"
    expected = write_quoted(path, quoted_rows(3000), csv.QUOTE_ALL if quoting == "all" else csv.QUOTE_MINIMAL)

    def pieces(**kwargs) -> np.ndarray:
        found = list_pieces(data_files(path), ["x", "y", "z"], **kwargs)
        return np.concatenate([read_piece(p, ["x", "y", "z"]) for p in found])

    assert np.array_equal(read_table(path, ["x", "y", "z"]), expected)  # pyarrow, one buffer
    assert np.array_equal(pieces(csv_block_bytes=700), expected)  # streamed blocks, cut between records
    monkeypatch.setattr(files, "_BLOCK", 512)  # buffers cut mid-file: never inside a quoted value
    assert np.array_equal(read_table(path, ["x", "y", "z"]), expected)
    for module in (files, piece_reader):  # the standard library's reader, for files and pieces
        monkeypatch.setattr(module, "_pyarrow", lambda: None)
    assert np.array_equal(read_table(path, ["x", "y", "z"]), expected)
    assert np.array_equal(pieces(csv_block_bytes=700), expected)


def test_quoted_newlines_in_a_large_buffer_are_parsed_by_pyarrow(tmp_path, monkeypatch):
    import csv

    from cropyield import files, pieces

    path = tmp_path / "q.csv"
    expected = write_quoted(path, quoted_rows(120_000), csv.QUOTE_MINIMAL)  # 2.6 MB: pyarrow chunks it
    pytest.importorskip("pyarrow")

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to the standard library's reader")

    monkeypatch.setattr(files, "_read_csv_stdlib", no_fallback)
    for module in (files, pieces):
        monkeypatch.setattr(module, "_parse_csv_lines", no_fallback)
    assert np.array_equal(read_table(path, ["x", "y", "z"]), expected)
    found = pieces.list_pieces(data_files(path), ["x", "y", "z"], csv_block_bytes=2 << 20)
    assert np.array_equal(np.concatenate([pieces.read_piece(p, ["x", "y", "z"]) for p in found]), expected)


def test_read_piece_keeps_float32_parquet_columns_only_when_asked(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from cropyield.pieces import list_pieces, read_piece

    rng = np.random.default_rng(0)
    single = rng.normal(50, 20, (1000, 2)).astype(np.float32)
    double = rng.normal(50, 20, (1000, 2))  # digits float32 would round away
    pq.write_table(pa.table({"a": single[:, 0], "b": single[:, 1]}), tmp_path / "single.parquet", row_group_size=400)
    pq.write_table(pa.table({"a": single[:, 0], "b": double[:, 1]}), tmp_path / "mixed.parquet", row_group_size=400)
    (piece, *_), (mixed, *_) = (list_pieces([tmp_path / n], ["a", "b"]) for n in ("single.parquet", "mixed.parquet"))

    kept = read_piece(piece, ["b", "a"], np.float64, "F", keep_float32=True)
    assert kept.dtype == np.float32 and kept.flags.f_contiguous
    assert np.array_equal(kept, single[:400, ::-1])
    widened = read_piece(piece, ["b", "a"], np.float64, "F")
    assert widened.dtype == np.float64 and np.array_equal(widened, single[:400, ::-1].astype(np.float64))
    # A float64 column keeps the piece float64, unrounded.
    wide = read_piece(mixed, ["a", "b"], np.float64, "F", keep_float32=True)
    assert wide.dtype == np.float64 and np.array_equal(wide[:, 1], double[:400, 1])
    assert np.array_equal(wide[:, 0], single[:400, 0].astype(np.float64))
