// A client for piivault's Tokenizer service on @grpc/grpc-js: mutual TLS,
// inputs split into the server's batch limit (lowered when the server says
// its limit is lower), a deadline on every request, retries with backoff and
// full jitter on UNAVAILABLE for detokenize and delete (never tokenize),
// typed errors, per-item results in input order. No value appears in an
// error, in util.inspect or in JSON.stringify of a result.

import { readFileSync } from "node:fs";
import { inspect } from "node:util";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

/** The server's default `limits.max_items_per_call`. */
export const DEFAULT_MAX_BATCH = 1000;

/** PEM contents, or a path to a PEM file. */
export type PemSource = Buffer | string;

/** A whole call failed. The message comes from the server, which never puts a value in it. */
export class PiiVaultError extends Error {
  constructor(
    /** The gRPC status name (`PERMISSION_DENIED`, ...). */
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = new.target.name;
  }
}
/** Not granted this action on this collection (or no such collection). */
export class PermissionDenied extends PiiVaultError {}
/** The certificate names no caller, or was revoked. */
export class Unauthenticated extends PiiVaultError {}
/** A malformed request. */
export class InvalidArgument extends PiiVaultError {}
/** A limit: the caller's rate or detokenize quota, message size, token space. */
export class ResourceExhausted extends PiiVaultError {}
/** The vault cannot serve now, or cannot be reached (TLS included). */
export class Unavailable extends PiiVaultError {}
/** The call's deadline passed. */
export class DeadlineExceeded extends PiiVaultError {}

const ERRORS: Record<number, new (code: string, message: string) => PiiVaultError> = {
  [grpc.status.PERMISSION_DENIED]: PermissionDenied,
  [grpc.status.UNAUTHENTICATED]: Unauthenticated,
  [grpc.status.INVALID_ARGUMENT]: InvalidArgument,
  [grpc.status.RESOURCE_EXHAUSTED]: ResourceExhausted,
  [grpc.status.UNAVAILABLE]: Unavailable,
  [grpc.status.DEADLINE_EXCEEDED]: DeadlineExceeded,
};

function toError(e: grpc.ServiceError): PiiVaultError {
  const kind = ERRORS[e.code] ?? PiiVaultError;
  return new kind(grpc.status[e.code] ?? "UNKNOWN", e.details ?? "");
}

/** Why one item failed. */
export interface ItemError {
  /** `NOT_FOUND`, `INVALID_VALUE`, `UNREADABLE`, `TOKEN_SPACE_EXHAUSTED`, or
   * `BATCH_FAILED` (its batch failed as a whole after earlier batches of the
   * same call succeeded). */
  code: string;
  message: string;
}

/** One tokenized value. */
export type TokenResult = { ok: true; token: string } | { ok: false; error: ItemError };

/** One detokenized token. Read the value with `value()`; it is in no
 * enumerable property, so logging or serializing the result shows none. */
export class ValueResult {
  readonly #value: string | undefined;
  constructor(
    value: string | undefined,
    readonly masked: boolean,
    readonly error?: ItemError,
  ) {
    this.#value = value;
  }
  get ok(): boolean {
    return this.error === undefined;
  }
  /** The value (its mask when `masked`); undefined when the item failed. */
  value(): string | undefined {
    return this.#value;
  }
  [inspect.custom](): string {
    return this.ok ? `ValueResult { value: <redacted>, masked: ${this.masked} }` : `ValueResult { error: ${this.error?.code} }`;
  }
}

/** One deleted token. */
export type DeleteResult = { ok: true } | { ok: false; error: ItemError };

/** How to reach the vault and how calls behave. */
export interface ClientOptions {
  /** The vault CA certificate. */
  ca: PemSource;
  /** This caller's certificate. */
  cert: PemSource;
  /** This caller's private key. */
  key: PemSource;
  /** Items per request at most (default 1000). */
  maxBatch?: number;
  /** Deadline of each request, milliseconds (default 30000). */
  deadlineMs?: number;
  /** Retries of detokenize and delete on UNAVAILABLE (default 3). */
  retries?: number;
  /** The first retry waits up to this long, doubling, with full jitter (default 100 ms). */
  backoffMs?: number;
}

const ITEM_CODES: Record<string, string> = {
  ITEM_ERROR_CODE_NOT_FOUND: "NOT_FOUND",
  ITEM_ERROR_CODE_INVALID_VALUE: "INVALID_VALUE",
  ITEM_ERROR_CODE_UNREADABLE: "UNREADABLE",
  ITEM_ERROR_CODE_TOKEN_SPACE_EXHAUSTED: "TOKEN_SPACE_EXHAUSTED",
};

