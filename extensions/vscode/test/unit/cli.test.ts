// cli.ts against the real mirrord CLI (`mirrord` on PATH, or $MIRRORD_BIN): --version,
// verify-config --ide, schema, daemon status, ls errors. The process handling of `mirrord ext`
// that the real CLI never exercises (a line outside the protocol, no readiness, cancel) runs
// against small scripted peers.

import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, test } from 'node:test';

import { CancelledError, CliCommandError, CliNotFoundError, MirrordCli } from '../../src/cli';
import { starterConfig } from '../../src/configFile';
import { ProtocolError } from '../../src/protocol';

const BIN = process.env.MIRRORD_BIN ?? 'mirrord';
let scratch: string;
let runtime: string;

before(() => {
  scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'mirrord-vscode-cli-'));
  runtime = fs.mkdtempSync(path.join(os.tmpdir(), 'mvc'));
});

after(() => {
  fs.rmSync(scratch, { recursive: true, force: true });
  fs.rmSync(runtime, { recursive: true, force: true });
});

/** The CLI with a runtime directory of its own (never meets anyone's daemon). */
function cli(binary = BIN): MirrordCli {
  return new MirrordCli({
    binary,
    cwd: scratch,
    env: { ...process.env, MIRRORD_RUNTIME_DIR: runtime },
  });
}

function file(name: string, text: string, mode = 0o644): string {
  const p = path.join(scratch, name);
  fs.writeFileSync(p, text, { mode });
  return p;
}

test('mirrord --version is "mirrord X.Y.Z"', async () => {
  assert.match(await cli().version(), /^\d+\.\d+\.\d+/);
});

test('the starter config passes verify-config --ide and asks for a target', async () => {
  const result = await cli().verifyConfig(file('starter.json', starterConfig()));
  assert.deepEqual(result, { ok: true, target: { kind: 'ask' }, namespace: null, warnings: [] });
});

test('verify-config --ide: targets of the config, and a Fail naming the key', async () => {
  const pod = await cli().verifyConfig(
    file('pod.json', '{"target": {"path": "pod/api", "namespace": "shop"}}'),
  );
  assert.deepEqual(pod.ok && [pod.target, pod.namespace], [{ kind: 'path', path: 'pod/api' }, 'shop']);
  const targetless = await cli().verifyConfig(file('tl.yaml', 'target: targetless\n'));
  assert.deepEqual(targetless.ok && targetless.target, { kind: 'targetless' });
  const bad = await cli().verifyConfig(file('bad.json', '{"feature": {"fs": "sideways"}}'));
  assert.ok(!bad.ok);
  assert.match(bad.errors.join('\n'), /feature\.fs/);
});

test('the schema shipped in the extension is what mirrord schema prints', async () => {
  const shipped = JSON.parse(
    fs.readFileSync(path.join(__dirname, '..', '..', '..', 'schemas', 'mirrord.schema.json'), 'utf8'),
  ) as unknown;
  assert.deepEqual(await cli().schema(), shipped);
});

test('daemon status when no daemon runs in the runtime directory', async () => {
  const status = await cli().daemonStatus();
  assert.equal(status.running, false);
  assert.equal(fs.realpathSync(status.runtimeDir), fs.realpathSync(runtime));
});

test('ls against an API server that is not there fails with the CLI message', async () => {
  const kubeconfig = file(
    'kubeconfig',
    [
      'apiVersion: v1',
      'kind: Config',
      'clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]',
      'users: [{name: u, user: {token: t}}]',
      'contexts: [{name: x, context: {cluster: c, user: u, namespace: default}}]',
      'current-context: x',
      '',
    ].join('\n'),
  );
  const withKube = new MirrordCli({
    binary: BIN,
    cwd: scratch,
    env: { ...process.env, MIRRORD_RUNTIME_DIR: runtime, KUBECONFIG: kubeconfig },
  });
  await assert.rejects(withKube.listTargets(), (err: unknown) => {
    assert.ok(err instanceof CliCommandError, String(err));
    assert.match(err.message, /API server|127\.0\.0\.1:9|connect/i);
    return true;
  });
});

test('a binary that is not there is a clear error', async () => {
  await assert.rejects(cli('/nonexistent/mirrord').version(), CliNotFoundError);
  await assert.rejects(cli('/nonexistent/mirrord').startSession({}), CliNotFoundError);
});

// -- `mirrord ext` process handling, against scripted peers -----------------------------------

function script(name: string, body: string): string {
  return file(name, `#!/bin/sh\n${body}\n`, 0o755);
}

function pidAlive(pid: number | undefined): boolean {
  if (pid === undefined) {
    return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${String(pid)}/stat`, 'utf8');
    return !stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return false;
  }
}

test('a line outside the protocol ends the start with a ProtocolError', async () => {
  const bin = script('old-ext', `echo '{"type": "progress", "message": "old format"}'\nexec sleep 30`);
  await assert.rejects(cli(bin).startSession({}), /unknown line type "progress"/);
});

test('exiting before readiness rejects with the Error: line of stderr', async () => {
  const error = JSON.stringify({
    message: 'no such target',
    severity: 'Error',
    causes: [],
    help: 'run mirrord ls',
    labels: [],
    related: [],
  });
  const bin = script(
    'failing-ext',
    `echo '{"type":"NewTask","name":"mirrord cli","parent":null}'\necho 'Error: ${error}' >&2\nexit 1`,
  );
  const messages: string[] = [];
  await assert.rejects(
    cli(bin).startSession({ onMessage: (m) => messages.push(m.type) }),
    (err: unknown) => {
      assert.ok(err instanceof CliCommandError);
      assert.equal(err.message, 'no such target');
      assert.equal(err.error.help, 'run mirrord ls');
      assert.equal(err.exitCode, 1);
      return true;
    },
  );
  assert.deepEqual(messages, ['NewTask']);
});

test('no readiness in time: the process is stopped and the error says so', async () => {
  const pidFile = path.join(scratch, 'slow.pid');
  const bin = script('slow-ext', `echo $$ > ${pidFile}\nexec sleep 60`);
  await assert.rejects(cli(bin).startSession({ readyTimeoutMs: 1500 }), /did not get the session ready within 1\.5 s/);
  const pid = Number(fs.readFileSync(pidFile, 'utf8'));
  for (let i = 0; i < 50 && pidAlive(pid); i++) {
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(pidAlive(pid), false);
});

test('cancel stops mirrord ext', async () => {
  const bin = script('cancel-ext', 'exec sleep 60');
  const abort = new AbortController();
  const started = cli(bin).startSession({ signal: abort.signal });
  setTimeout(() => {
    abort.abort();
  }, 300);
  await assert.rejects(started, CancelledError);
});

test('ready: the environment arrives and the session lives until stopped', async () => {
  const ready = JSON.stringify({
    type: 'FinishedTask',
    name: 'mirrord preparing to launch',
    success: true,
    message: JSON.stringify({
      environment: { MIRRORD_SESSION: 's9', A: 'b' },
      patched_path: null,
      env_to_unset: [],
      uses_operator: false,
    }),
  });
  const bin = script('ready-ext', `echo '${ready}'\nexec sleep 60`);
  const session = await cli(bin).startSession({});
  assert.deepEqual(session.ready?.environment, { MIRRORD_SESSION: 's9', A: 'b' });
  assert.equal(session.sessionId, 's9');
  assert.equal(session.running, true);
  session.stop();
  assert.equal(await session.exited(), null);
  assert.equal(session.running, false);
});

test('ProtocolError names the binary setting', () => {
  assert.match(new ProtocolError('x', 'y').message, /mirrord\.binaryPath/);
});
