from __future__ import annotations

import random

import pytest

from authd.backoff import BackoffPolicy, ExponentialBackoff


def test_grows_to_the_cap_and_resets() -> None:
    backoff = ExponentialBackoff(BackoffPolicy(initial=1, maximum=8, multiplier=2, jitter=0))
    assert [backoff.next_delay() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    backoff.reset()
    assert backoff.next_delay() == 1


def test_jitter_stays_within_bounds_and_under_the_cap() -> None:
    policy = BackoffPolicy(initial=1, maximum=4, multiplier=2, jitter=0.5)
    backoff = ExponentialBackoff(policy, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(200)]
    assert min(delays[:1]) >= 0.5
    assert max(delays) <= 4
    assert len(set(delays)) > 100


@pytest.mark.parametrize(
    "kwargs", [{"initial": 0}, {"initial": 5, "maximum": 1}, {"multiplier": 0.5}, {"jitter": 1.0}]
)
def test_rejects_parameters_that_would_spin(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        BackoffPolicy(**kwargs)