interface WireItemError {
  code: string;
  message: string;
}
interface WireResult {
  outcome?: string;
  token?: string;
  value?: string;
  deleted?: boolean;
  error?: WireItemError;
  masked?: boolean;
}
type Unary = (
  request: object,
  metadata: grpc.Metadata,
  options: grpc.CallOptions,
  callback: (error: grpc.ServiceError | null, response?: { results: WireResult[] }) => void,
) => void;

/** The longest string taken for a file path; anything longer is not one. */
const MAX_PATH = 4096;

/** PEM bytes, PEM text (a string holding `-----BEGIN`), or the path of a PEM
 * file. An error names the path and nothing else: a key passed as a string
 * never lands in an exception. */
function pem(source: PemSource, what: string): Buffer {
  if (Buffer.isBuffer(source)) {
    return source;
  }
  if (source.includes("-----BEGIN")) {
    return Buffer.from(source);
  }
  if (source.includes("\n") || source.length > MAX_PATH) {
    throw new Error(`the ${what} is neither PEM text nor a file path`);
  }
  try {
    return readFileSync(source);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "unreadable";
    throw new Error(`cannot read the ${what} file ${source}: ${code}`);
  }
}

function itemError(error: WireItemError | undefined): ItemError {
  return { code: ITEM_CODES[error?.code ?? ""] ?? "UNSPECIFIED", message: error?.message ?? "" };
}

let tokenizerService: grpc.ServiceClientConstructor | undefined;
function service(): grpc.ServiceClientConstructor {
  if (tokenizerService === undefined) {
    const definition = protoLoader.loadSync("piivault/v1/tokenizer.proto", {
      includeDirs: [join(__dirname, "../proto")],
      keepCase: true,
      enums: String,
      oneofs: true,
      defaults: false,
    });
    const loaded = grpc.loadPackageDefinition(definition) as unknown as {
      piivault: { v1: { Tokenizer: grpc.ServiceClientConstructor } };
    };
    tokenizerService = loaded.piivault.v1.Tokenizer;
  }
  return tokenizerService;
}

/** How long a node that answered UNAVAILABLE (or could not be reached) is
 * skipped while other nodes are up, milliseconds. */
export const NODE_DOWN_FOR_MS = 5_000;

type Stub = grpc.Client & Record<string, Unary>;

/** One vault node: its stub, and until when it is skipped. */
class Node {
  downUntil = 0;
  constructor(readonly stub: Stub) {}
  isUp(now: number): boolean {
    return this.downUntil <= now;
  }
}

/** Addresses from a comma-separated string or an array of them. */
function addresses(address: string | readonly string[]): string[] {
  const parts = typeof address === "string" ? address.split(",") : [...address];
  const found = parts.map((a) => a.trim()).filter((a) => a.length > 0);
  if (found.length === 0) {
    throw new Error("no vault address given");
  }
  return found;
}

/** A connection to a vault: one node, or several nodes on one database
 * (calls go round robin; a node that answered UNAVAILABLE or could not be
 * reached is skipped for `NODE_DOWN_FOR_MS`). Call `close()` when done. */
export class Client {
  readonly #nodes: Node[];
  #next = 0;
  /** Items per request at most now. */
  maxBatch: number;
  readonly deadlineMs: number;
  readonly retries: number;
  readonly backoffMs: number;

