"""Session fixtures of the node tier: one real node (tests/support/node.py) with its control plane, the chart
installed by the real helm from the images built here, the chart's etcd on a local volume, and Kamailio on
the host as the main registrar.

Nothing here skips: a missing prerequisite is an error that names the make target installing it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.e2e import Kube, install_chart, start_kamailio
from tests.support.helm import Helm
from tests.support.kamailio import KamailioMain
from tests.support.node import Node, running_node


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    with running_node() as n:
        yield n


@pytest.fixture(scope="session")
def kube(node: Node) -> Kube:
    return Kube(node)


@pytest.fixture(scope="session")
def kamailio(tmp_path_factory: pytest.TempPathFactory, node: Node) -> Iterator[KamailioMain]:
    kam = start_kamailio(tmp_path_factory.mktemp("kamailio-main"))
    yield kam
    kam.stop()


@pytest.fixture(scope="session")
def helm(node: Node) -> Helm:
    assert node.cp is not None
    return Helm(node.cp)


@pytest.fixture(scope="session")
def platform(node: Node, kube: Kube, helm: Helm) -> dict[str, float]:
    return {"helm_install_s": install_chart(node, kube, helm)}
