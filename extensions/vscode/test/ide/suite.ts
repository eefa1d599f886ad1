/**
 * Integration suite, run by VS Code's extension host (code-server) through the workbench's
 * `extensionTestsPath`: the mirrord extension installed from its .vsix, real debug sessions
 * (js-debug for node, debugpy's adapter for python) against a local pod, the target pick
 * against `mirrord ls`, errors of the CLI, the sessions view. The page is read and
 * photographed by the driver (bridge.ts). Writes result.json: every check with its outcome.
 *
 * The scenario (pod target, its variable and file, config files) comes from the pytest that
 * made the pod: tests/ide/test_vscode.py.
 */

import * as fs from 'node:fs';
import * as path from 'node:path';

import * as vscode from 'vscode';

import { CliCommandError, MirrordCli } from '../../src/cli';
import type { MirrordApi } from '../../src/extension';
import type { DaemonStatus } from '../../src/protocol';
import { ask, screenshot, testDir, waitInPage, writeAtomic } from './bridge';

interface Scenario {
  workspace: string;
  /** The mirrord command (also in the mirrord.binaryPath setting). */
  mirrord: string;
  /** The test's runtime directory: the extension's daemon must be the test's. */
  runtimeDir: string;
  target: string;
  podVar: { name: string; value: string };
  podFile: { path: string; text: string };
  python: string;
  /** A config whose target does not exist: `mirrord ext` fails. */
  badTargetConfig: string;
  /** A config that `verify-config` rejects. */
  invalidConfig: string;
  /** A kubeconfig (in KUBECONFIG) points at the tests' API server: run the target pick. */
  kube: boolean;
}

interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

const checks: Check[] = [];

function check(name: string, ok: boolean, detail = ''): void {
  checks.push({ name, ok, detail });
  console.log(`${ok ? 'ok' : 'FAILED'}: ${name}${detail !== '' ? ` (${detail})` : ''}`);
}

async function step(name: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (err) {
    check(name, false, err instanceof Error ? (err.stack ?? err.message) : String(err));
    await screenshot(`failed-${name.replace(/[^a-z0-9]+/gi, '-')}`).catch(() => undefined);
    // what the failed step left: its debug sessions (their mirrord ext stop with them), a pick
    await vscode.debug.stopDebugging();
    await ask({ kind: 'press', key: 'Escape' }).catch(() => undefined);
  }
}

