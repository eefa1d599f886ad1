/**
 * Driver of the integration suite: starts code-server (a real VS Code) with the mirrord
 * extension installed from its .vsix, opens its workbench in Debian's chromium (playwright-core)
 * with the `extensionDevelopmentPath`/`extensionTestsPath` payload so that the extension host
 * runs suite.ts, answers the suite's requests (screenshots, reading the page, typing), and
 * stops everything it started. Prints result.json's checks; exit code 0 when all passed.
 *
 * Usage: node out/test/ide/driver.js CONFIG.json (written by tests/ide/test_vscode.py).
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';

import { type Browser, chromium, type Page } from 'playwright-core';

import type { DriverRequest, DriverResponse } from './bridge';

interface DriverConfig {
  codeServer: string;
  chromium: string;
  port: number;
  workspace: string;
  /** The suite's files (scenario.json, requests/, responses/, result.json). */
  testDir: string;
  /** Screenshots and logs. */
  artifacts: string;
  /** Scratch for code-server: user data, extensions, home. */
  scratch: string;
  /** TMPDIR of code-server and what it starts (their sockets): short, for unix socket paths. */
  tmpDir: string;
  vsix: string;
  /** The extension under development: the debugpy fixture (the mirrord one is installed). */
  fixture: string;
  /** The compiled suite module (exports run()). */
  suite: string;
  timeoutMs: number;
  /** User settings added to the defaults below (e.g. mirrord.binaryPath). */
  settings?: Record<string, unknown>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function log(line: string): void {
  process.stderr.write(`driver: ${line}\n`);
}

function healthy(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/healthz', timeout: 2000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on('error', () => {
      resolve(false);
    });
    req.on('timeout', () => {
      req.destroy();
      resolve(false);
    });
  });
}

function codeServerEnv(cfg: DriverConfig): NodeJS.ProcessEnv {
  const home = path.join(cfg.scratch, 'home');
  return {
    ...process.env,
    // code-server writes a config (with a password) into the home: keep it in the scratch
    HOME: home,
    XDG_CONFIG_HOME: path.join(home, '.config'),
    XDG_DATA_HOME: path.join(home, '.local', 'share'),
    XDG_CACHE_HOME: path.join(home, '.cache'),
    MIRRORD_IDE_TEST_DIR: cfg.testDir,
    TMPDIR: cfg.tmpDir,
  };
}

function prepare(cfg: DriverConfig): void {
  const user = path.join(cfg.scratch, 'user', 'User');
  fs.mkdirSync(user, { recursive: true });
  fs.mkdirSync(cfg.artifacts, { recursive: true });
  fs.writeFileSync(
    path.join(user, 'settings.json'),
    JSON.stringify(
      {
        'workbench.startupEditor': 'none',
        'workbench.tips.enabled': false,
        'workbench.enableExperiments': false,
        'telemetry.telemetryLevel': 'off',
        'extensions.autoCheckUpdates': false,
        'extensions.autoUpdate': false,
        'security.workspace.trust.enabled': false,
        'debug.openDebug': 'neverOpen',
        'debug.internalConsoleOptions': 'neverOpen',
        'window.commandCenter': false,
        'git.enabled': false,
        'editor.minimap.enabled': false,
        'remote.autoForwardPorts': false,
        ...cfg.settings,
      },
      null,
      2,
    ),
  );
  const install = spawnSync(
    cfg.codeServer,
    [
      '--user-data-dir',
      path.join(cfg.scratch, 'user'),
      '--extensions-dir',
      path.join(cfg.scratch, 'ext'),
      '--install-extension',
      cfg.vsix,
    ],
    { env: codeServerEnv(cfg), encoding: 'utf8', timeout: 180_000 },
  );
  const said = `${install.stdout}${install.stderr}`;
  log(`install-extension: ${said.trim()}`);
  if (install.status !== 0 || !/successfully installed/i.test(said)) {
    throw new Error(`code-server --install-extension ${cfg.vsix} failed: ${said}`);
  }
}

function startCodeServer(cfg: DriverConfig): ChildProcess {
  const logFile = fs.openSync(path.join(cfg.artifacts, 'code-server.log'), 'w');
  const child = spawn(
    cfg.codeServer,
    [
      '--bind-addr',
      `127.0.0.1:${String(cfg.port)}`,
      '--auth',
      'none',
      '--disable-telemetry',
      '--disable-update-check',
      '--disable-workspace-trust',
      '--disable-getting-started-override',
      '--user-data-dir',
      path.join(cfg.scratch, 'user'),
      '--extensions-dir',
      path.join(cfg.scratch, 'ext'),
      cfg.workspace,
    ],
    // its own process group: code-server's helpers (file watcher, extension host, debug
    // adapters) all go when the group is stopped
    { env: codeServerEnv(cfg), stdio: ['ignore', logFile, logFile], detached: true },
  );
  fs.closeSync(logFile);
  // for the pytest, should this driver be killed before it stops the group itself
  fs.writeFileSync(path.join(cfg.testDir, 'code-server.pid'), String(child.pid));
  return child;
}

async function stopGroup(child: ChildProcess): Promise<void> {
  const pid = child.pid;
  if (pid === undefined) {
    return;
  }
  for (const [signal, waitMs] of [
    ['SIGTERM', 8000],
    ['SIGKILL', 3000],
  ] as const) {
    try {
      process.kill(-pid, signal);
    } catch {
      return; // the group is gone
    }
    const deadline = Date.now() + waitMs;
    while (Date.now() < deadline) {
      try {
        process.kill(-pid, 0);
      } catch {
        return;
      }
      await sleep(200);
    }
  }
}

