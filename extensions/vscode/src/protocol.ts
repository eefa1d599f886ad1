/**
 * The CLI's IDE protocol, parsed and checked: what `mirrord ext`, `mirrord verify-config --ide`,
 * `mirrord ls` and `mirrord daemon status --json` print.
 *
 * Owns: turning their output into typed values, and a clear ProtocolError (naming the command
 * and the offending text) for anything else. Pure: no `vscode`, no processes.
 * Does not own: running the commands (cli.ts) or showing anything (extension.ts).
 */

/** Output of the CLI that does not follow the protocol: a bug or a CLI of another version. */
export class ProtocolError extends Error {
  constructor(what: string, text: string) {
    const shown = text.length > 300 ? `${text.slice(0, 300)}…` : text;
    super(
      `${what}: ${JSON.stringify(shown)}. Check that mirrord.binaryPath points at a mirrord ` +
        'that speaks the IDE protocol (`mirrord --version`).',
    );
    this.name = 'ProtocolError';
  }
}

type Json = unknown;

function isObject(value: Json): value is Record<string, Json> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isStringArray(value: Json): value is string[] {
  return Array.isArray(value) && value.every((v) => typeof v === 'string');
}

function parseJson(text: string, what: string): Json {
  try {
    return JSON.parse(text) as Json;
  } catch {
    throw new ProtocolError(`${what} is not JSON`, text);
  }
}

// -- mirrord ext -----------------------------------------------------------------------------

/** The `FinishedTask` whose message carries the session's environment. */
export const READY_TASK = 'mirrord preparing to launch';

export interface IdeAction {
  kind: 'Link';
  label: string;
  link: string;
}

export interface IdeMessage {
  id: string;
  level: 'Info' | 'Warning';
  text: string;
  actions: IdeAction[];
}

export type ProgressMessage =
  | { type: 'NewTask'; name: string; parent: string | null }
  | { type: 'FinishedTask'; name: string; success: boolean; message: string | null }
  | { type: 'Warning'; message: string }
  | { type: 'Info'; message: string }
  | { type: 'IdeMessage'; message: IdeMessage };

/** What the debuggee needs: the `FinishedTask` READY_TASK's message, decoded. */
export interface ReadyEnv {
  environment: Record<string, string>;
  patchedPath: string | null;
  envToUnset: string[];
  usesOperator: boolean;
}

function optionalString(value: Json): value is string | null | undefined {
  return value === undefined || value === null || typeof value === 'string';
}

function parseIdeMessage(value: Json): IdeMessage | undefined {
  if (!isObject(value) || typeof value.text !== 'string') {
    return undefined;
  }
  const level = value.level === 'Warning' ? 'Warning' : 'Info';
  const actions: IdeAction[] = [];
  if (Array.isArray(value.actions)) {
    for (const action of value.actions) {
      // Only links are defined; an action kind we do not know is left out, not an error.
      if (
        isObject(action) &&
        action.kind === 'Link' &&
        typeof action.label === 'string' &&
        typeof action.link === 'string'
      ) {
        actions.push({ kind: 'Link', label: action.label, link: action.link });
      }
    }
  }
  return { id: typeof value.id === 'string' ? value.id : '', level, text: value.text, actions };
}

/**
 * One stdout line of `mirrord ext`. Every line must be one of the five shapes; anything else
 * is a ProtocolError (the IDE must not guess at a CLI it does not understand).
 */
export function parseProgressLine(line: string): ProgressMessage {
  const value = parseJson(line, 'mirrord ext printed a line that');
  if (!isObject(value) || typeof value.type !== 'string') {
    throw new ProtocolError('mirrord ext printed a line without a "type"', line);
  }
  switch (value.type) {
    case 'NewTask':
      if (typeof value.name === 'string' && optionalString(value.parent)) {
        return { type: 'NewTask', name: value.name, parent: value.parent ?? null };
      }
      break;
    case 'FinishedTask':
      if (
        typeof value.name === 'string' &&
        typeof value.success === 'boolean' &&
        optionalString(value.message)
      ) {
        return {
          type: 'FinishedTask',
          name: value.name,
          success: value.success,
          message: value.message ?? null,
        };
      }
      break;
    case 'Warning':
    case 'Info':
      if (typeof value.message === 'string') {
        return { type: value.type, message: value.message };
      }
      break;
    case 'IdeMessage': {
      const message = parseIdeMessage(value.message);
      if (message !== undefined) {
        return { type: 'IdeMessage', message };
      }
      break;
    }
    default:
      throw new ProtocolError(`mirrord ext printed an unknown line type "${value.type}"`, line);
  }
  throw new ProtocolError(`mirrord ext printed a malformed "${value.type}" line`, line);
}

