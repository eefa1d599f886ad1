"""`mirrord demo`: the main job on a machine without a cluster.

Owns: creating a demo pod (mirrord.localpod), running the sample app (`_demo_app.py`, shipped
in the package) through `mirrord run --steal` against it with a private runtime directory,
sending it a request through the pod, and removing everything (pod, daemon, agent). Does not
own any of the machinery it shows.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mirrord.cli._app import app
from mirrord.cli._run import run_command
from mirrord.cli._sessions import fail
from mirrord.daemon import DaemonError, RuntimePaths, runtime_paths, stop_daemon

if TYPE_CHECKING:
    from mirrord.localpod import LocalPod

__all__ = ["DEMO_SPEC_ENV"]

DEMO_SPEC_ENV = {
    "DEMO_GREETING": "hello from the demo pod",
    "DATABASE_URL": "postgres://demo-db.cluster.local:5432/app",
}
_CONFIG = b"service: demo\nreplicas: 3\nsecret_source: only-in-the-pod\n"
_DB_ADDRESS = "10.213.254.10"  # only the pod's hosts file knows it; nothing listens there


def _send_through_pod(pod_ip: str, port: int, stop: threading.Event, out: list[str]) -> None:
    """Send requests to the pod's IP until one is answered by the demo app (stolen), not by
    the pod's own service."""
    import urllib.request

    deadline = time.monotonic() + 25
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{pod_ip}:{port}/checkout", timeout=3) as r:
                body = r.read().decode().strip()
        except OSError:
            body = ""
        if "stolen" in body:
            out.append(body)
            return
        stop.wait(0.3)


def _processes_of(runtime: Path) -> list[int]:
    """Live processes whose command line names `runtime` (the demo's own directory, unique
    to this run): its daemon and agents."""
    needle = str(runtime).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def _clean_up(runtime: Path, pod: LocalPod | None) -> None:
    """Remove everything the demo made; idempotent (run again after an interruption)."""
    try:
        stop_daemon(RuntimePaths(runtime))
    except DaemonError as exc:
        print(f"mirrord demo: {exc}", file=sys.stderr)
    # A daemon interrupted while it was starting does not answer yet: end it (and any agent)
    # by its directory, SIGTERM first, SIGKILL after 5 s.
    deadline = time.monotonic() + 10
    while (pids := _processes_of(runtime)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    if pod is not None:
        pod.close()
    shutil.rmtree(runtime, ignore_errors=True)


@app.command("demo")
def demo() -> None:
    """Create a local demo pod, run a sample app through mirrord against it, clean up."""
    if os.geteuid() != 0:
        fail(
            "`mirrord demo` creates network namespaces and a local agent: run it as root "
            "(for example `sudo mirrord demo`)"
        )
    from mirrord.localpod import PodError, PodSpec, create_pod

    # a private daemon in a directory of its own under the user's runtime dir, removed at the end
    parent = runtime_paths()
    parent.ensure()
    pod: LocalPod | None = None
    stop = threading.Event()
    code = 1
    runtime = Path(tempfile.mkdtemp(prefix="demo-", dir=parent.root))
    try:  # Ctrl-C may come at any moment from here on: the finally removes what exists
        os.environ["MIRRORD_RUNTIME_DIR"] = str(runtime)
        print(
            "mirrord demo: creating a demo pod (network + mount namespaces, a process, an HTTP "
            "service on :8080)",
            flush=True,
        )
        try:
            pod = create_pod(  # removes what it made if it fails or is interrupted
                PodSpec(
                    name="demo",
                    env=DEMO_SPEC_ENV,
                    files={"/app/config.yaml": _CONFIG},
                    hosts={"demo-db.cluster.local": _DB_ADDRESS},
                    http_port=8080,
                    echo_port=None,
                )
            )
        except PodError as exc:
            fail(f"could not create the demo pod: {exc}")
        stolen: list[str] = []
        sender = threading.Thread(
            target=_send_through_pod, args=(pod.ip, 8080, stop, stolen), daemon=True
        )
        print(
            f"mirrord demo: pod {pod.netns} (pid {pod.pid}, IP {pod.ip}); running "
            f"`mirrord run --steal -t pid/{pod.pid} -- python3 <demo app>`",
            flush=True,
        )
        sender.start()
        app_path = Path(__file__).with_name("_demo_app.py")
        code = run_command(
            command=[sys.executable, str(app_path)],
            target=f"pid/{pod.pid}",
            config_file=None,
            steal=True,
            block_sigint=True,  # the app unblocks it once its quiet handler is in place
        )
        stop.set()
        sender.join(timeout=5)
        if stolen:
            print(f"mirrord demo: the client that called the pod got: {stolen[0]!r}", flush=True)
    except KeyboardInterrupt:
        code = 130
        print("mirrord demo: interrupted", file=sys.stderr, flush=True)
    finally:
        stop.set()
        # a second Ctrl-C must not stop the cleanup halfway: ignored from here; one that was
        # already on its way restarts the (idempotent) cleanup
        while True:
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                print("mirrord demo: cleaning up (daemon, agent, pod)", flush=True)
                _clean_up(runtime, pod)
                break
            except KeyboardInterrupt:
                continue
    raise typer.Exit(code)
