// Launch configurations: which debuggers, MIRRORD_ACTIVE, the executable, and the session's
// environment merged in each debugger's shape.

import * as assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  activeOverride,
  applyEnvironment,
  debugKind,
  executableOf,
  GO_SKIP_PROCESSES,
  isActive,
  joinPreload,
  type LaunchConfig,
  launchConfigFile,
  launchEnv,
  sessionVariables,
  startsProgram,
  withPatchedPath,
} from '../../src/launch';
import type { ReadyEnv } from '../../src/protocol';

const READY: ReadyEnv = {
  environment: { POD_VAR: 'from-the-pod', LD_PRELOAD: '/lib/libmirrord_layer.so' },
  patchedPath: null,
  envToUnset: ['aws_profile'],
  usesOperator: false,
};

function config(type: string, rest: Record<string, unknown> = {}): LaunchConfig {
  return { type, request: 'launch', name: 'test', ...rest };
}

test('the supported debuggers and nothing else', () => {
  assert.equal(debugKind('node'), 'node');
  assert.equal(debugKind('pwa-node'), 'node');
  assert.equal(debugKind('node-terminal'), 'node-terminal');
  assert.equal(debugKind('python'), 'python');
  assert.equal(debugKind('debugpy'), 'python');
  assert.equal(debugKind('go'), 'go');
  assert.equal(debugKind('java'), 'java');
  assert.equal(debugKind('cppdbg'), 'cppdbg');
  assert.equal(debugKind('chrome'), undefined);
  assert.equal(debugKind('toString'), undefined);
});

test('launches start a program; attaches and js-debug child sessions do not', () => {
  assert.equal(startsProgram(config('node')), true);
  assert.equal(startsProgram({ ...config('python'), request: 'attach' }), false);
  assert.equal(startsProgram(config('pwa-node', { __pendingTargetId: 'abc' })), false);
});

test('MIRRORD_ACTIVE in the launch configuration overrides the toggle', () => {
  assert.equal(isActive(config('node'), true), true);
  assert.equal(isActive(config('node'), false), false);
  assert.equal(isActive(config('node', { env: { MIRRORD_ACTIVE: '1' } }), false), true);
  assert.equal(isActive(config('node', { env: { MIRRORD_ACTIVE: '0' } }), true), false);
  assert.equal(isActive(config('python', { env: { MIRRORD_ACTIVE: 'true' } }), false), true);
  assert.equal(isActive(config('python', { env: { MIRRORD_ACTIVE: 1 } }), false), true);
  assert.equal(
    activeOverride(config('cppdbg', { environment: [{ name: 'MIRRORD_ACTIVE', value: '1' }] })),
    true,
  );
  assert.equal(activeOverride(config('node', { env: { MIRRORD_ACTIVE: 'maybe' } })), undefined);
});

test('MIRRORD_CONFIG_FILE names the config file of one launch', () => {
  assert.equal(
    launchConfigFile(config('node', { env: { MIRRORD_CONFIG_FILE: '/w/.mirrord/other.json' } })),
    '/w/.mirrord/other.json',
  );
  assert.equal(launchConfigFile(config('node', { env: { MIRRORD_CONFIG_FILE: ' ' } })), undefined);
  assert.equal(launchConfigFile(config('node')), undefined);
});

test('the executable for mirrord ext -e', () => {
  assert.equal(executableOf(config('node')), 'node');
  assert.equal(executableOf(config('node', { runtimeExecutable: '/usr/bin/node20' })), '/usr/bin/node20');
  assert.equal(executableOf(config('debugpy', { python: '/venv/bin/python' })), '/venv/bin/python');
  assert.equal(executableOf(config('python')), undefined);
  assert.equal(executableOf(config('cppdbg', { program: '/w/a.out' })), '/w/a.out');
  assert.equal(executableOf(config('go')), undefined);
});

test('patched_path replaces the program the debugger starts, and nothing else', () => {
  const sv = '/venv/mirrord/layer/mirrord-supervisor';
  const cpp = config('cppdbg', { program: '/w/static-app', args: ['-v'] });
  assert.deepEqual(withPatchedPath(cpp, sv), { ...cpp, program: sv });
  assert.equal(withPatchedPath(cpp, null), cpp);
  assert.equal(withPatchedPath(config('node'), sv).runtimeExecutable, sv);
  assert.equal(withPatchedPath(config('debugpy', { python: '/venv/bin/python' }), sv).python, sv);
  const go = config('go');
  assert.equal(withPatchedPath(go, sv), go);
});

