"""The Python client against two live nodes on one PostgreSQL database:
calls go round robin, a dead node is skipped, reads go on."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import pytest
from conftest import BIN, NODES_PASSPHRASE, Vault

from piivault import Client, Unavailable


def tokenize_records(node: Vault) -> Counter[str]:
    """Tokenize audit records per chain (node), read offline through `node`."""
    out = subprocess.run(
        [str(BIN), "audit", "query", "--data-dir", str(node.dir), "--action", "tokenize", "--json"],
        env={**os.environ, "PIIVAULT_PASSPHRASE": NODES_PASSPHRASE},
        capture_output=True,
        text=True,
        check=True,
    )
    return Counter(json.loads(line)["chain"] for line in out.stdout.splitlines())


def test_calls_go_round_robin_and_a_dead_node_is_skipped(two_nodes) -> None:
    a, b = two_nodes
    both = f"{a.address},{b.address}"
    values = [f"Spread Value {i}" for i in range(10)]
    with a.client("app", address=both) as client:
        tokens = [client.tokenize("name", [v])[0].token for v in values]
    assert all(tokens)
    # Round robin: five calls through each node.
    assert tokenize_records(a) == Counter({"node-a": 5, "node-b": 5})

    assert b.process is not None
    b.process.kill()
    b.process.wait(30)
    b.process = None
    with a.client("app", address=both, backoff=0.01) as client:
        # Reads go on through the node that is left, retried there at once.
        for _ in range(3):
            assert [r.value for r in client.detokenize("name", tokens)] == values
        # A tokenize is never retried, but the dead node is skipped once it
        # failed one.
        failed = 0
        for i in range(6):
            try:
                assert client.tokenize("name", [f"After Kill {i}"])[0].ok
            except Unavailable:
                failed += 1
        assert failed <= 1, f"{failed} writes failed"


def test_several_addresses_are_one_string_or_a_list(two_nodes) -> None:
    a, b = two_nodes
    with a.client("app", address=f" {a.address} , {b.address} ") as spaced:
        token = spaced.tokenize("name", ["Listed Value"])[0].token
    creds = a.dir / "clients" / "app"
    with Client([a.address, b.address], ca=a.dir / "pki" / "ca.pem", cert=creds / "cert.pem", key=creds / "key.pem") as listed:
        assert [r.value for r in listed.detokenize("name", [token, token])] == ["Listed Value", "Listed Value"]
        assert repr(listed).startswith("Client(nodes=2,")
    with pytest.raises(ValueError, match="no vault address given"):
        Client(" , ", ca=a.dir / "pki" / "ca.pem", cert=creds / "cert.pem", key=creds / "key.pem")
