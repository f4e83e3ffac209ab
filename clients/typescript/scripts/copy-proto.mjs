// Copies the API definition from the repository's proto/ next to the
// compiled client, which loads it at run time.
import { cpSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
cpSync(join(here, "../../../proto/piivault/v1/tokenizer.proto"), join(here, "../dist/proto/piivault/v1/tokenizer.proto"));
