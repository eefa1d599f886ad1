/**
 * The "mirrord" view: live sessions and agents of the daemon.
 *
 * Owns: the TreeDataProvider, refreshing (on demand, after a launch, and every few seconds
 * while the view is visible), and the last status for the stop action. The content comes from
 * sessionsModel.ts; the status from `mirrord daemon status --json`.
 */

import * as vscode from 'vscode';

import type { DaemonStatus } from './protocol';
import { statusTree, type TreeNode } from './sessionsModel';

const REFRESH_MS = 3000;

export class SessionsView implements vscode.TreeDataProvider<TreeNode>, vscode.Disposable {
  private readonly changed = new vscode.EventEmitter<TreeNode | undefined>();
  readonly onDidChangeTreeData = this.changed.event;
  private roots: TreeNode[] = [];
  private timer: NodeJS.Timeout | undefined;
  private inFlight: Promise<void> | undefined;
  private readonly view: vscode.TreeView<TreeNode>;
  status: DaemonStatus | undefined;

  constructor(
    private readonly fetch: () => Promise<DaemonStatus>,
    private readonly onError: (err: unknown) => void,
  ) {
    this.view = vscode.window.createTreeView('mirrord.sessions', {
      treeDataProvider: this,
      showCollapseAll: true,
    });
    this.view.onDidChangeVisibility((e) => {
      this.schedule(e.visible);
    });
    this.schedule(this.view.visible);
  }

  private schedule(visible: boolean): void {
    if (this.timer !== undefined) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
    if (visible) {
      void this.refresh();
      this.timer = setInterval(() => void this.refresh(true), REFRESH_MS);
    }
  }

  /** Fetches the status once (concurrent calls share one fetch). `quiet`: errors not shown. */
  refresh(quiet = false): Promise<void> {
    this.inFlight ??= this.fetch()
      .then((status) => {
        this.status = status;
        this.roots = statusTree(status, Date.now() / 1000);
        this.view.message = undefined;
        this.changed.fire(undefined);
      })
      .catch((err: unknown) => {
        this.view.message = `mirrord daemon status failed: ${err instanceof Error ? err.message : String(err)}`;
        if (!quiet) {
          this.onError(err);
        }
      })
      .finally(() => {
        this.inFlight = undefined;
      });
    return this.inFlight;
  }

  getTreeItem(node: TreeNode): vscode.TreeItem {
    const item = new vscode.TreeItem(
      node.label,
      node.children.length === 0
        ? vscode.TreeItemCollapsibleState.None
        : node.id === 'sessions' || node.id === 'agents'
          ? vscode.TreeItemCollapsibleState.Expanded
          : vscode.TreeItemCollapsibleState.Collapsed,
    );
    item.id = node.id;
    item.description = node.description;
    item.tooltip = node.tooltip;
    item.contextValue = node.contextValue;
    if (node.icon !== undefined) {
      item.iconPath = new vscode.ThemeIcon(node.icon);
    }
    return item;
  }

  getChildren(node?: TreeNode): TreeNode[] {
    return node === undefined ? this.roots : node.children;
  }

  getParent(): undefined {
    return undefined;
  }

  dispose(): void {
    this.schedule(false);
    this.view.dispose();
    this.changed.dispose();
  }
}
