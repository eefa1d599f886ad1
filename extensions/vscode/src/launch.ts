/**
 * What a debug launch configuration means to mirrord, and how the session's environment goes
 * into it.
 *
 * Owns: which debugger types mirrord handles; `MIRRORD_ACTIVE` and `MIRRORD_CONFIG_FILE` read
 * from a launch configuration; the executable passed to `mirrord ext -e`; the variables that
 * keep a debugger's own connections on this machine; merging the session's environment into
 * the configuration in each debugger's own shape (`env` object, or cppdbg's `environment`
 * list). Pure: takes and returns plain objects (a `vscode.DebugConfiguration` is one).
 * Does not own: running mirrord or asking the user anything.
 */

import type { ReadyEnv } from './protocol';

/** A launch configuration as VS Code hands it over: `type`, `request`, `name` and the rest. */
export interface LaunchConfig {
  type: string;
  request: string;
  name: string;
  [key: string]: unknown;
}

/** The debuggers mirrord knows how to feed, by the family of their launch configurations. */
export type DebugKind = 'node' | 'node-terminal' | 'python' | 'go' | 'java' | 'cppdbg';

const KINDS: Record<string, DebugKind> = {
  node: 'node',
  'pwa-node': 'node',
  'node-terminal': 'node-terminal',
  python: 'python',
  debugpy: 'python',
  go: 'go',
  java: 'java',
  cppdbg: 'cppdbg',
};

export function debugKind(type: string): DebugKind | undefined {
  return Object.prototype.hasOwnProperty.call(KINDS, type) ? KINDS[type] : undefined;
}

/**
 * The debugger whose port the layer reads from the debuggee's command line
 * (`MIRRORD_DETECT_DEBUGGER_PORT`), so that its connections stay on this machine.
 */
const DETECT_PORT: Partial<Record<DebugKind, string>> = {
  node: 'nodeinspector',
  'node-terminal': 'nodeinspector',
  python: 'debugpy',
  java: 'javaagent',
  go: 'dlv',
};

/** Go builds run compilers and linkers under the debuggee's environment: keep them out. */
export const GO_SKIP_PROCESSES = 'dlv;debugserver;compile;go;asm;cgo;link;git;gcc;as;ld;collect2;cc1';

/** A variable's value as the debugger will see it (numbers and booleans become text). */
function envText(value: unknown): string | undefined {
  if (typeof value === 'string') {
    return value;
  }
  if (typeof value === 'number' || typeof value === 'boolean') {
    return String(value);
  }
  return undefined;
}

/**
 * Whether this configuration starts a program mirrord can feed: a `launch` (an `attach` has
 * no process to give an environment to), and not a child session that a debugger starts for a
 * process already running (js-debug marks those with `__pendingTargetId`).
 */
export function startsProgram(config: LaunchConfig): boolean {
  return config.request === 'launch' && config.__pendingTargetId === undefined;
}

/** The environment as the launch configuration has it (cppdbg: a list of {name, value}). */
export function launchEnv(config: LaunchConfig): Record<string, string> {
  const out: Record<string, string> = {};
  if (config.type === 'cppdbg') {
    if (Array.isArray(config.environment)) {
      for (const entry of config.environment as unknown[]) {
        if (typeof entry === 'object' && entry !== null) {
          const { name, value } = entry as { name?: unknown; value?: unknown };
          const text = envText(value);
          if (typeof name === 'string' && text !== undefined) {
            out[name] = text;
          }
        }
      }
    }
    return out;
  }
  if (typeof config.env === 'object' && config.env !== null) {
    for (const [name, value] of Object.entries(config.env as Record<string, unknown>)) {
      const text = envText(value);
      if (text !== undefined) {
        out[name] = text;
      }
    }
  }
  return out;
}

/**
 * `MIRRORD_ACTIVE` in the launch configuration: true ("1", "true"), false ("0", "false"), or
 * undefined (not set: the status bar toggle decides).
 */
export function activeOverride(config: LaunchConfig): boolean | undefined {
  const value = launchEnv(config).MIRRORD_ACTIVE;
  if (value === undefined) {
    return undefined;
  }
  const v = value.trim().toLowerCase();
  if (v === '1' || v === 'true' || v === 'yes' || v === 'on') {
    return true;
  }
  if (v === '0' || v === 'false' || v === 'no' || v === 'off' || v === '') {
    return false;
  }
  return undefined;
}

/** Whether mirrord runs for this launch: the configuration's MIRRORD_ACTIVE, else the toggle. */
export function isActive(config: LaunchConfig, toggleOn: boolean): boolean {
  return activeOverride(config) ?? toggleOn;
}

