/*
 * Running the `mirrord` CLI for the IDE.
 *
 * Owns: finding the binary (the settings' path, the project's virtualenv, PATH, ~/.local/bin),
 * the environment every call gets (the IDE protocol's variables), running a command with a
 * time limit and both pipes drained, and the typed calls (`--version`, `verify-config --ide`,
 * `ls -o json`, `daemon status --json`, starting `ext`). Does not own: parsing (Protocol.kt),
 * the session's lifetime (Session.kt).
 */
package mirrord.intellij.core

import java.io.File
import java.io.InputStream
import java.nio.charset.StandardCharsets
import java.util.concurrent.TimeUnit

/** Where the binary was found, for the settings page to show. */
data class ResolvedBinary(val path: File, val source: String)

/** No usable `mirrord` binary: the message says where we looked and what to do. */
class BinaryNotFound(message: String) : Exception(message)

object BinaryResolver {
    /**
     * The `mirrord` to run: [configured] (the settings' path) when set, which must then exist;
     * else the project's virtualenv (`.venv`, `venv`: `pip install mirrord` there is the usual
     * install for a Python project), then each directory of [pathVariable], then ~/.local/bin
     * (`pip install --user`).
     */
    fun resolve(
        configured: String?,
        projectDir: File?,
        pathVariable: String? = System.getenv("PATH"),
        home: String? = System.getProperty("user.home"),
    ): ResolvedBinary {
        if (!configured.isNullOrBlank()) {
            val file = File(configured.trim())
            if (file.isFile && file.canExecute()) return ResolvedBinary(file, "settings")
            throw BinaryNotFound(
                "the mirrord binary set in Settings > Tools > mirrord ($configured) " +
                    (if (file.exists()) "is not executable" else "does not exist") +
                    "; fix the path or clear it to use the one on PATH",
            )
        }
        val looked = mutableListOf<String>()
        fun candidate(dir: File, source: String): ResolvedBinary? {
            val file = File(dir, "mirrord")
            looked += file.path
            return if (file.isFile && file.canExecute()) ResolvedBinary(file, source) else null
        }
        if (projectDir != null) {
            for (venv in listOf(".venv", "venv")) {
                candidate(File(projectDir, "$venv/bin"), "project virtualenv")?.let { return it }
            }
        }
        for (dir in (pathVariable ?: "").split(File.pathSeparatorChar).filter { it.isNotEmpty() }) {
            candidate(File(dir), "PATH")?.let { return it }
        }
        if (home != null) candidate(File(home, ".local/bin"), "~/.local/bin")?.let { return it }
        throw BinaryNotFound(
            "mirrord is not installed where the IDE looks (${looked.size} places, e.g. " +
                looked.take(3).joinToString() + "); install it with `pip install mirrord` " +
                "or set its path in Settings > Tools > mirrord",
        )
    }
}

/** What a finished command printed. */
data class CommandResult(val exitCode: Int, val stdout: String, val stderr: String)

/** A command did not finish in time; it was killed. */
class CommandTimeout(message: String) : Exception(message)

/**
 * The environment of every call: the IDE's own, plus what mirrord's IDE protocol asks for.
 * [extra] (e.g. MIRRORD_TARGET_NAMESPACE, MIRRORD_LS_TARGET_TYPES) comes last.
 */
fun cliEnvironment(base: Map<String, String>, extra: Map<String, String> = emptyMap()): Map<String, String> {
    val env = LinkedHashMap(base)
    env["MIRRORD_PROGRESS_MODE"] = "json"
    env["MIRRORD_PROGRESS_SUPPORT_IDE"] = "true"
    env["MIRRORD_IDE_NAME"] = "intellij"
    env["MIRRORD_LS_RICH_OUTPUT"] = "true"
    env["MIRRORD_EXT_PRINT_CONFIG"] = "TRUE"
    env.putAll(extra)
    return env
}

