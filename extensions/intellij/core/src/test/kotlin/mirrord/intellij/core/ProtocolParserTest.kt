package mirrord.intellij.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertInstanceOf
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

/** The parser on lines in the protocol's shapes (core/src/test/resources/recorded). */
class ProtocolParserTest {
    private fun resource(name: String): String =
        javaClass.getResource("/recorded/$name")?.readText() ?: error("missing test resource recorded/$name")

    @Test
    fun `every ext line parses, in order, ending with the ready line`() {
        val messages = resource("ext-protocol.jsonl").lines().filter { it.isNotBlank() }.map(ProtocolParser::progressLine)
        assertEquals(ProgressMessage.NewTask(LAUNCH_TASK, null), messages[0])
        assertEquals(ProgressMessage.NewTask("resolving the target", LAUNCH_TASK), messages[1])
        assertEquals(ProgressMessage.FinishedTask("resolving the target", true, "pod/web-7d9f/container/app"), messages[2])
        assertEquals(ProgressMessage.Info("mirrord will mirror incoming traffic on the ports your app binds"), messages[3])
        assertEquals(ProgressMessage.Warning("agent image is older than the CLI"), messages[4])
        val ide = assertInstanceOf(ProgressMessage.IdeMessage::class.java, messages[5])
        assertEquals("steal_hint", ide.id)
        assertEquals("Info", ide.level)
        assertEquals(listOf(IdeAction("Link", "Read more", "https://mirrord.dev/docs/")), ide.actions)
        val ready = assertInstanceOf(ProgressMessage.Ready::class.java, messages[6])
        assertEquals("from-the-pod", ready.execution.environment["POD_VAR"])
        assertEquals("/opt/mirrord/libmirrord_layer.so", ready.execution.environment["LD_PRELOAD"])
        assertEquals(listOf("HTTP_PROXY"), ready.execution.envToUnset)
        assertNull(ready.execution.patchedPath)
        assertFalse(ready.execution.usesOperator)
    }

    @Test
    fun `the execution never prints the pod's values`() {
        val execution = ProtocolParser.execution("""{"environment":{"DB_PASSWORD":"hunter2"},"env_to_unset":[]}""")
        assertFalse("hunter2" in execution.toString(), execution.toString())
    }

    @Test
    fun `a failed launch task is not the ready line`() {
        val message = ProtocolParser.progressLine(
            """{"type":"FinishedTask","name":"mirrord preparing to launch","success":false,"message":"no such target"}""",
        )
        assertEquals(ProgressMessage.FinishedTask(LAUNCH_TASK, false, "no such target"), message)
    }

    @Test
    fun `an unknown message type is kept, not an error`() {
        val line = """{"type":"SomethingNew","x":1}"""
        assertEquals(ProgressMessage.Unknown("SomethingNew", line), ProtocolParser.progressLine(line))
    }

    @Test
    fun `a line that is not JSON is a protocol error`() {
        val error = assertThrows(ProtocolError::class.java) { ProtocolParser.progressLine("starting the daemon...") }
        assertTrue("not JSON" in error.message!!, error.message)
        assertThrows(ProtocolError::class.java) { ProtocolParser.progressLine("""{"name":"no type"}""") }
        assertThrows(ProtocolError::class.java) {
            ProtocolParser.progressLine("""{"type":"FinishedTask","name":"$LAUNCH_TASK","success":true,"message":"not json"}""")
        }
    }

    @Test
    fun `an Error line gives all six fields`() {
        val error = resource("errors.txt").lines().firstNotNullOf(ProtocolParser::errorLine)
        assertEquals("the target deployment/nope was not found in namespace default", error.message)
        assertEquals("Error", error.severity)
        assertEquals(listOf("deployments.apps \"nope\" not found"), error.causes)
        assertEquals("List the targets with `mirrord ls`, or fix target.path in mirrord.json.", error.help)
        assertEquals(listOf("target.path"), error.labels)
        assertEquals(listOf("namespace default"), error.related)
        assertTrue(error.describe().endsWith(error.help!!))
        assertNull(ProtocolParser.errorLine("mirrord: the daemon is starting"))
        assertEquals("plain words", ProtocolParser.errorLine("Error: plain words")!!.message)
    }

    @Test
    fun `a failure is the Error line when there is one, else the stderr text`() {
        assertEquals("the target deployment/nope was not found in namespace default",
            ProtocolParser.failure("mirrord ext", 1, resource("errors.txt")).message)
        assertEquals("mirrord: error: bad flag", ProtocolParser.failure("mirrord ls", 2, "mirrord: error: bad flag\n").message)
        assertTrue("exited with code 3" in ProtocolParser.failure("mirrord ls", 3, "").message)
    }

    @Test
    fun `ls in its rich form`() {
        val ls = ProtocolParser.ls(resource("ls-rich.json"))
        assertEquals("default", ls.currentNamespace)
        assertEquals(listOf("default", "kube-system", "mirrord"), ls.namespaces)
        assertEquals(LsTarget("rollout/canary", false), ls.targets[2])
        assertEquals(3, ls.targets.size)
    }

