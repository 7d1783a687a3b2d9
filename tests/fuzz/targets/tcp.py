"""A TCP byte stream through the framer into the whole engine, as registrar/net/server.py's ``stream_data``
does it: the stream pieces (tests/fuzz/targets/pipeline.py) arrive in chunks whose sizes come from the
input's hash; a framing error ends the connection (nothing more is read from it). Nothing may escape."""

from __future__ import annotations

import hashlib
import random

from registrar.sip.errors import FramingError
from registrar.sip.framing import PING, StreamFramer
from registrar.sip.transport import Peer
from tests.fuzz.harness import Target
from tests.fuzz.targets.pipeline import make_core, script

PEER = Peer("tcp", "192.0.2.10", 50000, conn=1)


def run(data: bytes) -> None:
    core = make_core(data, tcp=True)
    framer = StreamFramer()
    rng = random.Random(hashlib.blake2b(data, digest_size=8).digest())

    def stream(piece: bytes) -> None:
        i = 0
        while i < len(piece) and not framer.closed:
            n = rng.choice((1, 7, 64, 536, 1460, 65536))
            for item in framer.feed(piece[i : i + n]):
                if item is PING or isinstance(item, FramingError):
                    continue
                assert isinstance(item, bytes)
                core.feed(item, PEER)
            i += n

    script(data, core, stream)


TARGET = Target("tcp", run, (), __doc__ or "")
