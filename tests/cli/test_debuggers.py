"""Debuggers stay local: a program run through `mirrord run -t pid/P` under a real debugger
(debugpy, node's inspector) attaches, stops at a breakpoint and still sees the pod; the
debugger's own port is never sent to the pod, and a listener on it subscribes nothing. Each
check has its counterpart without the setting, where the same port does reach the pod (a
listener inside the pod gets the connection, the port is subscribed), so the checks can fail.
`MIRRORD_SKIP_PROCESSES` keeps a named process (and only it) out of the session."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import Mirrord, wait_for

pytestmark = pytest.mark.netns

NODE = shutil.which("node")
SPEC = PodSpec(env={"POD_VAR": "from-the-pod"}, files={"/app/test.txt": b"pod-only file\n"})
_DEBUGPY = importlib.util.find_spec("debugpy")
assert _DEBUGPY is not None and _DEBUGPY.origin is not None, "pip install -e '.[test]'"
DEBUGPY_DIR = str(Path(_DEBUGPY.origin).parent)  # what VS Code runs: python .../debugpy

# A listener inside the pod on the pod's loopback: it reports every connection that reaches
# the pod instead of this machine.
POD_DECOY = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(4)
print("listening", flush=True)
s.settimeout(60)
c, _ = s.accept()
print("connected", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _decoy(pod: LocalPod, port: int) -> subprocess.Popen[bytes]:
    proc = pod.popen_in_pod([os.path.realpath(sys.executable), "-c", POD_DECOY, str(port)])
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"listening\n", proc.stderr
    return proc


def _decoy_connected(decoy: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the pod's listener was reached within `timeout` (then it exits)."""
    try:
        out, _ = decoy.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        decoy.kill()
        decoy.communicate(timeout=10)
        return False
    return b"connected" in out


# ---------------------------------------------------------------- connect to a debugger port

CONNECT_APP = """
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.sendall(b"hello")
print("reply", s.recv(16).decode(), os.environ["POD_VAR"], open("/app/test.txt").read().strip())
"""


@pytest.mark.parametrize("setting", ["single", "range", "list", "none"])
def test_a_debugger_port_on_loopback_stays_local(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path, setting: str
) -> None:
    pod = make_pod(SPEC)
    local = socket.socket()
    local.bind(("127.0.0.1", 0))
    local.listen(4)
    port = local.getsockname()[1]
    decoy = _decoy(pod, port)
    value = {
        "single": str(port),
        "range": f"{port - 1}-{port + 1}",
        "list": f"1,{port},{port + 5}-{port + 9}",
        "none": "",
    }[setting]
    mirrord.env["MIRRORD_IGNORE_DEBUGGER_PORTS"] = value
    app = tmp_path / "app.py"
    app.write_text(CONNECT_APP)
    run = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", sys.executable, str(app), str(port))
    try:
        if setting == "none":
            # without the setting the connection is the target's: it reaches the pod's loopback
            assert _decoy_connected(decoy, 60)
            return
        local.settimeout(60)
        conn, _ = local.accept()
        assert conn.recv(5) == b"hello"
        conn.sendall(b"here")
        conn.close()
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        # the debugger's connection was local, everything else still the pod's
        assert out.split() == ["reply", "here", "from-the-pod", "pod-only", "file"]
        assert not _decoy_connected(decoy, 0.5)
    finally:
        local.close()


# ---------------------------------------------------------------- debugpy, spoken to over DAP


