"""The dataset's text files read and checked line by line: UTF-8, one JSON object per line (JSONL),
or CSV under a fixed header. Every problem is a `DataError` naming the file, the line, what is
wrong and how to fix it."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

_UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A dataset file breaks the format.

    The message reads ``<file> line <n>: <what is wrong>; <how to fix it>`` (without ``line`` when
    the problem concerns the whole file).

    Attributes:
        path: The offending file (or dataset folder).
        line: 1-based line number of the problem, or ``None`` when it concerns the whole file.
        problem: The message without the file and line prefix.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{self.path} line {line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the error picklable (e.g. across DataLoader worker processes)
        return (type(self), (self.path, self.line, self.problem))


def check_file(path: Path, fix: str | None = None) -> None:
    """Refuses a path that is not a file; `fix` says what to pass instead."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        fix = fix or f"pass the path of an existing {path.name or 'file'}"
        raise DataError(path, None, f"{what}; {fix}")


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    if lineno == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            path, lineno,
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
            "save the file as UTF-8",
        ) from None


def _no_duplicate_keys(path: Path, lineno: int):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise DataError(path, lineno, f"duplicate key {key!r} in the JSON object; "
                                              "give each field once")
            obj[key] = value
        return obj
    return hook


def json_objects(path: Path, fix: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line number, object)`` for each non-blank line of a JSONL file."""
    check_file(path, fix)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = _decode_line(path, lineno, raw)
            if not text.strip():
                continue
            try:
                obj = json.loads(text, object_pairs_hook=_no_duplicate_keys(path, lineno))
            except json.JSONDecodeError as exc:
                raise DataError(
                    path, lineno,
                    f"malformed JSON ({exc.msg} at column {exc.colno}); "
                    "each line must hold one complete JSON object",
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    path, lineno,
                    f"expected a JSON object, got {json_type(obj)}; "
                    'each line must be one object such as {"key": "value"}',
                )
            yield lineno, obj


def json_type(value: Any) -> str:
    """A JSON value's type in words, for messages: "a string", "an array", "a number (3)"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def read_text(path: Path) -> str:
    """A whole file as text (UTF-8, a leading byte-order mark dropped), refused at the line of a bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise DataError(path, lineno, f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                                      "save the file as UTF-8") from None


def csv_rows(path: Path, header: Sequence[str], *, any_order: bool = False, fix: str | None = None
             ) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields ``(line number, {column: cell})`` for each non-blank row of a CSV file whose first line
    names exactly `header` (in that order, or in any order with `any_order`)."""
    check_file(path, fix)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    columns = None
    expected = ",".join(header)
    try:
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if columns is None:
                columns = [cell.strip() for cell in row]
                right = (sorted(columns) == sorted(header)) if any_order else tuple(columns) == tuple(header)
                if not right or len(columns) != len(header):
                    must = (f"must name the columns {expected} (in any order)" if any_order else
                            f"must be exactly {expected!r}")
                    raise DataError(path, reader.line_num, f"bad header {','.join(row)!r}; the first line {must}")
                continue
            if len(row) != len(columns):
                raise DataError(path, reader.line_num, f"expected {len(columns)} columns ({','.join(columns)}), got "
                                                       f"{len(row)}; quote values that contain commas")
            yield reader.line_num, dict(zip(columns, row))
    except csv.Error as exc:
        raise DataError(path, reader.line_num, f"malformed CSV ({exc}); check the quoting") from None
    if columns is None:
        raise DataError(path, None, f"empty file; the first line must be {expected!r}")
