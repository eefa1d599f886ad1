/**
 * The extension: the status bar toggle, mirrord in every supported debug launch, the sessions
 * view and the commands.
 *
 * Owns: wiring VS Code to the CLI. A launch with mirrord on goes: config file (configFile.ts)
 * → `mirrord verify-config --ide` → target pick when the config names none (targetPick.ts) →
 * `mirrord ext` with a progress notification → the session's environment merged into the
 * launch configuration (launch.ts). The `mirrord ext` process lives as long as the session;
 * it is stopped when the debug session ends.
 * Does not own: the protocol (protocol.ts), running processes (cli.ts), the view's content
 * (sessionsModel.ts). Never links or re-implements the layer or the daemon.
 */

import * as fs from 'node:fs';

import * as vscode from 'vscode';

import { CancelledError, CliCommandError, CliNotFoundError, type ExtSession, MirrordCli } from './cli';
import { chooseConfigFile, ConfigFileError, createStarterConfig } from './configFile';
import {
  activeOverride,
  applyEnvironment,
  debugKind,
  executableOf,
  withPatchedPath,
  isActive,
  type LaunchConfig,
  launchConfigFile,
  sessionVariables,
  startsProgram,
} from './launch';
import { type ProgressMessage, ProtocolError } from './protocol';
import type { TreeNode } from './sessionsModel';
import { SessionsView } from './sessionsView';
import { pickTarget } from './targetPick';
import { remember, TARGETLESS } from './targets';

const ENABLED_KEY = 'mirrord.enabled';
const RECENT_KEY = 'mirrord.recentTargets';
/** Set in the launch configurations mirrord handled, to find their `mirrord ext` again. */
const LAUNCH_ID_KEY = '__mirrordLaunchId';

function settings(): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration('mirrord');
}

class Mirrord implements vscode.Disposable {
  private readonly output = vscode.window.createOutputChannel('mirrord');
  private readonly statusBar = vscode.window.createStatusBarItem(
    vscode.StatusBarAlignment.Left,
    100,
  );
  private readonly sessions = new Map<string, ExtSession>();
  /** The debug session of each launch mirrord handled (by launch id). */
  private readonly debugSessions = new Map<string, vscode.DebugSession>();
  private readonly view: SessionsView;
  private nextLaunch = 1;

  constructor(private readonly context: vscode.ExtensionContext) {
    this.statusBar.command = 'mirrord.toggle';
    this.statusBar.name = 'mirrord';
    this.updateStatusBar();
    this.statusBar.show();
    this.view = new SessionsView(
      () => this.cli(undefined).daemonStatus(),
      (err) => {
        this.showError(err);
      },
    );
  }

  get enabled(): boolean {
    return this.context.workspaceState.get<boolean>(
      ENABLED_KEY,
      settings().get<boolean>('enabledByDefault', false),
    );
  }

  async setEnabled(on: boolean): Promise<void> {
    await this.context.workspaceState.update(ENABLED_KEY, on);
    this.updateStatusBar();
  }

  private updateStatusBar(): void {
    const on = this.enabled;
    this.statusBar.text = on ? '$(mirror) mirrord: on' : '$(circle-slash) mirrord: off';
    this.statusBar.tooltip = on
      ? 'mirrord is on: debug sessions run as if inside the target. Click to turn it off.'
      : 'mirrord is off. Click to turn it on for debug sessions.';
    this.statusBar.backgroundColor = on
      ? new vscode.ThemeColor('statusBarItem.warningBackground')
      : undefined;
  }

  cli(folder: vscode.WorkspaceFolder | undefined): MirrordCli {
    const cwd = folder?.uri.fsPath ?? vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
    return new MirrordCli({
      binary: settings().get<string>('binaryPath', 'mirrord'),
      cwd,
      log: (line) => {
        this.output.appendLine(line);
      },
    });
  }

  log(line: string): void {
    this.output.appendLine(line);
  }

