"""Categorical columns and missing cells: treatment coding shared by data, inference, serving and export.

A categorical column is encoded as statsmodels' formulas and patsy do (treatment, or dummy,
coding): its levels sorted (numerically when every level is a number, else as text), the first
the reference, and one 0/1 column per other level, named ``Item[T.Potatoes]``. A level the
training rows did not hold is an error, never encoded as the reference.

A column arrives here as one of two kinds, whatever file or request it came from:

- numeric: a float array, NaN where a cell is missing;
- :class:`Coded`: the distinct cell values as canonical text (``None`` for a missing cell) and
  one code per row into them, so a column of a million strings costs a million small integers.

Only numpy and the standard library are imported: the JSON export's predictor uses this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cropyield.errors import CropYieldError

MISSING_CHOICES = ("error", "drop")
DEFAULT_MAX_LEVELS = 1000


def level_key(value) -> str | None:
    """The canonical text of one cell: ``None`` when it is missing (None, NaN, empty text).

    Numbers that are whole are written without a fraction (``1990.0`` and ``1990`` are one level);
    text is kept as it is, so ``"Rice, paddy"`` stays one level.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    number = float(value)
    if math.isnan(number):
        return None
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


@dataclass
class Coded:
    """A text (or categorical) column: distinct canonical values and one code per row into them."""

    keys: list[str | None]
    codes: np.ndarray  # int32, one per row

    @staticmethod
    def of(values: Iterable) -> Coded:
        """Codes a sequence of cell values (text, numbers, None)."""
        index: dict[str | None, int] = {}
        codes = [index.setdefault(level_key(v), len(index)) for v in values]
        return Coded(list(index), np.asarray(codes, dtype=np.int32).reshape(-1))

    @staticmethod
    def concat(parts: Sequence[Coded]) -> Coded:
        """The column of several parts stacked, codes mapped into one list of keys."""
        index: dict[str | None, int] = {}
        codes = []
        for part in parts:
            lut = np.asarray([index.setdefault(k, len(index)) for k in part.keys], dtype=np.int32)
            codes.append(lut[part.codes] if len(part.codes) else part.codes)
        return Coded(list(index), np.concatenate(codes) if codes else np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.codes)

    def take(self, rows: np.ndarray) -> Coded:
        return Coded(self.keys, self.codes[rows])

    def missing(self) -> np.ndarray:
        missing_keys = np.asarray([k is None for k in self.keys], dtype=bool)
        return missing_keys[self.codes] if len(self.keys) else np.zeros(len(self.codes), dtype=bool)

    def present(self, rows: np.ndarray | None = None) -> set[str]:
        """The distinct non-missing values of the column (of the selected rows)."""
        codes = self.codes if rows is None else self.codes[rows]
        return {self.keys[c] for c in np.unique(codes) if self.keys[c] is not None}


Column = np.ndarray | Coded


def sort_levels(levels: Iterable[str]) -> list[str]:
    """Levels in patsy's order: numerically when every one is a number, else as text."""
    levels = set(levels)
    try:
        return sorted(levels, key=float)
    except ValueError:
        return sorted(levels)


def missing_mask(column: Column) -> np.ndarray:
    return column.missing() if isinstance(column, Coded) else np.isnan(column)


