/*
 * The messages of mirrord's IDE protocol (docs/commands.md, "IDE protocol") and their parser.
 *
 * Owns: the typed form of every line the CLI prints for an IDE (`mirrord ext` progress lines and
 * its launch-ready line, `Error:` lines on stderr, `mirrord ls` in its rich and array forms,
 * `mirrord verify-config --ide`, `mirrord daemon status --json`), and turning text into those
 * types. Does not own: running the CLI (Cli.kt) or deciding anything from the messages.
 *
 * Compatibility: the CLI may add fields and message types; unknown fields are ignored and an
 * unknown `type` is kept as [ProgressMessage.Unknown], never an error. A line that is not JSON
 * at all is a [ProtocolError]: the CLI promises JSON only on `ext`'s stdout.
 */
package mirrord.intellij.core

import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject
import com.google.gson.JsonParser
import com.google.gson.JsonSyntaxException

/** The name of the task whose successful end carries the session ([MirrordExecution]). */
const val LAUNCH_TASK = "mirrord preparing to launch"

/** The CLI printed something that is not its protocol: a bug on its side or a version mismatch. */
class ProtocolError(message: String) : Exception(message)

/** What the debuggee needs: the launch-ready line's payload. */
data class MirrordExecution(
    /** Variables to set in the debuggee's environment (`LD_PRELOAD` is the layer alone). */
    val environment: Map<String, String>,
    /**
     * What the IDE starts instead of the executable it named (`ext -e`): mirrord's system-call
     * supervisor for a static or Go program (see [Supervision]); null when the program runs as it is.
     */
    val patchedPath: String?,
    /** Variables to remove from the debuggee's environment. */
    val envToUnset: List<String>,
    val usesOperator: Boolean,
) {
    // The environment holds the pod's secrets: never print it.
    override fun toString(): String =
        "MirrordExecution(${environment.size} variables, unset=$envToUnset, patchedPath=$patchedPath)"
}

/** A button of an [ProgressMessage.IdeMessage]. */
data class IdeAction(val kind: String, val label: String, val link: String?)

sealed interface ProgressMessage {
    data class NewTask(val name: String, val parent: String?) : ProgressMessage
    data class FinishedTask(val name: String, val success: Boolean, val message: String?) : ProgressMessage
    data class Warning(val message: String) : ProgressMessage
    data class Info(val message: String) : ProgressMessage
    data class IdeMessage(
        val id: String,
        val level: String,
        val text: String,
        val actions: List<IdeAction>,
    ) : ProgressMessage
    /** The launch-ready line: `FinishedTask` of [LAUNCH_TASK] with success and the execution. */
    data class Ready(val execution: MirrordExecution) : ProgressMessage
    /** A message type this plugin does not know (a newer CLI); shown nowhere, never an error. */
    data class Unknown(val type: String, val raw: String) : ProgressMessage
}

/**
 * An error of the CLI: the JSON object after `Error: ` on stderr, or (from a CLI that printed no
 * such line) the text it printed. [help] says what the user should do.
 */
class MirrordError(
    override val message: String,
    val severity: String = "Error",
    val causes: List<String> = emptyList(),
    val help: String? = null,
    val labels: List<String> = emptyList(),
    val related: List<String> = emptyList(),
) : Exception(message) {
    /** The text for a notification: the message, its causes, then the help. */
    fun describe(): String = buildString {
        append(message)
        for (cause in causes) append("\n  caused by: ").append(cause)
        help?.let { append("\n").append(it) }
    }
}

data class LsTarget(val path: String, val available: Boolean)

/** `mirrord ls` output. The array form carries targets only (all available). */
data class LsResult(
    val targets: List<LsTarget>,
    val currentNamespace: String?,
    val namespaces: List<String>,
)

/** The target a config file names, as `verify-config --ide` reports it. */
sealed interface ConfigTarget {
    /** No target in the config: the IDE asks the user. */
    object Unset : ConfigTarget { override fun toString() = "Unset" }
    object Targetless : ConfigTarget { override fun toString() = "Targetless" }
    data class Path(val path: String) : ConfigTarget
}

sealed interface VerifyConfigResult {
    data class Success(
        val target: ConfigTarget,
        val namespace: String?,
        val warnings: List<String>,
        val compatibleTargetTypes: List<String>,
    ) : VerifyConfigResult
    data class Fail(val errors: List<String>) : VerifyConfigResult
}

/** One live session of the daemon, as `mirrord daemon status --json` lists it. */
data class LiveSession(
    val id: String,
    val target: String,
    val state: String,
    val processes: Int,
    val channels: Int,
    val label: String,
    val createdEpochSeconds: Double,
    val bytesToAgent: Long,
    val bytesToUser: Long,
)