async function until<T>(
  probe: () => T | undefined | Promise<T | undefined>,
  what: string,
  timeoutMs: number,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await probe();
    if (value !== undefined) {
      return value;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out after ${String(timeoutMs / 1000)} s waiting for ${what}`);
}

// -- what the debug adapters say --------------------------------------------------------------

interface DapMessage {
  type?: string;
  event?: string;
  body?: { output?: string; threadId?: number; reason?: string };
}

const output: string[] = [];
const stopped: { session: vscode.DebugSession; threadId: number }[] = [];
const terminated = new Set<string>();

function rootOf(session: vscode.DebugSession): vscode.DebugSession {
  let s = session;
  while (s.parentSession !== undefined) {
    s = s.parentSession;
  }
  return s;
}

function trackDebugAdapters(): vscode.Disposable[] {
  return [
    vscode.debug.registerDebugAdapterTrackerFactory('*', {
      createDebugAdapterTracker: (session) => ({
        onDidSendMessage: (m: DapMessage) => {
          if (m.type !== 'event') {
            return;
          }
          if (m.event === 'output' && typeof m.body?.output === 'string') {
            output.push(m.body.output);
          } else if (m.event === 'stopped' && typeof m.body?.threadId === 'number') {
            stopped.push({ session, threadId: m.body.threadId });
          }
        },
      }),
    }),
    vscode.debug.onDidTerminateDebugSession((s) => {
      terminated.add(rootOf(s).id);
    }),
  ];
}

// -- reading the page --------------------------------------------------------------------------

/** The texts of the notification toasts on screen. */
const NOTIFICATIONS = `[...document.querySelectorAll('.notifications-toasts .notification-toast')]
  .map((t) => t.innerText)`;

/** The rows of the mirrord view. */
const SESSIONS_VIEW = `[...document.querySelectorAll('[id="workbench.view.extension.mirrord"] .monaco-list-row, .pane-body .monaco-list-row')]
  .filter((r) => r.closest('[id*="mirrord"]'))
  .map((r) => r.getAttribute('aria-label') || r.innerText)`;

/** The quick input's rows once it has them and is not loading. */
const QUICK_PICK = `(() => {
  const w = document.querySelector('.quick-input-widget');
  if (!w || w.style.display === 'none') return null;
  const rows = [...w.querySelectorAll('.monaco-list-row')];
  if (rows.length === 0) return null;
  return rows.map((r) => r.getAttribute('aria-label') || r.innerText);
})()`;

async function statusBarText(): Promise<string[]> {
  return waitInPage<string[]>(
    `[...document.querySelectorAll('.statusbar-item')].map((e) => e.innerText).filter((t) => t.includes('mirrord'))`,
    'the mirrord status bar item',
  );
}

// -- the steps ---------------------------------------------------------------------------------

function cliFor(scenario: Scenario): MirrordCli {
  return new MirrordCli({ binary: scenario.mirrord, cwd: scenario.workspace });
}

async function sessionsOf(cli: MirrordCli, target: string): Promise<DaemonStatus & { running: true }> {
  const status = await cli.daemonStatus();
  if (!status.running) {
    throw new Error('no daemon runs');
  }
  return { ...status, sessions: status.sessions.filter((s) => s.target === target) };
}

async function debugAtBreakpoint(
  scenario: Scenario,
  folder: vscode.WorkspaceFolder,
  opts: {
    prefix: string;
    program: string;
    line: number;
    variable: string;
    config: vscode.DebugConfiguration;
  },
): Promise<void> {
  const cli = cliFor(scenario);
  const uri = vscode.Uri.file(opts.program);
  vscode.debug.removeBreakpoints(vscode.debug.breakpoints);
  vscode.debug.addBreakpoints([
    new vscode.SourceBreakpoint(new vscode.Location(uri, new vscode.Position(opts.line - 1, 0))),
  ]);
  await vscode.window.showTextDocument(uri);
  output.length = 0;
  stopped.length = 0;
  const before = new Set(terminated);
  const started = await vscode.debug.startDebugging(folder, opts.config);
  check(`${opts.prefix}: the debug session starts through mirrord`, started);
  if (!started) {
    return;
  }
  const hit = await until(() => stopped[0], `${opts.prefix} to stop at the breakpoint`, 180_000);
  const root = rootOf(hit.session);
  const trace = (await hit.session.customRequest('stackTrace', {
    threadId: hit.threadId,
    startFrame: 0,
    levels: 1,
  })) as { stackFrames: { id: number; line: number; source?: { path?: string } }[] };
  const frame = trace.stackFrames[0];
  check(
    `${opts.prefix}: stopped at the breakpoint (${path.basename(opts.program)}:${String(opts.line)})`,
    frame?.line === opts.line,
    JSON.stringify(frame),
  );
  const value = (await hit.session.customRequest('evaluate', {
    expression: opts.variable,
    frameId: frame?.id,
    context: 'watch',
  })) as { result: string };
  check(
    `${opts.prefix}: at the breakpoint the program holds the pod's ${scenario.podVar.name}`,
    value.result.includes(scenario.podVar.value),
    value.result,
  );
  await screenshot(`${opts.prefix}-1-breakpoint`);

  // the sessions view lists the running session, as the daemon does
  await vscode.commands.executeCommand('workbench.view.extension.mirrord');
  await vscode.commands.executeCommand('mirrord.sessions.refresh');
  const daemon = await sessionsOf(cli, scenario.target);
  check(
    `${opts.prefix}: the daemon has one session on ${scenario.target}`,
    daemon.sessions.length === 1,
    JSON.stringify(daemon.sessions.map((s) => s.id)),
  );
  const session = daemon.sessions[0];
  check(
    `${opts.prefix}: the debugger's own port is not subscribed in the pod`,
    session?.subscriptions.length === 0,
    JSON.stringify(session?.subscriptions),
  );
  const rows = await waitInPage<string[]>(
    `(${SESSIONS_VIEW}).filter((t) => t.includes(${JSON.stringify(scenario.target)}))`,
    'the session in the mirrord view',
  );
  check(`${opts.prefix}: the mirrord view lists the session`, rows.length > 0, rows.join(' | '));
  await screenshot(`${opts.prefix}-2-sessions-view`);
  await vscode.commands.executeCommand('workbench.view.explorer');

  await hit.session.customRequest('continue', { threadId: hit.threadId });
  const expected = [`env ${scenario.podVar.value}`, `file ${scenario.podFile.text}`];
  await until(
    () => (expected.every((e) => output.join('').includes(e)) ? true : undefined),
    `${opts.prefix} to print ${JSON.stringify(expected)}`,
    60_000,
  ).catch(() => undefined);
  const printed = output.join('');
  for (const e of expected) {
    check(`${opts.prefix}: the program printed "${e}"`, printed.includes(e), printed.slice(-500));
  }
  await vscode.commands.executeCommand('workbench.debug.action.toggleRepl');
  await until(
    () => (terminated.has(root.id) && !before.has(root.id) ? true : undefined),
    `${opts.prefix}'s debug session to end`,
    60_000,
  );
  await screenshot(`${opts.prefix}-3-output`);
  await vscode.commands.executeCommand('workbench.action.closePanel');
  // the program has exited: `mirrord ext` ends the session
  const gone = await until(
    async () => ((await sessionsOf(cli, scenario.target)).sessions.length === 0 ? true : undefined),
    'the session to end with its program',
    60_000,
  ).catch(() => false);
  check(`${opts.prefix}: the session ends with the program`, gone);
}

