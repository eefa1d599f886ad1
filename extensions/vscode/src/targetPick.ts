/**
 * The target quick pick: `mirrord ls`'s targets, recent first, targetless, and a namespace
 * switch that lists that namespace's targets in the same pick.
 *
 * Owns: the QuickPick widget and its loading state. The entries and their order come from
 * targets.ts; the listing from cli.ts.
 */

import * as vscode from 'vscode';

import type { MirrordCli } from './cli';
import type { TargetList } from './protocol';
import { type PickEntry, pickEntries, TARGETLESS, unavailableCount } from './targets';

export interface PickedTarget {
  /** A target path, or TARGETLESS. */
  target: string;
  /** The namespace switched to in the pick (undefined: the config's or the context's). */
  namespace: string | undefined;
}

interface Item extends vscode.QuickPickItem {
  entry: PickEntry;
}

function toItem(entry: PickEntry): Item {
  switch (entry.kind) {
    case 'target':
      return {
        label: entry.path,
        description: entry.recent ? 'recent' : undefined,
        iconPath: new vscode.ThemeIcon(entry.path.startsWith('pod/') ? 'vm' : 'layers'),
        entry,
      };
    case 'targetless':
      return {
        label: TARGETLESS,
        description: 'no target: outgoing traffic, DNS and files from the cluster, no incoming',
        iconPath: new vscode.ThemeIcon('globe'),
        entry,
      };
    case 'namespace':
      return {
        label: `Switch to namespace ${entry.namespace}`,
        iconPath: new vscode.ThemeIcon('symbol-namespace'),
        entry,
      };
    case 'separator':
      return { label: entry.label, kind: vscode.QuickPickItemKind.Separator, entry };
  }
}

/**
 * Shows the pick; resolves with the choice, or undefined when the user dismisses it. A failing
 * `mirrord ls` rejects (the caller shows the CLI's error).
 */
export async function pickTarget(
  cli: MirrordCli,
  opts: {
    configFile: string | undefined;
    namespace: string | undefined;
    recent: readonly string[];
    targetTypes: string[];
  },
): Promise<PickedTarget | undefined> {
  const pick = vscode.window.createQuickPick<Item>();
  pick.title = 'mirrord: pick a target';
  pick.matchOnDescription = true;
  pick.ignoreFocusOut = true;
  let namespace = opts.namespace;
  let failure: Error | undefined;

  const load = async (): Promise<void> => {
    pick.busy = true;
    pick.enabled = false;
    pick.placeholder = `listing targets${namespace !== undefined ? ` in ${namespace}` : ''} (mirrord ls)…`;
    pick.items = [];
    let list: TargetList;
    try {
      list = await cli.listTargets({
        configFile: opts.configFile,
        namespace,
        targetTypes: opts.targetTypes,
      });
    } catch (err) {
      failure = err instanceof Error ? err : new Error(`mirrord ls failed: ${JSON.stringify(err)}`);
      pick.hide();
      return;
    }
    const hidden = unavailableCount(list);
    pick.items = pickEntries(list, opts.recent).map(toItem);
    pick.placeholder =
      `Target in namespace ${list.currentNamespace ?? namespace ?? '(default)'}` +
      (hidden > 0 ? ` (${String(hidden)} without a running pod not shown)` : '');
    pick.busy = false;
    pick.enabled = true;
  };

  return new Promise((resolve, reject) => {
    let done = false;
    const finish = (value: PickedTarget | undefined): void => {
      if (done) {
        return;
      }
      done = true;
      pick.dispose();
      if (failure !== undefined) {
        reject(failure);
      } else {
        resolve(value);
      }
    };
    pick.onDidAccept(() => {
      const item = pick.selectedItems[0];
      if (item === undefined) {
        return;
      }
      const entry = item.entry;
      if (entry.kind === 'namespace') {
        namespace = entry.namespace;
        void load();
      } else if (entry.kind === 'target') {
        finish({ target: entry.path, namespace });
      } else if (entry.kind === 'targetless') {
        finish({ target: TARGETLESS, namespace });
      }
    });
    pick.onDidHide(() => {
      finish(undefined);
    });
    pick.show();
    void load();
  });
}
