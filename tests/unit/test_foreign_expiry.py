"""How a process shows the expiry of a binding another process owns (registrar.store.etcd.foreign_expiry)."""

from __future__ import annotations

import pytest

from registrar.store.etcd import foreign_expiry

NOW = 1_000_000.0


def test_written_expiry_ahead_is_shown_as_written() -> None:
    assert foreign_expiry(NOW + 40, 60, NOW + 640, NOW) == NOW + 40


def test_written_expiry_past_but_vouched_shows_one_lifetime_not_the_hold() -> None:
    # the owner absorbed the phone's refreshes without writing them; its lease runs for 9 more minutes
    assert foreign_expiry(NOW - 200, 60, NOW + 540, NOW) == NOW + 60


def test_never_beyond_the_hold() -> None:
    assert foreign_expiry(NOW - 5, 60, NOW + 20, NOW) == NOW + 20
    assert foreign_expiry(NOW + 90, 60, NOW + 30, NOW) == NOW + 30


@pytest.mark.parametrize("written", [NOW - 100, NOW + 10])
@pytest.mark.parametrize("lifetime", [0, 60, 3600])
def test_valid_exactly_while_the_owner_vouches(written: float, lifetime: int) -> None:
    hold = NOW + 300
    assert foreign_expiry(written, lifetime, hold, NOW) > NOW
    assert foreign_expiry(written, lifetime, NOW, NOW) <= NOW  # lease over: expired


def test_no_lifetime_known_falls_back_to_the_hold() -> None:
    assert foreign_expiry(NOW - 1, 0, NOW + 300, NOW) == NOW + 300
