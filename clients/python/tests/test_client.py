"""The Python client against the real piivault binary."""

from __future__ import annotations

import sqlite3

import pytest

import piivault
from piivault import Client, PermissionDenied, Unavailable

SAMPLES = {
    "card": ["4111111111111111", "5500 0055 5555 5559"],
    "ssn": ["078-05-1120", "219099999"],
    "email": ["Ada@Example.org", "grace@example.com"],
    "phone": ["+44 20 7946 0958", "+1 555 010 9999"],
    "name": ["Ada Lovelace", "Grace Hopper"],
}


def test_every_sample_collection_round_trips(vault) -> None:
    with vault.client("writer") as writer, vault.client("reader") as reader, vault.client("support") as support:
        for collection, values in SAMPLES.items():
            tokens = writer.tokenize(collection, values)
            assert all(t.ok for t in tokens), tokens
            back = reader.detokenize(collection, [t.token for t in tokens])
            expected = [v.lower() if collection == "email" else v for v in values]
            assert [(r.value, r.masked) for r in back] == [(v, False) for v in expected]
            masked = support.detokenize(collection, [tokens[0].token])[0]
            assert masked.ok and masked.masked and masked.value != values[0]


def test_a_reader_cannot_tokenize(vault) -> None:
    with vault.client("reader") as reader:
        with pytest.raises(PermissionDenied) as denied:
            reader.tokenize("card", ["4111111111111111"])
    assert denied.value.code == "PERMISSION_DENIED"
    assert str(denied.value) == "PERMISSION_DENIED: permission denied for this collection"
    assert "4111111111111111" not in repr(denied.value) + str(denied.value)


def test_items_fail_alone_and_results_never_show_values(vault) -> None:
    with vault.client("writer") as writer, vault.client("reader") as reader:
        token = writer.tokenize("name", ["Alan Turing"])[0].token
        results = reader.detokenize("name", ["name_AAAAAAAAAAAAAAAAAAAAAA", token, "not a token"])
        assert [r.error.code if r.error else r.value for r in results] == ["NOT_FOUND", "Alan Turing", "NOT_FOUND"]
        assert "Alan Turing" not in repr(results)
        invalid = writer.tokenize("card", ["not a card"])[0]
        assert invalid.error is not None and invalid.error.code == "INVALID_VALUE"
        assert "not a card" not in repr(invalid)
        deleted = writer.delete("name", [token, token])
        assert [d.deleted for d in deleted] == [True, False]
        assert deleted[1].error == piivault.ItemError("NOT_FOUND", deleted[1].error.message)
        assert writer.tokenize("name", []) == []


def _requests(vault, action: str) -> list[int]:
    db = sqlite3.connect(f"file:{vault.dir / 'vault.db'}?mode=ro", uri=True)
    rows = db.execute(
        "SELECT count(*) FROM audit_records x JOIN audit a ON a.seq = x.audit_seq"
        " WHERE a.action = ? GROUP BY a.seq ORDER BY a.seq",
        (action,),
    ).fetchall()
    db.close()
    return [n for (n,) in rows]


def test_large_inputs_are_split_and_a_lower_server_limit_is_learned(vault) -> None:
    values = [f"Person {i}" for i in range(2345)]
    with vault.client("writer") as writer, vault.client("reader") as reader:
        tokens = [t.token for t in writer.tokenize("name", values)]
        assert len(tokens) == 2345 and all(tokens)
        assert [r.value for r in reader.detokenize("name", tokens)] == values
    assert _requests(vault, "tokenize") == [1000, 1000, 345]

    vault.stop()
    config = vault.dir / "config.toml"
    config.write_text(config.read_text().replace("max_items_per_call = 1000", "max_items_per_call = 100"))
    vault.start()
    later = [f"Later {i}" for i in range(250)]
    with vault.client("writer") as writer, vault.client("reader") as reader:
        tokens = [t.token for t in writer.tokenize("name", later)]
        assert writer.max_batch == 100
        assert [r.value for r in reader.detokenize("name", tokens)] == later


def test_a_wrong_ca_is_refused(vault, tmp_path) -> None:
    other = tmp_path / "other"
    import subprocess

    from conftest import BIN

    subprocess.run([str(BIN), "init", "--data-dir", str(other)], check=True, capture_output=True,
                   env={"PIIVAULT_PASSPHRASE": "another vault entirely"})
    creds = vault.dir / "clients" / "writer"
    with Client(vault.address, ca=other / "pki" / "ca.pem", cert=creds / "cert.pem", key=creds / "key.pem",
                deadline=10) as client:
        with pytest.raises(Unavailable) as refused:
            client.tokenize("name", ["Ada"])
    assert "CERTIFICATE_VERIFY_FAILED" in refused.value.message or "handshake" in refused.value.message.lower()


def test_from_env(vault, monkeypatch) -> None:
    creds = vault.dir / "clients" / "writer"
    monkeypatch.setenv("PIIVAULT_ADDR", vault.address)
    monkeypatch.setenv("PIIVAULT_CACERT", str(vault.dir / "pki" / "ca.pem"))
    monkeypatch.setenv("PIIVAULT_CLIENT_CERT", str(creds / "cert.pem"))
    monkeypatch.setenv("PIIVAULT_CLIENT_KEY", str(creds / "key.pem"))
    with Client.from_env() as client:
        assert client.tokenize("name", ["From Env"])[0].ok
    monkeypatch.delenv("PIIVAULT_CLIENT_KEY")
    with pytest.raises(ValueError, match="PIIVAULT_CLIENT_KEY not set"):
        Client.from_env()


def test_pem_text_is_contents_and_errors_never_carry_key_material(vault) -> None:
    creds = vault.dir / "clients" / "writer"
    ca, cert, key = ((vault.dir / "pki" / "ca.pem").read_text(), (creds / "cert.pem").read_text(),
                     (creds / "key.pem").read_text())
    # PEM given as strings is used as it is, not opened as a path.
    with Client(vault.address, ca=ca, cert=cert, key=key) as client:
        assert client.tokenize("name", ["Pem Text"])[0].ok
    # A missing file: fixed text and the path.
    missing = str(creds / "no-such-key.pem")
    with pytest.raises(ValueError) as error:
        Client(vault.address, ca=ca, cert=cert, key=missing)
    assert str(error.value) == f"cannot read the client key file {missing}: No such file or directory"
    # Key material without its header is neither PEM nor a path: refused
    # with fixed text, and nothing of it in the exception or its context.
    body = "".join(line for line in key.splitlines(keepends=True) if not line.startswith("-----"))
    with pytest.raises(ValueError) as error:
        Client(vault.address, ca=ca, cert=cert, key=body)
    assert str(error.value) == "the client key is neither PEM text nor a file path"
    shown = repr(error.value) + repr(error.value.__context__) + repr(error.value.__cause__)
    assert not any(line in shown for line in body.splitlines() if len(line) > 8)