  // -- errors and messages -----------------------------------------------------------------

  /** Shows an error without waiting for the user (a launch must not hang on a notification). */
  showError(err: unknown): void {
    if (err instanceof CancelledError) {
      return;
    }
    const message = err instanceof Error ? err.message : String(err);
    this.log(`error: ${message}`);
    if (err instanceof CliCommandError) {
      const { help, causes } = err.error;
      const actions = help !== '' ? ['Help', 'Show output'] : ['Show output'];
      void vscode.window.showErrorMessage(`mirrord: ${message}`, ...actions).then((choice) => {
        if (choice === 'Help') {
          const detail = [help, ...causes.map((c) => `caused by: ${c}`)].join('\n');
          void vscode.window.showInformationMessage(`mirrord: ${message}`, { modal: true, detail });
        } else if (choice === 'Show output') {
          this.output.show(true);
        }
      });
    } else if (err instanceof CliNotFoundError || err instanceof ProtocolError) {
      void vscode.window
        .showErrorMessage(`mirrord: ${message}`, 'Open settings', 'Show output')
        .then((choice) => {
          if (choice === 'Open settings') {
            void vscode.commands.executeCommand('workbench.action.openSettings', 'mirrord.binaryPath');
          } else if (choice === 'Show output') {
            this.output.show(true);
          }
        });
    } else {
      void vscode.window.showErrorMessage(`mirrord: ${message}`);
    }
  }

  private showMessage(message: ProgressMessage): void {
    switch (message.type) {
      case 'Warning':
        this.log(`warning: ${message.message}`);
        void vscode.window.showWarningMessage(`mirrord: ${message.message}`);
        break;
      case 'Info':
        this.log(`info: ${message.message}`);
        void vscode.window.showInformationMessage(`mirrord: ${message.message}`);
        break;
      case 'IdeMessage': {
        const { text, level, actions } = message.message;
        this.log(`${level.toLowerCase()}: ${text}`);
        const show =
          level === 'Warning' ? vscode.window.showWarningMessage : vscode.window.showInformationMessage;
        void show(`mirrord: ${text}`, ...actions.map((a) => a.label)).then((choice) => {
          const action = actions.find((a) => a.label === choice);
          if (action !== undefined) {
            void vscode.env.openExternal(vscode.Uri.parse(action.link));
          }
        });
        break;
      }
      default:
        break;
    }
  }

  // -- the launch --------------------------------------------------------------------------

