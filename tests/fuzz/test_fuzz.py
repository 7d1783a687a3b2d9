"""The short fuzz run of ``make test``: for every target, its committed corpus (tests/fuzz/corpus/<target>: the
seeds and every crash reproducer found so far) and then a fixed number of seeded mutations of it, in about
two seconds a target. Fails on a crash (an exception the target's code does not promise) or a hang (one input
over 100 ms on its best of three runs). The long, coverage-guided runs are ``python -m tests.fuzz.run``."""

from __future__ import annotations

import pytest

from tests.fuzz.harness import NAMES, corpus, short_run

pytestmark = pytest.mark.fuzz

# Mutations per target: about two seconds each on one core of the development machine.
MUTATIONS = {"message": 20_000, "uri": 40_000, "udp": 8_000, "tcp": 5_000, "config": 1_500, "etcd": 50_000}


def test_every_target_has_a_corpus() -> None:
    assert set(MUTATIONS) == set(NAMES)
    for name in NAMES:
        assert corpus(name), name


@pytest.mark.parametrize("name", NAMES)
def test_short_fuzz_run(name: str) -> None:
    judge = short_run(name, MUTATIONS[name], seed=1)
    assert judge.ok, judge.report()
    print(judge.report())