data class DaemonStatus(
    val running: Boolean,
    val pid: Int?,
    val version: String?,
    val sessions: List<LiveSession>,
)

object ProtocolParser {
    private fun parseObject(text: String, what: String): JsonObject {
        val element = try {
            JsonParser.parseString(text)
        } catch (e: JsonSyntaxException) {
            throw ProtocolError("$what is not JSON: ${text.take(200)}")
        }
        if (!element.isJsonObject) throw ProtocolError("$what is not a JSON object: ${text.take(200)}")
        return element.asJsonObject
    }

    private fun JsonObject.str(key: String): String? =
        get(key)?.takeUnless { it.isJsonNull }?.let { if (it.isJsonPrimitive) it.asString else it.toString() }

    private fun JsonObject.need(key: String, what: String): String =
        str(key) ?: throw ProtocolError("$what has no '$key': $this")

    private fun JsonObject.bool(key: String): Boolean =
        get(key)?.takeIf { it.isJsonPrimitive }?.asBoolean ?: false

    private fun JsonElement?.strings(): List<String> {
        if (this == null || !isJsonArray) return emptyList()
        return asJsonArray.map { if (it.isJsonPrimitive) it.asString else it.toString() }
    }

    /** One line of `mirrord ext`'s stdout. */
    fun progressLine(line: String): ProgressMessage {
        val obj = parseObject(line, "mirrord's progress line")
        return when (val type = obj.need("type", "progress line")) {
            "NewTask" -> ProgressMessage.NewTask(obj.need("name", "NewTask"), obj.str("parent"))
            "FinishedTask" -> {
                val name = obj.need("name", "FinishedTask")
                val success = obj.bool("success")
                val message = obj.str("message")
                if (name == LAUNCH_TASK && success) {
                    ProgressMessage.Ready(execution(message ?: throw ProtocolError("the launch-ready line has no message: $line")))
                } else {
                    ProgressMessage.FinishedTask(name, success, message)
                }
            }
            "Warning" -> ProgressMessage.Warning(obj.str("message") ?: "")
            "Info" -> ProgressMessage.Info(obj.str("message") ?: "")
            "IdeMessage" -> {
                val msg = obj.get("message")?.takeIf { it.isJsonObject }?.asJsonObject
                    ?: throw ProtocolError("IdeMessage without a message object: $line")
                val actions = msg.get("actions")?.takeIf { it.isJsonArray }?.asJsonArray.orEmpty().mapNotNull { a ->
                    a.takeIf { it.isJsonObject }?.asJsonObject?.let {
                        IdeAction(it.str("kind") ?: "Link", it.str("label") ?: "", it.str("link"))
                    }
                }
                ProgressMessage.IdeMessage(msg.str("id") ?: "", msg.str("level") ?: "Info", msg.str("text") ?: "", actions)
            }
            else -> ProgressMessage.Unknown(type, line)
        }
    }

    private fun JsonArray?.orEmpty(): List<JsonElement> = this?.toList() ?: emptyList()

    /** The launch-ready line's message: a JSON *string* holding the execution object. */
    fun execution(message: String): MirrordExecution {
        val obj = parseObject(message, "the launch-ready message")
        val envObj = obj.get("environment")?.takeIf { it.isJsonObject }?.asJsonObject
            ?: throw ProtocolError("the launch-ready message has no environment object")
        val env = LinkedHashMap<String, String>()
        for ((k, v) in envObj.entrySet()) {
            if (!v.isJsonNull) env[k] = if (v.isJsonPrimitive) v.asString else v.toString()
        }
        return MirrordExecution(
            environment = env,
            patchedPath = obj.str("patched_path"),
            envToUnset = obj.get("env_to_unset").strings(),
            usesOperator = obj.bool("uses_operator"),
        )
    }

    /** A stderr line `Error: {...}`; null for any other line. */
    fun errorLine(line: String): MirrordError? {
        val text = line.trimEnd()
        if (!text.startsWith("Error: ")) return null
        val payload = text.removePrefix("Error: ").trim()
        if (!payload.startsWith("{")) return MirrordError(payload)
        val obj = try {
            parseObject(payload, "mirrord's error line")
        } catch (e: ProtocolError) {
            return MirrordError(payload)
        }
        return MirrordError(
            message = obj.str("message") ?: payload,
            severity = obj.str("severity") ?: "Error",
            causes = obj.get("causes").strings(),
            help = obj.str("help")?.takeIf { it.isNotBlank() },
            labels = obj.get("labels").strings(),
            related = obj.get("related").strings(),
        )
    }

