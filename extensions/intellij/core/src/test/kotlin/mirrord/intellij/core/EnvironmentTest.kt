package mirrord.intellij.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class EnvironmentTest {
    private val layer = "/home/u/.venv/lib/python3.11/site-packages/mirrord/layer/libmirrord_layer.so"
    private val execution = MirrordExecution(
        environment = mapOf("POD_VAR" to "from-the-pod", "LD_PRELOAD" to layer, "PATH" to "/pod/bin"),
        patchedPath = null,
        envToUnset = listOf("HTTP_PROXY"),
        usesOperator = false,
    )

    @Test
    fun `the session's variables are set, unset keys removed, the layer appended to the user's preloads`() {
        val run = mapOf("HTTP_PROXY" to "http://proxy:3128", "LD_PRELOAD" to "/usr/lib/libjemalloc.so", "KEEP" to "1")
        val env = SessionEnvironment.merge(run, execution, DebuggerKind.JAVA)
        assertEquals("from-the-pod", env["POD_VAR"])
        assertEquals("/pod/bin", env["PATH"])
        assertFalse("HTTP_PROXY" in env)
        assertEquals("/usr/lib/libjemalloc.so:$layer", env["LD_PRELOAD"])
        assertEquals("1", env["KEEP"])
        assertEquals("35000-65535", env["MIRRORD_IGNORE_DEBUGGER_PORTS"])
        assertEquals("javaagent", env["MIRRORD_DETECT_DEBUGGER_PORT"])
        assertNull(env["MIRRORD_SKIP_PROCESSES"])
    }

    @Test
    fun `a re-run strips the earlier run's layer before adding it again`() {
        val first = SessionEnvironment.merge(mapOf("LD_PRELOAD" to "/usr/lib/a.so"), execution)
        val moved = execution.copy(environment = execution.environment + ("LD_PRELOAD" to "/opt/new/libmirrord_layer.so"))
        val second = SessionEnvironment.merge(first, moved)
        assertEquals("/usr/lib/a.so:/opt/new/libmirrord_layer.so", second["LD_PRELOAD"])
        val alone = SessionEnvironment.withoutLayer(mapOf("LD_PRELOAD" to "$layer /x/libmirrord_layer.dylib"))
        assertFalse("LD_PRELOAD" in alone)
    }

    @Test
    fun `the debugger's settings per kind, the user's own values winning`() {
        val go = SessionEnvironment.merge(emptyMap(), execution, DebuggerKind.GO)
        assertEquals(SessionEnvironment.GO_SKIP_PROCESSES.joinToString(";"), go["MIRRORD_SKIP_PROCESSES"])
        assertTrue("dlv;" in go["MIRRORD_SKIP_PROCESSES"]!!)
        assertNull(go["MIRRORD_DETECT_DEBUGGER_PORT"])
        assertEquals("pydevd", SessionEnvironment.merge(emptyMap(), execution, DebuggerKind.PYDEVD)["MIRRORD_DETECT_DEBUGGER_PORT"])
        assertEquals("debugpy", SessionEnvironment.merge(emptyMap(), execution, DebuggerKind.DEBUGPY)["MIRRORD_DETECT_DEBUGGER_PORT"])
        assertEquals("nodeinspector", SessionEnvironment.merge(emptyMap(), execution, DebuggerKind.NODE)["MIRRORD_DETECT_DEBUGGER_PORT"])
        val own = SessionEnvironment.merge(mapOf("MIRRORD_IGNORE_DEBUGGER_PORTS" to "5005"), execution, DebuggerKind.NONE, PortRange(40000, 40010))
        assertEquals("5005", own["MIRRORD_IGNORE_DEBUGGER_PORTS"])
        assertEquals("40000-40010", SessionEnvironment.merge(emptyMap(), execution, DebuggerKind.NONE, PortRange(40000, 40010))["MIRRORD_IGNORE_DEBUGGER_PORTS"])
        assertThrows(IllegalArgumentException::class.java) { PortRange(10, 5) }
        assertThrows(IllegalArgumentException::class.java) { PortRange(0, 5) }
    }

    @Test
    fun `MIRRORD_ACTIVE in the run configuration overrides the toggle`() {
        assertTrue(SessionEnvironment.isActive(true, emptyMap()))
        assertFalse(SessionEnvironment.isActive(false, emptyMap()))
        assertTrue(SessionEnvironment.isActive(false, mapOf("MIRRORD_ACTIVE" to "1")))
        assertFalse(SessionEnvironment.isActive(true, mapOf("MIRRORD_ACTIVE" to "0")))
        assertTrue(SessionEnvironment.isActive(true, mapOf("MIRRORD_ACTIVE" to "maybe")))
    }

    @Test
    fun `every call gets the IDE protocol's variables`() {
        val env = cliEnvironment(mapOf("HOME" to "/h", "MIRRORD_PROGRESS_MODE" to "std"), mapOf("MIRRORD_TARGET_NAMESPACE" to "prod"))
        assertEquals("json", env["MIRRORD_PROGRESS_MODE"])
        assertEquals("true", env["MIRRORD_PROGRESS_SUPPORT_IDE"])
        assertEquals("intellij", env["MIRRORD_IDE_NAME"])
        assertEquals("true", env["MIRRORD_LS_RICH_OUTPUT"])
        assertEquals("prod", env["MIRRORD_TARGET_NAMESPACE"])
        assertEquals("/h", env["HOME"])
    }

    @Test
    fun `the changes a command line needs, from its effective environment`() {
        val parent = mapOf("HOME" to "/h", "HTTP_PROXY" to "p", "LD_PRELOAD" to "/a.so")
        val before = SessionEnvironment.effective(mapOf("OWN" to "1"), inheritParent = true, parent = parent)
        assertEquals(mapOf("HOME" to "/h", "HTTP_PROXY" to "p", "LD_PRELOAD" to "/a.so", "OWN" to "1"), before)
        assertEquals(mapOf("OWN" to "1"), SessionEnvironment.effective(mapOf("OWN" to "1"), inheritParent = false, parent = parent))
        val after = SessionEnvironment.merge(before, execution)
        val changes = SessionEnvironment.changes(before, after)
        assertEquals(setOf("HTTP_PROXY"), changes.unset)
        assertEquals("/a.so:$layer", changes.set["LD_PRELOAD"])
        assertEquals("from-the-pod", changes.set["POD_VAR"])
        assertFalse("HOME" in changes.set)
    }
}