test('debugger ports stay on this machine: the range and the detector per debugger', () => {
  const opts = { ignoreDebuggerPorts: '45000-65535' };
  const node = sessionVariables(READY, 'node', opts);
  assert.equal(node.MIRRORD_IGNORE_DEBUGGER_PORTS, '45000-65535');
  assert.equal(node.MIRRORD_DETECT_DEBUGGER_PORT, 'nodeinspector');
  assert.equal(node.POD_VAR, 'from-the-pod');
  assert.equal(sessionVariables(READY, 'node-terminal', opts).MIRRORD_DETECT_DEBUGGER_PORT, 'nodeinspector');
  assert.equal(sessionVariables(READY, 'python', opts).MIRRORD_DETECT_DEBUGGER_PORT, 'debugpy');
  assert.equal(sessionVariables(READY, 'java', opts).MIRRORD_DETECT_DEBUGGER_PORT, 'javaagent');
  const go = sessionVariables(READY, 'go', opts);
  assert.equal(go.MIRRORD_DETECT_DEBUGGER_PORT, 'dlv');
  assert.equal(go.MIRRORD_SKIP_PROCESSES, GO_SKIP_PROCESSES);
  const cpp = sessionVariables(READY, 'cppdbg', { ignoreDebuggerPorts: '' });
  assert.equal(cpp.MIRRORD_DETECT_DEBUGGER_PORT, undefined);
  assert.equal(cpp.MIRRORD_IGNORE_DEBUGGER_PORTS, undefined);
});

test('env object: unset names removed case-insensitively, variables added, LD_PRELOAD appended', () => {
  const launch = config('debugpy', {
    program: 'app.py',
    env: { AWS_PROFILE: 'dev', KEEP: 'me', LD_PRELOAD: '/mine.so' },
  });
  const out = applyEnvironment(launch, 'python', READY.environment, READY.envToUnset);
  assert.deepEqual(out.env, {
    KEEP: 'me',
    LD_PRELOAD: '/mine.so:/lib/libmirrord_layer.so',
    POD_VAR: 'from-the-pod',
  });
  assert.equal(out.program, 'app.py');
  // the input is not modified
  assert.deepEqual(launch.env, { AWS_PROFILE: 'dev', KEEP: 'me', LD_PRELOAD: '/mine.so' });
});

test('js-debug gets null for unset names so the inherited value goes too', () => {
  const out = applyEnvironment(config('node', { program: 'a.js' }), 'node', { A: '1' }, ['SECRET']);
  assert.deepEqual(out.env, { A: '1', SECRET: null });
  const term = applyEnvironment(config('node-terminal', { command: 'npm start' }), 'node-terminal', {}, ['X']);
  assert.deepEqual(term.env, { X: null });
});

test('cppdbg: the environment list of {name, value}', () => {
  const launch = config('cppdbg', {
    environment: [
      { name: 'AWS_PROFILE', value: 'dev' },
      { name: 'KEEP', value: 'me' },
    ],
  });
  const out = applyEnvironment(launch, 'cppdbg', READY.environment, READY.envToUnset);
  assert.deepEqual(out.environment, [
    { name: 'KEEP', value: 'me' },
    { name: 'POD_VAR', value: 'from-the-pod' },
    { name: 'LD_PRELOAD', value: '/lib/libmirrord_layer.so' },
  ]);
  assert.equal(out.env, undefined);
  assert.deepEqual(launchEnv(out), {
    KEEP: 'me',
    POD_VAR: 'from-the-pod',
    LD_PRELOAD: '/lib/libmirrord_layer.so',
  });
});

test('LD_PRELOAD lists are joined without repeating a library', () => {
  assert.equal(joinPreload(undefined, '/l.so'), '/l.so');
  assert.equal(joinPreload('/a.so /b.so', '/l.so'), '/a.so:/b.so:/l.so');
  assert.equal(joinPreload('/l.so', '/l.so'), '/l.so');
});