  async resolveLaunch(
    folder: vscode.WorkspaceFolder | undefined,
    config: vscode.DebugConfiguration,
    token: vscode.CancellationToken | undefined,
  ): Promise<vscode.DebugConfiguration | undefined> {
    const launch: LaunchConfig = config;
    const kind = debugKind(launch.type);
    if (kind === undefined || config[LAUNCH_ID_KEY] !== undefined || !startsProgram(launch)) {
      if (kind === undefined && activeOverride(launch) === true) {
        void vscode.window.showWarningMessage(
          `mirrord: debug type "${launch.type}" is not supported (node, python/debugpy, go, java, cppdbg, node-terminal are)`,
        );
      }
      return config;
    }
    if (!isActive(launch, this.enabled)) {
      return config;
    }
    this.log(`launch "${launch.name}" (${launch.type}) with mirrord`);
    const cli = this.cli(folder);
    try {
      const configFile = chooseConfigFile({
        fromLaunch: launchConfigFile(launch),
        setting: settings().get<string>('configPath', ''),
        autoDetect: settings().get<boolean>('autoDetectConfig', true),
        folder: folder?.uri.fsPath,
      });
      let target: string | undefined;
      let namespace: string | undefined;
      let ask = true;
      if (configFile !== undefined) {
        this.log(`config file ${configFile}`);
        const verified = await cli.verifyConfig(configFile);
        if (!verified.ok) {
          this.log(`invalid config ${configFile}: ${verified.errors.join('; ')}`);
          void vscode.window
            .showErrorMessage(
              `mirrord: ${configFile} is not a valid mirrord config: ${verified.errors.join('; ')}`,
              'Open config',
            )
            .then((choice) => {
              if (choice === 'Open config') {
                void vscode.window.showTextDocument(vscode.Uri.file(configFile));
              }
            });
          return undefined;
        }
        for (const warning of verified.warnings) {
          void vscode.window.showWarningMessage(`mirrord: ${warning}`);
        }
        ask = verified.target.kind === 'ask';
        namespace = verified.namespace ?? undefined;
      }
      if (ask) {
        const picked = await pickTarget(cli, {
          configFile,
          namespace,
          recent: this.recentTargets(),
          targetTypes: settings().get<string[]>('targetTypes', []),
        });
        if (picked === undefined) {
          this.log('no target picked: launch cancelled');
          return undefined;
        }
        target = picked.target;
        namespace = picked.namespace ?? namespace;
        await this.context.workspaceState.update(RECENT_KEY, remember(this.recentTargets(), target));
      }
      const session = await this.startSession(cli, {
        target,
        configFile,
        executable: executableOf(launch),
        namespace: target !== undefined && target !== TARGETLESS ? namespace : undefined,
        token,
      });
      const ready = session.ready;
      if (ready === undefined) {
        throw new Error('mirrord ext ended before the session was ready');
      }
      const variables = sessionVariables(ready, kind, {
        ignoreDebuggerPorts: settings().get<string>('ignoreDebuggerPorts', '45000-65535'),
      });
      const launchId = `${String(process.pid)}-${String(this.nextLaunch++)}`;
      const patched = withPatchedPath(launch, ready.patchedPath);
      const resolved = applyEnvironment(patched, kind, variables, ready.envToUnset);
      resolved[LAUNCH_ID_KEY] = launchId;
      this.sessions.set(launchId, session);
      void session.exited().then((code) => {
        this.log(`mirrord ext for "${launch.name}" exited (${String(code)})`);
        this.sessions.delete(launchId);
        void this.view.refresh(true);
      });
      this.log(`session ${session.sessionId ?? '?'} ready for "${launch.name}"`);
      void this.view.refresh(true);
      return resolved;
    } catch (err) {
      if (err instanceof ConfigFileError) {
        void vscode.window.showErrorMessage(`mirrord: ${err.message}`);
      } else {
        this.showError(err);
      }
      return undefined;
    }
  }

  private startSession(
    cli: MirrordCli,
    request: {
      target: string | undefined;
      configFile: string | undefined;
      executable: string | undefined;
      namespace: string | undefined;
      token: vscode.CancellationToken | undefined;
    },
  ): Promise<ExtSession> {
    return Promise.resolve(
      vscode.window.withProgress(
        {
          location: vscode.ProgressLocation.Notification,
          title: 'mirrord',
          cancellable: true,
        },
        (progress, cancel) => {
          const abort = new AbortController();
          cancel.onCancellationRequested(() => {
            abort.abort();
          });
          request.token?.onCancellationRequested(() => {
            abort.abort();
          });
          progress.report({ message: `starting (${request.target ?? 'target from the config'})` });
          return cli.startSession({
            target: request.target,
            configFile: request.configFile,
            executable: request.executable,
            namespace: request.namespace,
            signal: abort.signal,
            onMessage: (message) => {
              if (message.type === 'NewTask') {
                this.log(`task: ${message.name}`);
                progress.report({ message: message.name });
              } else if (message.type === 'FinishedTask') {
                this.log(
                  `done: ${message.name}${message.success ? '' : ' (failed)'}${message.message !== null && message.name !== 'mirrord preparing to launch' ? `: ${message.message}` : ''}`,
                );
                progress.report({
                  message: `${message.name}${message.success ? ' ✓' : ' ✗'}`,
                });
              } else {
                this.showMessage(message);
              }
            },
          });
        },
      ),
    );
  }