    /**
     * The error a failed command reports: its `Error:` line when it printed one, else its stderr
     * text (an older CLI, or a crash before the error handler), else the exit code alone.
     */
    fun failure(command: String, exitCode: Int, stderr: String): MirrordError {
        stderr.lineSequence().firstNotNullOfOrNull { errorLine(it) }?.let { return it }
        val text = stderr.trim()
        return if (text.isEmpty()) {
            MirrordError("`$command` exited with code $exitCode and printed no error")
        } else {
            MirrordError(text.lines().take(20).joinToString("\n"))
        }
    }

    /** `mirrord ls` stdout: the rich object or the array of paths. */
    fun ls(stdout: String): LsResult {
        val element = try {
            JsonParser.parseString(stdout.trim())
        } catch (e: JsonSyntaxException) {
            throw ProtocolError("mirrord ls printed no JSON: ${stdout.take(200)}")
        }
        return when {
            element.isJsonArray -> LsResult(element.asJsonArray.map { LsTarget(it.asString, true) }, null, emptyList())
            element.isJsonObject -> {
                val obj = element.asJsonObject
                val targets = obj.get("targets")?.takeIf { it.isJsonArray }?.asJsonArray
                    ?: throw ProtocolError("mirrord ls's object has no targets: ${stdout.take(200)}")
                LsResult(
                    targets.map { t ->
                        if (t.isJsonPrimitive) {
                            LsTarget(t.asString, true)
                        } else {
                            val o = t.asJsonObject
                            LsTarget(o.need("path", "ls target"), o.get("available")?.asBoolean ?: true)
                        }
                    },
                    obj.str("current_namespace"),
                    obj.get("namespaces").strings(),
                )
            }
            else -> throw ProtocolError("mirrord ls printed neither an array nor an object: ${stdout.take(200)}")
        }
    }

    /** A target of `verify-config --ide`: null, "targetless", "kind/name...", or {"kind": name, "container": c}. */
    private fun configTarget(element: JsonElement?): ConfigTarget {
        if (element == null || element.isJsonNull) return ConfigTarget.Unset
        if (element.isJsonPrimitive) {
            val path = element.asString
            return if (path == "targetless") ConfigTarget.Targetless else ConfigTarget.Path(path)
        }
        if (element.isJsonObject) {
            val obj = element.asJsonObject
            val container = obj.str("container")
            val kind = obj.keySet().firstOrNull { it != "container" && !obj.get(it).isJsonNull }
                ?: return ConfigTarget.Unset
            val name = obj.str(kind)!!
            return ConfigTarget.Path(if (container != null) "$kind/$name/container/$container" else "$kind/$name")
        }
        throw ProtocolError("verify-config's target is neither a string nor an object: $element")
    }

    /** `mirrord verify-config --ide` stdout. */
    fun verifyConfig(stdout: String): VerifyConfigResult {
        val obj = parseObject(stdout.trim(), "verify-config's output")
        return when (val type = obj.need("type", "verify-config output")) {
            "Success" -> {
                val config = obj.get("config")?.takeIf { it.isJsonObject }?.asJsonObject ?: JsonObject()
                VerifyConfigResult.Success(
                    target = configTarget(config.get("path")),
                    namespace = config.str("namespace"),
                    warnings = obj.get("warnings").strings(),
                    compatibleTargetTypes = obj.get("compatible_target_types").strings(),
                )
            }
            "Fail" -> VerifyConfigResult.Fail(obj.get("errors").strings())
            else -> throw ProtocolError("verify-config printed an unknown type '$type'")
        }
    }

    /** `mirrord daemon status --json` stdout (also its `{"running": false}` when none runs). */
    fun daemonStatus(stdout: String): DaemonStatus {
        val obj = parseObject(stdout.trim(), "daemon status")
        if (!obj.bool("running")) return DaemonStatus(false, null, null, emptyList())
        val daemon = obj.get("daemon")?.takeIf { it.isJsonObject }?.asJsonObject ?: JsonObject()
        val sessions = obj.get("sessions")?.takeIf { it.isJsonArray }?.asJsonArray.orEmpty().map { e ->
            val s = e.asJsonObject
            LiveSession(
                id = s.need("id", "session"),
                target = s.str("target") ?: "",
                state = s.str("state") ?: "",
                processes = s.get("processes")?.let { if (it.isJsonArray) it.asJsonArray.size() else it.asInt } ?: 0,
                channels = s.get("channels")?.asInt ?: 0,
                label = s.str("label") ?: "",
                createdEpochSeconds = s.get("created")?.asDouble ?: 0.0,
                bytesToAgent = s.get("bytes_to_agent")?.asLong ?: 0,
                bytesToUser = s.get("bytes_to_user")?.asLong ?: 0,
            )
        }
        return DaemonStatus(true, daemon.get("pid")?.asInt, daemon.str("version"), sessions)
    }
}