class Dap:
    """A DAP client over a debug adapter's stdin/stdout (Content-Length framed JSON)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.seq = 0
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            headers = {}
            while (line := out.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            if line == b"":
                return
            body = out.read(int(headers["content-length"]))
            self.messages.put(json.loads(body))

    def send(self, command: str, **arguments: Any) -> int:
        self.seq += 1
        body = json.dumps(
            {"seq": self.seq, "type": "request", "command": command, "arguments": arguments}
        ).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.proc.stdin.flush()
        return self.seq

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        for message in self.seen:
            if match(message):
                self.seen.remove(message)
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if match(message):
                return message
            self.seen.append(message)
        raise AssertionError(f"no matching DAP message in {timeout} s; seen: {self.seen}")

    def event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait(lambda m: m.get("type") == "event" and m.get("event") == name, timeout)

    def response(self, seq: int, timeout: float = 60) -> dict[str, Any]:
        reply = self.wait(
            lambda m: m.get("type") == "response" and m.get("request_seq") == seq, timeout
        )
        assert reply["success"], reply
        return reply


DEBUGGEE = """import os
value = os.environ.get("POD_VAR")
data = open("/app/test.txt").read().strip()
print("debuggee", value, data, flush=True)
"""
BREAK_LINE = 4  # the print: `value` and `data` are set there


@pytest.fixture
def adapter() -> Iterator[Dap]:
    """debugpy's adapter on this machine (as the IDE runs it, outside the session)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "debugpy.adapter"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield Dap(proc)
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def _attach_listening(dap: Dap) -> int:
    """initialize + attach with "listen": the adapter waits for the debuggee's `--connect`."""
    dap.response(dap.send("initialize", adapterID="debugpy", clientID="mirrord-test"))
    dap.send("attach", listen={"host": "127.0.0.1", "port": 0}, justMyCode=False)
    return int(dap.event("debugpyWaitingForServer")["body"]["port"])


def _stop_at_the_breakpoint_and_read_the_pod(adapter: Dap, app: Path) -> dict[str, Any]:
    """The DAP exchange of a debuggee just started: a breakpoint at BREAK_LINE, where the
    debugger evaluates what the debuggee read from the pod; then continue. The top frame."""
    adapter.event("initialized")
    breakpoints = adapter.send(
        "setBreakpoints", source={"path": str(app)}, breakpoints=[{"line": BREAK_LINE}]
    )
    assert adapter.response(breakpoints)["body"]["breakpoints"][0]["verified"]
    adapter.response(adapter.send("configurationDone"))
    stopped = adapter.event("stopped")["body"]
    assert stopped["reason"] == "breakpoint"
    frames = adapter.response(adapter.send("stackTrace", threadId=stopped["threadId"]))
    top: dict[str, Any] = frames["body"]["stackFrames"][0]
    value = adapter.response(
        adapter.send("evaluate", expression="value + '|' + data", frameId=top["id"])
    )
    assert value["body"]["result"] == "'from-the-pod|pod-only file'"
    adapter.send("continue", threadId=stopped["threadId"])
    return top


def _debugpy_under_mirrord(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path, adapter: Dap
) -> tuple[Path, subprocess.Popen[bytes], subprocess.Popen[str]]:
    """The debuggee under `mirrord run`, started by debugpy connecting to `adapter` (listening
    on loopback), with a decoy listening on the same port in the pod: (app, decoy, run)."""
    app = tmp_path / "app.py"
    app.write_text(DEBUGGEE)
    port = _attach_listening(adapter)
    decoy = _decoy(pod, port)
    run = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", "--", sys.executable, DEBUGPY_DIR, "--connect",
        f"127.0.0.1:{port}", str(app),
    )  # fmt: skip
    return app, decoy, run


def test_debugpy_session_attaches_and_stops_at_a_breakpoint(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path, adapter: Dap
) -> None:
    # what VS Code's python launch puts in the debuggee's environment
    mirrord.env["MIRRORD_DETECT_DEBUGGER_PORT"] = "debugpy"
    app, decoy, run = _debugpy_under_mirrord(mirrord, make_pod(SPEC), tmp_path, adapter)
    top = _stop_at_the_breakpoint_and_read_the_pod(adapter, app)
    assert top["line"] == BREAK_LINE and top["source"]["path"] == str(app)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "debuggee from-the-pod pod-only file" in out
    assert not _decoy_connected(decoy, 0.5)  # the debugger's connection never reached the pod


def test_without_detection_debugpy_would_connect_to_the_pod(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path, adapter: Dap
) -> None:
    _, decoy, _ = _debugpy_under_mirrord(mirrord, make_pod(SPEC), tmp_path, adapter)
    assert _decoy_connected(decoy, 60)


