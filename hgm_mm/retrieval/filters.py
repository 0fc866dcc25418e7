"""Metadata filters, one language for both product stores.

A filter is a dict of attribute -> condition, all of which must hold: a JSON scalar (equality), a
list of scalars (any of), or a `(min, max)` tuple of numbers or None (a closed range; None is
open). The FAISS index evaluates it over `MetadataColumn`s; the Milvus index turns it into an
expression. Both read and refuse conditions here, with the same messages.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def check_filter(filter: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The filter, or None when it asks for nothing; refuses anything but a dict."""
    if filter is None or (isinstance(filter, Mapping) and not filter):
        return None
    if not isinstance(filter, Mapping):
        raise TypeError(f"filter must be a dict of attribute -> condition, got {type(filter).__name__}")
    return filter


def unknown_attribute(key: str, known: Sequence[str]) -> ValueError:
    """The error for a filter on an attribute no product holds, naming those that exist."""
    return ValueError(f"filter on unknown attribute {key!r}: no product in the index has it; "
                      f"known attributes: {list(known) if known else 'none (the index has no metadata)'}")


def range_bounds(key: str, condition: tuple) -> tuple[float | None, float | None]:
    """(min, max) of a range condition, checked: numbers or None, min <= max."""
    if len(condition) != 2 or not all(b is None or is_number(b) for b in condition):
        raise ValueError(f"filter {key!r}: a range is a (min, max) pair of numbers or None; got {condition!r}")
    low, high = condition
    if low is not None and high is not None and low > high:
        raise ValueError(f"filter {key!r}: range min {low} > max {high}")
    return low, high


def wanted_values(key: str, condition: Any) -> list[Any]:
    """The values an equality or any-of condition accepts, each checked to be a JSON scalar."""
    values = list(condition) if isinstance(condition, (list, set, frozenset)) else [condition]
    for value in values:
        if value_key(value) is None:
            raise ValueError(f"filter {key!r}: {value!r} is not a JSON scalar; use a value, a list of values, or "
                             "a (min, max) tuple")
    return values


def value_key(value: Any) -> tuple | None:
    """A hashable key under which equal JSON values meet; bools stay apart from 1 and 0."""
    if isinstance(value, (list, dict)):
        return None
    if isinstance(value, (str, bool, int, float)) or value is None:
        return (type(value) is bool, value)
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# -- the FAISS index's columns ----------------------------------------------------------------------------
class MetadataColumn:
    """One metadata attribute over labels: value codes for equality, floats for ranges."""

    def __init__(self) -> None:
        self.vocab: dict[tuple, int] = {}  # hashable value key -> code
        self.codes = np.zeros(0, dtype=np.int32)  # (L,) code, -1: absent or unhashable
        self.numbers = np.zeros(0, dtype=np.float64)  # (L,) numeric value, NaN: absent or not a number

    @classmethod
    def build(cls, key: str, metas: Sequence[dict | None]) -> "MetadataColumn":
        column = cls()
        column.extend(key, metas)
        return column

    def extend(self, key: str, metas: Sequence[dict | None]) -> None:
        codes = np.full(len(metas), -1, dtype=np.int32)
        numbers = np.full(len(metas), np.nan)
        for row, meta in enumerate(metas):
            if meta is None or key not in meta:
                continue
            value = meta[key]
            key_of_value = value_key(value)
            if key_of_value is not None:
                codes[row] = self.vocab.setdefault(key_of_value, len(self.vocab))
            if is_number(value):
                numbers[row] = value
        self.codes = np.concatenate([self.codes, codes])
        self.numbers = np.concatenate([self.numbers, numbers])

    def match(self, key: str, condition: Any) -> np.ndarray:
        """(L,) bool: the products whose value satisfies `condition`."""
        if isinstance(condition, tuple):
            low, high = range_bounds(key, condition)
            with np.errstate(invalid="ignore"):  # NaN (absent) compares False: never matches
                inside = ~np.isnan(self.numbers)
                if low is not None:
                    inside &= self.numbers >= low
                if high is not None:
                    inside &= self.numbers <= high
            return inside
        wanted = [self.vocab[value_key(value)] for value in wanted_values(key, condition)
                  if value_key(value) in self.vocab]
        if len(wanted) <= 8:  # a few comparisons beat np.isin, which sorts, by far
            match = np.zeros(len(self.codes), dtype=bool)
            for code in wanted:
                match |= self.codes == code
            return match
        table = np.zeros(len(self.vocab) + 1, dtype=bool)  # last slot: code -1 (absent), never wanted
        table[wanted] = True
        return table[self.codes]