/**
 * The session's environment if `message` is the ready line, else undefined (also for the
 * ready task finished without success: the CLI's error follows on stderr).
 */
export function readyEnv(message: ProgressMessage): ReadyEnv | undefined {
  if (message.type !== 'FinishedTask' || message.name !== READY_TASK) {
    return undefined;
  }
  if (!message.success) {
    return undefined; // the CLI's error follows on stderr, and it exits
  }
  if (message.message === null) {
    throw new ProtocolError(
      `mirrord ext finished "${READY_TASK}" without the environment`,
      JSON.stringify(message),
    );
  }
  const value = parseJson(message.message, `the message of "${READY_TASK}"`);
  if (!isObject(value) || !isObject(value.environment)) {
    throw new ProtocolError(`the message of "${READY_TASK}" has no environment`, message.message);
  }
  const environment: Record<string, string> = {};
  for (const [key, v] of Object.entries(value.environment)) {
    if (typeof v !== 'string') {
      throw new ProtocolError(`the environment variable ${key} is not a string`, message.message);
    }
    environment[key] = v;
  }
  const unset = value.env_to_unset ?? [];
  if (!isStringArray(unset)) {
    throw new ProtocolError('env_to_unset is not a list of names', message.message);
  }
  return {
    environment,
    patchedPath: typeof value.patched_path === 'string' ? value.patched_path : null,
    envToUnset: unset,
    usesOperator: value.uses_operator === true,
  };
}

// -- errors (`Error: {...}` on stderr) -------------------------------------------------------

export interface CliError {
  message: string;
  severity: string;
  causes: string[];
  help: string;
  labels: Json[];
  related: Json[];
}

/**
 * The error a failed command reported: its `Error: {json}` line on stderr. Without one (a crash,
 * a CLI that does not speak the protocol), the last lines of stderr are the message.
 */
export function parseCliError(stderr: string, exitCode: number | null): CliError {
  const lines = stderr.split(/\r?\n/);
  for (let i = lines.length - 1; i >= 0; i--) {
    const line = (lines[i] ?? '').trim();
    if (!line.startsWith('Error: ')) {
      continue;
    }
    let value: Json;
    try {
      value = JSON.parse(line.slice('Error: '.length)) as Json;
    } catch {
      continue; // a plain-text "Error: ..." from somewhere else: fall through to the tail
    }
    if (isObject(value) && typeof value.message === 'string') {
      return {
        message: value.message,
        severity: typeof value.severity === 'string' ? value.severity : 'Error',
        causes: isStringArray(value.causes) ? value.causes : [],
        help: typeof value.help === 'string' ? value.help : '',
        labels: Array.isArray(value.labels) ? value.labels : [],
        related: Array.isArray(value.related) ? value.related : [],
      };
    }
  }
  const tail = lines
    .map((l) => l.trim())
    .filter((l) => l !== '')
    .slice(-5)
    .join('\n');
  return {
    message: tail || `mirrord exited with code ${String(exitCode)} and printed nothing on stderr`,
    severity: 'Error',
    causes: [],
    help: '',
    labels: [],
    related: [],
  };
}

// -- mirrord verify-config --ide -------------------------------------------------------------

/** What the config says about the target: ask the user, targetless, or a target path. */
export type ConfigTarget = { kind: 'ask' } | { kind: 'targetless' } | { kind: 'path'; path: string };

export type VerifyResult =
  | { ok: true; target: ConfigTarget; namespace: string | null; warnings: string[] }
  | { ok: false; errors: string[] };

