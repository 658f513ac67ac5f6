"""Settings refuse unknown sampling choices at start-up, with the valid ones in the message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.config import Settings
from ml_worker.sampler import DEFAULT_QUERY_STRATEGY, STRATEGIES


@pytest.mark.parametrize("field,value,listed", [
    ("query_strategy", "clustr_margin", "cluster_margin"),
    ("uncertainty_measure", "bald", "entropy"),
    ("aggregation", "median", "mean"),
])
def test_unknown_sampling_choice_is_refused(field, value, listed, tmp_path):
    with pytest.raises(ValidationError, match=listed) as e:
        Settings(var_dir=tmp_path, **{field: value})
    assert field in str(e.value) and repr(value) in str(e.value)


def test_sampling_defaults_and_every_strategy_accepted(tmp_path):
    s = Settings(var_dir=tmp_path)
    assert (s.query_strategy, s.uncertainty_measure, s.aggregation) == ("", "margin", "max")
    assert DEFAULT_QUERY_STRATEGY in STRATEGIES
    for strategy in STRATEGIES:
        assert Settings(var_dir=tmp_path, query_strategy=strategy).query_strategy == strategy


def test_sampling_choice_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QUERY_STRATEGY", "typiclust")
    assert Settings(var_dir=tmp_path).query_strategy == "typiclust"
    monkeypatch.setenv("QUERY_STRATEGY", "nope")
    with pytest.raises(ValidationError, match="'nope' is not one of"):
        Settings(var_dir=tmp_path)