    @Test
    fun `ls in its array form`() {
        val ls = ProtocolParser.ls("""["deployment/web","pod/web-1/container/app"]""" + "\n")
        assertEquals(listOf(LsTarget("deployment/web", true), LsTarget("pod/web-1/container/app", true)), ls.targets)
        assertNull(ls.currentNamespace)
        assertThrows(ProtocolError::class.java) { ProtocolParser.ls("no targets in namespace x") }
        assertThrows(ProtocolError::class.java) { ProtocolParser.ls("42") }
    }

    @Test
    fun `verify-config's target in each of its forms`() {
        fun target(json: String) =
            (ProtocolParser.verifyConfig("""{"type":"Success","config":{"path":$json,"namespace":"prod"},"warnings":["w"]}""")
                as VerifyConfigResult.Success).target
        assertEquals(ConfigTarget.Unset, target("null"))
        assertEquals(ConfigTarget.Targetless, target("\"targetless\""))
        assertEquals(ConfigTarget.Path("deployment/api"), target("\"deployment/api\""))
        assertEquals(ConfigTarget.Path("deployment/api/container/main"), target("""{"deployment":"api","container":"main"}"""))
        assertEquals(ConfigTarget.Path("pod/p"), target("""{"pod":"p","container":null}"""))
        val success = ProtocolParser.verifyConfig(
            """{"type":"Success","config":{"path":null,"namespace":"prod"},"warnings":["w"],"compatible_target_types":["pod"]}""",
        ) as VerifyConfigResult.Success
        assertEquals("prod", success.namespace)
        assertEquals(listOf("w"), success.warnings)
        assertEquals(listOf("pod"), success.compatibleTargetTypes)
    }

    @Test
    fun `verify-config's failure lists every error`() {
        val fail = ProtocolParser.verifyConfig("""{"type":"Fail","errors":["a: bad","b: worse"]}""")
        assertEquals(VerifyConfigResult.Fail(listOf("a: bad", "b: worse")), fail)
        assertThrows(ProtocolError::class.java) { ProtocolParser.verifyConfig("""{"type":"Maybe"}""") }
    }

    @Test
    fun `daemon status lists the live sessions`() {
        val status = ProtocolParser.daemonStatus(resource("daemon-status.json"))
        assertTrue(status.running)
        assertEquals(13738, status.pid)
        assertEquals(
            listOf(LiveSession("7f3a", "pid/4242", "open", 2, 2, "ext", 1796218300.5, 1024, 2048)),
            status.sessions,
        )
        val none = ProtocolParser.daemonStatus("""{"running": false, "runtime_dir": "/run/user/0/mirrord"}""")
        assertEquals(DaemonStatus(false, null, null, emptyList()), none)
    }

    // Recorded from our own CLI (`mirrord ext -t pid/N` against a local pod, a pid that does not
    // exist, `verify-config --ide` on a good and a bad file): recorded/ours/.

    @Test
    fun `our ext's lines all parse, the last being the ready line with the pod's env`() {
        val messages = resource("ours/ext.jsonl").lines().filter { it.isNotBlank() }.map(ProtocolParser::progressLine)
        assertTrue(messages.none { it is ProgressMessage.Unknown }, messages.toString())
        assertEquals(ProgressMessage.NewTask(LAUNCH_TASK, null), messages.first())
        val ready = assertInstanceOf(ProgressMessage.Ready::class.java, messages.last())
        assertEquals("from-the-pod", ready.execution.environment["POD_VAR"])
        assertTrue(ready.execution.environment["LD_PRELOAD"]!!.endsWith("/libmirrord_layer.so"))
        assertEquals(1, messages.count { it is ProgressMessage.Ready })
    }

    @Test
    fun `our ext's failure, its failed launch task and its Error line`() {
        val messages = resource("ours/ext-bad-target.stdout").lines().filter { it.isNotBlank() }.map(ProtocolParser::progressLine)
        assertEquals(ProgressMessage.FinishedTask(LAUNCH_TASK, false, null), messages.last())
        val error = ProtocolParser.failure("mirrord ext", 1, resource("ours/ext-bad-target.stderr"))
        assertTrue("999999" in error.message, error.message)
        assertTrue(error.help!!.isNotBlank())
        assertEquals("error", error.severity)
    }

    @Test
    fun `our verify-config's success and failure`() {
        val good = ProtocolParser.verifyConfig(resource("ours/verify-good.json")) as VerifyConfigResult.Success
        assertEquals(ConfigTarget.Path("deployment/api/container/main"), good.target)
        assertEquals("prod", good.namespace)
        assertTrue("deployment" in good.compatibleTargetTypes)
        val bad = ProtocolParser.verifyConfig(resource("ours/verify-bad.json")) as VerifyConfigResult.Fail
        assertTrue(bad.errors.single().contains("feature.fs.mode"), bad.errors.toString())
    }
}