  debugSessionStarted(session: vscode.DebugSession): void {
    const id = session.configuration[LAUNCH_ID_KEY] as unknown;
    if (typeof id === 'string' && session.parentSession === undefined) {
      this.debugSessions.set(id, session);
    }
  }

  /** Stops `mirrord ext` of launches whose debug session ended. */
  debugSessionEnded(session: vscode.DebugSession): void {
    const id = session.configuration[LAUNCH_ID_KEY] as unknown;
    if (typeof id !== 'string' || session.parentSession !== undefined) {
      return;
    }
    this.debugSessions.delete(id);
    const ext = this.sessions.get(id);
    if (ext !== undefined) {
      this.log(`debug session "${session.name}" ended: stopping its mirrord session`);
      ext.stop();
    }
  }

  recentTargets(): string[] {
    return this.context.workspaceState.get<string[]>(RECENT_KEY, []);
  }

  // -- commands ----------------------------------------------------------------------------

  async selectTarget(): Promise<string | undefined> {
    const folder = vscode.workspace.workspaceFolders?.[0];
    try {
      const configFile = chooseConfigFile({
        setting: settings().get<string>('configPath', ''),
        autoDetect: settings().get<boolean>('autoDetectConfig', true),
        folder: folder?.uri.fsPath,
      });
      const picked = await pickTarget(this.cli(folder), {
        configFile,
        namespace: undefined,
        recent: this.recentTargets(),
        targetTypes: settings().get<string[]>('targetTypes', []),
      });
      if (picked === undefined) {
        return undefined;
      }
      await this.context.workspaceState.update(
        RECENT_KEY,
        remember(this.recentTargets(), picked.target),
      );
      this.log(`picked ${picked.target}`);
      return picked.target;
    } catch (err) {
      this.showError(err);
      return undefined;
    }
  }

  async createConfig(): Promise<string | undefined> {
    const folders = vscode.workspace.workspaceFolders ?? [];
    const folder =
      folders.length <= 1
        ? folders[0]
        : await vscode.window.showWorkspaceFolderPick({ placeHolder: 'Folder for .mirrord/mirrord.json' });
    if (folder === undefined) {
      void vscode.window.showErrorMessage('mirrord: open a folder first: the config goes into its .mirrord/');
      return undefined;
    }
    const { file, created } = createStarterConfig(folder.uri.fsPath);
    this.log(`${created ? 'created' : 'opened existing'} ${file}`);
    await vscode.window.showTextDocument(vscode.Uri.file(file));
    return file;
  }

  async stopSession(node: TreeNode | undefined): Promise<void> {
    const session = node?.session;
    if (session === undefined) {
      this.log(`stop: not a session (${node?.id ?? 'no item'})`);
      return;
    }
    const owned = [...this.sessions.entries()].find(([, s]) => s.sessionId === session.id);
    this.log(
      `stop session ${session.id}: ${owned !== undefined ? `its debug session and mirrord ext (pid ${String(owned[1].pid)})` : `mirrord pid ${String(session.clientPid)}`}`,
    );
    if (owned !== undefined) {
      // The session lives as long as its program: stop the debug session (the program), and
      // its `mirrord ext`, which then closes the session.
      const [launchId, ext] = owned;
      const debugSession = this.debugSessions.get(launchId);
      if (debugSession !== undefined) {
        await vscode.debug.stopDebugging(debugSession);
      }
      ext.stop();
    } else if (session.clientPid !== null && isMirrordProcess(session.clientPid)) {
      // Started elsewhere (`mirrord run` in a terminal, another window): its mirrord command
      // owns the session; SIGTERM makes `run` stop its command and `ext` close the session.
      process.kill(session.clientPid, 'SIGTERM');
    } else {
      void vscode.window.showErrorMessage(
        `mirrord: session ${session.id} has no mirrord command here to stop; "Stop the daemon" ends every session`,
      );
      return;
    }
    this.log(`stopping session ${session.id} (${session.target})`);
    await waitFor(async () => {
      await this.view.refresh(true);
      return !(this.view.status?.running === true && this.view.status.sessions.some((s) => s.id === session.id));
    }, 15_000);
  }

