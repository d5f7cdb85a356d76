import pytest

from spjax.errors import ConfigError
from spjax.rules import Rules


def test_first_match_wins_and_patterns_match_whole_names():
    rules = Rules.from_pairs([
        ("layers/0/.*", "first"),
        (".*attn/q", "q"),
        (".*attn/.*", "attn"),
        (".*", "rest"),
    ])
    assert rules.lookup("layers/0/attn/q") == "first"
    assert rules.lookup("layers/1/attn/q") == "q"
    assert rules.lookup("layers/1/attn/qk_norm") == "attn"  # 'attn/q' must not match a prefix
    assert rules.lookup("embed") == "rest"


def test_no_match_uses_default_or_raises_naming_the_source():
    rules = Rules.from_pairs([("embed", 1)], source="parallel.rules")
    assert rules.lookup("mlp", None) is None
    with pytest.raises(ConfigError, match="no rule in parallel.rules matches 'mlp'"):
        rules.lookup("mlp")


def test_bad_rules_are_rejected_with_their_position():
    with pytest.raises(ConfigError, match=r"sparsity\[1\]: invalid regex"):
        Rules.from_pairs([("a", 1), ("(", 2)], source="sparsity")
    with pytest.raises(ConfigError, match=r"sparsity\[0\] must be a \[regex, value\] pair"):
        Rules.from_pairs([("a", 1, 2)], source="sparsity")