async function errorShown(
  folder: vscode.WorkspaceFolder,
  opts: { prefix: string; configFile: string; expected: string; help: boolean },
): Promise<void> {
  await vscode.commands.executeCommand('notifications.clearAll');
  const started = await vscode.debug.startDebugging(folder, {
    type: 'node',
    request: 'launch',
    name: `node: ${opts.prefix}`,
    program: path.join(folder.uri.fsPath, 'app.js'),
    console: 'internalConsole',
    env: { MIRRORD_CONFIG_FILE: opts.configFile },
  });
  check(`${opts.prefix}: the launch is abandoned`, !started);
  const shown = await waitInPage<string[]>(
    `(${NOTIFICATIONS}).filter((t) => t.includes(${JSON.stringify(opts.expected.slice(0, 80))}))`,
    `a notification with ${JSON.stringify(opts.expected)}`,
  );
  check(`${opts.prefix}: the notification shows the CLI's message`, shown.length > 0, shown.join(' | '));
  if (opts.help) {
    const buttons = await ask({
      kind: 'evaluate',
      expression: `[...document.querySelectorAll('.notifications-toasts .notification-toast .monaco-button')].map((b) => b.innerText.trim())`,
    });
    check(
      `${opts.prefix}: the notification offers the CLI's help`,
      Array.isArray(buttons) && buttons.includes('Help'),
      JSON.stringify(buttons),
    );
  }
  await screenshot(opts.prefix);
  await vscode.commands.executeCommand('notifications.clearAll');
}

/** The stop button of the session's row in the mirrord view ends the session. */
async function stopFromView(scenario: Scenario, folder: vscode.WorkspaceFolder): Promise<void> {
  const cli = cliFor(scenario);
  const program = path.join(scenario.workspace, 'app.py');
  vscode.debug.removeBreakpoints(vscode.debug.breakpoints);
  vscode.debug.addBreakpoints([
    new vscode.SourceBreakpoint(new vscode.Location(vscode.Uri.file(program), new vscode.Position(3, 0))),
  ]);
  stopped.length = 0;
  const started = await vscode.debug.startDebugging(folder, {
    type: 'debugpy',
    request: 'launch',
    name: 'python: stop from the view',
    program,
    python: scenario.python,
    console: 'internalConsole',
  });
  check('06-stop: the debug session starts', started);
  await until(() => stopped[0], 'the program to stop at the breakpoint', 180_000);
  await vscode.commands.executeCommand('workbench.view.extension.mirrord');
  await vscode.commands.executeCommand('mirrord.sessions.refresh');
  const session = (await sessionsOf(cli, scenario.target)).sessions[0];
  check('06-stop: the daemon has the session', session !== undefined);
  if (session === undefined) {
    return;
  }
  const row = `.monaco-list-row[aria-label*=${JSON.stringify(scenario.target)}]`;
  await waitInPage<boolean>(`!!document.querySelector(${JSON.stringify(row)})`, 'the session row');
  await ask({
    kind: 'click',
    hover: row,
    selector: `${row} .action-label[aria-label="Stop session"]`,
  });
  const ended = (): Promise<boolean> =>
    until(
      async () =>
        (await sessionsOf(cli, scenario.target)).sessions.some((s) => s.id === session.id) ? undefined : true,
      'the session to end',
      20_000,
    ).catch(() => false);
  const gone = await ended();
  check('06-stop: the stop button of the mirrord view ends the session', gone);
  check(
    '06-stop: and its debug session',
    await until(() => (vscode.debug.activeDebugSession === undefined ? true : undefined), 'no debug session', 20_000).catch(
      () => false,
    ),
  );
  await vscode.commands.executeCommand('mirrord.sessions.refresh');
  const rows = (await ask({ kind: 'evaluate', expression: SESSIONS_VIEW })) as string[];
  check(
    '06-stop: the mirrord view no longer lists it',
    !rows.some((r) => r.includes(scenario.target) && r.includes('open')),
    rows.join(' | '),
  );
  await screenshot('06-stop-from-view');
  await vscode.debug.stopDebugging();

  // the daemon log, through `mirrord daemon logs`
  await vscode.commands.executeCommand('mirrord.daemon.showLog');
  const log = await until(
    () => {
      const text = vscode.window.activeTextEditor?.document.getText() ?? '';
      return text.includes(`session ${session.id}`) ? text : undefined;
    },
    'the daemon log in an editor',
    30_000,
  ).catch(() => '');
  check("06-stop: 'Show daemon log' shows the daemon's log of the session", log !== '');
  await screenshot('07-daemon-log');
  await vscode.commands.executeCommand('workbench.action.closeAllEditors');
  await vscode.commands.executeCommand('workbench.view.explorer');
}

