"""Weighted prompts: one parser for search, subset specs and guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.prompts import PromptError, WeightedPrompt, combine, parse_prompts


def test_weights_stops_and_negatives():
    assert parse_prompts("a red star:1|blurry:-0.5") == [
        WeightedPrompt("a red star", 1.0),
        WeightedPrompt("blurry", -0.5),
    ]
    assert parse_prompts("x:2:0.3") == [WeightedPrompt("x", 2.0, 0.3)]
    assert parse_prompts(["a", "b:0.5"]) == [WeightedPrompt("a"), WeightedPrompt("b", 0.5)]
    assert parse_prompts("  a red circle  ")[0] == WeightedPrompt("a red circle", 1.0, -math.inf)


def test_a_colon_followed_by_words_stays_in_the_text():
    assert parse_prompts("photo: a dog") == [WeightedPrompt("photo: a dog")]
    assert parse_prompts("a photo of: two cats:2") == [WeightedPrompt("a photo of: two cats", 2.0)]


@pytest.mark.parametrize(
    "bad, named",
    [
        ("", "empty"),
        ("|", "empty"),
        ("a red star:abc", "'abc'"),
        ("a:1|:2", "empty text"),
        ("blurry:-1", "positive weight"),
        ("a:nan", "finite"),
        ("a:inf", "finite"),
        ("a:1:x", "stop 'x'"),
    ],
)
def test_malformed_prompts_are_one_line_errors_naming_the_problem(bad, named):
    with pytest.raises(PromptError, match=named) as err:
        parse_prompts(bad)
    assert "\n" not in str(err.value)


def test_round_trip_through_str():
    prompts = parse_prompts("a red star:1|blurry:-0.5|x:2:0.3")
    assert parse_prompts("|".join(str(p) for p in prompts)) == prompts


def test_combine_pulls_toward_positive_and_away_from_negative():
    e = np.eye(3, dtype=np.float32)
    v = combine(e[:2], parse_prompts("a:1|b:-0.5"))
    assert np.isclose(np.linalg.norm(v), 1.0) and v[0] > 0 > v[1]
    with pytest.raises(PromptError, match="cancel"):
        combine(np.stack([e[0], e[0]]), [WeightedPrompt("a", 1.0), WeightedPrompt("b", -1.0)])


def test_negative_only_parts_parse_when_the_caller_checks_positivity_itself():
    assert parse_prompts("blurry:-1", require_positive=False) == [WeightedPrompt("blurry", -1.0)]
    with pytest.raises(PromptError, match="empty text"):
        parse_prompts(":-1", require_positive=False)
