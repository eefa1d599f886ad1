/**
 * Running the mirrord CLI: every call the extension makes, with the IDE environment, limits
 * on time and output, and the CLI's errors as values.
 *
 * Owns: spawning `mirrord` (never through a shell), the variables every call carries
 * (`MIRRORD_PROGRESS_MODE=json`, `MIRRORD_PROGRESS_SUPPORT_IDE=true`, `MIRRORD_IDE_NAME=vscode`,
 * `MIRRORD_LS_RICH_OUTPUT=true`), the `mirrord ext` process of a session from its first line
 * to its end. Uses node only (no `vscode`), so the unit tests run it against the real CLI.
 * Does not own: parsing (protocol.ts) or showing anything (extension.ts).
 */

import { spawn, type ChildProcess } from 'node:child_process';
import * as os from 'node:os';
import * as readline from 'node:readline';

import {
  type CliError,
  type DaemonStatus,
  parseCliError,
  parseDaemonStatus,
  parseProgressLine,
  parseTargetList,
  parseVerify,
  type ProgressMessage,
  ProtocolError,
  readyEnv,
  type ReadyEnv,
  type TargetList,
  type VerifyResult,
} from './protocol';

/** mirrord's own extension gives `mirrord ext` this long to get the session ready. */
export const EXT_READY_TIMEOUT_MS = 120_000;
/** Output kept per stream: enough for any JSON answer; a runaway CLI cannot fill memory. */
const MAX_OUTPUT = 16 * 1024 * 1024;
const STDERR_TAIL = 64 * 1024;

/** A command that failed and said why (its `Error: {...}` line, or its stderr). */
export class CliCommandError extends Error {
  constructor(
    readonly command: string,
    readonly error: CliError,
    readonly exitCode: number | null,
  ) {
    super(error.message);
    this.name = 'CliCommandError';
  }
}

/** The binary cannot be started at all. */
export class CliNotFoundError extends Error {
  constructor(binary: string, reason: string) {
    super(
      `cannot run "${binary}" (${reason}): install mirrord (pip install mirrord) or set ` +
        'mirrord.binaryPath to its full path',
    );
    this.name = 'CliNotFoundError';
  }
}

/** The user cancelled (the progress notification's Cancel, or the launch was abandoned). */
export class CancelledError extends Error {
  constructor() {
    super('cancelled');
    this.name = 'CancelledError';
  }
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface CliOptions {
  /** `mirrord.binaryPath`: a path or a name on PATH; `~/` is expanded. */
  binary: string;
  /** Working directory of every call (the workspace folder: the CLI finds `.mirrord/` there). */
  cwd?: string | undefined;
  /** Environment of every call before the IDE variables (default: this process's). */
  env?: NodeJS.ProcessEnv | undefined;
  /** Every command line and stderr line, for the output channel. */
  log?: ((line: string) => void) | undefined;
}

export interface SessionRequest {
  target?: string | undefined;
  configFile?: string | undefined;
  executable?: string | undefined;
  /** Chosen in the target pick: `MIRRORD_TARGET_NAMESPACE`. */
  namespace?: string | undefined;
  onMessage?: ((message: ProgressMessage) => void) | undefined;
  signal?: AbortSignal | undefined;
  readyTimeoutMs?: number | undefined;
}

function expandHome(p: string): string {
  return p === '~' || p.startsWith('~/') ? os.homedir() + p.slice(1) : p;
}

export class MirrordCli {
  readonly binary: string;

  constructor(private readonly options: CliOptions) {
    this.binary = expandHome(options.binary.trim() === '' ? 'mirrord' : options.binary.trim());
  }

  /** The environment of a call: ours, the IDE protocol's variables, then `extra`. */
  env(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
    const merged: Record<string, string | undefined> = {
      ...(this.options.env ?? process.env),
      MIRRORD_PROGRESS_MODE: 'json',
      MIRRORD_PROGRESS_SUPPORT_IDE: 'true',
      MIRRORD_IDE_NAME: 'vscode',
      MIRRORD_LS_RICH_OUTPUT: 'true',
      ...extra,
    };
    // An `extra` value of undefined removes the variable (e.g. an inherited namespace).
    return Object.fromEntries(Object.entries(merged).filter(([, v]) => v !== undefined));
  }

  private log(line: string): void {
    this.options.log?.(line);
  }