@dataclass(frozen=True)
class Encoding:
    """How raw input columns become the model's features.

    Args:
        columns: the raw input columns, in order.
        levels: for each categorical column, its levels sorted, the first the reference.
    """

    columns: tuple[str, ...]
    levels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def categorical(self) -> bool:
        return bool(self.levels)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The encoded columns: numeric ones by name, then ``Item[T.level]`` for each non-reference level."""
        names = []
        for column in self.columns:
            if column in self.levels:
                names += [f"{column}[T.{level}]" for level in self.levels[column][1:]]
            else:
                names.append(column)
        return tuple(names)

    @property
    def numeric(self) -> np.ndarray:
        """Which encoded columns are numeric (standardized); dummies stay 0/1."""
        flags = []
        for column in self.columns:
            flags += [False] * (len(self.levels[column]) - 1) if column in self.levels else [True]
        return np.asarray(flags, dtype=bool)

    def to_dict(self) -> dict:
        """Plain lists and strings, as checkpoints (``weights_only=True``) and JSON hold them."""
        return {"columns": list(self.columns), "levels": {c: list(v) for c, v in self.levels.items()}}

    @staticmethod
    def from_dict(spec, where: str = "the encoding") -> Encoding:
        """Reads :meth:`to_dict`'s output back, checking that it holds only names and levels.

        Raises:
            CropYieldError: the spec is not lists of strings, or names a categorical column it lacks.
        """
        ok = (
            isinstance(spec, Mapping) and isinstance(spec.get("columns"), list) and isinstance(spec.get("levels"), dict)
        )
        columns = spec.get("columns") if ok else None
        levels = spec.get("levels") if ok else None
        if not ok or not all(isinstance(c, str) for c in columns):
            raise CropYieldError(f"{where}: not an encoding (columns and levels as lists of strings)")
        for name, values in levels.items():
            if (
                name not in columns
                or not isinstance(values, list)
                or not values
                or not all(isinstance(v, str) for v in values)
            ):
                raise CropYieldError(f"{where}: the levels of {name!r} must be a non-empty list of strings")
        return Encoding(tuple(columns), {c: tuple(levels[c]) for c in columns if c in levels})

    def encode(
        self,
        columns: Mapping[str, Column],
        targets: Sequence[str] = (),
        missing: str = "error",
        where: Callable[[int], str] = lambda i: f"row {i + 1}",
        hint: str = "fill it in or drop the row (missing: drop)",
        dtype=np.float32,
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, int]]:
        """Encodes raw columns into one float32 table ``[rows, features + targets]``.

        Args:
            columns: every raw input column and target, numeric or :class:`Coded`.
            targets: numeric columns appended after the features, as they are.
            missing: ``error`` raises on the first missing cell; ``drop`` marks its row.
            where: names row ``i`` in a message (``file, row 7``).
            hint: what the message for a missing cell says to do.
            dtype: the table's dtype.

        Returns:
            The table (rows with a missing cell hold zeros there), the mask of the rows to keep
            (None when every row is kept), and the missing cells counted per column.

        Raises:
            CropYieldError: a missing cell (with ``missing="error"``) or an unseen level, naming
                the row, the column and the value.
        """
        used = [*self.columns, *targets]
        rows = len(next(iter(columns.values()))) if columns else 0
        masks = {name: missing_mask(columns[name]) for name in used}
        counts = {name: int(mask.sum()) for name, mask in masks.items() if mask.any()}
        keep = None
        if counts:
            if missing != "drop":
                first = min(int(np.argmax(masks[name])) for name in counts)
                name = next(n for n in used if masks[n][first])
                raise CropYieldError(f"{where(first)}, column {name!r}: missing value; {hint}")
            keep = ~np.logical_or.reduce([masks[name] for name in counts])
        out = np.zeros((rows, len(self.feature_names) + len(targets)), dtype=dtype)
        j = 0
        for name in used:
            column = columns[name]
            if name not in self.levels:
                if isinstance(column, Coded):
                    column = _numbers(column, name, where)
                out[:, j] = np.where(masks[name], 0, column) if name in counts else column
                bad = ~np.isfinite(out[:, j])
                if bad.any():
                    row = int(np.argmax(bad))
                    raise CropYieldError(
                        f"{where(row)}, column {name!r}: {float(column[row])!r} is infinite or out of {out.dtype} range"
                    )
                j += 1
                continue
            if not isinstance(column, Coded):
                column = Coded.of(column.tolist())
            levels = self.levels[name]
            position = {level: i for i, level in enumerate(levels)}
            # -1: a level not seen in training; -2: a missing cell (its row is dropped).
            lut = np.asarray([position.get(k, -1) if k is not None else -2 for k in column.keys] or [0], np.int32)
            index = lut[column.codes]
            unseen = index == -1
            if keep is not None:
                unseen &= keep
            if unseen.any():
                row = int(np.argmax(unseen))
                value = column.keys[column.codes[row]]
                raise CropYieldError(
                    f"{where(row)}, column {name!r}: level {value!r} was not in the training data "
                    f"(it has {len(levels)}: {_list(levels)})"
                )
            for level in range(1, len(levels)):
                out[:, j] = index == level
                j += 1
        return out, keep, counts

    def decode(self, x: np.ndarray) -> list[list[str]]:
        """The raw input columns of encoded feature rows, as text: a categorical column's level
        (all its 0/1 columns zero: the reference), a number as the shortest text that reads back
        to the value in ``x``'s dtype (float32 ``85.3``, not ``85.30000305175781``).

        Example:
            >>> e = Encoding(("Item", "rain"), {"Item": ("Maize", "Potatoes", "Rice, paddy")})
            >>> e.decode(e.encode_rows([["Rice, paddy", 2.5], ["Maize", 1]]))
            [['Rice, paddy', 'Maize'], ['2.5', '1']]
        """
        columns, j = [], 0
        for name in self.columns:
            if name not in self.levels:
                columns.append([np.format_float_positional(v, unique=True, trim="-") for v in x[:, j]])
                j += 1
                continue
            k = len(self.levels[name]) - 1
            dummies = x[:, j : j + k] != 0
            index = np.where(dummies.any(axis=1), dummies.argmax(axis=1) + 1, 0) if k else np.zeros(len(x), int)
            columns.append(np.asarray(self.levels[name], dtype=object)[index].tolist())
            j += k
        return columns

    def encode_rows(self, rows, where: str = "row", dtype=np.float32) -> np.ndarray:
        """Encodes request rows: lists of raw values in column order, or dicts keyed by column.

        A missing cell is an error naming the row and column: prediction never drops a row.

        Example:
            >>> e = Encoding(("Item", "rain"), {"Item": ("Maize", "Potatoes", "Rice, paddy")})
            >>> e.encode_rows([["Potatoes", 2.5], {"Item": "Maize", "rain": 1}]).tolist()
            [[1.0, 0.0, 2.5], [0.0, 0.0, 1.0]]
        """
        table = rows_to_columns(rows, self.columns, where)
        out, _, _ = self.encode(table, where=lambda i: f"{where} {i}", hint="prediction needs every cell", dtype=dtype)
        return out


def rows_to_columns(rows, columns: Sequence[str], where: str = "row") -> dict[str, Coded]:
    """Request rows (lists in column order, or dicts keyed by column) as one :class:`Coded` per column.

    Raises:
        CropYieldError: the rows are not a non-empty list, a row has the wrong length or keys.
    """
    if isinstance(rows, Mapping) or (isinstance(rows, (list, tuple)) and rows and not _is_row_list(rows)):
        rows = [rows]
    if not isinstance(rows, (list, tuple)) or not rows:
        raise CropYieldError("rows must be a non-empty list of rows")
    names, values = list(columns), [[] for _ in columns]
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            # Other keys (an id, a note) are ignored, as cropyield-predict --csv ignores other columns.
            missing = [name for name in names if name not in row]
            if missing:
                raise CropYieldError(f"{where} {i}: missing {missing} (a row holds {names}; other keys are ignored)")
            row = [row[name] for name in names]
        if not isinstance(row, (list, tuple)) or len(row) != len(names):
            raise CropYieldError(f"{where} {i}: expected {len(names)} values ({', '.join(names)}), got {row!r:.80}")
        for j, value in enumerate(row):
            if not isinstance(value, (str, int, float, np.number)) and value is not None:
                raise CropYieldError(f"{where} {i}, column {names[j]!r}: {value!r:.40} is not a value")
            values[j].append(value)
    return {name: Coded.of(v) for name, v in zip(names, values, strict=True)}


def _is_row_list(rows) -> bool:
    return all(isinstance(r, (list, tuple, Mapping)) for r in rows)


def _numbers(column: Coded, name: str, where: Callable[[int], str]) -> np.ndarray:
    """A coded column as numbers (NaN where missing), naming the first cell that is not one."""
    lut = np.empty(max(1, len(column.keys)), dtype=np.float64)
    for i, key in enumerate(column.keys):
        try:
            lut[i] = math.nan if key is None else float(key)
        except ValueError:
            row = int(np.argmax(column.codes == i))
            raise CropYieldError(f"{where(row)}, column {name!r}: {key[:40]!r} is not a number") from None
        if key is not None and not math.isfinite(lut[i]):
            row = int(np.argmax(column.codes == i))
            raise CropYieldError(f"{where(row)}, column {name!r}: {key[:40]!r} is not a finite number")
    return lut[column.codes]


def learn_levels(
    found: Mapping[str, set[str]], max_levels: int = DEFAULT_MAX_LEVELS, source: str = "the data"
) -> dict[str, tuple[str, ...]]:
    """Sorted levels per categorical column from the values found in the training rows.

    Raises:
        CropYieldError: a column has no value at all, or more than ``max_levels`` distinct values.
    """
    levels = {}
    for name, values in found.items():
        check_levels(name, len(values), max_levels, source)
        if not values:
            raise CropYieldError(f"{source}, column {name!r}: no value in the training rows to learn levels from")
        levels[name] = tuple(sort_levels(values))
    return levels


def check_levels(name: str, count: int, max_levels: int, source: str = "the data") -> None:
    """Raises when a categorical column holds more distinct values than ``max_levels`` (an id column)."""
    if count > max_levels:
        raise CropYieldError(
            f"{source}, column {name!r}: {count:,} distinct values, more than max_levels={max_levels:,}; "
            "an identifier is not a category: leave it out of feature_names, or raise max_levels"
        )


def drop_message(counts: Mapping[str, int], dropped: int, total: int) -> str:
    """``dropped 40 of 6,000 rows with a missing value: avg_temp 20, Item 20``."""
    per_column = ", ".join(f"{name} {count:,}" for name, count in counts.items() if count)
    return f"dropped {dropped:,} of {total:,} rows with a missing value: {per_column}"


def _list(levels: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(repr(v) for v in levels[:most])
    return shown + (f", ... {len(levels) - most} more" if len(levels) > most else "")