/** The config schema is contributed: VS Code's JSON support flags a value it does not allow. */
async function schemaChecks(scenario: Scenario): Promise<void> {
  const uri = vscode.Uri.file(scenario.invalidConfig);
  // jsonValidation's fileMatch covers .mirrord/*.json: a copy of the invalid file there
  const inFolder = vscode.Uri.file(path.join(scenario.workspace, '.mirrord', 'broken.json'));
  fs.copyFileSync(uri.fsPath, inFolder.fsPath);
  await vscode.window.showTextDocument(inFolder);
  const problems = await until(
    () => {
      const d = vscode.languages.getDiagnostics(inFolder);
      return d.length > 0 ? d : undefined;
    },
    'diagnostics of .mirrord/broken.json',
    60_000,
  ).catch(() => []);
  check(
    'schema: an invalid value in .mirrord/*.json is flagged by the contributed schema',
    // (not a note about the schema's draft: a complaint about the value)
    problems.some((p) => /not accepted|incorrect type|expected|does not match|not valid/i.test(p.message)),
    JSON.stringify(problems.map((p) => p.message)),
  );
  await vscode.commands.executeCommand('workbench.actions.view.problems');
  await screenshot('08-schema-problem');
  await vscode.commands.executeCommand('workbench.action.closeAllEditors');
  await vscode.commands.executeCommand('workbench.action.closePanel');
  fs.rmSync(inFolder.fsPath);
}

async function targetPick(scenario: Scenario): Promise<void> {
  const cli = cliFor(scenario);
  const configFile = path.join(scenario.workspace, '.mirrord', 'mirrord.json');
  const listed = await cli.listTargets({ configFile });
  const available = listed.targets.filter((t) => t.available).map((t) => t.path);
  check('target pick: mirrord ls lists targets', available.length > 0, JSON.stringify(listed));
  const picked = vscode.commands.executeCommand<string | undefined>('mirrord.selectTarget');
  const rows = await waitInPage<string[]>(QUICK_PICK, 'the target pick');
  await screenshot('06-target-pick');
  for (const target of available) {
    check(`target pick: lists ${target}`, rows.some((r) => r.includes(target)), rows.join(' | '));
  }
  check('target pick: offers targetless', rows.some((r) => r.includes('targetless')), rows.join(' | '));
  for (const ns of listed.namespaces.filter((n) => n !== listed.currentNamespace)) {
    check(
      `target pick: offers namespace ${ns}`,
      rows.some((r) => r.includes(`namespace ${ns}`)),
      rows.join(' | '),
    );
  }
  const choice = available[available.length - 1] ?? 'targetless';
  await ask({ kind: 'type', text: choice });
  await new Promise((r) => setTimeout(r, 500));
  await ask({ kind: 'press', key: 'Enter' });
  const result = await picked;
  check('target pick: returns the picked target', result === choice, String(result));
  // picked again: the recent target comes first
  const again = vscode.commands.executeCommand<string | undefined>('mirrord.selectTarget');
  const rowsAgain = await waitInPage<string[]>(QUICK_PICK, 'the target pick (second time)');
  await screenshot('07-target-pick-recent-first');
  const firstTarget = rowsAgain.find((r) => available.some((t) => r.includes(t)));
  check(
    'target pick: the recent target is first',
    firstTarget?.includes(choice) === true && firstTarget.includes('recent'),
    rowsAgain.join(' | '),
  );
  await ask({ kind: 'press', key: 'Escape' });
  check('target pick: Escape picks nothing', (await again) === undefined);
}

