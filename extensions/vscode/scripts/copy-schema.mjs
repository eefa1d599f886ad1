// Build step: ships the config schema (docs/mirrord.schema.json, the output of `mirrord schema`,
// kept equal to it by tests/config) inside the extension, for `jsonValidation`/`yamlValidation`.
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, '..', '..', '..', 'docs', 'mirrord.schema.json');
const target = join(here, '..', 'schemas', 'mirrord.schema.json');
mkdirSync(dirname(target), { recursive: true });
copyFileSync(source, target);
