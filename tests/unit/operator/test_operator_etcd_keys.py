"""etcd key arithmetic used by the finalizer and the status counts (pure)."""

from __future__ import annotations

import pytest

from midreg_operator.etcd import EtcdGateway, EtcdUnavailable, count_keys, endpoint_url, prefix_range_end


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/midregistrar/ns/a/") == b"/midregistrar/ns/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"


def test_count_keys_separates_aors_and_bindings() -> None:
    p = b"/midregistrar/ns/a/"
    keys = [
        p + b"aor/sip:alice@example.com",
        p + b"aor/sip:alice@example.com/ct/1",
        p + b"aor/sip:alice@example.com/ct/2",
        p + b"aor/sip:bob@example.com",
        p + b"aor/sip:bob@example.com/ct/9",
        p + b"ctid/1",
        b"/midregistrar/ns/other/aor/x",
    ]
    c = count_keys(keys, p)
    assert (c.aors, c.contacts) == (2, 3)


def test_endpoint_url() -> None:
    assert endpoint_url("127.0.0.1:2379", tls=False) == "http://127.0.0.1:2379"
    assert endpoint_url("etcd:2379", tls=True) == "https://etcd:2379"
    assert endpoint_url("https://etcd:2379/", tls=False) == "https://etcd:2379"


def test_unreachable_endpoints_raise_a_clear_error() -> None:
    gw = EtcdGateway(endpoints=[], timeout=0.5)
    with pytest.raises(EtcdUnavailable, match="no etcd endpoint"):
        gw.delete_prefix("/x/")