export async function run(): Promise<void> {
  const dir = testDir();
  const scenario = JSON.parse(fs.readFileSync(path.join(dir, 'scenario.json'), 'utf8')) as Scenario;
  const trackers = trackDebugAdapters();
  try {
    const folder = vscode.workspace.workspaceFolders?.[0];
    if (folder === undefined) {
      throw new Error('code-server opened no workspace folder');
    }
    await step('activate', async () => {
      const ext = vscode.extensions.getExtension<MirrordApi>('mirrord.mirrord');
      check('the extension is installed (from the .vsix)', ext !== undefined, ext?.extensionPath ?? '');
      if (ext === undefined) {
        return;
      }
      // code-server replaces PATH with the login shell's: the test passes its mirrord in the
      // mirrord.binaryPath setting; its own variables must still be there
      check(
        "the extension host has the test's MIRRORD_RUNTIME_DIR",
        process.env.MIRRORD_RUNTIME_DIR === scenario.runtimeDir,
        String(process.env.MIRRORD_RUNTIME_DIR),
      );
      const api = await ext.activate();
      await api.setEnabled(true);
      const texts = await statusBarText();
      await until(
        async () => ((await statusBarText()).some((t) => t.includes('mirrord: on')) ? true : undefined),
        'the status bar to say mirrord: on',
        30_000,
      );
      check('the status bar toggle is on', true, texts.join(' | '));
      await screenshot('01-status-bar-on');
    });
    const ws = scenario.workspace;
    await step('node', () =>
      debugAtBreakpoint(scenario, folder, {
        prefix: '02-node',
        program: path.join(ws, 'app.js'),
        line: 4,
        variable: 'v',
        config: {
          type: 'node',
          request: 'launch',
          name: 'node: app.js',
          program: path.join(ws, 'app.js'),
          console: 'internalConsole',
          outputCapture: 'std',
        },
      }),
    );
    await step('python', () =>
      debugAtBreakpoint(scenario, folder, {
        prefix: '03-python',
        program: path.join(ws, 'app.py'),
        line: 4,
        variable: 'v',
        config: {
          type: 'debugpy',
          request: 'launch',
          name: 'python: app.py',
          program: path.join(ws, 'app.py'),
          python: scenario.python,
          console: 'internalConsole',
          justMyCode: true,
        },
      }),
    );
    await step('invalid config', () =>
      errorShown(folder, {
        prefix: '04-error-invalid-config',
        configFile: scenario.invalidConfig,
        expected: 'is not a valid mirrord config',
        help: false,
      }),
    );
    await step('cli error', async () => {
      // what the CLI itself says about this config, through the same protocol
      let expected = '';
      let help = false;
      try {
        const session = await cliFor(scenario).startSession({ configFile: scenario.badTargetConfig });
        session.stop();
      } catch (err) {
        if (err instanceof CliCommandError) {
          expected = err.message.split('\n')[0] ?? '';
          help = err.error.help !== '';
        } else {
          throw err;
        }
      }
      check('cli error: mirrord ext fails for a target that does not exist', expected !== '', expected);
      await errorShown(folder, {
        prefix: '05-error-from-cli',
        configFile: scenario.badTargetConfig,
        expected,
        help,
      });
    });
    await step('stop from the view', () => stopFromView(scenario, folder));
    await step('schema', () => schemaChecks(scenario));
    if (scenario.kube) {
      await step('target pick', () => targetPick(scenario));
    }
  } finally {
    for (const t of trackers) {
      t.dispose();
    }
    writeAtomic(path.join(dir, 'result.json'), { checks });
  }
}