class MirrordCli(
    val binary: File,
    /** The IDE's environment; the protocol's variables are added to it for each call. */
    private val baseEnvironment: Map<String, String> = System.getenv(),
    /** The project directory: relative config paths resolve against it. */
    private val workingDirectory: File? = null,
) {
    fun processBuilder(args: List<String>, extraEnv: Map<String, String> = emptyMap()): ProcessBuilder {
        val builder = ProcessBuilder(listOf(binary.path) + args)
        builder.environment().clear()
        builder.environment().putAll(cliEnvironment(baseEnvironment, extraEnv))
        workingDirectory?.let { builder.directory(it) }
        builder.redirectInput(ProcessBuilder.Redirect.PIPE)
        return builder
    }

    /** Runs `mirrord ARGS`, reading both pipes as it runs; kills it after [timeoutSeconds]. */
    fun run(args: List<String>, timeoutSeconds: Long = 60, extraEnv: Map<String, String> = emptyMap()): CommandResult {
        val process = processBuilder(args, extraEnv).start()
        process.outputStream.close() // no stdin: a prompt must not wait for the IDE
        val stdout = drain(process.inputStream)
        val stderr = drain(process.errorStream)
        if (!process.waitFor(timeoutSeconds, TimeUnit.SECONDS)) {
            process.destroyForcibly()
            process.waitFor(5, TimeUnit.SECONDS)
            throw CommandTimeout("`mirrord ${args.joinToString(" ")}` did not finish within $timeoutSeconds s and was stopped")
        }
        stdout.join(5_000)
        stderr.join(5_000)
        return CommandResult(process.exitValue(), stdout.text(), stderr.text())
    }

    /** `mirrord --version`: the version word of "mirrord X.Y.Z". */
    fun version(): String {
        val result = run(listOf("--version"), timeoutSeconds = 10)
        val words = result.stdout.trim().split(Regex("\\s+"))
        if (result.exitCode != 0 || words.size < 2 || words[0] != "mirrord") {
            throw ProtocolError("`${binary.path} --version` did not print `mirrord X.Y.Z` (got '${result.stdout.trim()}'); is it mirrord?")
        }
        return words[1]
    }

    /** `mirrord verify-config --ide CONFIG`. */
    fun verifyConfig(config: File): VerifyConfigResult {
        val result = run(listOf("verify-config", "--ide", config.path), timeoutSeconds = 30)
        if (result.stdout.isBlank()) throw ProtocolParser.failure("mirrord verify-config", result.exitCode, result.stderr)
        return ProtocolParser.verifyConfig(result.stdout)
    }

    /** `mirrord ls -o json [-f CONFIG] [-n NAMESPACE]`, optionally limited to [targetTypes]. */
    fun ls(config: File?, namespace: String?, targetTypes: List<String>? = null): LsResult {
        val args = mutableListOf("ls", "-o", "json")
        config?.let { args += listOf("-f", it.path) }
        namespace?.let { args += listOf("-n", it) }
        val extra = targetTypes?.let { types ->
            mapOf("MIRRORD_LS_TARGET_TYPES" to types.joinToString(",", "[", "]") { "\"$it\"" })
        } ?: emptyMap()
        val result = run(args, timeoutSeconds = 60, extraEnv = extra)
        if (result.exitCode != 0) throw ProtocolParser.failure("mirrord ls", result.exitCode, result.stderr)
        return ProtocolParser.ls(result.stdout)
    }

    /** `mirrord daemon status --json`: the live sessions (none when no daemon runs). */
    fun daemonStatus(): DaemonStatus {
        val result = run(listOf("daemon", "status", "--json"), timeoutSeconds = 20)
        if (result.stdout.isBlank()) throw ProtocolParser.failure("mirrord daemon status", result.exitCode, result.stderr)
        return ProtocolParser.daemonStatus(result.stdout)
    }

    /** The arguments of `mirrord ext` for a launch. */
    fun extArgs(target: String?, config: File?, executable: String?): List<String> {
        val args = mutableListOf("ext")
        target?.let { args += listOf("-t", it) }
        config?.let { args += listOf("-f", it.path) }
        executable?.let { args += listOf("-e", it) }
        return args
    }

    /** Starts `mirrord ext`; the session is ready when [MirrordSession.awaitReady] returns. */
    fun startExt(
        target: String?,
        config: File?,
        executable: String?,
        namespace: String? = null,
        listener: ProgressListener = ProgressListener.NONE,
        onBroken: (MirrordError) -> Unit = {},
    ): MirrordSession {
        val extra = namespace?.let { mapOf("MIRRORD_TARGET_NAMESPACE" to it) } ?: emptyMap()
        val process = processBuilder(extArgs(target, config, executable), extra).start()
        process.outputStream.close()
        return MirrordSession(process, listener, onBroken)
    }

    override fun toString() = "MirrordCli(${binary.path})"
}

/** A thread reading a stream to its end, so the child never blocks on a full pipe. */
internal class Drain(private val input: InputStream) : Thread("mirrord-pipe") {
    private val buffer = java.io.ByteArrayOutputStream()

    init {
        isDaemon = true
    }

    override fun run() {
        input.use { it.copyTo(buffer) }
    }

    fun text(): String = synchronized(buffer) { buffer.toString(StandardCharsets.UTF_8) }
}

internal fun drain(input: InputStream): Drain = Drain(input).also { it.start() }
