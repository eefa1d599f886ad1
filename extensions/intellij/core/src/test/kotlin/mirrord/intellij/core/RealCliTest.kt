package mirrord.intellij.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertInstanceOf
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Assumptions.assumeTrue
import org.junit.jupiter.api.BeforeEach
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.Timeout
import java.io.File
import java.util.concurrent.TimeUnit

/**
 * The core against the real `mirrord` CLI, a local pod and the tests' in-process API server,
 * as tests/ide/test_intellij_core.py sets them up:
 *   MIRRORD_TEST_BINARY   the `mirrord` to run
 *   MIRRORD_TEST_POD_PID  a local pod's process (env POD_VAR=from-the-pod, file /app/test.txt)
 *   MIRRORD_TEST_PYTHON   a python3 for the debuggee
 *   MIRRORD_TEST_WORKDIR  a scratch directory
 *   KUBECONFIG            the API server, with deployment/web (the same pod) in namespace default
 *   MIRRORD_RUNTIME_DIR   this run's own daemon
 * Without them (a plain `scripts/test-core`), these tests are skipped.
 */
@Timeout(value = 180, unit = TimeUnit.SECONDS)
class RealCliTest {
    private lateinit var cli: MirrordCli
    private lateinit var workdir: File
    private lateinit var python: String
    private var podPid = 0

    @BeforeEach
    fun setUp() {
        val binary = System.getenv("MIRRORD_TEST_BINARY")
        assumeTrue(binary != null, "MIRRORD_TEST_BINARY is not set: run through tests/ide/test_intellij_core.py")
        cli = MirrordCli(File(binary!!))
        workdir = File(System.getenv("MIRRORD_TEST_WORKDIR")!!)
        python = System.getenv("MIRRORD_TEST_PYTHON")!!
        podPid = System.getenv("MIRRORD_TEST_POD_PID")!!.toInt()
    }

    private fun config(name: String, json: String): File = File(workdir, name).apply { writeText(json) }

    /** A UI that must not be asked for a target (the config names one) and records warnings. */
    private class RecordingUi(private val choose: ((TargetChooserModel) -> TargetChoice?)? = null) : LaunchUi {
        val messages = mutableListOf<ProgressMessage>()
        val warnings = mutableListOf<String>()
        var offered: List<TargetItem>? = null

        override fun chooseTarget(model: TargetChooserModel, reload: (String) -> TargetChooserModel): TargetChoice? {
            offered = model.items()
            return (choose ?: error("the chooser was opened although the config names a target"))(model)
        }

        override fun warn(text: String) {
            warnings += text
        }

        override fun onMessage(message: ProgressMessage) {
            synchronized(messages) { messages += message }
        }
    }

    /** Runs [python] code as the debuggee with [env]; it prints, then waits for a line on stdin. */
    private fun debuggee(env: Map<String, String>, code: String): Process {
        val builder = ProcessBuilder(python, "-c", code)
        builder.environment().clear()
        builder.environment().putAll(env)
        builder.redirectErrorStream(true)
        return builder.start()
    }

    /** A listener on 127.0.0.1 at a free port of [range]. */
    private fun listenInRange(range: IntRange): java.net.ServerSocket {
        for (port in range.shuffled().take(50)) {
            try {
                return java.net.ServerSocket(port, 8, java.net.InetAddress.getLoopbackAddress())
            } catch (e: java.io.IOException) {
                continue // taken
            }
        }
        error("no free port in $range")
    }

    private fun waitUntil(seconds: Long, what: String, check: () -> Boolean) {
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(seconds)
        while (System.nanoTime() < deadline) {
            if (check()) return
            Thread.sleep(200)
        }
        throw AssertionError("timed out after $seconds s waiting for $what")
    }

    /** When the running test started, in the daemon's clock (epoch seconds). */
    private val testStart = System.currentTimeMillis() / 1000.0 - 1.0