# ---------------------------------------------------------------- node's inspector

NODE_APP = """const fs = require("fs");
const value = process.env.POD_VAR;
const data = fs.readFileSync("/app/test.txt", "utf8").trim();
console.log("debuggee", value, data);
"""
NODE_BREAK_LINE = 3  # 0-based: the console.log


def _inspector_targets(port: int) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            return list(json.loads(r.read()))
    except OSError:
        return []


def _subscribed_ports(mirrord: Mirrord) -> set[int]:
    return {int(sub["port"]) for s in mirrord.sessions() for sub in s.get("subscriptions", [])}


async def _inspect(ws_url: str, script: Path) -> str:
    """Break at NODE_BREAK_LINE through the inspector's websocket, evaluate there, resume."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
        ids = iter(range(1, 1000))
        replies: dict[int, dict[str, Any]] = {}
        events: list[dict[str, Any]] = []

        async def call(method: str, **params: Any) -> dict[str, Any]:
            n = next(ids)
            await ws.send_json({"id": n, "method": method, "params": params})
            while n not in replies:
                message = await ws.receive_json(timeout=60)
                if "id" in message:
                    replies[message["id"]] = message
                else:
                    events.append(message)
            assert "error" not in replies[n], replies[n]
            return dict(replies[n].get("result", {}))

        async def paused() -> dict[str, Any]:
            while True:
                for event in events:
                    if event["method"] == "Debugger.paused":
                        events.remove(event)
                        return dict(event["params"])
                message = await ws.receive_json(timeout=60)
                if "id" in message:
                    replies[message["id"]] = message
                else:
                    events.append(message)

        await call("Runtime.enable")
        await call("Debugger.enable")
        await call("Debugger.setBreakpointByUrl", lineNumber=NODE_BREAK_LINE, url=script.as_uri())
        await call("Runtime.runIfWaitingForDebugger")
        stop = await paused()
        while not stop.get("hitBreakpoints"):  # --inspect-brk stops on the first line first
            await call("Debugger.resume")
            stop = await paused()
        frame = stop["callFrames"][0]
        assert frame["location"]["lineNumber"] == NODE_BREAK_LINE
        result = await call(
            "Debugger.evaluateOnCallFrame",
            callFrameId=frame["callFrameId"],
            expression="value + '|' + data",
        )
        await call("Debugger.resume")
        return str(result["result"]["value"])


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("detect", [True, False])
def test_node_inspector_stays_local_and_stops_at_a_breakpoint(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path, detect: bool
) -> None:
    pod = make_pod(SPEC)
    script = tmp_path / "app.js"
    script.write_text(NODE_APP)
    port = _free_port()
    if detect:
        mirrord.env["MIRRORD_DETECT_DEBUGGER_PORT"] = "nodeinspector"
    run = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", "--", str(NODE), f"--inspect-brk=127.0.0.1:{port}",
        str(script),
    )  # fmt: skip
    try:
        # the inspector answers here, on this machine's loopback
        (target,) = wait_for(lambda: _inspector_targets(port), 60, "node's inspector")
        if not detect:
            # without the setting, node's listener is the target's port: subscribed
            wait_for(lambda: port in _subscribed_ports(mirrord), 30, "the subscription")
            return
        # paused before the first line: node has listened long ago, and nothing subscribed
        assert port not in _subscribed_ports(mirrord)
        assert asyncio.run(_inspect(target["webSocketDebuggerUrl"], script)) == (
            "from-the-pod|pod-only file"
        )
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert "debuggee from-the-pod pod-only file" in out
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate(timeout=10)


# ---------------------------------------------------------------- skip_processes

SHELL_CMD = (
    'cat /app/test.txt || echo "cat: local"; '
    f"{os.path.realpath(sys.executable)} -c "
    "\"import os; print('python:', os.path.exists('/app/test.txt'))\""
)


def _skip_run(env: dict[str, str], skip: str | None) -> list[str]:
    if skip is not None:
        env = dict(env, MIRRORD_SKIP_PROCESSES=skip)
    result = subprocess.run(
        ["/bin/sh", "-c", SHELL_CMD],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _ide_session(mirrord: Mirrord, pod: LocalPod, ide: str) -> dict[str, str]:
    """`mirrord ext` as the IDE `ide` starts it, and a debuggee that lasts the whole test (so
    the session outlives each short run of the test); the debuggee environment `ext` gave."""
    from tests.cli._ide import IDE_ENV, debuggee_env, read_until_ready

    mirrord.env.update(IDE_ENV[ide])
    ext = mirrord.popen("ext", "-t", f"pid/{pod.pid}", "--wait-timeout", "60")
    assert ext.stdout is not None
    env = debuggee_env(mirrord.env, read_until_ready(ext.stdout))
    holder = subprocess.Popen(
        [sys.executable, "-c", "open('/app/test.txt').read(); print('in', flush=True); input()"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    mirrord.children.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == "in\n"
    return env


def test_skip_processes_in_the_debuggees_environment(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    """As GoLand and VS Code set it: only in the debuggee's environment, after `ext`."""
    env = _ide_session(mirrord, make_pod(SPEC), "vscode")
    # nothing skipped: sh, cat and python are all in the session
    assert _skip_run(env, None) == ["pod-only file", "python: True"]
    # cat stands aside entirely (the pod-only file is not there for it); python does not
    assert _skip_run(env, "cat") == ["cat: local", "python: True"]
    # a skipped shell's children are in the session unless they match too
    assert _skip_run(env, "sh") == ["pod-only file", "python: True"]
    assert _skip_run(env, "dlv;sh;cat") == ["cat: local", "python: True"]
    python = Path(os.path.realpath(sys.executable)).name
    assert _skip_run(env, f"{python};go") == ["pod-only file", "python: False"]