  constructor(address: string | readonly string[], options: ClientOptions) {
    const credentials = grpc.credentials.createSsl(
      pem(options.ca, "CA certificate"),
      pem(options.key, "client key"),
      pem(options.cert, "client certificate"),
    );
    const Tokenizer = service();
    this.#nodes = addresses(address).map(
      (a) =>
        new Node(
          new Tokenizer(a, credentials, {
            "grpc.max_receive_message_length": 64 << 20,
            "grpc.max_send_message_length": 64 << 20,
          }) as Stub,
        ),
    );
    this.maxBatch = Math.max(1, options.maxBatch ?? DEFAULT_MAX_BATCH);
    this.deadlineMs = options.deadlineMs ?? 30_000;
    this.retries = options.retries ?? 3;
    this.backoffMs = options.backoffMs ?? 100;
  }

  /** From PIIVAULT_ADDR, PIIVAULT_CACERT, PIIVAULT_CLIENT_CERT and
   * PIIVAULT_CLIENT_KEY (file paths), as the command line reads them. */
  static fromEnv(options: Partial<ClientOptions> = {}, env: NodeJS.ProcessEnv = process.env): Client {
    const names = ["PIIVAULT_ADDR", "PIIVAULT_CACERT", "PIIVAULT_CLIENT_CERT", "PIIVAULT_CLIENT_KEY"];
    const missing = names.filter((n) => !env[n]);
    if (missing.length > 0) {
      throw new Error(`${missing.join(", ")} not set`);
    }
    const [address, ca, cert, key] = names.map((n) => env[n] as string);
    return new Client(address, { ca, cert, key, ...options });
  }

  close(): void {
    for (const node of this.#nodes) {
      node.stub.close();
    }
  }

  [inspect.custom](): string {
    return `Client { nodes: ${this.#nodes.length}, maxBatch: ${this.maxBatch}, deadlineMs: ${this.deadlineMs} }`;
  }

  /** The node for the next call: the next in turn that is not being skipped
   * (the next in turn if every node is). */
  #pick(): Node {
    const start = this.#next;
    this.#next = (start + 1) % this.#nodes.length;
    const now = Date.now();
    const turn = this.#nodes.map((_, i) => this.#nodes[(start + i) % this.#nodes.length]);
    return turn.find((node) => node.isUp(now)) ?? turn[0];
  }

  /** A token per value, in order. Never retried: a lost answer could store a value twice. */
  tokenize(collection: string, values: readonly string[]): Promise<TokenResult[]> {
    return this.#batched(values, false, "Tokenize", (batch) => ({ collection, values: batch }), (r) =>
      r.outcome === "token" ? { ok: true, token: r.token as string } : { ok: false, error: itemError(r.error) },
    (error) => ({ ok: false, error }));
  }

  /** The value (or its mask) per token, in order. */
  detokenize(collection: string, tokens: readonly string[]): Promise<ValueResult[]> {
    return this.#batched(tokens, true, "Detokenize", (batch) => ({ collection, tokens: batch }), (r) =>
      r.outcome === "value" ? new ValueResult(r.value, r.masked ?? false) : new ValueResult(undefined, false, itemError(r.error)),
    (error) => new ValueResult(undefined, false, error));
  }

  /** Deletes each token's value, in order (a second delete is NOT_FOUND). */
  delete(collection: string, tokens: readonly string[]): Promise<DeleteResult[]> {
    return this.#batched(tokens, true, "Delete", (batch) => ({ collection, tokens: batch }), (r) =>
      r.outcome === "deleted" && r.deleted ? { ok: true } : { ok: false, error: itemError(r.error) },
    (error) => ({ ok: false, error }));
  }

  async #batched<R>(
    items: readonly string[],
    idempotent: boolean,
    method: string,
    request: (batch: string[]) => object,
    result: (r: WireResult) => R,
    failed: (error: ItemError) => R,
  ): Promise<R[]> {
    const out: R[] = [];
    while (out.length < items.length) {
      const size = Math.min(this.maxBatch, items.length - out.length);
      const batch = items.slice(out.length, out.length + size);
      let results: WireResult[];
      try {
        results = await this.#withRetries(idempotent, method, request(batch));
      } catch (e) {
        const error = e as PiiVaultError;
        const limit = error instanceof ResourceExhausted ? /the limit is (\d+)/.exec(error.message) : null;
        if (limit !== null && Number(limit[1]) > 0 && Number(limit[1]) < size) {
          this.maxBatch = Number(limit[1]);
          continue;
        }
        if (out.length === 0) {
          throw error;
        }
        const item = { code: "BATCH_FAILED", message: error.message };
        while (out.length < items.length) {
          out.push(failed(item));
        }
        break;
      }
      if (results.length !== size) {
        throw new PiiVaultError("UNKNOWN", `the server answered ${results.length} results for ${size} items`);
      }
      out.push(...results.map(result));
    }
    return out;
  }

  async #withRetries(idempotent: boolean, method: string, request: object): Promise<WireResult[]> {
    for (let attempt = 0; ; attempt++) {
      const node = this.#pick();
      try {
        return await this.#call(node.stub, method, request);
      } catch (e) {
        if (e instanceof Unavailable) {
          node.downUntil = Date.now() + NODE_DOWN_FOR_MS;
        }
        if (!(idempotent && e instanceof Unavailable && attempt < this.retries)) {
          throw e;
        }
        // Another node that is up is tried at once; when none is, the retry waits.
        if (!this.#nodes.some((n) => n.isUp(Date.now()))) {
          const ceiling = this.backoffMs * 2 ** attempt;
          await new Promise((resolve) => setTimeout(resolve, Math.random() * ceiling));
        }
      }
    }
  }

  #call(stub: Stub, method: string, request: object): Promise<WireResult[]> {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + this.deadlineMs);
      stub[method].call(stub, request, new grpc.Metadata(), { deadline }, (error, response) => {
        if (error) {
          reject(toError(error));
        } else {
          resolve(response?.results ?? []);
        }
      });
    });
  }
}
