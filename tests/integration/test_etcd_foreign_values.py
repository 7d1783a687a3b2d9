"""A corrupted or foreign value under the registrar's prefix in a real etcd (issue 15 item 5): skipped with a log
line, never a crash, and the other AoRs (and the other bindings of the same AoR) keep working.

Written next to what the store wrote: a binding key holding garbage, one holding JSON of the wrong types, a
head that is not JSON, a head whose meta is not an object, keys that are not in the layout (under an AoR
and beside the layout's folders), a member key and a contact-id index that hold garbage. The store reads
around them, its watch keeps following, writes go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from registrar.records import AorRecord
from registrar.store.base import Pending, ctid_key
from registrar.store.etcd_client import EtcdClient
from tests.integration.test_etcd_store import META, binding, load, new_prefix, started, stop_all, write
from tests.support.etcd import EtcdServer, etcd_server

pytestmark = pytest.mark.integration
__all__ = ["etcd_server"]  # the fixture, collected from this module


def test_corrupted_and_foreign_values_are_skipped(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        prefix = new_prefix()
        a, ra = await started(etcd_server, prefix, "a")
        b, rb = await started(etcd_server, prefix, "b")
        caplog.set_level(logging.WARNING, logger="registrar.store")
        try:
            now = time.time()
            alice, bob, carol, dave = (f"{n}@example.com" for n in ("alice", "bob", "carol", "dave"))
            ctid = a.new_contact_id()
            record = AorRecord(alice, {ctid: binding(ctid, now + 60)}, meta=META)
            assert await write(a, ra, record, None) is True

            wrong_types = binding(98, now + 60).to_dict() | {"expires_at": "soon", "v": 1, "hold": now + 600}
            foreign = {
                f"aor/{alice}/ct/99": b"\x00garbage",
                f"aor/{alice}/ct/98": json.dumps(wrong_types).encode(),
                f"aor/{alice}/ct/97": b"[" * 100_000,  # nested past the JSON decoder's recursion limit
                f"aor/{alice}/other/1": b"not ours",
                f"aor/{bob}": b"{not json",
                f"aor/{carol}": b'{"v":1,"aor":"carol@example.com","meta":[1,2],"ctids":[]}',
                "somebody-else/1": b"\xff\xfe",
                "members/zed": b"[]",
                "ctid/77": b"\xff\xfe",
            }
            async with EtcdClient([etcd_server.endpoint]) as c:
                for key, value in foreign.items():
                    await c.put((prefix + key).encode(), value)

            # b reads alice afresh: the good binding; the three bad ones skipped, each with a log line
            got = await load(b, rb, alice)
            assert got is not None and set(got.bindings) == {ctid} and got.meta == META
            for key in ("ct/99", "ct/98", "ct/97"):
                assert any(
                    key in r.getMessage() and "not understood" in r.getMessage() for r in caplog.records
                ), key

            # heads that are not JSON, or not in the layout's shape: read without meta, and still writable
            for aor in (bob, carol):
                got = await load(b, rb, aor)
                assert got is not None and got.meta is None and not got.bindings and got.version > 0
                assert any(aor in r.getMessage() and "head" in r.getMessage() for r in caplog.records)
                new = b.new_contact_id()
                assert (
                    await write(b, rb, AorRecord(aor, {new: binding(new, now + 60)}, got.version, META), got)
                    is True
                )
                again = await load(b, rb, aor)
                assert again is not None and set(again.bindings) == {new} and again.meta == META

            # the garbage contact-id index reads as no such contact id
            with pytest.raises(Pending):
                b.find_ctid(77)
            await rb.wait(lambda: ctid_key(77) in rb.ready, what="ctid 77 ready")
            assert b.find_ctid(77) is None
            assert any("contact id 77" in r.getMessage() for r in caplog.records)

            # the garbage member is not a member; the watch (a's and b's) lived through every foreign event
            assert "zed" not in a.members and "zed" not in b.members
            assert set(b.members) == {"a", "b"}
            d_ctid = a.new_contact_id()
            assert (
                await write(a, ra, AorRecord(dave, {d_ctid: binding(d_ctid, now + 60)}, meta=META), None)
                is True
            )
            seen = await load(b, rb, dave)
            assert seen is not None and set(seen.bindings) == {d_ctid}

            # alice keeps working for her owner: a second binding is written next to the foreign keys
            mine = await load(a, ra, alice)
            assert mine is not None
            more = a.new_contact_id()
            grown = AorRecord(alice, {**mine.bindings, more: binding(more, now + 60)}, mine.version, META)
            assert await write(a, ra, grown, mine) is True
            await asyncio.sleep(0.2)  # the watch shows the write to b
            got = await load(b, rb, alice)
            assert got is not None and set(got.bindings) == {ctid, more}

            # a binding this process owns, overwritten with garbage: the watch lets go of it (log line), and
            # the AoR reads on with the other binding
            async with EtcdClient([etcd_server.endpoint]) as c:
                await c.put(f"{prefix}aor/{alice}/ct/{ctid}".encode(), b'{"v":1,"ctid":"x"}')
            await asyncio.sleep(0.2)
            assert any("written in etcd not understood" in r.getMessage() for r in caplog.records)
            now_a = await load(a, ra, alice)
            assert now_a is not None and set(now_a.bindings) == {more}
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        finally:
            await stop_all(a, b)

    asyncio.run(main())
