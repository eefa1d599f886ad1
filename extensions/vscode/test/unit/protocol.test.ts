// The IDE protocol's parsing: every line shape of `mirrord ext`, the ready line, `Error:` lines,
// `verify-config --ide`, `ls` (rich and plain) and `daemon status --json`.

import * as assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  parseCliError,
  parseDaemonStatus,
  parseProgressLine,
  parseTargetList,
  parseVerify,
  ProtocolError,
  READY_TASK,
  readyEnv,
} from '../../src/protocol';

function readyLine(payload: unknown): string {
  return JSON.stringify({
    type: 'FinishedTask',
    name: READY_TASK,
    success: true,
    message: JSON.stringify(payload),
  });
}

test('every progress shape parses', () => {
  assert.deepEqual(parseProgressLine('{"type":"NewTask","name":"mirrord cli","parent":null}'), {
    type: 'NewTask',
    name: 'mirrord cli',
    parent: null,
  });
  assert.deepEqual(parseProgressLine('{"type":"NewTask","name":"agent","parent":"mirrord cli"}'), {
    type: 'NewTask',
    name: 'agent',
    parent: 'mirrord cli',
  });
  assert.deepEqual(
    parseProgressLine('{"type":"FinishedTask","name":"agent","success":false,"message":"slow"}'),
    { type: 'FinishedTask', name: 'agent', success: false, message: 'slow' },
  );
  assert.deepEqual(parseProgressLine('{"type":"Warning","message":"port 80: not stolen"}'), {
    type: 'Warning',
    message: 'port 80: not stolen',
  });
  assert.deepEqual(parseProgressLine('{"type":"Info","message":"hello"}'), {
    type: 'Info',
    message: 'hello',
  });
  const ide = parseProgressLine(
    JSON.stringify({
      type: 'IdeMessage',
      message: {
        id: 'x',
        level: 'Warning',
        text: 'read the docs',
        actions: [
          { kind: 'Link', label: 'Docs', link: 'https://example.invalid/docs' },
          { kind: 'Command', label: 'unknown kind is left out' },
        ],
      },
    }),
  );
  assert.deepEqual(ide, {
    type: 'IdeMessage',
    message: {
      id: 'x',
      level: 'Warning',
      text: 'read the docs',
      actions: [{ kind: 'Link', label: 'Docs', link: 'https://example.invalid/docs' }],
    },
  });
});

test('lines that are not the protocol are errors naming the line', () => {
  for (const line of [
    'mirrord: starting the daemon',
    '[1, 2]',
    '{"message":"no type"}',
    '{"type":"progress","message":"the old format"}',
    '{"type":"NewTask"}',
    '{"type":"FinishedTask","name":"x","success":"yes"}',
    '{"type":"Warning","message":3}',
  ]) {
    assert.throws(() => parseProgressLine(line), ProtocolError, line);
  }
  assert.throws(() => parseProgressLine('{"type":"env"}'), /unknown line type "env"/);
});

test('the ready line carries the environment, patched path, names to unset and operator flag', () => {
  const message = parseProgressLine(
    readyLine({
      environment: { POD_VAR: 'from-the-pod', LD_PRELOAD: '/x/libmirrord_layer.so' },
      patched_path: null,
      env_to_unset: ['AWS_PROFILE'],
      uses_operator: false,
    }),
  );
  assert.deepEqual(readyEnv(message), {
    environment: { POD_VAR: 'from-the-pod', LD_PRELOAD: '/x/libmirrord_layer.so' },
    patchedPath: null,
    envToUnset: ['AWS_PROFILE'],
    usesOperator: false,
  });
  // other FinishedTask lines are not the ready line
  assert.equal(
    readyEnv(parseProgressLine('{"type":"FinishedTask","name":"agent","success":true,"message":null}')),
    undefined,
  );
});

test('a malformed ready line is an error, not a session without environment', () => {
  // a failed ready task is not the ready line: the error comes on stderr
  assert.equal(
    readyEnv(
      parseProgressLine(
        JSON.stringify({ type: 'FinishedTask', name: READY_TASK, success: false, message: null }),
      ),
    ),
    undefined,
  );
  const bad = [
    JSON.stringify({ type: 'FinishedTask', name: READY_TASK, success: true, message: null }),
    JSON.stringify({ type: 'FinishedTask', name: READY_TASK, success: true, message: 'not json' }),
    readyLine({ environment: 'x' }),
    readyLine({ environment: { A: 1 } }),
    readyLine({ environment: {}, env_to_unset: 'A' }),
  ];
  for (const line of bad) {
    assert.throws(() => readyEnv(parseProgressLine(line)), ProtocolError, line);
  }
});

test('Error: lines on stderr give message, help and causes', () => {
  const stderr = [
    'some log line',
    'Error: ' +
      JSON.stringify({
        message: 'target pod/x not found',
        severity: 'Error',
        causes: ['no pod x in default'],
        help: 'check the name with mirrord ls',
        labels: [],
        related: [],
      }),
    '',
  ].join('\n');
  assert.deepEqual(parseCliError(stderr, 1), {
    message: 'target pod/x not found',
    severity: 'Error',
    causes: ['no pod x in default'],
    help: 'check the name with mirrord ls',
    labels: [],
    related: [],
  });
});