    /**
     * Waits until the daemon lists no session this test opened (one another test's stopped `ext`
     * left may stay until its wait times out: the daemon answers one control request at a time).
     */
    private fun waitForNoSessions(what: String) {
        fun ours() = cli.daemonStatus().sessions.filter { it.createdEpochSeconds >= testStart }
        try {
            waitUntil(30, what) { ours().isEmpty() }
        } catch (e: AssertionError) {
            throw AssertionError("${e.message}; the daemon lists ${ours()}")
        }
    }

    @Test
    fun `the binary is found on PATH and answers --version`() {
        val resolved = BinaryResolver.resolve(null, null, pathVariable = "/nonexistent:" + cli.binary.parent, home = null)
        assertEquals(cli.binary.canonicalFile, resolved.path.canonicalFile)
        assertEquals("PATH", resolved.source)
        assertTrue(Regex("""\d+\.\d+\.\d+.*""").matches(MirrordCli(resolved.path).version()))
        val missing = assertThrows(BinaryNotFound::class.java) { BinaryResolver.resolve("/nonexistent/mirrord", null) }
        assertTrue("Settings" in missing.message!!, missing.message)
    }

    @Test
    fun `with no daemon running the status says so`() {
        val empty = java.nio.file.Files.createTempDirectory(java.nio.file.Paths.get("/tmp"), "mrdn").toFile()
        try {
            val status = MirrordCli(cli.binary, System.getenv() + ("MIRRORD_RUNTIME_DIR" to empty.path)).daemonStatus()
            assertEquals(DaemonStatus(false, null, null, emptyList()), status)
            assertTrue(Presentation.sessionRows(status, 0.0).isEmpty())
        } finally {
            empty.deleteRecursively()
        }
    }

    @Test
    fun `verify-config reports the config's target`() {
        val named = cli.verifyConfig(config("named.json", """{"target": {"path": "pid/$podPid", "namespace": "team"}}"""))
        assertEquals(ConfigTarget.Path("pid/$podPid"), (named as VerifyConfigResult.Success).target)
        assertEquals("team", named.namespace)
        val unset = cli.verifyConfig(config("unset.json", """{"feature": {"fs": {"mode": "local"}}}"""))
        assertEquals(ConfigTarget.Unset, (unset as VerifyConfigResult.Success).target)
        val targetless = cli.verifyConfig(config("targetless.json", """{"target": "targetless"}"""))
        assertEquals(ConfigTarget.Targetless, (targetless as VerifyConfigResult.Success).target)
    }

    @Test
    fun `verify-config lists a bad config's errors`() {
        val result = cli.verifyConfig(config("bad.json", """{"feature": {"fs": {"mode": "sideways"}}}"""))
        val fail = assertInstanceOf(VerifyConfigResult.Fail::class.java, result)
        assertTrue(fail.errors.any { "feature.fs.mode" in it && "sideways" in it }, fail.errors.toString())
    }

    @Test
    fun `a bad config is the launch's error, with what to do, and no session starts`() {
        val bad = config("bad-launch.json", """{"feature": {"fs": {"mode": "sideways"}}}""")
        val launcher = MirrordLauncher(cli, RecordingUi())
        val error = assertThrows(MirrordError::class.java) {
            launcher.prepare(LaunchRequest(true, emptyMap(), null, DebuggerKind.PYDEVD, bad))
        }
        assertTrue(error.causes.any { "feature.fs.mode" in it }, error.describe())
        assertTrue("verify-config" in error.help!!, error.help)
    }

    @Test
    fun `ext with a bad config fails with the CLI's error and exits`() {
        val bad = config("bad-ext.json", """{"feature": {"fs": {"mode": "sideways"}}}""")
        val session = cli.startExt(target = "pid/$podPid", config = bad, executable = null)
        val error = assertThrows(MirrordError::class.java) { session.awaitReady(60) }
        assertTrue("feature.fs.mode" in error.describe(), error.describe())
        assertTrue(session.waitForExit(30))
        assertEquals(MirrordSession.State.FAILED, session.state)
    }

    @Test
    fun `with mirrord off for the launch nothing runs`() {
        val launcher = MirrordLauncher(cli, RecordingUi())
        val request = LaunchRequest(true, mapOf("MIRRORD_ACTIVE" to "0"), null, DebuggerKind.NONE, null)
        assertEquals(null, launcher.prepare(request))
    }

