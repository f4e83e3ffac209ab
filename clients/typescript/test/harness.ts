// The real piivault binary, started as a process for the tests: $PIIVAULT_BIN,
// or the repository's target/debug/piivault.

import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { Client, type ClientOptions } from "../src/index";

export const BIN = process.env.PIIVAULT_BIN ?? join(__dirname, "../../../../target/debug/piivault");

/** A `piivault` process serving in `dir`: `piivault dev` there, or the
 * arguments given. */
export class Vault {
  address = "";
  output = "";
  #process: ChildProcess | undefined;
  constructor(readonly dir: string) {}

  async start(args?: string[], env?: NodeJS.ProcessEnv): Promise<void> {
    assert.ok(existsSync(BIN), `${BIN} is missing: run \`cargo build\` at the repository root, or set PIIVAULT_BIN`);
    this.output = "";
    const dev = ["dev", "--data-dir", this.dir, "--listen", "127.0.0.1:0", "--metrics-listen", "none"];
    const child = spawn(BIN, args ?? dev, { env: env ?? process.env });
    this.#process = child;
    this.address = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`piivault dev did not start:\n${this.output}`)), 60_000);
      const read = (chunk: Buffer) => {
        this.output += chunk.toString();
        const found = /piivault: listening on (\S+)/.exec(this.output);
        if (found) {
          clearTimeout(timer);
          resolve(found[1]);
        }
      };
      child.stdout?.on("data", read);
      child.stderr?.on("data", read);
    });
  }

  /** Stops the process (SIGTERM), and waits until it has. */
  stop(): Promise<void> {
    return this.#end("SIGTERM");
  }

  /** Kills the process at once (SIGKILL). */
  kill(): Promise<void> {
    return this.#end("SIGKILL");
  }

  async #end(signal: NodeJS.Signals): Promise<void> {
    const child = this.#process;
    // A process killed by a signal has a signalCode and no exitCode.
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return;
    await new Promise((resolve) => {
      child.once("exit", resolve);
      child.kill(signal);
    });
  }

  client(caller: string, options: Partial<ClientOptions> = {}, address?: string | string[]): Client {
    const creds = join(this.dir, "clients", caller);
    return new Client(address ?? this.address, {
      ca: join(this.dir, "pki/ca.pem"),
      cert: join(creds, "cert.pem"),
      key: join(creds, "key.pem"),
      ...options,
    });
  }
}

