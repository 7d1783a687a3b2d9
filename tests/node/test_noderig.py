"""The node rig's own safety: a clear error for a missing prerequisite, and a node whose test process dies
is torn down by its guardian (host settings restored), without a node or a cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, node


def test_a_missing_prerequisite_names_its_package_and_make_target(monkeypatch: pytest.MonkeyPatch) -> None:
    real = node.shutil.which
    monkeypatch.setattr(node.shutil, "which", lambda name: None if name == "containerd" else real(name))
    with pytest.raises(node.NodeRigError) as err:
        node.check_prerequisites()
    assert "containerd (Debian package containerd)" in str(err.value)
    assert "make node-tools" in str(err.value)


CHILD = """
import sys, time
from pathlib import Path
from tests.support import node
n = node.Node(bindir=Path("/nonexistent"), images=Path("/nonexistent"))
n.claim()
node.run("ip", "netns", "add", n.netns)
# What a kubelet does to the host, and a cgroup of the rig's own.
node._write_sysctl("vm/overcommit_memory", sys.argv[1])
(node.CGROUP_FS / "pids" / n.state.cgroup_root).mkdir()
print(n.state.path, n.netns, n.state.cgroup_root, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, sysctls)")
def test_the_guardian_tears_down_a_node_whose_test_process_was_killed() -> None:
    before = node._read_sysctl("vm/overcommit_memory")
    changed = "0" if before == "1" else "1"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, changed],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        state_path, netns, cgroup = child.stdout.readline().split()
        assert Path(f"/run/netns/{netns}").exists()
        assert (node.CGROUP_FS / "pids" / cgroup).is_dir()
        assert node._read_sysctl("vm/overcommit_memory") == changed
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 15
        while Path(state_path).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(state_path).exists(), "the guardian did not tear the node down"
        assert not Path(f"/run/netns/{netns}").exists()
        assert not (node.CGROUP_FS / "pids" / cgroup).exists()
        assert node._read_sysctl("vm/overcommit_memory") == before
    finally:
        if child.poll() is None:
            child.kill()
        node.cleanup_stale()
        node._write_sysctl("vm/overcommit_memory", before)
