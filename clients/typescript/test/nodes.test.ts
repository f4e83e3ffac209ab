// The TypeScript client against two live nodes on one PostgreSQL database
// (scripts/test-nodes, on the cluster scripts/test-all starts): calls go
// round robin, a dead node is skipped, reads go on.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { inspect } from "node:util";
import { Client, Unavailable } from "../src/index";
import { BIN, Vault } from "./harness";

const PASSPHRASE = "the nodes' test passphrase, never printed";
const ENV = { ...process.env, PIIVAULT_PASSPHRASE: PASSPHRASE, PIIVAULT_BIN: BIN };
const REPO = join(__dirname, "../../../..");

async function withTwoNodes(body: (a: Vault, b: Vault) => Promise<void>): Promise<void> {
  const tmp = mkdtempSync(join(tmpdir(), "piivault-ts-nodes-"));
  const nodes = [new Vault(join(tmp, "a")), new Vault(join(tmp, "b"))];
  try {
    const made = spawnSync(join(REPO, "scripts/test-nodes"), [tmp], { env: ENV, encoding: "utf8" });
    assert.equal(made.status, 0, `cannot set up two nodes: ${made.stderr}`);
    for (const node of nodes) {
      await node.start(["serve", "--config", join(node.dir, "config.toml")], ENV);
    }
    await body(nodes[0], nodes[1]);
  } finally {
    for (const node of nodes) {
      await node.stop();
    }
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** Tokenize audit records per chain (node), read offline through `node`. */
function tokenizeRecords(node: Vault): Record<string, number> {
  const out = spawnSync(BIN, ["audit", "query", "--data-dir", node.dir, "--action", "tokenize", "--json"], {
    env: ENV,
    encoding: "utf8",
  });
  assert.equal(out.status, 0, out.stderr);
  const counts: Record<string, number> = {};
  for (const line of out.stdout.trim().split("\n")) {
    const chain = JSON.parse(line).chain as string;
    counts[chain] = (counts[chain] ?? 0) + 1;
  }
  return counts;
}

test("calls go round robin over two nodes and a dead node is skipped", () =>
  withTwoNodes(async (a, b) => {
    const both = `${a.address},${b.address}`;
    const values = Array.from({ length: 10 }, (_, i) => `Spread Value ${i}`);
    const client = a.client("app", {}, both);
    const tokens: string[] = [];
    for (const value of values) {
      const [result] = await client.tokenize("name", [value]);
      assert.ok(result.ok);
      tokens.push(result.token);
    }
    // Round robin: five calls through each node.
    assert.deepEqual(tokenizeRecords(a), { "node-a": 5, "node-b": 5 });

    await b.kill();
    client.close();
    const after = a.client("app", { backoffMs: 10 }, [a.address, b.address]);
    assert.match(inspect(after), /nodes: 2/);
    // Reads go on through the node that is left, retried there at once.
    for (let i = 0; i < 3; i++) {
      assert.deepEqual((await after.detokenize("name", tokens)).map((r) => r.value()), values);
    }
    // A tokenize is never retried, but the dead node is skipped once it failed one.
    let failed = 0;
    for (let i = 0; i < 6; i++) {
      try {
        const [result] = await after.tokenize("name", [`After Kill ${i}`]);
        assert.ok(result.ok);
      } catch (e) {
        assert.ok(e instanceof Unavailable, String(e));
        failed += 1;
      }
    }
    assert.ok(failed <= 1, `${failed} writes failed`);
    after.close();
    assert.throws(() => a.client("app", {}, " , "), /no vault address given/);
  }));
