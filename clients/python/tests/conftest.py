"""A real `piivault dev` on a free loopback port, per test, with a fresh
data directory. The binary is $PIIVAULT_BIN, or the repository's
target/debug/piivault (built by `cargo build`)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pytest

from piivault import Client

REPO = pathlib.Path(__file__).resolve().parents[3]
BIN = pathlib.Path(os.environ.get("PIIVAULT_BIN", REPO / "target" / "debug" / "piivault"))


@dataclass
class Vault:
    dir: pathlib.Path
    address: str = ""
    process: Optional[subprocess.Popen[str]] = None
    output: list[str] = field(default_factory=list)

    def start(self, args: Optional[list[str]] = None, env: Optional[dict[str, str]] = None) -> None:
        """`piivault dev` in `dir`, or `piivault ARGS`."""
        if not BIN.exists():
            pytest.fail(f"{BIN} is missing: run `cargo build` at the repository root, or set PIIVAULT_BIN")
        dev = ["dev", "--data-dir", str(self.dir), "--listen", "127.0.0.1:0", "--metrics-listen", "none"]
        self.process = subprocess.Popen(
            [str(BIN), *(args or dev)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        ready = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                if line.startswith("piivault: listening on "):
                    self.address = line.split()[-1]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60):
            self.stop()
            pytest.fail("piivault dev did not start:\n" + "".join(self.output))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def client(self, caller: str, address: Optional[str] = None, **options: float) -> Client:
        creds = self.dir / "clients" / caller
        return Client(
            address or self.address,
            ca=self.dir / "pki" / "ca.pem",
            cert=creds / "cert.pem",
            key=creds / "key.pem",
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture
def vault() -> Iterator[Vault]:
    with tempfile.TemporaryDirectory() as tmp:
        v = Vault(pathlib.Path(tmp) / "vault")
        v.start()
        try:
            yield v
        finally:
            v.stop()


#: What the nodes of `two_nodes` are unsealed with.
NODES_PASSPHRASE = "the nodes' test passphrase, never printed"


@pytest.fixture
def two_nodes() -> Iterator[tuple[Vault, Vault]]:
    """Two `piivault serve` nodes on one fresh database of the test
    PostgreSQL cluster (scripts/test-nodes; scripts/test-all starts the
    cluster), caller `app` granted everything."""
    env = {**os.environ, "PIIVAULT_PASSPHRASE": NODES_PASSPHRASE, "PIIVAULT_BIN": str(BIN)}
    with tempfile.TemporaryDirectory() as tmp:
        made = subprocess.run(
            [str(REPO / "scripts" / "test-nodes"), tmp], env=env, capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            pytest.fail("cannot set up two nodes: " + made.stderr)
        nodes = (Vault(pathlib.Path(tmp) / "a"), Vault(pathlib.Path(tmp) / "b"))
        try:
            for node in nodes:
                node.start(["serve", "--config", str(node.dir / "config.toml")], env)
            yield nodes
        finally:
            for node in nodes:
                node.stop()
