"""`mirrord run` end to end: the real CLI, daemon, agent (`mirrord-agent`), layer
(LD_PRELOAD into real python3) and local pods (network + mount namespaces)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli._ide import READY, read_until_ready
from tests.cli.conftest import (
    Mirrord,
    agent_pids,
    pid_alive,
    processes_mentioning,
    python_app,
    wait_for,
)

pytestmark = pytest.mark.netns

POD_SPEC = PodSpec(
    env={"POD_VAR": "from-the-pod", "SHARED": "pod"},
    files={"/app/test.txt": b"pod-only file\n"},
    hosts={"pod-only-service": "10.213.250.7"},
)

APP = """
import os, socket, sys, urllib.request
print("env", os.environ.get("POD_VAR"), flush=True)
print("file", open("/app/test.txt").read().strip(), flush=True)
print("dns", socket.getaddrinfo("pod-only-service", 80, proto=socket.IPPROTO_TCP)[0][4][0], flush=True)
body = urllib.request.urlopen("http://127.0.0.1:8080/from-app", timeout=10).read().decode()
print("http", body.splitlines()[0], flush=True)
sys.exit(3)
"""


def test_run_sees_pod_env_file_dns_and_loopback_and_returns_the_exit_code(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(POD_SPEC)
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, APP))
    lines = result.stdout.splitlines()
    assert "env from-the-pod" in lines, result.stderr
    assert "file pod-only file" in lines, result.stderr
    assert "dns 10.213.250.7" in lines, result.stderr
    assert any(line.startswith("http ") and "GET /from-app" in line for line in lines), (
        result.stderr
    )
    assert result.returncode == 3


def test_env_include_exclude_and_exit_codes(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(POD_SPEC)
    show = "import os; print(os.environ.get('POD_VAR'), os.environ.get('SHARED'))"
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "-x", "SHARED", "--", sys.executable, "-c", show
    )
    assert result.stdout.strip() == "from-the-pod None", result.stderr
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "-s", "SHARED", "--", sys.executable, "-c", show
    )
    assert result.stdout.strip() == "None pod", result.stderr
    # killed by a signal: 128 + N, like a shell
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", kill)
    assert result.returncode == 128 + signal.SIGTERM
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "no-such-command-here")
    assert result.returncode == 127
    assert "command not found" in result.stderr


def test_progress_goes_to_stderr_never_stdout(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(POD_SPEC)
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "echo", "only-this")
    assert result.stdout == "only-this\n"
    assert "mirrord: starting the mirrord daemon" in result.stderr
    assert "agent" in result.stderr


def test_signals_are_forwarded_to_the_command(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(POD_SPEC)
    app = python_app(
        tmp_path,
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(42)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n",
    )
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *app)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert "got SIGTERM" in out
    assert proc.returncode == 42


def test_a_signal_to_mirrord_runs_process_group_reaches_the_command_once(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    # what `timeout`, CI runners and IDEs do: signal the whole group of `mirrord run`
    pod = make_pod(POD_SPEC)
    app = python_app(
        tmp_path,
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda *a: got.append(1))\n"
        "print('ready', flush=True)\n"
        "deadline = time.monotonic() + 30\n"
        "while not got and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(1)  # a second delivery would arrive by now\n"
        "print('SIGINT x', len(got), flush=True)\n",
    )
    proc = mirrord.popen(
        "run",
        "-t",
        f"pid/{pod.pid}",
        "--",
        *app,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out.strip() == "SIGINT x 1", (out, err)
    assert proc.returncode == 0


def test_the_command_dies_with_a_killed_mirrord_run(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(POD_SPEC)
    app = python_app(tmp_path, "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n")
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *app)
    assert proc.stdout is not None
    app_pid = int(proc.stdout.readline())
    proc.kill()  # SIGKILL: nothing of mirrord run runs any more
    proc.wait(timeout=10)
    wait_for(lambda: not pid_alive(app_pid), 10, "the command to die with mirrord run")


def test_three_sessions_share_one_agent_and_another_target_gets_its_own(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(POD_SPEC)
    other = make_pod(PodSpec(env={"POD_VAR": "other"}))
    gate = tmp_path / "go"
    waiter = [
        sys.executable,
        "-c",
        "import os,time\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.05)\n"
        "print(os.environ['POD_VAR'])",
    ]
    runs = [mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *waiter) for _ in range(3)]

    wait_for(lambda: len(mirrord.sessions()) == 3, 60, "three sessions")
    fourth = mirrord.popen("run", "-t", f"pid/{other.pid}", "--", *waiter)
    wait_for(lambda: len(mirrord.sessions()) == 4, 60, "the fourth session")
    status = mirrord.status()
    agents = {a["key"]: a for a in status["agents"]}
    shared = agents[f"local:pid/{pod.pid}"]
    assert len(shared["sessions"]) == 3
    assert shared["streams_opened"] == 1  # one agent connection for all three
    assert len(agents[f"local:pid/{other.pid}"]["sessions"]) == 1
    # the process table agrees: one agent process per target
    assert len(agent_pids(mirrord.runtime, f"pid/{pod.pid}")) == 1
    assert len(agent_pids(mirrord.runtime, f"pid/{other.pid}")) == 1
    assert agent_pids(mirrord.runtime, f"pid/{pod.pid}") == [shared["pid"]]
    gate.touch()
    outs = [p.communicate(timeout=30)[0].strip() for p in [*runs, fourth]]
    assert outs == ["from-the-pod"] * 3 + ["other"]
    assert all(p.returncode == 0 for p in [*runs, fourth])


def test_concurrent_runs_start_one_daemon_and_a_stale_socket_is_replaced(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(POD_SPEC)
    # a control socket left by a dead daemon: bound, then its owner went away
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(mirrord.runtime / "mirrordd.sock"))
    stale.close()
    procs = [mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", "true") for _ in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    starts = sum(err.count("starting the mirrord daemon") for err in [""])
    del starts
    daemons = [
        pid for pid in wait_for(lambda: [mirrord.daemon_pid()], 5, "pid file") if pid is not None
    ]
    assert len(daemons) == 1
    status = mirrord.status()
    assert status["daemon"]["pid"] == daemons[0]
    # one daemon process serves the runtime dir
    from tests.cli.conftest import processes_mentioning

    daemon_procs = [
        pid
        for pid in processes_mentioning(str(mirrord.runtime))
        if b"mirrord.daemon" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert daemon_procs == [daemons[0]]


def test_daemon_status_json_and_stop(mirrord: Mirrord, make_pod: Callable[..., LocalPod]) -> None:
    pod = make_pod(POD_SPEC)
    assert mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "true").returncode == 0
    status = mirrord.status()
    assert status["running"] is True
    assert status["daemon"]["uptime"] > 0
    assert status["sessions"] == []  # closed with its command
    [agent] = status["agents"]
    assert agent["idle_since"] is not None  # lingering, warm for the next run
    text = mirrord.run("daemon", "status")
    assert "sessions" in text.stdout and "agents" in text.stdout
    pid = mirrord.daemon_pid()
    stop = mirrord.run("daemon", "stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert pid is not None and not pid_alive(pid)
    assert agent_pids(mirrord.runtime) == []  # the daemon stopped its agent
    after = mirrord.run("daemon", "status", "--json")
    assert after.returncode == 3 and json.loads(after.stdout)["running"] is False
    logs = mirrord.run("daemon", "logs", "-n", "5")
    assert "shutting down" in logs.stdout


def test_unknown_target_kind_is_a_clear_error(mirrord: Mirrord) -> None:
    result = mirrord.run("run", "-t", "pid/999999999", "--", "true")
    assert result.returncode == 1
    assert "mirrord: error:" in result.stderr
    assert "pid/999999999" in result.stderr


def test_a_bad_config_is_a_usage_error(mirrord: Mirrord, tmp_path: Path) -> None:
    config = tmp_path / "mirrord.json"
    config.write_text('{"feature": {"fs": {"mode": "sideways"}}}')
    result = mirrord.run("run", "-f", str(config), "-t", "pid/1", "--", "true")
    assert result.returncode == 2
    assert "feature.fs.mode" in result.stderr and "sideways" in result.stderr
    # the daemon started while the config was checked is gone again, and was never announced
    assert "starting the mirrord daemon" not in result.stderr
    assert not (mirrord.runtime / "mirrordd.sock").exists()
    assert processes_mentioning(str(mirrord.runtime)) == []
    assert mirrord.sessions() == []


def test_a_cold_run_on_a_local_target_gets_the_agent_started_with_the_daemon(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    """The daemon this run starts starts the target's agent at once (`--standby-agent`), and
    the session gets that agent once it is told the session's settings."""
    pod = make_pod(POD_SPEC)
    target = f"pid/{pod.pid}"
    result = mirrord.run("run", "-t", target, "--", "sh", "-c", "echo $POD_VAR")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == POD_SPEC.env["POD_VAR"]
    [agent] = agent_pids(mirrord.runtime, target)
    with open(f"/proc/{agent}/cmdline", "rb") as f:
        assert b"--standby" in f.read().split(b"\0")
    [entry] = mirrord.status()["agents"]
    assert entry["pid"] == agent and entry["alive"] is True


