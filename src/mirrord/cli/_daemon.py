"""`mirrord daemon start|stop|status|logs`: manage the per-user mirrordd.

Owns: these commands' output (a rich table on a terminal, `--json` for scripts). Does not own
the daemon (mirrord.daemon).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from typing import Annotated, Any

import typer

from mirrord.cli._app import app
from mirrord.cli._sessions import fail
from mirrord.daemon import (
    ControlClient,
    DaemonError,
    DaemonNotRunning,
    Status,
    daemon_status,
    ensure_daemon,
    runtime_paths,
    stop_daemon,
)

__all__ = ["daemon_app"]

daemon_app = typer.Typer(
    name="daemon", help="Manage mirrordd, the per-user daemon sessions share.", no_args_is_help=True
)
app.add_typer(daemon_app, name="daemon")


@daemon_app.command("start")
def start(
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout", help="Exit after this many seconds without sessions.", min=0
        ),
    ] = None,
) -> None:
    """Start the daemon in the background (`mirrord run` does this by itself)."""
    paths = runtime_paths()
    try:
        started = ensure_daemon(paths, idle_timeout=idle_timeout)
        with ControlClient(paths.control_socket) as client:
            pid = client.call(Status()).status["daemon"]["pid"]
    except DaemonError as exc:
        fail(str(exc))
    typer.echo(
        f"mirrordd {'started' if started else 'already running'} (pid {pid}) in {paths.root}"
    )


@daemon_app.command("stop")
def stop() -> None:
    """Stop the daemon: its sessions end and its agents are stopped."""
    paths = runtime_paths()
    try:
        stopped = stop_daemon(paths)
    except DaemonError as exc:
        fail(str(exc))
    typer.echo("mirrordd stopped" if stopped else f"no mirrordd running in {paths.root}")


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    mnt, s = divmod(rest, 60)
    return f"{h}h{mnt:02d}m{s:02d}s" if h else f"{mnt}m{s:02d}s"


def _traffic(traffic: dict[str, dict[str, int]]) -> str:
    """`8080 (0), 9090 (12)`: each mirrored port with the agent's sniffer's kernel drops."""
    return ", ".join(f"{port} ({v.get('kernel_drops', 0)})" for port, v in traffic.items()) or "-"


def _subscriptions(subs: list[dict[str, Any]]) -> str:
    """`8080 steal (header_filter: ^x-user: me$), 9090 mirror`: the ports the session's
    processes subscribed, how, and with which HTTP filter."""
    out = []
    for sub in subs:
        text = f"{sub.get('port')} {sub.get('mode')}"
        flt = {k: v for k, v in (sub.get("http_filter") or {}).items() if k != "ports"}
        if flt:
            text += (
                " ("
                + ", ".join(
                    f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in flt.items()
                )
                + ")"
            )
        out.append(text)
    return ", ".join(out) or "-"


@daemon_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Sessions, agents, channels, bytes relayed and uptime (80 columns; --json for all)."""
    from rich import box
    from rich.console import Console  # imported here: rich costs other commands' startup
    from rich.table import Table

    paths = runtime_paths()
    try:
        info: dict[str, Any] = daemon_status(paths)
    except DaemonNotRunning as exc:
        if as_json:
            typer.echo(json.dumps({"running": False, "runtime_dir": str(paths.root)}))
            raise typer.Exit(3) from None
        fail(str(exc), code=3)
    except DaemonError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"running": True, **info}, indent=2))
        return
    # At most 80 columns on a terminal or not: few columns per table, and what is long
    # (filters, commands, mirrored ports) on indented lines under its table.
    console = Console(highlight=False, width=min(Console().width, 80))
    d = info["daemon"]
    totals = info["totals"]
    console.print(f"mirrordd {d['version']} pid {d['pid']}, up {_duration(d['uptime'])}")
    console.print(f"runtime dir {d['runtime_dir']}")
    for helper in info.get("helpers") or []:
        console.print(f"{helper['backend']} helper pid {helper['pid']}")
    for standby in info.get("standby_agents") or []:
        console.print(f"standby agent pid {standby['pid']} for {standby['target']}")
    console.print(
        f"{totals['sessions']} session(s), {totals['agents']} agent(s), "
        f"{totals['channels']} channel(s); relayed {_bytes(totals['bytes_to_agent'])} out / "
        f"{_bytes(totals['bytes_to_user'])} in"
    )

    def table(title: str, columns: tuple[str, ...]) -> Table:
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for col in columns:
            t.add_column(col, overflow="fold")
        return t

    now = time.time()
    sessions = table("sessions", ("id", "target", "state", "procs", "chans", "out / in", "age"))
    session_notes = []
    for s in info["sessions"]:
        sessions.add_row(
            s["id"],
            s["target"],
            s["state"],
            str(len(s["processes"])),
            str(s["channels"]),
            f"{_bytes(s['bytes_to_agent'])} / {_bytes(s['bytes_to_user'])}",
            _duration(now - s["created"]),
        )
        session_notes.append(
            f"  {s['id']}: incoming {_subscriptions(s.get('subscriptions') or [])}; "
            f"cmd {s['label'][:200] or '-'}"
        )
    console.print(sessions)
    for note in session_notes:
        console.print(note)
    agents = table("agents", ("agent", "pid", "state", "sessions", "chans", "conns", "up"))
    agent_notes = []
    for a in info["agents"]:
        link = a["link"] or {}
        agents.add_row(
            a["key"],
            str(a["pid"] or "-"),
            link.get("state", "-") if a["alive"] else "gone",
            str(len(a["sessions"])) + (" (lingering)" if a["idle_since"] else ""),
            str(link.get("channels", 0)),
            str(link.get("connections", 0)),
            _duration(now - a["started"]),
        )
        agent_notes.append(
            f"  {a['key']}: {a['streams_opened']} stream(s) opened; mirrored ports (kernel "
            f"drops) {_traffic(link.get('traffic') or {})}"
        )
    console.print(agents)
    for note in agent_notes:
        console.print(note)


@daemon_app.command("logs")
def logs(
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many last lines.", min=0)] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
) -> None:
    """Print the daemon's log (`<runtime dir>/mirrordd.log`)."""
    path = runtime_paths().log
    try:
        f = path.open("r", errors="replace")
    except FileNotFoundError:
        fail(f"no daemon log at {path}: the daemon has not run with this runtime directory")
    except OSError as exc:
        fail(f"cannot read the daemon log {path}: {exc.strerror}; check $MIRRORD_RUNTIME_DIR")
    with f:
        for line in deque(f, maxlen=max(lines, 0)):
            typer.echo(line, nl=False)
        while follow:
            line = f.readline()
            if line:
                typer.echo(line, nl=False)
            else:
                time.sleep(0.2)
                if not os.path.exists(path):
                    return
