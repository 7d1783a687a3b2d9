"""The member registry: which registrar processes are alive, and where to hand them a request.

Every process puts ``members/<member id>`` (its internal SIP address) on a liveness lease it keeps alive;
a binding's ``owner`` is such an id. A peer that sees the key go (revoked on shutdown, or the lease ran out
when the process died) stops handing requests to it, and the bindings it owned run out their own leases
into orphan claims (registrar/store/orphans.py).
"""

from __future__ import annotations

import logging

from registrar.store.etcd_client import EtcdClient
from registrar.store.etcd_layout import UNDECODABLE, EtcdKeys, decode_member, encode_member, why

log = logging.getLogger(__name__)


class MemberRegistry:
    """This process's member key and lease, and the live members as etcd last showed them. ``calls``
    counts the etcd requests made (listings, grants, puts, keepalives)."""

    def __init__(self, client: EtcdClient, keys: EtcdKeys, member_id: str, ttl: int) -> None:
        self.client = client
        self.keys = keys
        self.member_id = member_id
        self.ttl = ttl
        self.address = ""
        self.lease = 0
        self.calls = 0
        self._live: dict[str, str] = {}

    def address_of(self, member: str) -> str | None:
        return self._live.get(member)

    def live(self) -> dict[str, str]:
        """Live members: id → internal SIP address."""
        return dict(self._live)

    async def list(self) -> int:
        """Read every member key; returns the revision read at (a watch from the next one misses nothing)."""
        self.calls += 1
        page = await self.client.get_prefix(self.keys.members)
        live: dict[str, str] = {}
        for kv in page.kvs:
            try:
                member = kv.key[len(self.keys.members) :].decode()
                live[member] = decode_member(kv.value)
            except UNDECODABLE as exc:
                log.warning("member key %r in etcd not understood, skipped: %s", kv.key, why(exc))
        self._live = live
        return page.revision

    async def register(self) -> int:
        """Put this member's key on a fresh liveness lease (same member id after an outage). Returns the
        lease it replaces (0: none), for the caller to revoke."""
        self.calls += 2
        lease = await self.client.grant(self.ttl)
        await self.client.put(self.keys.member(self.member_id), encode_member(self.address), lease=lease)
        old, self.lease = self.lease, lease
        self._live[self.member_id] = self.address
        return old if old != lease else 0

    async def keepalive(self) -> bool:
        """Renew the lease once; False when etcd had already let it go (register again)."""
        self.calls += 1
        return await self.client.keepalive_once(self.lease) > 0

    def put(self, member: str, value: bytes) -> None:
        """A member key written (watch)."""
        try:
            self._live[member] = decode_member(value)
        except UNDECODABLE as exc:
            log.warning("member %r written in etcd not understood, skipped: %s", member, why(exc))

    def gone(self, member: str) -> None:
        """A member key deleted (watch): revoked, or its lease ran out."""
        self._live.pop(member, None)