def test_daemon_status_lists_a_standby_agent_until_its_session_takes_it(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(POD_SPEC)
    target = f"pid/{pod.pid}"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mirrord.daemon", "--standby-agent", target],
        env=mirrord.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    mirrord.children.append(daemon)
    wait_for((mirrord.runtime / "mirrordd.sock").exists, 30, "the daemon")
    [standby] = wait_for(lambda: mirrord.status()["standby_agents"], 30, "the standby agent")
    assert standby["backend"] == "local" and standby["target"] == target
    assert agent_pids(mirrord.runtime, target) == [standby["pid"]]
    text = mirrord.run("daemon", "status").stdout
    assert f"standby agent pid {standby['pid']} for {target}" in text, text
    assert mirrord.run("run", "-t", target, "--", "true").returncode == 0
    status = mirrord.status()
    assert status["standby_agents"] == []
    assert [a["pid"] for a in status["agents"]] == [standby["pid"]]
    assert mirrord.run("daemon", "stop").returncode == 0
    assert daemon.wait(timeout=30) == 0


def test_warm_run_is_quick(mirrord: Mirrord, make_pod: Callable[..., LocalPod]) -> None:
    pod = make_pod(POD_SPEC)
    assert mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "true").returncode == 0
    start = time.monotonic()
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "true")
    elapsed = time.monotonic() - start
    assert result.returncode == 0
    assert "reusing agent" in result.stderr
    assert elapsed < 5  # generous: the benchmark suite reports the real ratio


