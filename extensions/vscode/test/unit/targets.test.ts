// The target pick's entries: recent first, available only, targetless, namespace switch; and
// the sessions view's tree.

import * as assert from 'node:assert/strict';
import { test } from 'node:test';

import type { DaemonStatus, TargetList } from '../../src/protocol';
import { formatAge, formatBytes, statusTree } from '../../src/sessionsModel';
import { pickEntries, RECENT_LIMIT, remember, TARGETLESS, unavailableCount } from '../../src/targets';

const LIST: TargetList = {
  targets: [
    { path: 'deployment/api', available: true },
    { path: 'deployment/idle', available: false },
    { path: 'pod/api-1/container/app', available: true },
    { path: 'rollout/web', available: true },
  ],
  currentNamespace: 'default',
  namespaces: ['default', 'staging', 'prod'],
};

test('recent targets first, then the rest in mirrord ls order, then targetless and namespaces', () => {
  const entries = pickEntries(LIST, ['rollout/web', 'deployment/gone']);
  assert.deepEqual(entries, [
    { kind: 'separator', label: 'recent' },
    { kind: 'target', path: 'rollout/web', recent: true },
    { kind: 'separator', label: 'targets in default' },
    { kind: 'target', path: 'deployment/api', recent: false },
    { kind: 'target', path: 'pod/api-1/container/app', recent: false },
    { kind: 'separator', label: 'no target' },
    { kind: 'targetless' },
    { kind: 'separator', label: 'switch namespace' },
    { kind: 'namespace', namespace: 'staging' },
    { kind: 'namespace', namespace: 'prod' },
  ]);
  assert.equal(unavailableCount(LIST), 1);
});

test('an empty namespace still offers targetless; a plain list has no namespace entries', () => {
  assert.deepEqual(pickEntries({ targets: [], currentNamespace: 'x', namespaces: ['x'] }, []), [
    { kind: 'separator', label: 'no target' },
    { kind: 'targetless' },
  ]);
  const plain = pickEntries(
    { targets: [{ path: 'pod/a', available: true }], currentNamespace: null, namespaces: [] },
    [],
  );
  assert.deepEqual(plain[0], { kind: 'separator', label: 'targets' });
});

test('remember moves a target to the front, keeps the list short, skips targetless', () => {
  assert.deepEqual(remember(['a', 'b', 'c'], 'c'), ['c', 'a', 'b']);
  assert.deepEqual(remember(['a'], TARGETLESS), ['a']);
  const many = Array.from({ length: RECENT_LIMIT + 5 }, (_, i) => `pod/p${String(i)}`);
  const out = remember(many, 'pod/new');
  assert.equal(out.length, RECENT_LIMIT);
  assert.equal(out[0], 'pod/new');
});

test('the sessions view: daemon, sessions with details, agents', () => {
  const status: DaemonStatus = {
    running: true,
    pid: 10,
    version: '0.1.0',
    runtimeDir: '/run/m',
    sessions: [
      {
        id: 's1',
        target: 'pid/42',
        label: 'ext',
        state: 'active',
        clientPid: 77,
        agent: 'a1',
        created: 1000,
        processes: [123],
        channels: 1,
        bytesToAgent: 100,
        bytesToUser: 4096,
        subscriptions: [{ port: 8080, mode: 'steal', filter: ['header_filter: x'] }],
        kernelDrops: { '8080': 2 },
        warnings: ['w1'],
      },
    ],
    agents: [
      {
        key: 'a1',
        description: 'agent for pid/42',
        pid: 55,
        alive: true,
        lingering: false,
        sessions: ['s1'],
        channels: 1,
        connections: 0,
        kernelDrops: {},
        started: 990,
      },
    ],
  };
  const tree = statusTree(status, 1065);
  assert.deepEqual(
    tree.map((n) => [n.label, n.description]),
    [
      ['mirrordd 0.1.0', 'pid 10 · /run/m'],
      ['sessions', '1'],
      ['agents', '1'],
    ],
  );
  const session = tree[1]?.children[0];
  assert.ok(session !== undefined);
  assert.equal(session.label, 'pid/42');
  assert.equal(session.contextValue, 'mirrord.session');
  assert.equal(session.description, 'active · 1 process · 1m05s');
  assert.deepEqual(
    session.children.map((c) => [c.label, c.description]),
    [
      ['processes', '123'],
      ['port 8080', 'steal (header_filter: x)'],
      ['kernel drops', '8080: 2'],
      ['relayed', '100 B out / 4.0 KiB in'],
      ['w1', undefined],
    ],
  );
  assert.equal(tree[2]?.children[0]?.description, 'running · pid 55 · 1 session · up 1m15s');
  assert.deepEqual(
    statusTree({ running: false, runtimeDir: '/r' }, 0).map((n) => n.label),
    ['no daemon running'],
  );
});

test('sizes and ages read like the CLI table', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(5 * 1024 * 1024), '5.0 MiB');
  assert.equal(formatAge(59), '0m59s');
  assert.equal(formatAge(3725), '1h02m05s');
});