/**
 * `path` is a string (`deployment/x`, `targetless`), null (the IDE asks), or an object such
 * as `{"deployment": "x", "container": "c"}`: both shapes are in use.
 */
function configTarget(path: Json, text: string): ConfigTarget {
  if (path === null || path === undefined) {
    return { kind: 'ask' };
  }
  if (typeof path === 'string') {
    return path === 'targetless' ? { kind: 'targetless' } : { kind: 'path', path };
  }
  if (isObject(path)) {
    const entries = Object.entries(path);
    const container = entries.find(([k]) => k === 'container');
    const main = entries.find(([k]) => k !== 'container');
    if (main !== undefined && typeof main[1] === 'string') {
      let out = `${main[0]}/${main[1]}`;
      if (container !== undefined && typeof container[1] === 'string') {
        out += `/container/${container[1]}`;
      }
      return { kind: 'path', path: out };
    }
  }
  throw new ProtocolError('mirrord verify-config printed a target path it cannot be', text);
}

export function parseVerify(stdout: string): VerifyResult {
  const value = parseJson(stdout.trim(), 'mirrord verify-config --ide printed something that');
  if (!isObject(value)) {
    throw new ProtocolError('mirrord verify-config --ide printed no object', stdout);
  }
  if (value.type === 'Fail') {
    const errors = Array.isArray(value.errors) ? value.errors.map((e) => String(e)) : [];
    return { ok: false, errors };
  }
  if (value.type === 'Success' && isObject(value.config)) {
    const namespace = value.config.namespace;
    return {
      ok: true,
      target: configTarget(value.config.path, stdout),
      namespace: typeof namespace === 'string' ? namespace : null,
      warnings: Array.isArray(value.warnings) ? value.warnings.map((w) => String(w)) : [],
    };
  }
  throw new ProtocolError('mirrord verify-config --ide printed neither Success nor Fail', stdout);
}

// -- mirrord ls ------------------------------------------------------------------------------

export interface TargetEntry {
  path: string;
  available: boolean;
}

export interface TargetList {
  targets: TargetEntry[];
  /** Null when the CLI printed the plain list (no namespace information). */
  currentNamespace: string | null;
  namespaces: string[];
}

/** The rich object (`MIRRORD_LS_RICH_OUTPUT=true`) or the plain array of paths. */
export function parseTargetList(stdout: string): TargetList {
  const value = parseJson(stdout.trim(), 'mirrord ls printed something that');
  if (isStringArray(value)) {
    return {
      targets: value.map((path) => ({ path, available: true })),
      currentNamespace: null,
      namespaces: [],
    };
  }
  if (isObject(value) && Array.isArray(value.targets)) {
    const targets: TargetEntry[] = [];
    for (const t of value.targets) {
      if (isObject(t) && typeof t.path === 'string') {
        targets.push({ path: t.path, available: t.available !== false });
      } else if (typeof t === 'string') {
        targets.push({ path: t, available: true });
      } else {
        throw new ProtocolError('mirrord ls printed a target without a path', stdout);
      }
    }
    return {
      targets,
      currentNamespace: typeof value.current_namespace === 'string' ? value.current_namespace : null,
      namespaces: isStringArray(value.namespaces) ? value.namespaces : [],
    };
  }
  throw new ProtocolError('mirrord ls printed neither a list of targets nor {targets, ...}', stdout);
}

// -- mirrord daemon status --json ------------------------------------------------------------

export interface Subscription {
  port: number;
  mode: string;
  /** The HTTP filter without its `ports` key, as `key: value` texts. */
  filter: string[];
}

export interface SessionInfo {
  id: string;
  target: string;
  label: string;
  state: string;
  clientPid: number | null;
  agent: string;
  created: number;
  processes: number[];
  channels: number;
  bytesToAgent: number;
  bytesToUser: number;
  subscriptions: Subscription[];
  kernelDrops: Record<string, number>;
  warnings: string[];
}

