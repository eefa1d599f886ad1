/**
 * The target pick: which entries it shows, in which order, and the recent-target memory.
 *
 * Owns: turning `mirrord ls` (a TargetList) and the recently used targets into pick entries:
 * the recent target(s) first, then the other available targets, then "targetless", then one
 * entry per other namespace to switch to. Pure: no `vscode`.
 * Does not own: running `mirrord ls` or showing the pick.
 */

import type { TargetList } from './protocol';

export const TARGETLESS = 'targetless';

export type PickEntry =
  | { kind: 'target'; path: string; recent: boolean }
  | { kind: 'targetless' }
  | { kind: 'namespace'; namespace: string }
  | { kind: 'separator'; label: string };

/** How many recent targets are remembered. */
export const RECENT_LIMIT = 10;

/**
 * The pick's entries. `recent` is most recent first; a recent target is listed first only if
 * `mirrord ls` still lists it (available) in this namespace.
 */
export function pickEntries(list: TargetList, recent: readonly string[]): PickEntry[] {
  const available = list.targets.filter((t) => t.available).map((t) => t.path);
  const availableSet = new Set(available);
  const recentHere = recent.filter((p) => availableSet.has(p));
  const recentSet = new Set(recentHere);
  const entries: PickEntry[] = [];
  if (recentHere.length > 0) {
    entries.push({ kind: 'separator', label: 'recent' });
    for (const path of recentHere) {
      entries.push({ kind: 'target', path, recent: true });
    }
  }
  const rest = available.filter((p) => !recentSet.has(p));
  if (rest.length > 0) {
    entries.push({
      kind: 'separator',
      label: list.currentNamespace !== null ? `targets in ${list.currentNamespace}` : 'targets',
    });
    for (const path of rest) {
      entries.push({ kind: 'target', path, recent: false });
    }
  }
  entries.push({ kind: 'separator', label: 'no target' });
  entries.push({ kind: 'targetless' });
  const others = list.namespaces.filter((ns) => ns !== list.currentNamespace);
  if (others.length > 0) {
    entries.push({ kind: 'separator', label: 'switch namespace' });
    for (const namespace of others) {
      entries.push({ kind: 'namespace', namespace });
    }
  }
  return entries;
}

/** The targets `mirrord ls` listed but marked unavailable (shown as a count, not offered). */
export function unavailableCount(list: TargetList): number {
  return list.targets.filter((t) => !t.available).length;
}

/** `recent` with `target` moved to the front, at most RECENT_LIMIT long. */
export function remember(recent: readonly string[], target: string): string[] {
  if (target === TARGETLESS) {
    return [...recent];
  }
  return [target, ...recent.filter((p) => p !== target)].slice(0, RECENT_LIMIT);
}
