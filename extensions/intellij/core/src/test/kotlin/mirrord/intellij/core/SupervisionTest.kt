package mirrord.intellij.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertSame
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

/** The ready line's patched path (the system-call supervisor) as the launch applies it. */
class SupervisionTest {
    private val supervisor = "/venv/lib/python3.11/site-packages/mirrord/layer/mirrord-supervisor"
    private val supervised = MirrordExecution(
        environment = mapOf(
            "POD_VAR" to "from-the-pod",
            "MIRRORD_SUPERVISE" to "/work/app/server",
            "MIRRORD_DONT_LOAD" to "1",
        ),
        patchedPath = supervisor,
        envToUnset = emptyList(),
        usesOperator = false,
    )

    private fun request(executable: String?, replaceable: Boolean = true) =
        LaunchRequest(true, emptyMap(), executable, DebuggerKind.GO, null, executableReplaceable = replaceable)

    @Test
    fun `a patched path for the executable the glue starts is kept, with its variables`() {
        val warnings = mutableListOf<String>()
        assertSame(supervised, Supervision.applicable(supervised, request("/work/app/server"), warnings::add))
        assertTrue(warnings.isEmpty(), warnings.toString())
        val plain = supervised.copy(patchedPath = null, environment = mapOf("POD_VAR" to "x"))
        assertSame(plain, Supervision.applicable(plain, request("/usr/bin/python3", replaceable = false), warnings::add))
        assertTrue(warnings.isEmpty(), warnings.toString())
    }

    @Test
    fun `a launch that cannot start the supervisor keeps the layer active and says so`() {
        for (req in listOf(request("/usr/lib/jvm/bin/java", replaceable = false), request(null))) {
            val warnings = mutableListOf<String>()
            val used = Supervision.applicable(supervised, req, warnings::add)
            assertNull(used.patchedPath)
            assertFalse("MIRRORD_DONT_LOAD" in used.environment || "MIRRORD_SUPERVISE" in used.environment, used.environment.keys.toString())
            assertEquals("from-the-pod", used.environment["POD_VAR"])
            assertEquals(1, warnings.size)
            assertTrue("supervisor" in warnings[0] && supervisor in warnings[0], warnings[0])
        }
    }

    @Test
    fun `the command line starts the supervisor with the program's arguments`() {
        val original = listOf("/work/app/server", "--port", "8080")
        assertEquals(listOf(supervisor, "--port", "8080"), Supervision.commandLine(supervisor, original))
        assertEquals(original, Supervision.commandLine(null, original))
    }

    @Test
    fun `a re-run without the supervisor drops the earlier run's supervisor variables`() {
        val earlier = SessionEnvironment.merge(emptyMap(), supervised, DebuggerKind.GO)
        assertEquals("1", earlier["MIRRORD_DONT_LOAD"])
        val unsupervised = supervised.copy(patchedPath = null, environment = mapOf("POD_VAR" to "again"))
        val next = SessionEnvironment.merge(earlier, unsupervised, DebuggerKind.GO)
        assertFalse("MIRRORD_DONT_LOAD" in next || "MIRRORD_SUPERVISE" in next, next.keys.toString())
        assertEquals("again", next["POD_VAR"])
    }
}