/** The config file the launch configuration names (`MIRRORD_CONFIG_FILE`), if any. */
export function launchConfigFile(config: LaunchConfig): string | undefined {
  const value = launchEnv(config).MIRRORD_CONFIG_FILE;
  return value !== undefined && value.trim() !== '' ? value : undefined;
}

/** The configuration's key naming the program the debugger starts (undefined: none). */
function executableKey(config: LaunchConfig): string | undefined {
  const pick = (...keys: string[]): string | undefined =>
    keys.find((key) => {
      const value = config[key];
      return typeof value === 'string' && value.trim() !== '';
    });
  switch (debugKind(config.type)) {
    case 'node':
      return pick('runtimeExecutable');
    case 'python':
      return pick('python', 'pythonPath');
    case 'cppdbg':
      return pick('program');
    default:
      return undefined;
  }
}

/** The program the debugger starts, for `mirrord ext -e` (undefined: not known up front). */
export function executableOf(config: LaunchConfig): string | undefined {
  const key = executableKey(config);
  if (key !== undefined) {
    return config[key] as string;
  }
  return debugKind(config.type) === 'node' ? 'node' : undefined;
}

/**
 * The configuration with the ready line's `patched_path` (a static or Go program: mirrord's
 * system-call supervisor, which runs the program it names in the environment) in place of the
 * program `executableOf` named, its arguments unchanged; the configuration itself when there
 * is none.
 */
export function withPatchedPath(config: LaunchConfig, patchedPath: string | null): LaunchConfig {
  if (patchedPath === null) {
    return config;
  }
  const node = debugKind(config.type) === 'node' ? 'runtimeExecutable' : undefined;
  const key = executableKey(config) ?? node;
  return key === undefined ? config : { ...config, [key]: patchedPath };
}

export interface EnvOptions {
  /** `LOW-HIGH`, or '' for none (`mirrord.ignoreDebuggerPorts`). */
  ignoreDebuggerPorts: string;
}

/** Everything the debuggee gets: the session's environment and the debugger-port variables. */
export function sessionVariables(
  ready: ReadyEnv,
  kind: DebugKind,
  options: EnvOptions,
): Record<string, string> {
  const out: Record<string, string> = { ...ready.environment };
  if (options.ignoreDebuggerPorts !== '') {
    out.MIRRORD_IGNORE_DEBUGGER_PORTS = options.ignoreDebuggerPorts;
  }
  const detect = DETECT_PORT[kind];
  if (detect !== undefined) {
    out.MIRRORD_DETECT_DEBUGGER_PORT = detect;
  }
  if (kind === 'go') {
    out.MIRRORD_SKIP_PROCESSES = GO_SKIP_PROCESSES;
  }
  return out;
}

/** `existing` then `added`, each layer library once (LD_PRELOAD is a ':' or ' ' list). */
export function joinPreload(existing: string | undefined, added: string): string {
  const parts = (existing ?? '').split(/[:\s]+/).filter((p) => p !== '');
  for (const p of added.split(/[:\s]+/)) {
    if (p !== '' && !parts.includes(p)) {
      parts.push(p);
    }
  }
  return parts.join(':');
}

/**
 * A copy of `config` whose environment has the names in `unset` removed (case-insensitively,
 * as `feature.env.unset`) and `variables` added. `LD_PRELOAD` is appended to the
 * configuration's own. Debuggers that take `null` as "remove from the inherited environment"
 * (js-debug) get `null` for the unset names, so that VS Code's own environment does not bring
 * them back.
 */
export function applyEnvironment(
  config: LaunchConfig,
  kind: DebugKind,
  variables: Record<string, string>,
  unset: string[],
): LaunchConfig {
  const unsetLower = new Set(unset.map((n) => n.toLowerCase()));
  const own = launchEnv(config);
  const merged: Record<string, string> = {};
  for (const [name, value] of Object.entries(own)) {
    if (!unsetLower.has(name.toLowerCase())) {
      merged[name] = value;
    }
  }
  for (const [name, value] of Object.entries(variables)) {
    merged[name] = name === 'LD_PRELOAD' ? joinPreload(merged[name], value) : value;
  }
  if (kind === 'cppdbg') {
    return {
      ...config,
      environment: Object.entries(merged).map(([name, value]) => ({ name, value })),
    };
  }
  const env: Record<string, string | null> = { ...merged };
  if (kind === 'node' || kind === 'node-terminal') {
    for (const name of unset) {
      if (!(name in env)) {
        env[name] = null;
      }
    }
  }
  return { ...config, env };
}