    @Test
    fun `a session's environment reaches the debuggee and the session lives until it exits`() {
        val cfg = config("session.json", """{"target": {"path": "pid/$podPid"}}""")
        val ui = RecordingUi()
        val launch = MirrordLauncher(cli, ui).prepare(
            LaunchRequest(
                toggle = true,
                runEnvironment = System.getenv() + mapOf("LD_PRELOAD" to "/nonexistent/libmirrord_layer.so", "RUN_VAR" to "mine"),
                executable = python,
                debugger = DebuggerKind.PYDEVD,
                configFile = cfg,
            ),
        )
        assertNotNull(launch)
        launch!!
        assertNull(launch.patchedPath) // python3 is dynamic: the layer reaches it, no supervisor
        assertEquals(python, launch.executable)
        assertEquals("from-the-pod", launch.environment["POD_VAR"])
        assertEquals("mine", launch.environment["RUN_VAR"])
        val preload = SessionEnvironment.preloadEntries(launch.environment["LD_PRELOAD"])
        assertEquals(1, preload.size, preload.toString()) // the earlier run's entry is gone
        assertTrue(File(preload[0]).isFile, preload[0])
        assertEquals("35000-65535", launch.environment["MIRRORD_IGNORE_DEBUGGER_PORTS"])
        assertTrue(ui.messages.any { it is ProgressMessage.Ready }, ui.messages.toString())
        assertEquals(ui.messages.last { it !is ProgressMessage.Unknown }.javaClass, ProgressMessage.Ready::class.java)

        // A "debugger" listening on this machine inside the debugger port range, and a service
        // outside it: the debuggee's loopback connection to the first must stay here, the one
        // to the second goes to the pod (where nothing listens on it).
        val debuggerPort = listenInRange(45000..60000)
        val otherPort = listenInRange(20000..30000)
        val app = debuggee(
            launch.environment,
            """
            import os, socket, sys
            print('env', os.environ.get('POD_VAR'), flush=True)
            print('file', open('/app/test.txt').read().strip(), flush=True)
            def attempt(port):
                try:
                    with socket.create_connection(('127.0.0.1', port), timeout=20) as s:
                        s.sendall(b'debugger')
                    return 'connected'
                except OSError as e:
                    return type(e).__name__
            print('debugger-port', attempt(${debuggerPort.localPort}), flush=True)
            print('other-port', attempt(${otherPort.localPort}), flush=True)
            sys.stdin.readline()
            """.trimIndent(),
        )
        launch.session.attachDebuggee(app.toHandle())
        val out = app.inputStream.bufferedReader()
        assertEquals("env from-the-pod", out.readLine())
        assertEquals("file pod-only file", out.readLine())
        assertEquals("debugger-port connected", out.readLine())
        debuggerPort.soTimeout = 30_000
        debuggerPort.accept().use { assertEquals("debugger", it.getInputStream().readBytes().decodeToString()) }
        assertEquals("other-port ConnectionRefusedError", out.readLine())
        debuggerPort.close()
        otherPort.close()
        // The daemon lists the live session (what the plugin's tool window shows).
        val live = cli.daemonStatus()
        assertTrue(live.running)
        assertTrue(live.sessions.any { it.target.contains("$podPid") && it.processes >= 1 }, live.toString())
        assertTrue(launch.session.isAlive)

        app.outputStream.close() // the debuggee exits
        assertTrue(app.waitFor(30, TimeUnit.SECONDS))
        assertTrue(launch.session.waitForExit(30), "ext was not stopped with the debuggee")
        waitForNoSessions("the session to end in the daemon")
    }