# `mirrord run` (the fast path) ends with os._exit once its session is closed: this wrapper
# runs the real entry point with an atexit handler of its own and reports the exit it takes.
_EXIT_PROBE = """
import atexit, os, sys
atexit.register(lambda: sys.stderr.write("PROBE atexit ran\\n"))
real_exit = os._exit

def probe(code):
    sys.stderr.write(f"PROBE os._exit({code})\\n")
    sys.stderr.flush()
    real_exit(code)

os._exit = probe
sys.argv = ["mirrord", *sys.argv[1:]]
from mirrord.cli import main
main()
"""


@pytest.mark.parametrize("daemon", ["cold", "warm"])
def test_run_exits_without_teardown_and_loses_no_output(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], daemon: str
) -> None:
    pod = make_pod(POD_SPEC)
    if daemon == "warm":
        assert mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "true").returncode == 0
    command = ["sh", "-c", "for i in $(seq 1 2000); do echo line-$i; done; exit 7"]
    result = subprocess.run(
        [sys.executable, "-c", _EXIT_PROBE, "run", "-t", f"pid/{pod.pid}", "--", *command],
        env=mirrord.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 7, result.stderr
    # the command's output and mirrord's own last line, all there although nothing was torn down
    assert result.stdout.splitlines() == [f"line-{i}" for i in range(1, 2001)]
    lines = result.stderr.splitlines()
    assert any("running sh" in line for line in lines), result.stderr
    # the atexit handlers ran, then it left through os._exit (not the interpreter's teardown)
    assert lines[-2:] == ["PROBE atexit ran", "PROBE os._exit(7)"], result.stderr
    assert mirrord.sessions() == []


def test_a_lingering_local_agent_is_reused_only_with_the_same_agent_settings(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(POD_SPEC)
    config = tmp_path / "mirrord.json"
    config.write_text('{"agent": {"communication_timeout": 120}}')
    target = f"pid/{pod.pid}"
    first = mirrord.run("run", "-t", target, "--", "true")
    assert first.returncode == 0, first.stderr
    other = mirrord.run("run", "-f", str(config), "-t", target, "--", "true")
    assert other.returncode == 0, other.stderr
    assert "reusing agent" not in other.stderr  # other agent settings: a new agent
    assert f"starting agent for {target}" in other.stderr
    assert f"the agent for {target} runs with other agent settings" in other.stderr
    again = mirrord.run("run", "-f", str(config), "-t", target, "--", "true")
    assert again.returncode == 0, again.stderr
    assert "reusing agent" in again.stderr  # the same settings: the lingering one
    keys = sorted(a["key"] for a in mirrord.status()["agents"])
    assert len(keys) == 2 and keys[0] == f"local:{target}"
    assert keys[1].startswith(f"local:{target}@")
    assert len(agent_pids(mirrord.runtime, target)) == 2


def test_ext_prints_progress_then_env_and_waits_for_the_debuggee(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(POD_SPEC)
    proc = mirrord.popen("ext", "-t", f"pid/{pod.pid}", "--wait-timeout", "1")
    out, err = proc.communicate(timeout=60)
    execution = read_until_ready(out.splitlines())
    assert execution.messages[0] == {"type": "NewTask", "name": READY, "parent": None}
    steps = [m["name"] for m in execution.messages if m["type"] == "NewTask"][1:]
    assert steps and any("agent" in s for s in steps), out
    # the ready line is the last: nothing after it while the session lasts, nothing on stderr
    assert len(out.splitlines()) == len(execution.messages) and err == ""
    env = execution.environment
    assert env["POD_VAR"] == "from-the-pod"
    assert env["LD_PRELOAD"].endswith("libmirrord_layer.so")
    assert proc.returncode == 0
    assert mirrord.status()["sessions"] == []  # closed after the wait timeout


def test_an_unused_agent_lingers_then_stops(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(POD_SPEC)
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"daemon": {"agent_linger": 1.5}}))
    result = mirrord.run("run", "-f", str(config), "-t", f"pid/{pod.pid}", "--", "true")
    assert result.returncode == 0, result.stderr
    [agent] = mirrord.status()["agents"]
    assert agent["idle_since"] is not None and agent["linger"] == 1.5
    assert pid_alive(agent["pid"])
    wait_for(lambda: mirrord.status()["agents"] == [], 10, "the agent to be released")
    wait_for(lambda: not pid_alive(agent["pid"]), 10, "the agent process to exit")
    assert mirrord.status()["running"] is True  # the daemon itself stays
