/*
 * One `mirrord ext` process: the IDE side of a session.
 *
 * Owns: reading `ext`'s stdout line by line (every line is a protocol message, handed to the
 * listener as it comes), waiting for the launch-ready line with a time limit, turning a failed
 * start into the CLI's error, and the lifetime: the process is kept while the debuggee runs and
 * stopped when it exits (or when the IDE gives up). Does not own: the session itself (the
 * daemon ends it when `ext` goes) or the debuggee.
 */
package mirrord.intellij.core

import java.io.BufferedReader
import java.io.InputStreamReader
import java.nio.charset.StandardCharsets
import java.util.concurrent.CompletableFuture
import java.util.concurrent.ExecutionException
import java.util.concurrent.TimeUnit
import java.util.concurrent.TimeoutException

/** Receives `ext`'s messages on its reader thread, in order. */
fun interface ProgressListener {
    fun onMessage(message: ProgressMessage)

    companion object {
        val NONE = ProgressListener { }
    }
}

class MirrordSession internal constructor(
    private val process: Process,
    private val listener: ProgressListener,
    /** Called (on the reader thread) when a ready session ends with the CLI's error, not by [close]. */
    private val onBroken: (MirrordError) -> Unit = {},
) : AutoCloseable {
    /** STARTING → READY | FAILED; READY → CLOSED (by us) | BROKEN (the CLI ended it with an error). */
    enum class State { STARTING, READY, FAILED, CLOSED, BROKEN }

    @Volatile
    var state: State = State.STARTING
        private set

    private val ready = CompletableFuture<MirrordExecution>()
    private val stderr = drain(process.errorStream)
    private val messages = java.util.Collections.synchronizedList(mutableListOf<ProgressMessage>())
    private val reader = Thread(::readStdout, "mirrord-ext-stdout").also {
        it.isDaemon = true
        it.start()
    }

    val pid: Long get() = process.pid()
    val isAlive: Boolean get() = process.isAlive

    /** Every message read so far (for a log view and for tests). */
    fun messages(): List<ProgressMessage> = synchronized(messages) { messages.toList() }

    private fun readStdout() {
        var failedLaunch: String? = null
        var badLine: ProtocolError? = null
        BufferedReader(InputStreamReader(process.inputStream, StandardCharsets.UTF_8)).use { lines ->
            while (true) {
                val line = lines.readLine() ?: break
                if (line.isBlank()) continue
                val message = try {
                    ProtocolParser.progressLine(line)
                } catch (e: ProtocolError) {
                    if (badLine == null) badLine = e
                    continue
                }
                messages += message
                if (message is ProgressMessage.FinishedTask && message.name == LAUNCH_TASK && !message.success) {
                    failedLaunch = message.message
                }
                try {
                    listener.onMessage(message)
                } catch (e: RuntimeException) {
                    // a broken listener must not stop the reading: `ext` would block on a full pipe
                }
                // After the listener: the launch goes on once the UI has seen the ready line too.
                if (message is ProgressMessage.Ready) {
                    state = State.READY
                    ready.complete(message.execution)
                }
            }
        }
        if (ready.isDone) {
            // A ready session's `ext` prints nothing more; its end with an error (the daemon
            // gone) is an `Error:` line and a non-zero exit, worth telling the user.
            process.waitFor()
            stderr.join(5_000)
            if (state == State.READY && process.exitValue() != 0) {
                state = State.BROKEN
                onBroken(ProtocolParser.failure("mirrord ext", process.exitValue(), stderr.text()))
            }
            return
        }
        // stdout closed before the ready line: the start failed. Its reason is on stderr.
        process.waitFor(10, TimeUnit.SECONDS)
        stderr.join(5_000)
        val exit = if (process.isAlive) -1 else process.exitValue()
        val error = ProtocolParser.failure("mirrord ext", exit, stderr.text()).let { err ->
            val fromStderr = stderr.text().lineSequence().any { ProtocolParser.errorLine(it) != null }
            when {
                fromStderr -> err
                failedLaunch != null -> MirrordError(failedLaunch)
                badLine != null && exit == 0 -> MirrordError(
                    "mirrord ext did not speak the IDE protocol (${badLine.message}); " +
                        "is the mirrord binary too old for this plugin?",
                )
                else -> err
            }
        }
        state = State.FAILED
        ready.completeExceptionally(error)
    }

    /**
     * Waits for the launch-ready line and returns what the debuggee needs. Throws the CLI's
     * [MirrordError] when the start failed, [CommandTimeout] (and stops `ext`) after
     * [timeoutSeconds].
     */
    fun awaitReady(timeoutSeconds: Long = 120): MirrordExecution {
        try {
            return ready.get(timeoutSeconds, TimeUnit.SECONDS)
        } catch (e: TimeoutException) {
            close()
            throw CommandTimeout(
                "mirrord did not prepare the session within $timeoutSeconds s; check that the " +
                    "target exists and the cluster answers (`mirrord ls`), then try again",
            )
        } catch (e: ExecutionException) {
            close()
            throw e.cause ?: e
        }
    }

    /** Keeps the session until [debuggee] exits, then stops `ext`. */
    fun attachDebuggee(debuggee: ProcessHandle) {
        debuggee.onExit().thenRun { close() }
    }

    /** Stops `ext` (politely, then by force after [graceSeconds]); the daemon ends the session. */
    override fun close() {
        close(graceSeconds = 5)
    }

    fun close(graceSeconds: Long) {
        if (state == State.STARTING || state == State.READY) state = State.CLOSED
        if (process.isAlive) {
            process.destroy()
            if (!process.waitFor(graceSeconds, TimeUnit.SECONDS)) {
                process.destroyForcibly()
                process.waitFor(graceSeconds, TimeUnit.SECONDS)
            }
        }
        ready.completeExceptionally(MirrordError("the session was stopped before it was ready"))
    }

    /** Waits until `ext` has exited; true when it has. */
    fun waitForExit(timeoutSeconds: Long): Boolean = process.waitFor(timeoutSeconds, TimeUnit.SECONDS)

    override fun toString() = "MirrordSession(pid=${process.pid()}, state=$state)"
}
