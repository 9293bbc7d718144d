"""Pieces of ``gateway.auth`` and the auth settings: key format, the token bucket on a clock the test moves.

The integration tests (tests/integration/test_auth.py) drive all of it through a real node.
"""

import hashlib

import pytest
from pydantic import ValidationError

from nimbus.config import Settings
from nimbus.gateway import auth


def test_keys_are_random_prefixed_and_hashed_whole():
    one, two = auth.new_key(), auth.new_key()
    assert one != two and one.startswith("nmb_") and len(one) == 4 + 43  # 32 random bytes, URL-safe base64
    assert auth.hash_key(one) == hashlib.sha256(one.encode()).hexdigest()
    assert auth.display_prefix(one) == one[:12] and len(auth.display_prefix(one)) <= 16


def test_auth_on_may_bind_any_address_auth_off_only_loopback(tmp_path):
    assert Settings(home=tmp_path, auth="on", host="0.0.0.0").auth == "on"
    assert Settings(home=tmp_path, host="127.0.0.1").auth == "off"
    with pytest.raises(ValidationError, match="refusing to bind 0.0.0.0 with NIMBUS_AUTH=off"):
        Settings(home=tmp_path, host="0.0.0.0")
    with pytest.raises(ValidationError):
        Settings(home=tmp_path, rate_limit=-1)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    return now


def test_burst_then_refill_at_the_rate(clock):
    buckets = auth.Buckets(rate=2.0, burst=3)
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k") == pytest.approx(0.5)  # one token comes back every 1/rate s
    clock[0] += 0.5
    assert buckets.take("k") == 0.0
    assert buckets.take("k") == pytest.approx(0.5)
    clock[0] += 100  # a long pause fills the bucket up to the burst, never past it
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k") > 0


def test_callers_have_their_own_buckets_and_burst_defaults_to_one_second(clock):
    buckets = auth.Buckets(rate=2.5, burst=0)
    assert buckets.burst == 3
    assert [buckets.take("a") for _ in range(3)] == [0.0] * 3
    assert buckets.take("a") > 0
    assert buckets.take("b") == 0.0


def test_full_buckets_are_forgotten_past_the_cap(clock, monkeypatch):
    monkeypatch.setattr(auth, "BUCKETS_MAX", 3)
    buckets = auth.Buckets(rate=1.0, burst=2)
    for caller in "abc":
        buckets.take(caller)
    buckets.take("a")  # a is spent; b and c refill to full below
    clock[0] += 1.0
    buckets.take("d")
    assert set(buckets._state) == {"a", "d"}
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0  # a kept its state: one token refilled
