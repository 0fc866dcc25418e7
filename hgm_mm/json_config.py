"""The one way a config dataclass goes to and from JSON: `to_dict`, and `from_dict`, which refuses unknown keys."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, TypeVar

Config = TypeVar("Config", bound="JsonConfig")


class JsonConfig:
    """Mixin for a dataclass of settings read from JSON or YAML that people write by hand.

    `from_dict` refuses keys the dataclass does not have (a misspelt setting would otherwise be
    ignored in silence) and names where the dict came from (`origin`: a file, a field) in every
    error; the dataclass's `__post_init__` checks the values. Subclasses with nested configs
    override `_nested` to build them first.
    """

    _key_noun = "key"  # what errors call a field: "setting" for the training config

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, JSON-ready (tuples as lists); `from_dict` reads it back to an equal config."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[Config], data: Mapping[str, Any], *, origin: str | None = None) -> Config:
        """A config from a mapping of its fields.

        Raises:
            ValueError: `data` is not a mapping, has keys the config does not (listing the valid
                ones), or holds a value the config refuses; the message starts with `origin`.
        """
        origin = origin or cls.__name__
        if not isinstance(data, Mapping):
            raise ValueError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            noun = cls._key_noun
            raise ValueError(f"{origin}: unknown {noun}(s) {unknown}; valid {noun}s are {sorted(valid)} "
                             f"({cls.__name__})")
        data = cls._nested(dict(data), origin)
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{origin}: {err}") from err

    @classmethod
    def _nested(cls, data: dict[str, Any], origin: str) -> dict[str, Any]:
        """`data` with its nested configs built (none here)."""
        return data
