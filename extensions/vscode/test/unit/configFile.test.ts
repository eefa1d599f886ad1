// Choosing the config file (real temporary folders) and the starter config.

import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, test } from 'node:test';

import {
  chooseConfigFile,
  ConfigFileError,
  createStarterConfig,
  detectConfigFiles,
  starterConfig,
} from '../../src/configFile';

let folder: string;

beforeEach(() => {
  folder = fs.mkdtempSync(path.join(os.tmpdir(), 'mirrord-vscode-cfg-'));
});

afterEach(() => {
  fs.rmSync(folder, { recursive: true, force: true });
});

function write(rel: string, text = '{}'): string {
  const file = path.join(folder, rel);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, text);
  return file;
}

test('nothing to find: no config file', () => {
  assert.equal(chooseConfigFile({ setting: '', autoDetect: true, folder }), undefined);
  assert.deepEqual(detectConfigFiles(folder), []);
});

test('auto-detect prefers mirrord.json, then other *mirrord files of .mirrord/', () => {
  write('.mirrord/staging.mirrord.yaml');
  write('.mirrord/mirrord.toml');
  write('.mirrord/notes.json');
  assert.deepEqual(
    detectConfigFiles(folder).map((f) => path.basename(f)),
    ['mirrord.toml', 'staging.mirrord.yaml'],
  );
  const json = write('.mirrord/mirrord.json');
  assert.equal(chooseConfigFile({ setting: '', autoDetect: true, folder }), json);
  assert.equal(chooseConfigFile({ setting: '', autoDetect: false, folder }), undefined);
});

test('the setting wins over auto-detect, the launch configuration over both', () => {
  write('.mirrord/mirrord.json');
  const fromSetting = write('cfg/team.json');
  const fromLaunch = write('cfg/mine.yaml');
  assert.equal(
    chooseConfigFile({ setting: '${workspaceFolder}/cfg/team.json', autoDetect: true, folder }),
    fromSetting,
  );
  assert.equal(chooseConfigFile({ setting: 'cfg/team.json', autoDetect: true, folder }), fromSetting);
  assert.equal(
    chooseConfigFile({ fromLaunch: 'cfg/mine.yaml', setting: 'cfg/team.json', autoDetect: true, folder }),
    fromLaunch,
  );
});

test('a named file that does not exist is an error that says where it was named', () => {
  assert.throws(
    () => chooseConfigFile({ setting: 'missing.json', autoDetect: true, folder }),
    (err: unknown) =>
      err instanceof ConfigFileError && /missing\.json.*mirrord\.configPath setting/.test(err.message),
  );
  assert.throws(
    () => chooseConfigFile({ fromLaunch: '/nowhere/x.json', setting: '', autoDetect: true, folder }),
    /MIRRORD_CONFIG_FILE in the launch configuration/,
  );
});

test('the starter config is created once and never overwritten', () => {
  const first = createStarterConfig(folder);
  assert.equal(first.created, true);
  assert.equal(first.file, path.join(folder, '.mirrord', 'mirrord.json'));
  assert.equal(fs.readFileSync(first.file, 'utf8'), starterConfig());
  fs.writeFileSync(first.file, '{"target": "pod/mine"}');
  const second = createStarterConfig(folder);
  assert.equal(second.created, false);
  assert.equal(fs.readFileSync(first.file, 'utf8'), '{"target": "pod/mine"}');
});
