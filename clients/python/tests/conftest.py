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

    def start(self) -> None:
        if not BIN.exists():
            pytest.fail(f"{BIN} is missing: run `cargo build` at the repository root, or set PIIVAULT_BIN")
        self.process = subprocess.Popen(
            [str(BIN), "dev", "--data-dir", str(self.dir), "--listen", "127.0.0.1:0", "--metrics-listen", "none"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
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

    def client(self, caller: str, **options: float) -> Client:
        creds = self.dir / "clients" / caller
        return Client(
            self.address,
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
