"""The benchmark environment: one local pod, an isolated runtime directory, the mirrord CLI.

Everything stays on this machine: the pod is a network namespace the suite creates, the load
generators only talk to loopback and the pod's address, and `close()` removes it all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bench._core import NotAvailable

if TYPE_CHECKING:
    from bench._cluster import PortForwardCluster
    from mirrord.localpod import LocalPod

__all__ = ["BenchEnv"]

SMALL_FILE = "/app/small.bin"
BULK_FILE = "/data/bulk.bin"


def byte_compile_mirrord() -> None:
    """Byte-compile mirrord's modules, as `pip install .` does when it installs them.

    An editable install (the tests' `pip install -e`) leaves them as sources, and where
    PYTHONDONTWRITEBYTECODE is set (as on the CI machines) nothing ever caches their bytecode:
    every `mirrord run`, daemon and agent start then compiles the ~100 modules it imports
    (20-40 ms here), a cost of the checkout, not of mirrord as users install it. The startup
    figures measure the latter."""
    import compileall

    import mirrord

    compileall.compile_dir(Path(mirrord.__file__).parent, quiet=1)


class BenchEnv:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        byte_compile_mirrord()
        self.bulk_size = (32 if quick else 256) * 1024 * 1024
        self.tmp = Path(tempfile.mkdtemp(prefix="mirrord-bench-"))
        self.runtime_dir = self.tmp / "runtime"
        self.runtime_dir.mkdir(mode=0o700)
        self._pod: LocalPod | None = None
        self._pod_error: str | None = None
        self._cluster: PortForwardCluster | None = None
        # The `mirrord` script installed beside this interpreter, as a venv puts it on PATH;
        # a version manager's shim (pyenv's is a bash script that re-resolves the version) found
        # first on PATH would add its own ~100 ms to every startup figure.
        beside = Path(sys.executable).parent / "mirrord"
        if beside.is_file():
            self.mirrord = [str(beside)]
        elif shutil.which("mirrord"):
            self.mirrord = [shutil.which("mirrord") or "mirrord"]
        else:
            self.mirrord = [sys.executable, "-c", "from mirrord.cli import main; main()"]

    # -- the pod

    @property
    def pod(self) -> LocalPod:
        if self._pod is None:
            if self._pod_error:
                raise NotAvailable(self._pod_error)
            if os.geteuid() != 0:
                self._pod_error = "local pods need root"
                raise NotAvailable(self._pod_error)
            try:
                from mirrord.localpod import PodSpec, cleanup_leftovers, create_pod
            except ImportError as exc:
                self._pod_error = f"local pods not available ({exc})"
                raise NotAvailable(self._pod_error) from None
            cleanup_leftovers()
            spec = PodSpec(
                name="bench",
                env={"BENCH_VAR": "from-the-pod"},
                files={
                    SMALL_FILE: os.urandom(4096),
                    BULK_FILE: b"\0",  # grown in place below, to avoid a 256 MiB copy
                },
                hosts={"bench-only.internal": "10.213.255.1"},
            )
            self._pod = create_pod(spec)
            pid = self._pod.pid
            with open(f"/proc/{pid}/root{BULK_FILE}", "wb") as f:
                chunk = os.urandom(1024 * 1024)
                for _ in range(self.bulk_size // len(chunk)):
                    f.write(chunk)
        return self._pod

    @property
    def target(self) -> str:
        return f"pid/{self.pod.pid}"

    @property
    def cluster(self) -> PortForwardCluster:
        """The same pod behind the in-process API server: the agent a Job pod, reached through
        the websocket port-forward (what a cluster user has)."""
        if self._cluster is None:
            from bench._cluster import PortForwardCluster

            self._cluster = PortForwardCluster(self.pod, self.tmp / "apiserver")
        return self._cluster

    # -- the CLI

    def env(self, port_forward: bool = False, *, handover: bool = False) -> dict[str, str]:
        """`handover` False (every figure but the `*_handover` ones): the relayed path, as a
        cluster target has it, also for the local target."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_")}
        env["MIRRORD_RUNTIME_DIR"] = str(self.runtime_dir)
        if not handover:
            env["MIRRORD_FILE_HANDOVER"] = "false"
            env["MIRRORD_OUTGOING_HANDOVER"] = "false"
        if port_forward:
            env["KUBECONFIG"] = str(self.cluster.kubeconfig)
        return env

    def require_run(self) -> None:
        proc = subprocess.run(
            [*self.mirrord, "run", "--help"],
            capture_output=True,
            env=self.env(),
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise NotAvailable("`mirrord run` is not available yet")

    def run_argv(self, cmd: list[str], *flags: str, port_forward: bool = False) -> list[str]:
        target = self.cluster.target if port_forward else self.target
        return [*self.mirrord, "run", "-t", target, *flags, "--", *cmd]

    def run(
        self,
        cmd: list[str],
        *flags: str,
        timeout: float = 300,
        port_forward: bool = False,
        handover: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """`mirrord run` against the pod: as a local target (`pid/P`, the agent reached on
        this machine), or with `port_forward` as the Kubernetes pod (`pod/NAME`); `handover`:
        files and connections handed over (local target only), else relayed."""
        proc = subprocess.run(
            self.run_argv(cmd, *flags, port_forward=port_forward),
            capture_output=True,
            text=True,
            env=self.env(port_forward, handover=handover),
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"mirrord run failed ({proc.returncode}): {proc.stderr.strip()[-400:]}"
            )
        return proc

    @contextlib.contextmanager
    def session_env(self) -> Iterator[dict[str, str]]:
        """The environment of one open session on the pod, as `mirrord ext` gives it to an IDE:
        processes started with it run under the layer exactly as under `mirrord run`, without
        `mirrord run`'s start-up in between. A holder process keeps the session open (ext
        closes it when the session's last process exits) until the block ends."""
        ext = subprocess.Popen(
            [*self.mirrord, "ext", "-t", self.target, "--wait-timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**self.env(), "MIRRORD_PROGRESS_MODE": "json"},
        )
        holder: subprocess.Popen[bytes] | None = None
        try:
            assert ext.stdout is not None and ext.stderr is not None
            session: dict[str, str] | None = None
            for line in ext.stdout:  # ext exits (EOF) on an error or its wait timeout
                msg = json.loads(line)
                # The IDE protocol's ready line: the execution is a JSON string in `message`.
                if (
                    msg.get("type") == "FinishedTask"
                    and msg.get("name") == "mirrord preparing to launch"
                    and msg.get("success")
                    and msg.get("message")
                ):
                    execution = json.loads(msg["message"])
                    session = {**self.env(), **execution["environment"]}
                    for key in execution.get("env_to_unset") or ():
                        session.pop(key, None)
                    break
            if session is None:
                error = ext.stderr.read().strip() if ext.poll() is not None else ""
                raise RuntimeError(f"mirrord ext ended without a session {error[-400:]}")
            holder = subprocess.Popen(["sleep", "3600"], env=session)
            yield session
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
            try:
                ext.wait(timeout=30)
            except subprocess.TimeoutExpired:
                ext.kill()
                ext.wait()

    def stop_daemon(self) -> None:
        subprocess.run(
            [*self.mirrord, "daemon", "stop"],
            capture_output=True,
            env=self.env(),
            timeout=60,
            check=False,
        )

    def daemon_pid(self) -> int | None:
        pidfile = self.runtime_dir / "mirrordd.pid"
        if pidfile.exists():
            return int(pidfile.read_text().split()[0])
        out = subprocess.run(
            ["pgrep", "-f", "mirrordd|mirrord.daemon"], capture_output=True, text=True, check=False
        )
        for line in out.stdout.split():
            try:
                environ = Path(f"/proc/{line}/environ").read_bytes()
            except OSError:
                continue
            if str(self.runtime_dir).encode() in environ:
                return int(line)
        return None

    def close(self) -> None:
        self.stop_daemon()
        if self._cluster is not None:
            self._cluster.close()
        if self._pod is not None:
            self._pod.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