def test_skip_processes_from_the_config_and_its_variable(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"skip_processes": ["cat"]}))
    result = mirrord.run(
        "run", "-f", str(config), "-t", f"pid/{pod.pid}", "--", "sh", "-c", SHELL_CMD
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["cat: local", "python: True"]
    mirrord.env["MIRRORD_SKIP_PROCESSES"] = "cat"
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "sh", "-c", SHELL_CMD)
    assert result.stdout.splitlines() == ["cat: local", "python: True"], result.stderr


# ---------------------------------------------------------------- detection per debugger

DETECTED_APP = """
import os, socket
s = socket.create_connection(("127.0.0.1", int(os.environ["DBG_PORT"])), timeout=20)
s.sendall(b"x")
print(os.environ.get("MIRRORD_IGNORE_DEBUGGER_PORTS"), os.environ.get("MIRRORD_DETECT_DEBUGGER_PORT"))
"""


def test_each_debuggers_port_is_read_from_its_command_line(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    """The layer reads the port where each debugger puts it (a python process stands in for
    each debugger: the layer sees only its command line and environment)."""
    pod = make_pod(SPEC)
    env = _ide_session(mirrord, pod, "intellij")
    pydevd = tmp_path / "pydevd.py"
    pydevd.write_text(DETECTED_APP)
    py = os.path.realpath(sys.executable)
    for name in ("java", "dlv", "node"):  # the name each debugger's process has
        (tmp_path / name).symlink_to(py)
    java, dlv, node = (str(tmp_path / name) for name in ("java", "dlv", "node"))

    def argfile(port: int) -> Path:
        path = tmp_path / "java.args"
        path.write_text(
            "-Xmx512m\n-agentlib:jdwp=transport=dt_socket,server=n,suspend=y,"
            f'address=127.0.0.1:{port}\n-cp "/a b/x.jar"\n'
        )
        return path

    cases: list[tuple[str, Callable[[int], list[str]], Callable[[int], dict[str, str]]]] = [
        (
            "javaagent",
            lambda p: [java, "-c", DETECTED_APP, "-agentlib:jdwp=transport=dt_socket,"
                       f"server=n,suspend=y,address=localhost:{p}", "Main"],
            lambda p: {},
        ),
        (
            "javaagent",  # the options in an @argfile, as IntelliJ passes long command lines
            lambda p: [java, "-c", DETECTED_APP, f"@{argfile(p)}", "Main"],
            lambda p: {},
        ),
        ("dlv", lambda p: [dlv, "-c", DETECTED_APP, "dap", f"--listen=127.0.0.1:{p}"], lambda p: {}),
        (
            "pydevd",
            lambda p: [py, str(pydevd), "--client", "127.0.0.1", "--port", str(p), "--file", "x.py"],
            lambda p: {},
        ),
        (
            "nodeinspector",
            lambda p: [node, "-c", DETECTED_APP],
            lambda p: {"NODE_OPTIONS": f"--require=/x.js --inspect-publish-uid=http --inspect={p}"},
        ),
        (
            "nodeinspector",
            lambda p: [node, "-c", DETECTED_APP],
            lambda p: {"NODE_INSPECTOR_INFO": f'{{"pid":"1","inspectorURL":"ws://127.0.0.1:{p}/u"}}'},
        ),
    ]  # fmt: skip
    for kind, argv, extra in cases:
        with socket.socket() as local:
            local.bind(("127.0.0.1", 0))
            local.listen(1)
            local.settimeout(60)
            port = local.getsockname()[1]
            proc = subprocess.run(
                argv(port),
                env={**env, **extra(port), "DBG_PORT": str(port), "MIRRORD_DETECT_DEBUGGER_PORT": kind},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )  # fmt: skip
            assert proc.returncode == 0, (kind, proc.stderr)
            conn, _ = local.accept()  # it reached this machine, not the pod
            conn.close()
            # its children ignore the port found, and only node's children detect again
            ignored, detect = proc.stdout.split()
            assert ignored == str(port), (kind, proc.stdout)
            assert detect == ("nodeinspector" if kind == "nodeinspector" else "None"), kind


def test_python_debug_launch_as_vscode_does_it(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path, adapter: Dap
) -> None:
    """VS Code's python launch, end to end: `ext` with the extension's environment, then a DAP
    `launch` whose `env` is the launch configuration's (MIRRORD_DETECT_DEBUGGER_PORT=debugpy,
    MIRRORD_IGNORE_DEBUGGER_PORTS=45000-65535, plus `environment`): debugpy's launcher starts
    `python .../debugpy --connect 127.0.0.1:P app.py`, whose connection to the adapter (on a
    port the adapter picked, often outside the range) stays on this machine."""
    from tests.cli._ide import IDE_ENV, read_until_ready

    pod = make_pod(SPEC)
    app = tmp_path / "app.py"
    app.write_text(DEBUGGEE)
    launch_env = {
        "MIRRORD_DETECT_DEBUGGER_PORT": "debugpy",
        "MIRRORD_IGNORE_DEBUGGER_PORTS": "45000-65535",
    }
    mirrord.env.update(IDE_ENV["vscode"])
    mirrord.env.update(launch_env)
    ext = mirrord.popen("ext", "-t", f"pid/{pod.pid}")
    assert ext.stdout is not None
    execution = read_until_ready(ext.stdout)
    launch_env.update(execution.environment)
    for key in execution.env_to_unset:
        launch_env.pop(key, None)
    adapter.response(adapter.send("initialize", adapterID="debugpy", clientID="vscode"))
    adapter.send(
        "launch",
        program=str(app),
        python=[sys.executable],
        env=launch_env,
        console="internalConsole",
        justMyCode=False,
    )
    _stop_at_the_breakpoint_and_read_the_pod(adapter, app)
    assert adapter.event("exited")["body"]["exitCode"] == 0
    # the program's own output, as the debug console shows it (it arrives in pieces)
    printed = "".join(
        m["body"]["output"]
        for m in adapter.seen
        if m.get("event") == "output" and m["body"].get("category") == "stdout"
    )
    assert "debuggee from-the-pod pod-only file" in printed
    ext.communicate(timeout=30)  # the debuggee is gone: the session ends
    assert ext.returncode == 0
