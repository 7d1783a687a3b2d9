"""Session fixtures of the node tier: one real node (tests/node/noderig.py) with its control plane, the chart
installed by the real helm from the images built here, the chart's etcd on a local volume, and Kamailio on
the host as the main registrar.

Nothing here skips: a missing prerequisite is an error that names the make target installing it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helmkit import Helm
from tests.node import noderig
from tests.node.e2ekit import Kube, install_chart, start_kamailio, thrkit


@pytest.fixture(scope="session")
def node() -> Iterator[noderig.Node]:
    with noderig.node() as n:
        yield n


@pytest.fixture(scope="session")
def kube(node: noderig.Node) -> Kube:
    return Kube(node)


@pytest.fixture(scope="session")
def kamailio(tmp_path_factory: pytest.TempPathFactory, node: noderig.Node) -> Iterator[thrkit.KamailioMain]:
    kam = start_kamailio(tmp_path_factory.mktemp("kamailio-main"))
    yield kam
    kam.stop()


@pytest.fixture(scope="session")
def helm(node: noderig.Node) -> Helm:
    assert node.cp is not None
    return Helm(node.cp)


@pytest.fixture(scope="session")
def platform(node: noderig.Node, kube: Kube, helm: Helm) -> dict[str, float]:
    return {"helm_install_s": install_chart(node, kube, helm)}