    /** A static C program, built here with `cc -static`, that prints the file its argument names. */
    private fun staticCat(): File {
        val source = File(workdir, "static-cat.c")
        source.writeText(
            """
            #include <stdio.h>
            int main(int argc, char **argv) {
                FILE *f = fopen(argv[1], "r");
                if (f == NULL) { perror(argv[1]); return 3; }
                char line[256];
                while (fgets(line, sizeof line, f) != NULL) fputs(line, stdout);
                return fclose(f) == 0 ? 0 : 4;
            }
            """.trimIndent(),
        )
        val program = File(workdir, "static-cat")
        val cc = ProcessBuilder("cc", "-static", "-O1", "-o", program.path, source.path).redirectErrorStream(true).start()
        val log = cc.inputStream.bufferedReader().readText()
        assertTrue(cc.waitFor(120, TimeUnit.SECONDS) && cc.exitValue() == 0, "cc -static failed: $log")
        return program
    }

    /** Runs [command] with [env] (stderr to a file); its exit code, stdout and stderr. */
    private fun runProgram(command: List<String>, env: Map<String, String>, session: MirrordSession? = null): Triple<Int, String, String> {
        val stderr = File.createTempFile("program", ".err", workdir)
        val builder = ProcessBuilder(command).redirectError(stderr).redirectInput(ProcessBuilder.Redirect.from(File("/dev/null")))
        builder.environment().clear()
        builder.environment().putAll(env)
        val process = builder.start()
        session?.attachDebuggee(process.toHandle())
        // The first line, then the exit: the supervisor (not the program's child) may hold stdout a moment longer.
        val line = process.inputStream.bufferedReader().readLine() ?: ""
        assertTrue(process.waitFor(60, TimeUnit.SECONDS), "$command did not exit")
        return Triple(process.exitValue(), line, stderr.readText())
    }

    @Test
    fun `a static program starts through the ready line's patched path and reads the pod's file`() {
        val program = staticCat()
        val cfg = config("static.json", """{"target": {"path": "pid/$podPid"}}""")
        val ui = RecordingUi()
        val launch = MirrordLauncher(cli, ui).prepare(
            LaunchRequest(true, System.getenv(), program.path, DebuggerKind.NONE, cfg),
        )!!
        try {
            val supervisor = File(launch.patchedPath ?: error("no patched path for a static program: ${ui.messages}"))
            assertEquals("mirrord-supervisor", supervisor.name)
            assertTrue(supervisor.canExecute(), supervisor.path)
            assertEquals(supervisor.path, launch.executable)
            assertEquals(program.absolutePath, launch.environment["MIRRORD_SUPERVISE"])
            assertEquals("1", launch.environment["MIRRORD_DONT_LOAD"])
            assertTrue(ui.warnings.isEmpty(), ui.warnings.toString())
            val command = listOf(program.path, "/app/test.txt")
            // Started as it is, the static program never meets the layer: no such file here.
            val (alone, _, aloneErr) = runProgram(command, launch.environment)
            assertEquals(3, alone, aloneErr)
            assertTrue("No such file" in aloneErr, aloneErr)
            // Started as the launch says, through the supervisor: the pod's file.
            val started = launch.commandLine(command)
            assertEquals(listOf(supervisor.path, "/app/test.txt"), started)
            val (exit, line, err) = runProgram(started, launch.environment, launch.session)
            assertEquals(0, exit, err)
            assertEquals("pod-only file", line, err)
            assertTrue(launch.session.waitForExit(30), "ext was not stopped with the supervised program")
        } finally {
            launch.session.close()
        }
        waitForNoSessions("the supervised program's session to end in the daemon")
    }

