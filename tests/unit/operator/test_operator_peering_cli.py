"""`midregistrar-operator` peering options: standalone by default, a distinct stable priority per pod."""

from __future__ import annotations

import pytest

from midreg_operator.__main__ import parse_args
from midreg_operator.peering import PRIORITY_RANGE, priority_from_name, settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MIDREG_OPERATOR_PEERING", "MIDREG_OPERATOR_PEERING_LIFETIME", "POD_NAME"):
        monkeypatch.delenv(var, raising=False)


def test_standalone_by_default() -> None:
    args = parse_args([])
    assert args.peering is None and args.priority is None
    assert args.peering_lifetime == 60


def test_explicit_priority() -> None:
    args = parse_args(["--peering", "midreg", "--priority", "100", "--peering-lifetime", "15"])
    assert (args.peering, args.priority, args.peering_lifetime) == ("midreg", 100, 15)
    s = settings(args)
    assert s.peering.lifetime == 15 and s.peering.stealth is True


def test_priority_from_the_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "mr-kube-midregistrar-7d9f8b6c4-x2x9q")
    args = parse_args(["--peering", "midreg", "--priority-from-env", "POD_NAME"])
    assert args.priority == priority_from_name("mr-kube-midregistrar-7d9f8b6c4-x2x9q")
    # Stable: the same name gives the same priority in every process (no hash seed).
    assert parse_args(["--peering", "m", "--priority-from-env", "POD_NAME"]).priority == args.priority


def test_hashed_priorities_are_in_range_and_distinct() -> None:
    names = [f"mr-kube-midregistrar-7d9f8b6c4-{i:05x}" for i in range(5000)]
    prios = {priority_from_name(n) for n in names}
    assert len(prios) == len(names)
    assert all(1 <= p <= PRIORITY_RANGE for p in prios)


def test_peering_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDREG_OPERATOR_PEERING", "midreg")
    monkeypatch.setenv("MIDREG_OPERATOR_PEERING_LIFETIME", "20")
    args = parse_args(["--priority", "5"])
    assert (args.peering, args.priority, args.peering_lifetime) == ("midreg", 5, 20)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peering", "midreg"], "needs --priority"),
        (["--priority", "3"], "need --peering"),
        (["--peering", "m", "--priority", "1", "--priority-from-env", "POD_NAME"], "not allowed with"),
        (["--peering", "m", "--priority-from-env", "POD_NAME"], "$POD_NAME is unset or empty"),
        (["--peering", "m", "--priority", "1", "--peering-lifetime", "1"], "at least 2 seconds"),
    ],
)
def test_bad_peering_options_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
