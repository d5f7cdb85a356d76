"""One ordered regex -> value rule engine, first match wins.

The same engine decides sharding (logical axis -> mesh axis), and later which layers are
sparse or low-rank and their per-layer settings, and learning-rate multipliers. A rule set is
written in config as a list of `[regex, value]` pairs; a regex must match the *whole* name
(`re.fullmatch`), so `attn/q` does not silently catch `attn/qk_norm`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

from spjax.errors import ConfigError

# A rule list as config holds it: ordered (regex, value) pairs, first match wins.
RuleList = tuple[tuple[str, Any], ...]

_NO_MATCH = object()


@dataclasses.dataclass(frozen=True)
class Rules:
    """An ordered list of (compiled regex, value); `lookup` returns the first match's value."""

    patterns: tuple[re.Pattern[str], ...]
    values: tuple[Any, ...]
    source: str = "rules"  # config key the rules came from, for error messages

    @classmethod
    def from_pairs(cls, pairs: Iterable[Sequence[Any]], source: str = "rules") -> Rules:
        patterns, values = [], []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"{source}[{i}] must be a [regex, value] pair, got {pair!r}")
            pattern, value = pair
            try:
                patterns.append(re.compile(str(pattern)))
            except re.error as e:
                raise ConfigError(f"{source}[{i}]: invalid regex {pattern!r} ({e})") from None
            values.append(value)
        return cls(tuple(patterns), tuple(values), source)

    def lookup(self, name: str, default: Any = _NO_MATCH) -> Any:
        """Value of the first rule whose regex matches all of `name`."""
        for pattern, value in zip(self.patterns, self.values):
            if pattern.fullmatch(name):
                return value
        if default is _NO_MATCH:
            raise ConfigError(f"no rule in {self.source} matches '{name}'; add a catch-all "
                              f"['.*', ...] rule at the end")
        return default

    def __len__(self) -> int:
        return len(self.patterns)