  async showDaemonLog(): Promise<void> {
    try {
      const text = await this.cli(undefined).daemonLogs(1000);
      const doc = await vscode.workspace.openTextDocument({ content: text, language: 'log' });
      await vscode.window.showTextDocument(doc, { preview: true });
    } catch (err) {
      this.showError(err);
    }
  }

  async stopDaemon(): Promise<void> {
    try {
      const text = await this.cli(undefined).daemonStop();
      this.log(text);
      void vscode.window.showInformationMessage(`mirrord: ${text}`);
    } catch (err) {
      this.showError(err);
    }
    await this.view.refresh(true);
  }

  refreshSessions(): Promise<void> {
    return this.view.refresh();
  }

  showOutput(): void {
    this.output.show(true);
  }

  dispose(): void {
    for (const session of this.sessions.values()) {
      session.stop();
    }
    this.view.dispose();
    this.statusBar.dispose();
    this.output.dispose();
  }
}

/** Whether `pid` runs a mirrord command (a pid from the daemon's status may have been reused). */
function isMirrordProcess(pid: number): boolean {
  try {
    return fs.readFileSync(`/proc/${String(pid)}/cmdline`, 'utf8').includes('mirrord');
  } catch {
    return false;
  }
}

async function waitFor(check: () => Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) {
      return true;
    }
    await new Promise((r) => setTimeout(r, 300));
  }
  return false;
}

/** What `activate` returns: for other extensions and the integration tests. */
export interface MirrordApi {
  readonly enabled: boolean;
  setEnabled(on: boolean): Promise<void>;
  recentTargets(): string[];
}

export function activate(context: vscode.ExtensionContext): MirrordApi {
  const mirrord = new Mirrord(context);
  context.subscriptions.push(
    mirrord,
    vscode.debug.registerDebugConfigurationProvider('*', {
      resolveDebugConfigurationWithSubstitutedVariables: (folder, config, token) =>
        mirrord.resolveLaunch(folder, config, token),
    }),
    vscode.debug.onDidStartDebugSession((session) => {
      mirrord.debugSessionStarted(session);
    }),
    vscode.debug.onDidTerminateDebugSession((session) => {
      mirrord.debugSessionEnded(session);
    }),
    vscode.commands.registerCommand('mirrord.toggle', () => mirrord.setEnabled(!mirrord.enabled)),
    vscode.commands.registerCommand('mirrord.selectTarget', () => mirrord.selectTarget()),
    vscode.commands.registerCommand('mirrord.createConfig', () => mirrord.createConfig()),
    vscode.commands.registerCommand('mirrord.sessions.refresh', () => mirrord.refreshSessions()),
    vscode.commands.registerCommand('mirrord.sessions.stop', (node?: TreeNode) =>
      mirrord.stopSession(node),
    ),
    vscode.commands.registerCommand('mirrord.daemon.showLog', () => mirrord.showDaemonLog()),
    vscode.commands.registerCommand('mirrord.daemon.stop', () => mirrord.stopDaemon()),
    vscode.commands.registerCommand('mirrord.showOutput', () => {
      mirrord.showOutput();
    }),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration('mirrord.enabledByDefault')) {
        void mirrord.setEnabled(mirrord.enabled);
      }
    }),
  );
  return {
    get enabled() {
      return mirrord.enabled;
    },
    setEnabled: (on) => mirrord.setEnabled(on),
    recentTargets: () => mirrord.recentTargets(),
  };
}

export function deactivate(): void {
  // Everything is in context.subscriptions.
}
