/**
 * The channel between the test suite (inside VS Code's extension host) and the driver (the
 * node process that runs chromium): files in $MIRRORD_IDE_TEST_DIR. The suite writes
 * `requests/N.json`, the driver answers `responses/N.json`. Requests: a screenshot, a
 * JavaScript expression evaluated in the workbench page, keys typed into it.
 */

import * as fs from 'node:fs';
import * as path from 'node:path';

export type DriverRequest =
  | { kind: 'screenshot'; name: string }
  | { kind: 'evaluate'; expression: string }
  | { kind: 'type'; text: string }
  | { kind: 'press'; key: string }
  /** Hovers `hover` (inline actions show on hover), then clicks `selector`. */
  | { kind: 'click'; selector: string; hover?: string };

export interface DriverResponse {
  ok: boolean;
  value?: unknown;
  error?: string;
}

/** Files of one test run: scenario.json (from the pytest), requests/, responses/, result.json. */
export function testDir(): string {
  const dir = process.env.MIRRORD_IDE_TEST_DIR;
  if (dir === undefined || dir === '') {
    throw new Error('MIRRORD_IDE_TEST_DIR is not set: run the suite through tests/ide');
  }
  return dir;
}

/** Writes `file` whole or not at all (the other side polls for it). */
export function writeAtomic(file: string, value: unknown): void {
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(value, null, 2));
  fs.renameSync(tmp, file);
}

let counter = 0;

export async function ask(request: DriverRequest, timeoutMs = 60_000): Promise<unknown> {
  const dir = testDir();
  const n = String(++counter).padStart(4, '0');
  fs.mkdirSync(path.join(dir, 'requests'), { recursive: true });
  writeAtomic(path.join(dir, 'requests', `${n}.json`), request);
  const answer = path.join(dir, 'responses', `${n}.json`);
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (fs.existsSync(answer)) {
      const response = JSON.parse(fs.readFileSync(answer, 'utf8')) as DriverResponse;
      if (!response.ok) {
        throw new Error(`driver: ${request.kind} failed: ${response.error ?? '?'}`);
      }
      return response.value;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`driver did not answer ${request.kind} within ${String(timeoutMs / 1000)} s`);
}

export async function screenshot(name: string): Promise<void> {
  await ask({ kind: 'screenshot', name });
}

/** Evaluates `expression` in the workbench page until it returns something truthy. */
export async function waitInPage<T>(expression: string, what: string, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    last = await ask({ kind: 'evaluate', expression });
    if (last !== null && last !== undefined && last !== false && !(Array.isArray(last) && last.length === 0)) {
      return last as T;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
  throw new Error(`timed out after ${String(timeoutMs / 1000)} s waiting for ${what} (last: ${JSON.stringify(last)})`);
}
