/*
 * The debuggee's environment under mirrord.
 *
 * Owns: whether mirrord applies to a launch (the toggle, overridden by MIRRORD_ACTIVE in the
 * run configuration), and merging a session's environment into a run configuration's: keys of
 * `env_to_unset` removed, the layer appended to LD_PRELOAD after the user's own preloads, layer
 * entries of an earlier run stripped first, the debugger's ports kept out of the session.
 * Does not own: where the run configuration keeps its variables (the plugin's glue).
 */
package mirrord.intellij.core

import java.io.File

/**
 * The debuggers the IDEs start, and the MIRRORD_DETECT_DEBUGGER_PORT value that makes the layer
 * read the debugger's port from the debuggee's command line (so its connections stay local).
 */
enum class DebuggerKind(val detectPortValue: String?) {
    /** IntelliJ IDEA: the JDWP agent (`-agentlib:jdwp=...address=PORT`). */
    JAVA("javaagent"),
    /** PyCharm: pydevd (`--port PORT`). */
    PYDEVD("pydevd"),
    /** debugpy (`--listen PORT`), as VS Code starts it. */
    DEBUGPY("debugpy"),
    /** WebStorm: node's inspector (`--inspect=PORT`). */
    NODE("nodeinspector"),
    /** GoLand: dlv runs the program; the toolchain is skipped (MIRRORD_SKIP_PROCESSES). */
    GO(null),
    NONE(null),
}

/** An inclusive range of TCP ports, as MIRRORD_IGNORE_DEBUGGER_PORTS spells it (`A-B`). */
data class PortRange(val first: Int, val last: Int) {
    init {
        require(first in 1..65535 && last in first..65535) { "not a port range: $first-$last" }
    }

    override fun toString() = if (first == last) "$first" else "$first-$last"
}

/** What to do to a command line's environment to turn one map into another. */
data class EnvChanges(val set: Map<String, String>, val unset: Set<String>)

object SessionEnvironment {
    /** The ports IntelliJ's debuggers listen on: their connections must stay on this machine. */
    val DEBUGGER_PORTS = PortRange(35000, 65535)

    /** Go's toolchain and debugger run as children of the debuggee's launch: not the app. */
    val GO_SKIP_PROCESSES = listOf(
        "dlv", "debugserver", "compile", "go", "asm", "cgo", "link", "git", "gcc", "as", "ld", "collect2", "cc1",
    )

    private val PRELOAD_KEYS = listOf("LD_PRELOAD", "DYLD_INSERT_LIBRARIES")

    /** A preload entry that is mirrord's layer (of any install): stripped before a re-run adds it. */
    fun isLayer(entry: String): Boolean = File(entry).name.startsWith("libmirrord_layer")

    /** LD_PRELOAD's entries (the loader splits on colons and spaces). */
    fun preloadEntries(value: String?): List<String> =
        value?.split(':', ' ')?.filter { it.isNotEmpty() } ?: emptyList()

    /**
     * Whether mirrord applies to a launch: MIRRORD_ACTIVE in the run configuration (`1`/`true`
     * on, `0`/`false` off) wins over the IDE's toggle.
     */
    fun isActive(toggle: Boolean, runEnvironment: Map<String, String>): Boolean =
        when (runEnvironment["MIRRORD_ACTIVE"]?.trim()?.lowercase()) {
            "1", "true", "yes", "on" -> true
            "0", "false", "no", "off" -> false
            else -> toggle
        }

    /**
     * A run configuration's variables without what an earlier mirrord run put there: the layer's
     * preload entries, and the supervisor's variables (`MIRRORD_DONT_LOAD` would switch the layer
     * off in a program started without the supervisor).
     */
    fun withoutLayer(runEnvironment: Map<String, String>): Map<String, String> {
        val env = LinkedHashMap(runEnvironment)
        Supervision.VARIABLES.forEach(env::remove)
        for (key in PRELOAD_KEYS) {
            val value = env[key] ?: continue
            val kept = preloadEntries(value).filterNot(::isLayer)
            if (kept.isEmpty()) env.remove(key) else env[key] = kept.joinToString(":")
        }
        return env
    }

    /**
     * The debuggee's environment: [runEnvironment] (the run configuration's variables) with the
     * session's [execution] merged in.
     */
    fun merge(
        runEnvironment: Map<String, String>,
        execution: MirrordExecution,
        debugger: DebuggerKind = DebuggerKind.NONE,
        debuggerPorts: PortRange = DEBUGGER_PORTS,
    ): Map<String, String> {
        val env = LinkedHashMap(withoutLayer(runEnvironment))
        for (key in execution.envToUnset) env.remove(key)
        for ((key, value) in execution.environment) {
            env[key] = if (key in PRELOAD_KEYS) {
                (preloadEntries(env[key]) + preloadEntries(value).filterNot { it in preloadEntries(env[key]) })
                    .joinToString(":")
            } else {
                value
            }
        }
        // The user's own value (a run configuration variable) wins over our defaults.
        env.putIfAbsent("MIRRORD_IGNORE_DEBUGGER_PORTS", debuggerPorts.toString())
        debugger.detectPortValue?.let { env.putIfAbsent("MIRRORD_DETECT_DEBUGGER_PORT", it) }
        if (debugger == DebuggerKind.GO) env.putIfAbsent("MIRRORD_SKIP_PROCESSES", GO_SKIP_PROCESSES.joinToString(";"))
        return env
    }

    /**
     * The environment a run configuration's process would get: the IDE's own [parent] when the
     * configuration passes it on, overridden by the configuration's [own] variables.
     */
    fun effective(own: Map<String, String>, inheritParent: Boolean, parent: Map<String, String> = System.getenv()): Map<String, String> =
        if (inheritParent) LinkedHashMap(parent).apply { putAll(own) } else LinkedHashMap(own)

    /** The variables to set and to remove on a command line whose environment is [before]. */
    fun changes(before: Map<String, String>, after: Map<String, String>): EnvChanges = EnvChanges(
        set = after.filter { (k, v) -> before[k] != v },
        unset = before.keys - after.keys,
    )
}
