/**
 * Which mirrord config file a debug session uses, and the starter file.
 *
 * Owns: the choice (launch configuration's MIRRORD_CONFIG_FILE > `mirrord.configPath` >
 * auto-detected `.mirrord/*mirrord.{json,toml,yaml,yml}` of the workspace folder > none) and
 * the starter `.mirrord/mirrord.json`. Uses node's fs only (no `vscode`), so it is tested with
 * real temporary folders.
 * Does not own: validating the file (`mirrord verify-config`).
 */

import * as fs from 'node:fs';
import * as path from 'node:path';

const CONFIG_FILE = /(^|[._-])mirrord\.(json|toml|ya?ml)$/;
/** Same order as the CLI's own discovery (`mirrord.json` before the others). */
const PREFERRED = ['mirrord.json', 'mirrord.toml', 'mirrord.yaml', 'mirrord.yml'];

export interface ConfigChoice {
  /** From the launch configuration's env (MIRRORD_CONFIG_FILE). */
  fromLaunch?: string | undefined;
  /** The `mirrord.configPath` setting ('' when unset). */
  setting: string;
  autoDetect: boolean;
  /** The workspace folder, if the launch belongs to one. */
  folder?: string | undefined;
}

export class ConfigFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigFileError';
  }
}

function expand(p: string, folder: string | undefined): string {
  let out = p;
  if (folder !== undefined) {
    out = out.replace(/\$\{workspaceFolder\}/g, folder);
  }
  if (out.startsWith('~/') && process.env.HOME !== undefined) {
    out = path.join(process.env.HOME, out.slice(2));
  }
  if (!path.isAbsolute(out) && folder !== undefined) {
    out = path.join(folder, out);
  }
  return out;
}

/** The `.mirrord/*mirrord.{json,toml,yaml,yml}` files of `folder`, preferred name first. */
export function detectConfigFiles(folder: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(path.join(folder, '.mirrord'));
  } catch {
    return [];
  }
  const found = names.filter((n) => CONFIG_FILE.test(n)).sort();
  found.sort((a, b) => {
    const ra = PREFERRED.indexOf(a);
    const rb = PREFERRED.indexOf(b);
    return (ra === -1 ? PREFERRED.length : ra) - (rb === -1 ? PREFERRED.length : rb);
  });
  return found.map((n) => path.join(folder, '.mirrord', n));
}

/**
 * The config file to use, or undefined for none (mirrord's defaults). A file that is named
 * explicitly (launch configuration or setting) but missing is an error: silently running
 * without the user's config would send the session somewhere they did not mean.
 */
export function chooseConfigFile(choice: ConfigChoice): string | undefined {
  for (const [named, where] of [
    [choice.fromLaunch, 'MIRRORD_CONFIG_FILE in the launch configuration'],
    [choice.setting.trim() !== '' ? choice.setting : undefined, 'the mirrord.configPath setting'],
  ] as const) {
    if (named !== undefined) {
      const file = expand(named, choice.folder);
      if (!fs.existsSync(file)) {
        throw new ConfigFileError(
          `the mirrord config file ${file} (from ${where}) does not exist: create it ` +
            '(command "mirrord: Create a starter config") or fix the path',
        );
      }
      return file;
    }
  }
  if (choice.autoDetect && choice.folder !== undefined) {
    return detectConfigFiles(choice.folder)[0];
  }
  return undefined;
}

/** A starter config: mirror incoming traffic, remote env/files/DNS/outgoing; no target (ask). */
export function starterConfig(): string {
  const config = {
    target: {
      path: null,
      namespace: null,
    },
    feature: {
      env: true,
      fs: 'read',
      network: {
        incoming: 'mirror',
        outgoing: true,
        dns: true,
      },
    },
  };
  return `${JSON.stringify(config, null, 2)}\n`;
}

/**
 * Writes `<folder>/.mirrord/mirrord.json` unless it exists; returns its path and whether it
 * was created.
 */
export function createStarterConfig(folder: string): { file: string; created: boolean } {
  const dir = path.join(folder, '.mirrord');
  const file = path.join(dir, 'mirrord.json');
  if (fs.existsSync(file)) {
    return { file, created: false };
  }
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(file, starterConfig(), { flag: 'wx' });
  return { file, created: true };
}