  private spawn(args: string[], env: NodeJS.ProcessEnv): ChildProcess {
    this.log(`$ ${[this.binary, ...args].join(' ')}`);
    return spawn(this.binary, args, {
      cwd: this.options.cwd,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
  }

  /** Runs a command to its end (killed after `timeoutMs`). */
  run(
    args: string[],
    opts: { timeoutMs?: number; env?: Record<string, string | undefined> } = {},
  ): Promise<RunResult> {
    const timeoutMs = opts.timeoutMs ?? 60_000;
    return new Promise((resolve, reject) => {
      const child = this.spawn(args, this.env(opts.env));
      let stdout = '';
      let stderr = '';
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGTERM');
      }, timeoutMs);
      child.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
        if (stdout.length < MAX_OUTPUT) {
          stdout += chunk;
        }
      });
      child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
        stderr = (stderr + chunk).slice(-STDERR_TAIL);
      });
      child.on('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new CliNotFoundError(this.binary, err.code ?? err.message));
      });
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        for (const line of stderr.split('\n')) {
          if (line.trim() !== '') {
            this.log(`  ${line}`);
          }
        }
        if (timedOut) {
          reject(
            new CliCommandError(
              args.join(' '),
              parseCliError(
                `mirrord ${args[0] ?? ''} did not finish within ${String(timeoutMs / 1000)} s`,
                null,
              ),
              null,
            ),
          );
          return;
        }
        resolve({ code, signal, stdout, stderr });
      });
    });
  }

  private async runOk(
    args: string[],
    opts: { timeoutMs?: number; env?: Record<string, string | undefined> } = {},
  ): Promise<string> {
    const result = await this.run(args, opts);
    if (result.code !== 0) {
      throw new CliCommandError(
        `mirrord ${args.join(' ')}`,
        parseCliError(result.stderr, result.code),
        result.code,
      );
    }
    return result.stdout;
  }

  /** `mirrord --version` → "X.Y.Z" (the second word, as mirrord's extension reads it). */
  async version(): Promise<string> {
    const out = (await this.runOk(['--version'], { timeoutMs: 10_000 })).trim();
    const [name, version] = out.split(/\s+/);
    if (name !== 'mirrord' || version === undefined) {
      throw new ProtocolError('mirrord --version printed something else than "mirrord X.Y.Z"', out);
    }
    return version;
  }

  /** `mirrord verify-config --ide FILE`: Fail is a value (exit code 1 with JSON on stdout). */
  async verifyConfig(file: string): Promise<VerifyResult> {
    const result = await this.run(['verify-config', '--ide', file], { timeoutMs: 30_000 });
    if (result.stdout.trim() === '') {
      throw new CliCommandError(
        `mirrord verify-config --ide ${file}`,
        parseCliError(result.stderr, result.code),
        result.code,
      );
    }
    return parseVerify(result.stdout);
  }

  /** `mirrord ls [-f CFG] [-n NS]` with the rich output. */
  async listTargets(
    opts: { configFile?: string | undefined; namespace?: string | undefined; targetTypes?: string[] } = {},
  ): Promise<TargetList> {
    const args = ['ls'];
    if (opts.configFile !== undefined) {
      args.push('-f', opts.configFile);
    }
    if (opts.namespace !== undefined) {
      args.push('-n', opts.namespace);
    }
    const types = opts.targetTypes ?? [];
    const stdout = await this.runOk(args, {
      timeoutMs: 90_000,
      env: { MIRRORD_LS_TARGET_TYPES: types.length > 0 ? JSON.stringify(types) : undefined },
    });
    return parseTargetList(stdout);
  }

  /** `mirrord daemon status --json` (exit code 3 with `{"running": false}`: none runs). */
  async daemonStatus(): Promise<DaemonStatus> {
    const result = await this.run(['daemon', 'status', '--json'], { timeoutMs: 20_000 });
    if ((result.code === 0 || result.code === 3) && result.stdout.trim() !== '') {
      return parseDaemonStatus(result.stdout);
    }
    throw new CliCommandError(
      'mirrord daemon status --json',
      parseCliError(result.stderr, result.code),
      result.code,
    );
  }

  async daemonStop(): Promise<string> {
    return (await this.runOk(['daemon', 'stop'], { timeoutMs: 60_000 })).trim();
  }

  async daemonLogs(lines: number): Promise<string> {
    return this.runOk(['daemon', 'logs', '-n', String(lines)], { timeoutMs: 20_000 });
  }

  /** `mirrord schema`: the JSON schema of the config file. */
  async schema(): Promise<Record<string, unknown>> {
    const out = await this.runOk(['schema'], { timeoutMs: 30_000 });
    const value = JSON.parse(out) as unknown;
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      throw new ProtocolError('mirrord schema printed no JSON object', out);
    }
    return value as Record<string, unknown>;
  }

  /**
   * `mirrord ext`: resolves once the session is ready (the READY_TASK line) with the running
   * process, which stays until the session ends. Rejects with the CLI's error if it exits
   * first, a ProtocolError for a line that is not the protocol, a CancelledError when
   * `signal` aborts, or a CliCommandError after `readyTimeoutMs`.
   */
  startSession(request: SessionRequest): Promise<ExtSession> {
    const args = ['ext'];
    if (request.target !== undefined) {
      args.push('-t', request.target);
    }
    if (request.configFile !== undefined) {
      args.push('-f', request.configFile);
    }
    if (request.executable !== undefined) {
      args.push('-e', request.executable);
    }
    const env = this.env({ MIRRORD_TARGET_NAMESPACE: request.namespace });
    const timeoutMs = request.readyTimeoutMs ?? EXT_READY_TIMEOUT_MS;
    return new Promise((resolve, reject) => {
      if (request.signal?.aborted === true) {
        reject(new CancelledError());
        return;
      }
      const child = this.spawn(args, env);
      const session = new ExtSession(child);
      let settled = false;
      const settle = (err: Error | undefined): void => {
        if (settled) {
          return;
        }
        settled = true;
        clearTimeout(timer);
        request.signal?.removeEventListener('abort', onAbort);
        if (err === undefined) {
          resolve(session);
        } else {
          session.stop();
          reject(err);
        }
      };
      const onAbort = (): void => {
        settle(new CancelledError());
      };
      request.signal?.addEventListener('abort', onAbort);
      const timer = setTimeout(() => {
        settle(
          new CliCommandError(
            `mirrord ${args.join(' ')}`,
            parseCliError(
              `mirrord ext did not get the session ready within ${String(timeoutMs / 1000)} s; ` +
                'see "mirrord: Show output" and the daemon log',
              null,
            ),
            null,
          ),
        );
      }, timeoutMs);
      child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
        session.stderr = (session.stderr + chunk).slice(-STDERR_TAIL);
        for (const line of chunk.split('\n')) {
          if (line.trim() !== '') {
            this.log(`  ${line}`);
          }
        }
      });
      if (child.stdout !== null) {
        const lines = readline.createInterface({ input: child.stdout, crlfDelay: Infinity });
        lines.on('line', (line) => {
          if (line.trim() === '') {
            return;
          }
          let message: ProgressMessage;
          let ready: ReadyEnv | undefined;
          try {
            message = parseProgressLine(line);
            ready = readyEnv(message);
          } catch (err) {
            this.log(`  (not the protocol) ${line}`);
            if (!settled) {
              settle(err instanceof Error ? err : new Error(String(err)));
            }
            return;
          }
          request.onMessage?.(message);
          if (ready !== undefined) {
            session.ready = ready;
            settle(undefined);
          }
        });
      }
      child.on('error', (err: NodeJS.ErrnoException) => {
        settle(new CliNotFoundError(this.binary, err.code ?? err.message));
      });
      child.on('close', (code) => {
        session.markExited(code);
        if (!settled) {
          settle(
            new CliCommandError(`mirrord ${args.join(' ')}`, parseCliError(session.stderr, code), code),
          );
        }
      });
    });
  }
}

/** A running `mirrord ext`: the session lives as long as it does. */
export class ExtSession {
  ready: ReadyEnv | undefined;
  stderr = '';
  private exitCode: number | null | undefined;
  private readonly exitWaiters: ((code: number | null) => void)[] = [];

  constructor(readonly process: ChildProcess) {}

  get pid(): number | undefined {
    return this.process.pid;
  }

  get running(): boolean {
    return this.exitCode === undefined;
  }

  /** The daemon's session id (the layer's MIRRORD_SESSION), when the CLI gives it. */
  get sessionId(): string | undefined {
    return this.ready?.environment.MIRRORD_SESSION;
  }

  markExited(code: number | null): void {
    this.exitCode = code;
    for (const waiter of this.exitWaiters.splice(0)) {
      waiter(code);
    }
  }

  /** Resolves with the exit code when `mirrord ext` has exited. */
  exited(): Promise<number | null> {
    if (this.exitCode !== undefined) {
      return Promise.resolve(this.exitCode);
    }
    return new Promise((resolve) => this.exitWaiters.push(resolve));
  }

  /** Ends the session: SIGTERM to `mirrord ext` (its daemon connection closes the session). */
  stop(): void {
    if (this.running) {
      this.process.kill('SIGTERM');
    }
  }
}