    @Test
    fun `a static program the run configuration cannot replace keeps the layer, with a warning`() {
        val program = staticCat()
        val cfg = config("static-fixed.json", """{"target": {"path": "pid/$podPid"}}""")
        val ui = RecordingUi()
        val launch = MirrordLauncher(cli, ui).prepare(
            LaunchRequest(true, System.getenv(), program.path, DebuggerKind.NONE, cfg, executableReplaceable = false),
        )!!
        try {
            assertNull(launch.patchedPath)
            assertEquals(program.path, launch.executable)
            assertFalse("MIRRORD_DONT_LOAD" in launch.environment, "the layer would be off")
            assertFalse("MIRRORD_SUPERVISE" in launch.environment)
            assertEquals("from-the-pod", launch.environment["POD_VAR"])
            assertTrue(ui.warnings.single().let { "system-call supervisor" in it && "mirrord-supervisor" in it }, ui.warnings.toString())
            // The layer is on in what the run configuration starts (MIRRORD_DONT_LOAD would have
            // switched it off): a dynamic program with this environment reads the pod's file.
            val (exit, line, err) = runProgram(
                listOf(python, "-c", "print(open('/app/test.txt').read().strip())"), launch.environment, launch.session,
            )
            assertEquals(0, exit, err)
            assertEquals("pod-only file", line, err)
            assertTrue(launch.session.waitForExit(30), "ext was not stopped with the program")
        } finally {
            launch.session.close()
        }
        waitForNoSessions("the session to end in the daemon")
    }

    @Test
    fun `a session whose daemon dies while the debuggee runs is reported with the CLI's error`() {
        val broken = java.util.concurrent.CompletableFuture<MirrordError>()
        val session = cli.startExt(target = "pid/$podPid", config = null, executable = null, onBroken = { broken.complete(it) })
        try {
            session.awaitReady(120)
            val daemon = ProcessHandle.of(cli.daemonStatus().pid!!.toLong()).get()
            daemon.destroyForcibly() // SIGKILL: a crash, not `mirrord daemon stop` (which ends sessions cleanly)
            val error = broken.get(60, TimeUnit.SECONDS)
            assertTrue("daemon" in error.message, error.describe())
            assertNotNull(error.help, error.describe())
            assertEquals(MirrordSession.State.BROKEN, session.state)
            assertTrue(daemon.onExit().get(30, TimeUnit.SECONDS) != null)
        } finally {
            session.close()
        }
    }

    @Test
    fun `ls lists the API server's targets in both forms`() {
        val rich = cli.ls(config = null, namespace = "default")
        assertEquals("default", rich.currentNamespace)
        assertTrue(rich.namespaces.containsAll(listOf("default", "kube-system")), rich.namespaces.toString())
        assertTrue(LsTarget("deployment/web", true) in rich.targets, rich.targets.toString())
        val plain = cli.run(listOf("ls", "-o", "json"), extraEnv = mapOf("MIRRORD_LS_RICH_OUTPUT" to "false"))
        assertEquals(0, plain.exitCode, plain.stderr)
        assertTrue(LsTarget("deployment/web", true) in ProtocolParser.ls(plain.stdout).targets, plain.stdout)
        assertTrue(cli.ls(config = null, namespace = "kube-system").targets.none { it.path == "deployment/web" })
        val pods = cli.ls(config = null, namespace = "default", targetTypes = listOf("pod"))
        assertTrue(pods.targets.isNotEmpty() && pods.targets.all { it.path.startsWith("pod/") }, pods.targets.toString())
    }

    @Test
    fun `the chooser offers ls's targets and its choice becomes the session's target`() {
        val ui = RecordingUi { model -> TargetChoice(model.items().first { it.path == "deployment/web" }.path, "default") }
        val launch = MirrordLauncher(cli, ui).prepare(
            LaunchRequest(true, System.getenv(), python, DebuggerKind.NONE, null, recentTargets = listOf("deployment/web")),
        )!!
        try {
            assertEquals(TargetItem("deployment/web", true, true), ui.offered!!.first())
            assertEquals(TARGETLESS, ui.offered!!.last().path)
            assertEquals(TargetChoice("deployment/web", "default"), launch.chosen)
            assertEquals("from-the-pod", launch.environment["POD_VAR"])
        } finally {
            launch.session.close()
        }
        assertFalse(launch.session.isAlive)
    }

    @Test
    fun `a target that does not exist is an Error line with help`() {
        val session = cli.startExt(target = "deployment/nope", config = null, executable = null, namespace = "default")
        val error = assertThrows(MirrordError::class.java) { session.awaitReady(90) }
        assertTrue("nope" in error.message, error.describe())
        assertNotNull(error.help, error.describe())
        assertTrue(session.waitForExit(30))
    }
}
