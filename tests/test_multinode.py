"""A real two-node Ray cluster on this machine (token auth on), and a sweep submitted to it.

The cluster is two ``ray start --block`` processes (head with resource ``node_a``, a second node
with ``node_b``), each in its own process group with its own ports and a private temp dir, so the
session-wide Ray of the other tests is never touched: teardown kills exactly these process groups
(and any process whose command line names this cluster's temp dir), never ``ray stop``, which
would stop every Ray on the machine. The sweep runs as a subprocess (``scripts/run_sweep.py``,
the script ``ray submit`` runs on a real cluster) with results on a path both nodes share.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, TINY_QWEN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    out = []
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
        out += [flag, str(_free_port())]
    return out


class LocalCluster:
    def __init__(self):
        # short: Ray's unix socket paths live under the temp dir and must stay under 108 bytes
        self.tmp = tempfile.mkdtemp(prefix="swmn", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, args: list[str], log: str) -> None:
        fh = open(Path(self.tmp) / log, "w")
        self.procs.append(subprocess.Popen(["ray", "start", "--block", "--num-gpus=0", f"--temp-dir={self.tmp}",
                                            *args, *_node_ports()], env=self.env, stdout=fh,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_for(self, needle: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited {p.returncode}: {self.logs()}")
            r = subprocess.run(["ray", "status", f"--address={self.address}"], env=self.env,
                               capture_output=True, text=True, timeout=60)
            out = r.stdout
            if r.returncode == 0 and needle in out:
                return
            time.sleep(1)
        raise RuntimeError(f"cluster not ready ({needle!r} missing): {out[-1000:]} {self.logs()}")

    def start(self) -> None:
        self._start(["--head", f"--port={self.port}", "--num-cpus=1", '--resources={"node_a": 1}',
                     "--include-dashboard=false", "--ray-client-server-port", str(_free_port())], "head.log")
        self._wait_for("node_a")
        self._start([f"--address={self.address}", "--num-cpus=1", '--resources={"node_b": 1}'], "worker.log")
        self._wait_for("node_b")

    def logs(self) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-800:]}" for p in Path(self.tmp).glob("*.log"))

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        # anything of this cluster that left its process group (named by our private temp dir)
        for pid_dir in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, ValueError):
                if pid_dir.name != str(os.getpid()) and self.tmp.encode() in (pid_dir / "cmdline").read_bytes():
                    os.kill(int(pid_dir.name), signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def cluster():
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.mark.slow  # ~80 s on 2 cores (two fresh Ray nodes); CI runs it in its slow pass
def test_sweep_on_two_node_cluster(cluster, tmp_path):
    shared = tmp_path / "shared-results"  # the storage both nodes see (a local path: one machine)
    data = json.loads(json.dumps(TINY_QWEN))
    data["name"] = "t-multinode"
    data["training"]["max_epochs"] = 2
    data["scheduler"] = {"type": "none"}
    data["output"] = {"root": str(shared)}
    man = tmp_path / "multinode.yaml"
    man.write_text(yaml.safe_dump(data, sort_keys=False))

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_sweep.py"), "--manifest", str(man),
                        "--address", cluster.address, "-q"], env=cluster.env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "without token authentication" not in r.stderr  # the driver joined with the token
    sweep_dir = Path(r.stdout.strip().splitlines()[-1].split("results:", 1)[1].strip())
    assert sweep_dir.parent == shared.resolve()

    rows = pq.read_table(sweep_dir / "sweep" / "trials.parquet").to_pylist()
    assert len(rows) == data["search"]["num_samples"]
    assert all(r["status"] == "completed" for r in rows), [(r["status"], r["stop_reason"]) for r in rows]
    nodes = {r["node_id"] for r in rows}
    assert None not in nodes and len(nodes) == 2, nodes  # one trial on each node

    # the node ids are the cluster's two nodes: node_a (head) and node_b
    probe = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(json.dumps({n['NodeID']: sorted(k for k in n['Resources'] if k.startswith('node_')) "
             "for n in ray.nodes() if n['Alive']}))" % cluster.address)
    pr = subprocess.run([sys.executable, "-c", probe], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert pr.returncode == 0, pr.stderr[-2000:]
    by_node = json.loads(pr.stdout.strip().splitlines()[-1])
    assert sorted(tuple(by_node[n]) for n in nodes) == [("node_a",), ("node_b",)]

    for f in ("manifest.resolved.yaml", "manifest.original.yaml", "overrides.yaml", "run_metadata.json",
              "state.json", "sweep/metrics.parquet"):
        assert (sweep_dir / f).is_file(), f
    assert json.loads((sweep_dir / "state.json").read_text())["status"] == "complete"
    assert (sweep_dir / "checkpoints" / "best").resolve().is_dir()
