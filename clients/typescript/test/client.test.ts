// The TypeScript client against the real piivault binary: a fresh
// `piivault dev` data directory on a free loopback port per test. The binary
// is $PIIVAULT_BIN, or the repository's target/debug/piivault.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { inspect } from "node:util";
import { Client, PermissionDenied, Unavailable } from "../src/index";
import { BIN, Vault } from "./harness";

async function withVault(body: (vault: Vault) => Promise<void>): Promise<void> {
  const tmp = mkdtempSync(join(tmpdir(), "piivault-ts-"));
  const vault = new Vault(join(tmp, "vault"));
  await vault.start();
  try {
    await body(vault);
  } finally {
    await vault.stop();
    rmSync(tmp, { recursive: true, force: true });
  }
}

function tokensOf(results: Awaited<ReturnType<Client["tokenize"]>>): string[] {
  return results.map((r) => {
    assert.ok(r.ok, JSON.stringify(r));
    return r.token;
  });
}

test("every sample collection round-trips", () =>
  withVault(async (vault) => {
    const [writer, reader, support] = ["writer", "reader", "support"].map((c) => vault.client(c));
    const samples: Record<string, string[]> = {
      card: ["4111111111111111", "5500 0055 5555 5559"],
      ssn: ["078-05-1120", "219099999"],
      email: ["Ada@Example.org", "grace@example.com"],
      phone: ["+44 20 7946 0958", "+1 555 010 9999"],
      name: ["Ada Lovelace", "Grace Hopper"],
    };
    for (const [collection, values] of Object.entries(samples)) {
      const tokens = tokensOf(await writer.tokenize(collection, values));
      const back = await reader.detokenize(collection, tokens);
      const expected = values.map((v) => (collection === "email" ? v.toLowerCase() : v));
      assert.deepEqual(back.map((r) => [r.value(), r.masked]), expected.map((v) => [v, false]));
      const [masked] = await support.detokenize(collection, tokens.slice(0, 1));
      assert.ok(masked.ok && masked.masked);
      assert.notEqual(masked.value(), values[0]);
    }
    [writer, reader, support].forEach((c) => c.close());
  }));

test("a reader cannot tokenize; items fail alone; nothing shows a value", () =>
  withVault(async (vault) => {
    const reader = vault.client("reader");
    const writer = vault.client("writer");
    const denied = await reader.tokenize("card", ["4111111111111111"]).then(
      () => assert.fail("tokenize was allowed"),
      (e: unknown) => e,
    );
    assert.ok(denied instanceof PermissionDenied);
    assert.equal(denied.code, "PERMISSION_DENIED");
    assert.equal(denied.message, "PERMISSION_DENIED: permission denied for this collection");
    assert.ok(!inspect(denied).includes("4111111111111111"));

    const [token] = tokensOf(await writer.tokenize("name", ["Alan Turing"]));
    const results = await reader.detokenize("name", ["name_AAAAAAAAAAAAAAAAAAAAAA", token, "not a token"]);
    assert.deepEqual(results.map((r) => (r.ok ? r.value() : r.error?.code)), ["NOT_FOUND", "Alan Turing", "NOT_FOUND"]);
    assert.ok(!inspect(results).includes("Alan Turing"));
    assert.ok(!JSON.stringify(results).includes("Alan Turing"));
    const [invalid] = await writer.tokenize("card", ["not a card"]);
    assert.ok(!invalid.ok && invalid.error.code === "INVALID_VALUE");
    assert.ok(!JSON.stringify(invalid).includes("not a card"));
    const deleted = await writer.delete("name", [token, token]);
    assert.deepEqual(deleted.map((d) => (d.ok ? "deleted" : d.error.code)), ["deleted", "NOT_FOUND"]);
    assert.deepEqual(await writer.tokenize("name", []), []);
    reader.close();
    writer.close();
  }));

function requestsOf(vault: Vault, action: string): number[] {
  const db = join(vault.dir, "vault.db");
  const sql =
    "SELECT count(*) FROM audit_records x JOIN audit a ON a.seq = x.audit_seq WHERE a.action = '" +
    action +
    "' GROUP BY a.seq ORDER BY a.seq";
  const out = spawnSync("python3", ["-c", "import sqlite3,sys; print(*[r[0] for r in sqlite3.connect(sys.argv[1]).execute(sys.argv[2])])", db, sql]);
  assert.equal(out.status, 0, out.stderr.toString());
  return out.stdout.toString().trim().split(/\s+/).map(Number);
}

