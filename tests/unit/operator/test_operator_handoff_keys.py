"""The pods' hand-off keys: made once, mounted with etcd, rotated in three steps (pure parts; the cluster tests
show the Secret on a real API server)."""

from __future__ import annotations

import itertools

import yaml

from midreg_operator import handoff_keys as hk
from midreg_operator import render
from midreg_operator.spec import Ref, parse_spec

REF = Ref(name="edge", namespace="voip", uid="u1")


def keys() -> itertools.count[int]:
    return itertools.count(1)


def test_a_rotation_adds_then_promotes_then_drops_each_after_settling() -> None:
    n = keys()
    make = lambda: f"k{next(n)}"  # noqa: E731
    state = hk.initial(0.0, make)
    assert state.keys == ("k1",)
    assert hk.next_state(state, "", 500.0, 120, make) is None  # nothing asked
    added = hk.next_state(state, "r1", 500.0, 120, make)
    assert added is not None and added.keys == ("k1", "k2") and added.phase == "added"  # accepted, not used
    assert hk.next_state(added, "r1", 560.0, 120, make) is None  # pods may not all have it yet
    promoted = hk.next_state(added, "r1", 621.0, 120, make)
    assert promoted is not None and promoted.keys == ("k2", "k1") and promoted.phase == "promoted"
    dropped = hk.next_state(promoted, "r1", 742.0, 120, make)
    assert dropped is not None and dropped.keys == ("k2",) and dropped.phase == ""
    assert hk.next_state(dropped, "r1", 900.0, 120, make) is None  # the same request is not redone
    again = hk.next_state(dropped, "r2", 900.0, 120, make)
    assert again is not None and again.keys == ("k2", "k3")


def test_a_request_during_a_rotation_waits_for_it() -> None:
    n = keys()
    make = lambda: f"k{next(n)}"  # noqa: E731
    added = hk.next_state(hk.initial(0.0, make), "r1", 1.0, 120, make)
    assert added is not None
    assert hk.next_state(added, "r2", 2.0, 120, make) is None


def test_the_state_round_trips_through_the_secret() -> None:
    state = hk.KeyState(("a" * 64, "b" * 64), "r1", "added", 123.0)
    again = hk.KeyState.from_secret({"keys": state.file()}, state.annotations())
    assert again == state
    assert hk.KeyState.from_secret({}, {}).keys == ()


def test_pods_with_etcd_mount_the_keys_and_read_them() -> None:
    spec = parse_spec({"mainRegistrar": "sip:pbx", "etcd": {"endpoints": ["etcd:2379"]}})
    config = yaml.safe_load(render.render_config_yaml(spec, REF))
    assert config["handoff_key_file"] == "/etc/midregistrar/handoff/keys"
    pod = render.render_deployment(spec, REF)["spec"]["template"]["spec"]
    assert {"name": "handoff", "secret": {"secretName": "edge-handoff"}} in pod["volumes"]
    plain = parse_spec({"mainRegistrar": "sip:pbx"})
    assert "handoff_key_file" not in yaml.safe_load(render.render_config_yaml(plain, REF)) or (
        yaml.safe_load(render.render_config_yaml(plain, REF))["handoff_key_file"] is None
    )
