"""A real local deployment: flower-superlink + 2 flower-supernodes on loopback, TLS, SuperNode auth.

Every process is started here in its own session and stopped by its process-group id at the end
(the SuperNodes start SuperExec children). FLWR_HOME is a temporary directory, runtime dependency
installation is disabled (no network). docs/deployment.md describes the same steps by hand.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.state_store import EncryptedStateStore
from server.deploy_keys import generate
from zo_core.state import PersonalState

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_photos(directory: Path, seed: int) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((72, 72)).save(directory / f"{i}.png")


def test_tls_authenticated_deployment(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    keys = generate(tmp_path / "keys", nodes=3)
    port = free_port()
    Path(env["FLWR_HOME"]).mkdir()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{keys / "ca.crt"}"\n'
    )
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(keys / "ca.crt"),
                            "--ssl-certfile", str(keys / "superlink.crt"), "--ssl-keyfile", str(keys / "superlink.key"),
                            "--enable-supernode-auth", "--port", str(port)])  # fmt: skip
        for attempt in range(60):  # until the Control API answers
            r = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(keys / "supernode-0.pub"), "local-tls"],
                               env=env, capture_output=True, timeout=60)  # fmt: skip
            if r.returncode == 0:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
        r = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(keys / "supernode-1.pub"), "local-tls"],
                           env=env, capture_output=True, timeout=60)  # fmt: skip
        assert r.returncode == 0
        # nodes 0 and 1 are registered; node 2 has a valid key pair but was never registered
        for i in range(3):
            write_photos(tmp_path / f"device-{i}" / "photos", seed=i)
            node_config = (f'data-dir="{tmp_path / f"device-{i}" / "photos"}" state-dir="{tmp_path / f"device-{i}" / "state"}" '
                           f'model-dir="{tiny_model_dir}" placeholder="<my-cup>" initializer="cup" seed={i}')  # fmt: skip
            start(f"supernode-{i}", [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                     "--root-certificates", str(keys / "ca.crt"), "--auth-supernode-private-key",
                                     str(keys / f"supernode-{i}"), "--port", str(free_port()),
                                     "--node-config", node_config])  # fmt: skip
        run_dir = tmp_path / "run"
        overrides = (f'run-dir="{run_dir}" num-rounds=1 local-steps=2 probe-steps=0 basis.rank=4 '
                     "min-nodes=2 clients-per-round=2 min-replies=2 wait-nodes-timeout-s=180.0")  # fmt: skip
        r = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "local-tls", "--stream", "-c", overrides],
                           env=env, capture_output=True, timeout=540)  # fmt: skip
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()[-3000:]

        record = json.loads((run_dir / "rounds" / "round-0001.json").read_text())
        assert record["status"] == "ok" and record["update"]["contributors"] == 2
        assert record["available"] == 2  # the unregistered SuperNode never joined
        for i in range(2):
            state_dir = tmp_path / f"device-{i}" / "state"
            saved = EncryptedStateStore(state_dir, state_dir / "device.key").load()
            assert saved is not None and PersonalState.from_tensors(saved[0]).step == 2
        assert not (tmp_path / "device-2" / "state").exists()
        listing = subprocess.run([str(BIN / "flwr"), "supernode", "list", "local-tls", "--format", "json"],
                                 env=env, capture_output=True, timeout=60)  # fmt: skip
        assert listing.returncode == 0 and listing.stdout.decode().count('"online"') == 2
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the group this test created: the process and its children
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:  # children (SuperExec) that outlived their parent are still in the group
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