test('without an Error: line the end of stderr is the message', () => {
  const err = parseCliError('Traceback\n  boom\nError: plain text, not JSON\n', 2);
  assert.equal(err.message, 'Traceback\nboom\nError: plain text, not JSON');
  assert.equal(err.help, '');
  assert.match(parseCliError('', 7).message, /exited with code 7/);
});

test('verify-config: target as string, object, targetless or null; and Fail', () => {
  const success = (path: unknown): string =>
    JSON.stringify({ type: 'Success', config: { path, namespace: 'ns1' }, warnings: ['w'] });
  assert.deepEqual(parseVerify(success('deployment/api')), {
    ok: true,
    target: { kind: 'path', path: 'deployment/api' },
    namespace: 'ns1',
    warnings: ['w'],
  });
  const object = parseVerify(success({ deployment: 'api', container: 'main' }));
  assert.deepEqual(object.ok && object.target, {
    kind: 'path',
    path: 'deployment/api/container/main',
  });
  const pid = parseVerify(success({ pid: '1234' }));
  assert.deepEqual(pid.ok && pid.target, { kind: 'path', path: 'pid/1234' });
  const targetless = parseVerify(success('targetless'));
  assert.deepEqual(targetless.ok && targetless.target, { kind: 'targetless' });
  const ask = parseVerify(success(null));
  assert.deepEqual(ask.ok && ask.target, { kind: 'ask' });
  assert.deepEqual(parseVerify('{"type":"Fail","errors":["target.path: bad"]}'), {
    ok: false,
    errors: ['target.path: bad'],
  });
  assert.throws(() => parseVerify('{"type":"Maybe"}'), ProtocolError);
  assert.throws(() => parseVerify(success(42)), ProtocolError);
});

test('ls: rich object and plain list', () => {
  assert.deepEqual(
    parseTargetList(
      JSON.stringify({
        targets: [
          { path: 'deployment/api', available: true },
          { path: 'deployment/idle', available: false },
        ],
        current_namespace: 'default',
        namespaces: ['default', 'staging'],
      }),
    ),
    {
      targets: [
        { path: 'deployment/api', available: true },
        { path: 'deployment/idle', available: false },
      ],
      currentNamespace: 'default',
      namespaces: ['default', 'staging'],
    },
  );
  assert.deepEqual(parseTargetList('["pod/a", "deployment/b"]'), {
    targets: [
      { path: 'pod/a', available: true },
      { path: 'deployment/b', available: true },
    ],
    currentNamespace: null,
    namespaces: [],
  });
  assert.throws(() => parseTargetList('{"targets": [{"name": "x"}]}'), ProtocolError);
  assert.throws(() => parseTargetList('no targets'), ProtocolError);
});

test('daemon status: sessions with subscriptions and drops, agents with traffic', () => {
  const status = parseDaemonStatus(
    JSON.stringify({
      running: true,
      daemon: { pid: 10, version: '0.1.0', runtime_dir: '/run/user/0/mirrord', uptime: 5 },
      sessions: [
        {
          id: 's1',
          target: 'pid/42',
          label: 'ext',
          client_pid: 77,
          state: 'active',
          agent: 'local:pid/42',
          created: 1000,
          processes: [123, 124],
          channels: 2,
          bytes_to_agent: 10,
          bytes_to_user: 2048,
          warnings: ['port 81: not stolen'],
          kernel_drops: { '8080': 0 },
          subscriptions: [
            {
              port: 8080,
              mode: 'steal',
              http_filter: { header_filter: '^x-user: me$', ports: [8080] },
              pid: 123,
            },
          ],
        },
      ],
      agents: [
        {
          key: 'local:pid/42',
          description: 'agent for pid/42',
          pid: 55,
          alive: true,
          started: 990,
          sessions: ['s1'],
          idle_since: null,
          link: { channels: 2, connections: 1, traffic: { '8080': { packets: 3, kernel_drops: 1 } } },
        },
      ],
      totals: {},
    }),
  );
  assert.ok(status.running);
  assert.equal(status.pid, 10);
  const [session] = status.sessions;
  assert.ok(session);
  assert.equal(session.clientPid, 77);
  assert.deepEqual(session.processes, [123, 124]);
  assert.deepEqual(session.subscriptions, [
    { port: 8080, mode: 'steal', filter: ['header_filter: ^x-user: me$'] },
  ]);
  assert.deepEqual(session.kernelDrops, { '8080': 0 });
  const [agent] = status.agents;
  assert.ok(agent);
  assert.deepEqual(agent.kernelDrops, { '8080': 1 });
  assert.equal(agent.lingering, false);
  assert.deepEqual(parseDaemonStatus('{"running": false, "runtime_dir": "/r"}'), {
    running: false,
    runtimeDir: '/r',
  });
});