export interface AgentInfo {
  key: string;
  description: string;
  pid: number | null;
  alive: boolean;
  lingering: boolean;
  sessions: string[];
  channels: number;
  connections: number;
  /** Mirrored port → packets dropped by the kernel before the agent's sniffer read them. */
  kernelDrops: Record<string, number>;
  started: number;
}

export type DaemonStatus =
  | { running: false; runtimeDir: string }
  | {
      running: true;
      pid: number;
      version: string;
      runtimeDir: string;
      sessions: SessionInfo[];
      agents: AgentInfo[];
    };

function num(value: Json, fallback = 0): number {
  return typeof value === 'number' && Number.isFinite(value) ? value : fallback;
}

function str(value: Json, fallback = ''): string {
  return typeof value === 'string' ? value : fallback;
}

function drops(value: Json): Record<string, number> {
  const out: Record<string, number> = {};
  if (isObject(value)) {
    for (const [port, v] of Object.entries(value)) {
      // sessions carry {port: n}; agents' traffic carries {port: {packets, kernel_drops}}
      out[port] = isObject(v) ? num(v.kernel_drops) : num(v);
    }
  }
  return out;
}

function subscription(value: Json): Subscription | undefined {
  if (!isObject(value) || typeof value.port !== 'number') {
    return undefined;
  }
  const filter: string[] = [];
  if (isObject(value.http_filter)) {
    for (const [k, v] of Object.entries(value.http_filter)) {
      if (k !== 'ports' && v !== null && v !== undefined) {
        filter.push(`${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`);
      }
    }
  }
  return { port: value.port, mode: str(value.mode, '?'), filter };
}

function session(value: Json): SessionInfo {
  if (!isObject(value) || typeof value.id !== 'string') {
    throw new ProtocolError('a session without an id', JSON.stringify(value));
  }
  const subs = Array.isArray(value.subscriptions) ? value.subscriptions : [];
  return {
    id: value.id,
    target: str(value.target, '?'),
    label: str(value.label),
    state: str(value.state, '?'),
    clientPid: typeof value.client_pid === 'number' ? value.client_pid : null,
    agent: str(value.agent),
    created: num(value.created),
    processes: Array.isArray(value.processes)
      ? value.processes.filter((p): p is number => typeof p === 'number')
      : [],
    channels: num(value.channels),
    bytesToAgent: num(value.bytes_to_agent),
    bytesToUser: num(value.bytes_to_user),
    subscriptions: subs.map(subscription).filter((s): s is Subscription => s !== undefined),
    kernelDrops: drops(value.kernel_drops),
    warnings: isStringArray(value.warnings) ? value.warnings : [],
  };
}

function agent(value: Json): AgentInfo {
  if (!isObject(value) || typeof value.key !== 'string') {
    throw new ProtocolError('an agent without a key', JSON.stringify(value));
  }
  const link = isObject(value.link) ? value.link : {};
  return {
    key: value.key,
    description: str(value.description),
    pid: typeof value.pid === 'number' ? value.pid : null,
    alive: value.alive !== false,
    lingering: typeof value.idle_since === 'number',
    sessions: isStringArray(value.sessions) ? value.sessions : [],
    channels: num(link.channels),
    connections: num(link.connections),
    kernelDrops: drops(link.traffic),
    started: num(value.started),
  };
}

/** `mirrord daemon status --json`: exit code 3 and `{"running": false}` when none runs. */
export function parseDaemonStatus(stdout: string): DaemonStatus {
  const value = parseJson(stdout.trim(), 'mirrord daemon status --json printed something that');
  if (!isObject(value)) {
    throw new ProtocolError('mirrord daemon status --json printed no object', stdout);
  }
  if (value.running === false) {
    return { running: false, runtimeDir: str(value.runtime_dir) };
  }
  const daemon = isObject(value.daemon) ? value.daemon : {};
  return {
    running: true,
    pid: num(daemon.pid),
    version: str(daemon.version),
    runtimeDir: str(daemon.runtime_dir),
    sessions: Array.isArray(value.sessions) ? value.sessions.map(session) : [],
    agents: Array.isArray(value.agents) ? value.agents.map(agent) : [],
  };
}