async function handle(page: Page, cfg: DriverConfig, request: DriverRequest): Promise<DriverResponse> {
  switch (request.kind) {
    case 'screenshot': {
      const file = path.join(cfg.artifacts, `${request.name}.png`);
      await page.screenshot({ path: file });
      log(`screenshot ${file}`);
      return { ok: true, value: file };
    }
    case 'evaluate':
      return { ok: true, value: await page.evaluate(request.expression) };
    case 'type':
      await page.keyboard.type(request.text, { delay: 20 });
      return { ok: true };
    case 'press':
      await page.keyboard.press(request.key);
      return { ok: true };
    case 'click':
      if (request.hover !== undefined) {
        await page.hover(request.hover, { timeout: 30_000 });
      }
      await page.click(request.selector, { timeout: 30_000 });
      return { ok: true };
  }
}

/** Answers requests until result.json appears; false if time ran out or code-server died. */
async function serve(page: Page, cfg: DriverConfig, codeServer: ChildProcess): Promise<boolean> {
  const requests = path.join(cfg.testDir, 'requests');
  const responses = path.join(cfg.testDir, 'responses');
  fs.mkdirSync(requests, { recursive: true });
  fs.mkdirSync(responses, { recursive: true });
  const answered = new Set<string>();
  const deadline = Date.now() + cfg.timeoutMs;
  while (Date.now() < deadline) {
    if (fs.existsSync(path.join(cfg.testDir, 'result.json'))) {
      return true;
    }
    if (codeServer.exitCode !== null || codeServer.signalCode !== null) {
      log(`code-server exited (${String(codeServer.exitCode ?? codeServer.signalCode)})`);
      return false;
    }
    for (const name of fs.readdirSync(requests).sort()) {
      if (!name.endsWith('.json') || answered.has(name)) {
        continue;
      }
      answered.add(name);
      const request = JSON.parse(fs.readFileSync(path.join(requests, name), 'utf8')) as DriverRequest;
      let response: DriverResponse;
      try {
        response = await handle(page, cfg, request);
      } catch (err) {
        response = { ok: false, error: err instanceof Error ? err.message : String(err) };
      }
      const out = path.join(responses, name);
      fs.writeFileSync(`${out}.tmp`, JSON.stringify(response));
      fs.renameSync(`${out}.tmp`, out);
    }
    await sleep(100);
  }
  log(`no result within ${String(cfg.timeoutMs / 1000)} s`);
  return false;
}

async function main(): Promise<number> {
  const configPath = process.argv[2];
  if (configPath === undefined) {
    throw new Error('usage: driver.js CONFIG.json');
  }
  const cfg = JSON.parse(fs.readFileSync(configPath, 'utf8')) as DriverConfig;
  prepare(cfg);
  const codeServer = startCodeServer(cfg);
  let browser: Browser | undefined;
  try {
    const upBy = Date.now() + 120_000;
    while (!(await healthy(cfg.port))) {
      if (Date.now() > upBy || codeServer.exitCode !== null) {
        throw new Error('code-server did not answer /healthz within 120 s (see code-server.log)');
      }
      await sleep(500);
    }
    browser = await chromium.launch({
      executablePath: cfg.chromium,
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
      timeout: 120_000,
    });
    const page = await browser.newPage({ viewport: { width: 1400, height: 860 } });
    const browserLog = fs.createWriteStream(path.join(cfg.artifacts, 'browser.log'));
    page.on('console', (m) => browserLog.write(`${m.type()}: ${m.text()}\n`));
    const authority = `127.0.0.1:${String(cfg.port)}`;
    const payload = JSON.stringify([
      ['extensionDevelopmentPath', `vscode-remote://${authority}${cfg.fixture}`],
      ['extensionTestsPath', `vscode-remote://${authority}${cfg.suite}`],
    ]);
    const url =
      `http://${authority}/?folder=${encodeURIComponent(cfg.workspace)}` +
      `&payload=${encodeURIComponent(payload)}`;
    log(`open ${url}`);
    await page.goto(url, { timeout: 120_000 });
    await page.waitForSelector('.monaco-workbench', { timeout: 120_000 });
    const done = await serve(page, cfg, codeServer);
    await page.screenshot({ path: path.join(cfg.artifacts, 'zz-final.png') }).catch(() => undefined);
    browserLog.end();
    if (!done) {
      return 2;
    }
    const result = JSON.parse(fs.readFileSync(path.join(cfg.testDir, 'result.json'), 'utf8')) as {
      checks: { name: string; ok: boolean; detail: string }[];
    };
    fs.writeFileSync(path.join(cfg.artifacts, 'result.json'), JSON.stringify(result, null, 2));
    process.stdout.write(`${JSON.stringify(result)}\n`);
    return result.checks.length > 0 && result.checks.every((c) => c.ok) ? 0 : 1;
  } finally {
    await browser?.close().catch(() => undefined);
    await stopGroup(codeServer);
    // VS Code's logs (the extension host's, the mirrord output channel) beside the screenshots
    try {
      fs.cpSync(path.join(cfg.scratch, 'user', 'logs'), path.join(cfg.artifacts, 'logs'), {
        recursive: true,
      });
    } catch {
      // no logs written: nothing to keep
    }
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    log(err instanceof Error ? (err.stack ?? err.message) : String(err));
    process.exitCode = 3;
  },
);
