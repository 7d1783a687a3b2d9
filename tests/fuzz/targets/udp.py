"""Stack.receive with arbitrary UDP datagrams, through the whole engine (tests/fuzz/targets/pipeline.py):
nothing may escape; a bad message is answered 400 or dropped."""

from __future__ import annotations

from tests.fuzz.harness import Target
from tests.fuzz.targets.pipeline import udp

TARGET = Target("udp", udp, (), __doc__ or "")
