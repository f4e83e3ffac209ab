"""The README's first-hour snippets, run as printed against `piivault dev`
started with its defaults (./piivault-dev, 127.0.0.1:7443) in a fresh
directory. The only change is where the binary is: the README says
./target/release/piivault, the tests use the one they were given."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading

import pytest

from conftest import BIN, REPO

README = (REPO / "README.md").read_text()


def block(language: str, marker: str) -> str:
    """The fenced block of `language` that contains `marker`."""
    for match in re.finditer(rf"```{language}\n(.*?)```", README, re.S):
        if marker in match.group(1):
            return match.group(1)
    raise AssertionError(f"no {language} block with {marker!r} in README.md")


def same_shape(expected: str, actual: str) -> bool:
    """Same length; every letter or digit stands where one stands in the
    example, everything else is the same character."""
    return len(expected) == len(actual) and all(
        (e.isalnum() and a.isalnum()) or e == a for e, a in zip(expected, actual)
    )


@pytest.fixture()
def default_dev_vault(tmp_path: pathlib.Path):
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: run `cargo build` at the repository root, or set PIIVAULT_BIN")
    process = subprocess.Popen([str(BIN), "dev"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = threading.Event()
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith("piivault: listening on "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(60):
            pytest.fail("piivault dev did not start:\n" + "".join(output))
        yield tmp_path
    finally:
        process.terminate()
        process.wait(30)


def test_the_shell_snippet_runs_as_printed(default_dev_vault: pathlib.Path) -> None:
    script = block("sh", "piivault() {").replace("./target/release/piivault", str(BIN))
    run = subprocess.run(["bash", "-c", script], cwd=default_dev_vault, capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    expected = [line[2:] for line in script.splitlines() if line.startswith("# ")]
    assert len(lines) == len(expected), (lines, expected)
    for want, got in zip(expected, lines):
        assert same_shape(want, got), (want, got)
        # Values, masks and errors are not random: they come back exactly.
        if "*" in want or want.startswith("piivault:") or want == "5500 0000 0000 0004":
            assert got == want
    # The kept digits, and one token per value in deterministic collections.
    assert lines[0].endswith("1111") and lines[1].endswith("0005")
    assert lines[4].replace("-", "") == lines[5]
    assert lines[6] == lines[7]


def test_the_python_snippet_runs_as_printed(default_dev_vault: pathlib.Path) -> None:
    snippet = block("python", "from piivault import Client")
    run = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=default_dev_vault,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert run.returncode == 0, run.stderr
    token, value = run.stdout.split()
    assert len(token) == 15 and token.endswith("0005") and token != "378282246310005"
    assert value == "378282246310005"


def test_the_key_management_and_audit_snippets_run_as_printed(default_dev_vault: pathlib.Path) -> None:
    # The first-calls block defines `piivault` and leaves a card token in
    # $card; the operating blocks follow, each command expected to succeed.
    first = block("sh", "piivault() {").replace("./target/release/piivault", str(BIN))
    operating = "\n".join(
        [
            "set -e",
            block("sh", "k() {"),
            block("sh", "k rotate --collection card "),
            block("sh", "piivault audit query --data-dir ./piivault-dev --as auditor --token"),
            "k list --collection card",
        ]
    )
    run = subprocess.run(
        ["bash", "-c", first + "\n" + operating], cwd=default_dev_vault, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # The reader's detokenize of $card is on the trail, and version 1 of the
    # card data key is gone after rotate, reencrypt and retire.
    assert "detokenize" in run.stdout and "reader" in run.stdout, run.stdout
    final_listing = run.stdout.strip().splitlines()[-3:]
    assert any("retired" in line for line in final_listing), final_listing
