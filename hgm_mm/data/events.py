"""Interaction events (user_id, product_id, event, timestamp) read from CSV or JSONL, checked row by row.

    events = read_events("events.csv")   # view / cart / purchase, timestamps in seconds or ISO 8601

A bad row is refused with a `DataError` naming the file, the line and the fix; `UserProfile`
(`hgm_mm.ranking.profile`) builds a shopper's taste from the events.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .lines import DataError, csv_rows, json_objects

EVENT_TYPES = ("view", "cart", "purchase")
EVENTS_HEADER = ("user_id", "product_id", "event", "timestamp")


@dataclass(frozen=True)
class InteractionEvent:
    """One thing a user did with a product."""

    user_id: str
    product_id: str
    event: str  # "view", "cart" or "purchase"
    timestamp: float  # seconds since the epoch (UTC)

    def __post_init__(self) -> None:
        if self.event not in EVENT_TYPES:
            raise ValueError(f"event={self.event!r}; expected one of {list(EVENT_TYPES)}")
        if not isinstance(self.user_id, str) or not self.user_id or not isinstance(self.product_id, str) \
                or not self.product_id:
            raise ValueError(f"user_id and product_id must be non-empty strings; got {self.user_id!r}, "
                             f"{self.product_id!r}")
        if isinstance(self.timestamp, bool) or not isinstance(self.timestamp, (int, float)) \
                or not math.isfinite(self.timestamp):
            raise ValueError(f"timestamp={self.timestamp!r}; expected finite seconds since the epoch")


def read_events(path: str | Path) -> list[InteractionEvent]:
    """Reads interaction events from CSV (header `user_id,product_id,event,timestamp`) or JSONL.

    The format follows the suffix (`.jsonl`/`.json` is JSONL, anything else CSV). A timestamp is
    seconds since the epoch or an ISO-8601 string ("2024-05-01T12:00:00Z"); an ISO time without
    a zone is read as UTC.

    Raises:
        DataError: (a `ValueError`) at the first bad row, naming the file, the line and the fix.
    """
    path = Path(path)
    fix = "pass a CSV or JSONL file of interaction events"
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = _jsonl_rows(path, fix)
    else:
        rows = ((lineno, {key: cell.strip() for key, cell in row.items()})
                for lineno, row in csv_rows(path, EVENTS_HEADER, any_order=True, fix=fix))
    return [event_from_row(row, path, lineno) for lineno, row in rows]


def event_from_row(row: Mapping[str, Any], origin: str | Path, lineno: int | None = None) -> InteractionEvent:
    """One event from a row with the keys of `EVENTS_HEADER`, checked.

    Raises:
        DataError: naming `origin` (a file, or where a request carried the row) and `lineno`.
    """
    user_id, product_id, event, stamp = (row.get(key) for key in EVENTS_HEADER)
    for key, value in (("user_id", user_id), ("product_id", product_id)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(origin, lineno, f"{key} is {value!r}; give a non-empty string id")
    if event not in EVENT_TYPES:
        raise DataError(origin, lineno, f"event {event!r} is not known; write one of {', '.join(EVENT_TYPES)}")
    return InteractionEvent(user_id, product_id, event, _timestamp(origin, lineno, stamp))


def _jsonl_rows(path: Path, fix: str):
    for lineno, row in json_objects(path, fix):
        missing = [key for key in EVENTS_HEADER if key not in row]
        unknown = sorted(set(row) - set(EVENTS_HEADER))
        if missing or unknown:
            raise DataError(path, lineno, f"{'missing key(s) ' + str(missing) if missing else ''}"
                                          f"{'; ' if missing and unknown else ''}"
                                          f"{'unknown key(s) ' + str(unknown) if unknown else ''}; each line holds "
                                          f"exactly {', '.join(EVENTS_HEADER)}")
        yield lineno, row


def _timestamp(path: Path, lineno: int, value: Any) -> float:
    fix = "write seconds since the epoch (1714564800) or ISO-8601 (2024-05-01T12:00:00Z)"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        try:
            seconds = float(value)
        except ValueError:
            try:
                moment = datetime.fromisoformat(value.strip())
            except ValueError:
                raise DataError(path, lineno, f"timestamp {value!r} is not a time; {fix}") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            seconds = moment.timestamp()
    else:
        raise DataError(path, lineno, f"timestamp is {value!r}; {fix}")
    if not math.isfinite(seconds):
        raise DataError(path, lineno, f"timestamp {value!r} is not finite; {fix}")
    return seconds
