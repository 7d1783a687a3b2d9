"""The command line: options, environment and YAML through one model; exit 2 on bad values; docs current."""

from __future__ import annotations

from pathlib import Path

import pytest

from registrar.cli import config_reference, main
from registrar.config import ConfigError, Listen, Settings, Transport, build_settings

REPO = Path(__file__).resolve().parents[2]


def test_configuration_doc_is_generated_from_the_model() -> None:
    assert (REPO / "docs" / "configuration.md").read_text() == config_reference(), (
        "docs/configuration.md is stale: run `.venv/bin/midregistrar config-reference > docs/configuration.md`"
    )


def test_every_setting_has_a_description() -> None:
    assert all(f.description for f in Settings.model_fields.values())


def test_options_win_over_environment_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "min_expires: 30\nmax_expires: 900\ndefault_expires: 300\nmode: contact\nmain_registrar: sip:10.0.0.3:5070\n"
    )
    s = build_settings({"max_expires": "600"}, {"MIDREG_MIN_EXPIRES": "40", "MIDREG_MODE": "aor"}, cfg)
    assert (s.min_expires, s.max_expires, s.mode.value) == (40, 600, "aor")
    assert s.main_registrar == "sip:10.0.0.3:5070"


def test_list_settings_from_environment() -> None:
    s = build_settings({}, {"MIDREG_LISTEN": "udp:127.0.0.1:5060,tcp:127.0.0.1:5061"})
    assert [str(x) for x in s.listen] == ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5061"]


def test_etcd_endpoints_comma_separated_in_a_repeated_flag_or_the_environment() -> None:
    """`--etcd-endpoints a,b --etcd-endpoints c` is three members (it once reached gRPC as one bogus host)."""
    s = build_settings({"etcd_endpoints": ["127.0.1.1:2379,127.0.1.2:2379", "127.0.1.3:2379"]}, {})
    assert s.etcd_endpoints == ["127.0.1.1:2379", "127.0.1.2:2379", "127.0.1.3:2379"]
    s = build_settings({}, {"MIDREG_ETCD_ENDPOINTS": "127.0.1.1:2379, 127.0.1.2:2379"})
    assert s.etcd_endpoints == ["127.0.1.1:2379", "127.0.1.2:2379"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--main-registrar", "nope"], "main-registrar"),
        (
            ["run", "--main-registrar", "sip:a.example", "--min-expires", "100", "--max-expires", "50"],
            "min_expires",
        ),
        (["run", "--main-registrar", "sip:a.example", "--listen", "sctp:1.2.3.4:5"], "listen"),
        (["run", "--main-registrar", "sip:a.example", "--mode", "weird"], "mode"),
        (
            ["run", "--main-registrar", "sip:a.example", "--insertion", "path", "--mode", "aor"],
            "insertion path",
        ),
        (["run", "--main-registrar", "sip:a.example", "--listen", "tls:1.2.3.4"], "tls_cert and tls_key"),
        (["run", "--main-registrar", "sip:a.example", "--tls-cert", "/x.crt"], "go together"),
        (["run", "--main-registrar", "sip:a.example", "--listen", "wss:1.2.3.4"], "tls_cert and tls_key"),
        (
            ["run", "--main-registrar", "sip:a.example", "--tls-cert", "/no/x.crt", "--tls-key", "/no/x.key"],
            "cannot load the certificate /no/x.crt",
        ),
        (
            ["run", "--main-registrar", "sips:a.example", "--tls-ca", "/no/ca.pem"],
            "cannot load the CA bundle",
        ),
        (["run"], "main registrar"),
        (["run", "--bogus"], "unrecognized"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_bad_yaml_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: [unclosed\n")
    with pytest.raises(ConfigError):
        build_settings({}, {}, cfg)


def test_run_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--at-escape-str" in out and "%40" in out, "a default with % is shown as written"
    assert all("--" + name.replace("_", "-") in out for name in Settings.model_fields)


def test_a_tls_socket_defaults_to_port_5061() -> None:
    assert Listen.parse("tls:192.0.2.1") == Listen(transport=Transport.TLS, host="192.0.2.1", port=5061)
    assert str(Listen.parse("tls:[2001:db8::1]:5062")) == "tls:[2001:db8::1]:5062"


def test_websocket_sockets_default_to_8080_and_8443() -> None:
    assert Listen.parse("ws:0.0.0.0").port == 8080 and Listen.parse("wss:0.0.0.0").port == 8443
