"""The CRD file: names, subresources, printer columns, and defaults that agree with the operator's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from midreg_operator.spec import parse_spec

CRD = Path(__file__).resolve().parents[3] / "crds" / "midregistrar.yaml"


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CRD.read_text())
    return data


def test_names_and_subresources() -> None:
    crd = load()
    assert crd["metadata"]["name"] == "midregistrars.sip.midregistrar.io"
    spec = crd["spec"]
    assert spec["group"] == "sip.midregistrar.io"
    assert spec["names"]["kind"] == "MidRegistrar"
    assert spec["names"]["shortNames"] == ["midreg"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    scale = version["subresources"]["scale"]
    assert scale["labelSelectorPath"] == ".status.selector"
    assert scale["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]
    cols = [c["name"] for c in version["additionalPrinterColumns"]]
    assert cols[:3] == ["Mode", "Main-Registrar", "Ready"]
    assert "Contacts" in cols and "Age" in cols


def _defaults(schema: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        if "default" in prop and prop["default"] != {}:
            out[name] = prop["default"]
        elif prop.get("type") == "object" and "properties" in prop:
            sub = _defaults(prop)
            if sub:
                out[name] = sub
    return out


def test_crd_defaults_match_the_operator_model() -> None:
    schema = load()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    defaults = _defaults(schema)
    model = parse_spec({"mainRegistrar": "sip:pbx"}).model_dump(by_alias=True)
    # spec.sidecar has no default of its own: its fields' defaults apply when it is given.
    model["sidecar"] = parse_spec({"sidecar": {"pbxPort": 5070}}).model_dump(by_alias=True)["sidecar"]
    for key, value in defaults.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                assert model[key][sub] == subvalue, f"{key}.{sub}"
        elif key == "transports":
            assert model[key] == value
        else:
            assert model[key] == value, key