test("large inputs are split, and a lower server limit is learned", () =>
  withVault(async (vault) => {
    const values = Array.from({ length: 2345 }, (_, i) => `Person ${i}`);
    let writer = vault.client("writer");
    let reader = vault.client("reader");
    const tokens = tokensOf(await writer.tokenize("name", values));
    assert.deepEqual((await reader.detokenize("name", tokens)).map((r) => r.value()), values);
    assert.deepEqual(requestsOf(vault, "tokenize"), [1000, 1000, 345]);
    writer.close();
    reader.close();

    await vault.stop();
    const config = join(vault.dir, "config.toml");
    writeFileSync(config, readFileSync(config, "utf8").replace("max_items_per_call = 1000", "max_items_per_call = 100"));
    await vault.start();
    writer = vault.client("writer");
    reader = vault.client("reader");
    const later = Array.from({ length: 250 }, (_, i) => `Later ${i}`);
    const laterTokens = tokensOf(await writer.tokenize("name", later));
    assert.equal(writer.maxBatch, 100);
    assert.deepEqual((await reader.detokenize("name", laterTokens)).map((r) => r.value()), later);
    writer.close();
    reader.close();
  }));

test("a wrong CA is refused; the environment configures", () =>
  withVault(async (vault) => {
    const other = mkdtempSync(join(tmpdir(), "piivault-other-"));
    const init = spawnSync(BIN, ["init", "--data-dir", join(other, "v")], {
      env: { PIIVAULT_PASSPHRASE: "another vault entirely" },
    });
    assert.equal(init.status, 0, init.stderr.toString());
    const creds = join(vault.dir, "clients/writer");
    const wrong = new Client(vault.address, {
      ca: join(other, "v/pki/ca.pem"),
      cert: join(creds, "cert.pem"),
      key: join(creds, "key.pem"),
      deadlineMs: 10_000,
    });
    const refused = await wrong.tokenize("name", ["Ada"]).then(
      () => assert.fail("connected with the wrong CA"),
      (e: unknown) => e,
    );
    assert.ok(refused instanceof Unavailable, String(refused));
    wrong.close();
    rmSync(other, { recursive: true, force: true });

    const env = {
      PIIVAULT_ADDR: vault.address,
      PIIVAULT_CACERT: join(vault.dir, "pki/ca.pem"),
      PIIVAULT_CLIENT_CERT: join(creds, "cert.pem"),
      PIIVAULT_CLIENT_KEY: join(creds, "key.pem"),
    };
    const fromEnv = Client.fromEnv({}, env);
    assert.ok((await fromEnv.tokenize("name", ["From Env"]))[0].ok);
    fromEnv.close();
    assert.throws(() => Client.fromEnv({}, { ...env, PIIVAULT_CLIENT_KEY: "" }), /PIIVAULT_CLIENT_KEY not set/);
  }));

test("PEM text is contents, and errors never carry key material", () =>
  withVault(async (vault) => {
    const creds = join(vault.dir, "clients/writer");
    const ca = readFileSync(join(vault.dir, "pki/ca.pem"), "utf8");
    const cert = readFileSync(join(creds, "cert.pem"), "utf8");
    const key = readFileSync(join(creds, "key.pem"), "utf8");
    const fromText = new Client(vault.address, { ca, cert, key });
    assert.ok((await fromText.tokenize("name", ["Pem Text"]))[0].ok);
    fromText.close();
    const missing = join(creds, "no-such-key.pem");
    assert.throws(
      () => new Client(vault.address, { ca, cert, key: missing }),
      (e: Error) => e.message === `cannot read the client key file ${missing}: ENOENT`,
    );
    const body = key
      .split("\n")
      .filter((line) => !line.startsWith("-----"))
      .join("\n");
    assert.throws(
      () => new Client(vault.address, { ca, cert, key: body }),
      (e: Error) =>
        e.message === "the client key is neither PEM text nor a file path" &&
        !body.split("\n").some((line) => line.length > 8 && (e.stack ?? "").includes(line)),
    );
  }));
