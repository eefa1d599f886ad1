/**
 * The "mirrord" view's content, built from `mirrord daemon status --json`.
 *
 * Owns: the tree (daemon, its sessions with their processes, incoming subscriptions and
 * filters, kernel drops and bytes relayed, and its agents) as plain nodes. Pure: no `vscode`;
 * sessionsView.ts turns nodes into TreeItems.
 * Does not own: fetching the status or acting on a node.
 */

import type { AgentInfo, DaemonStatus, SessionInfo } from './protocol';

export interface TreeNode {
  id: string;
  label: string;
  description?: string;
  tooltip?: string;
  /** `mirrord.session` nodes get the stop action. */
  contextValue?: string;
  /** A codicon name. */
  icon?: string;
  children: TreeNode[];
  session?: SessionInfo;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${String(n)} B` : `${value.toFixed(1)} ${units[unit] ?? 'GiB'}`;
}

export function formatAge(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  const pad = (v: number): string => String(v).padStart(2, '0');
  return h > 0 ? `${String(h)}h${pad(m)}m${pad(rest)}s` : `${String(m)}m${pad(rest)}s`;
}

function plural(n: number, word: string): string {
  if (n === 1) {
    return `1 ${word}`;
  }
  return `${String(n)} ${word}${word.endsWith('s') ? 'es' : 's'}`;
}

function dropsText(drops: Record<string, number>): string {
  return Object.entries(drops)
    .map(([port, n]) => `${port}: ${String(n)}`)
    .join(', ');
}

function sessionNode(s: SessionInfo, now: number): TreeNode {
  const prefix = `session/${s.id}`;
  const children: TreeNode[] = [];
  children.push({
    id: `${prefix}/processes`,
    label: 'processes',
    description: s.processes.length > 0 ? s.processes.join(', ') : 'none yet',
    icon: 'server-process',
    children: [],
  });
  for (const sub of s.subscriptions) {
    children.push({
      id: `${prefix}/port/${String(sub.port)}/${sub.mode}`,
      label: `port ${String(sub.port)}`,
      description: sub.mode + (sub.filter.length > 0 ? ` (${sub.filter.join(', ')})` : ''),
      icon: sub.mode === 'steal' ? 'arrow-down' : 'mirror',
      children: [],
    });
  }
  if (Object.keys(s.kernelDrops).length > 0) {
    children.push({
      id: `${prefix}/drops`,
      label: 'kernel drops',
      description: dropsText(s.kernelDrops),
      icon: Object.values(s.kernelDrops).some((n) => n > 0) ? 'warning' : 'pass',
      children: [],
    });
  }
  children.push({
    id: `${prefix}/relayed`,
    label: 'relayed',
    description: `${formatBytes(s.bytesToAgent)} out / ${formatBytes(s.bytesToUser)} in`,
    icon: 'arrow-swap',
    children: [],
  });
  s.warnings.forEach((w, i) => {
    children.push({ id: `${prefix}/warning/${String(i)}`, label: w, icon: 'warning', children: [] });
  });
  return {
    id: prefix,
    label: s.target,
    description: `${s.state} · ${plural(s.processes.length, 'process')} · ${formatAge(now - s.created)}`,
    tooltip: [
      `session ${s.id}`,
      `target ${s.target}`,
      `agent ${s.agent}`,
      s.label !== '' ? `command ${s.label}` : '',
      s.clientPid !== null ? `mirrord pid ${String(s.clientPid)}` : '',
    ]
      .filter((l) => l !== '')
      .join('\n'),
    contextValue: 'mirrord.session',
    icon: 'debug-alt',
    children,
    session: s,
  };
}

function agentNode(a: AgentInfo, now: number): TreeNode {
  const prefix = `agent/${a.key}`;
  const children: TreeNode[] = [
    {
      id: `${prefix}/link`,
      label: 'channels',
      description: `${String(a.channels)} · ${String(a.connections)} connection(s)`,
      icon: 'plug',
      children: [],
    },
  ];
  if (Object.keys(a.kernelDrops).length > 0) {
    children.push({
      id: `${prefix}/drops`,
      label: 'mirrored ports (kernel drops)',
      description: dropsText(a.kernelDrops),
      icon: Object.values(a.kernelDrops).some((n) => n > 0) ? 'warning' : 'pass',
      children: [],
    });
  }
  const state = a.alive ? (a.lingering ? 'lingering' : 'running') : 'gone';
  return {
    id: prefix,
    label: a.description !== '' ? a.description : a.key,
    description: `${state} · ${a.pid !== null ? `pid ${String(a.pid)} · ` : ''}${plural(a.sessions.length, 'session')} · up ${formatAge(now - a.started)}`,
    tooltip: `agent ${a.key}`,
    contextValue: 'mirrord.agent',
    icon: a.alive ? 'vm-running' : 'vm-outline',
    children,
  };
}

/** The view's top level. `now` is in seconds (the daemon's clock is the same machine's). */
export function statusTree(status: DaemonStatus, now: number): TreeNode[] {
  if (!status.running) {
    return [
      {
        id: 'daemon',
        label: 'no daemon running',
        description: status.runtimeDir,
        icon: 'circle-slash',
        children: [],
      },
    ];
  }
  return [
    {
      id: 'daemon',
      label: `mirrordd ${status.version}`,
      description: `pid ${String(status.pid)} · ${status.runtimeDir}`,
      contextValue: 'mirrord.daemon',
      icon: 'server',
      children: [],
    },
    {
      id: 'sessions',
      label: 'sessions',
      description: String(status.sessions.length),
      icon: 'debug',
      children: status.sessions.map((s) => sessionNode(s, now)),
    },
    {
      id: 'agents',
      label: 'agents',
      description: String(status.agents.length),
      icon: 'vm',
      children: status.agents.map((a) => agentNode(a, now)),
    },
  ];
}
