/*
 * What the plugin shows, decided here so the glue only draws it.
 *
 * Owns: which protocol messages become notifications (and at which level, with which links),
 * the progress text of a task, and the rows of the live sessions tool window. Does not own any
 * widget.
 */
package mirrord.intellij.core

enum class NoticeLevel { INFO, WARNING, ERROR }

/** A notification: title, text, and links (label to URL). */
data class Notice(val level: NoticeLevel, val text: String, val links: List<IdeAction> = emptyList(), val help: String? = null)

/**
 * Turns `ext`'s messages, in order, into notifications: warnings, IDE messages and failed tasks
 * at once; `Info` lines gathered per task and shown as one notification when the task ends
 * (`MIRRORD_EXT_PRINT_CONFIG`'s "config summary" is seven of them: one balloon, not seven).
 * Not thread-safe: feed it from one thread (`ext`'s reader).
 */
class NoticeStream {
    private var task: String? = null
    private val infos = mutableListOf<String>()

    fun accept(message: ProgressMessage): List<Notice> {
        val out = mutableListOf<Notice>()
        when (message) {
            is ProgressMessage.NewTask -> {
                flush(out)
                task = message.name
            }
            is ProgressMessage.Info -> infos += message.message
            is ProgressMessage.FinishedTask, is ProgressMessage.Ready -> flush(out)
            else -> {}
        }
        Presentation.notice(message)?.let(out::add)
        return out
    }

    private fun flush(out: MutableList<Notice>) {
        if (infos.isNotEmpty()) {
            out += Notice(NoticeLevel.INFO, (task?.let { "$it:\n" } ?: "") + infos.joinToString("\n"))
            infos.clear()
        }
    }
}

object Presentation {
    /** The notification for one message of `ext` on its own, or null (progress, or Info: see [NoticeStream]). */
    fun notice(message: ProgressMessage): Notice? = when (message) {
        is ProgressMessage.Warning -> Notice(NoticeLevel.WARNING, message.message)
        is ProgressMessage.IdeMessage -> Notice(
            if (message.level.equals("Warning", ignoreCase = true)) NoticeLevel.WARNING else NoticeLevel.INFO,
            message.text,
            message.actions.filter { it.link != null },
        )
        is ProgressMessage.FinishedTask ->
            if (message.success) null else Notice(NoticeLevel.WARNING, "${message.name} failed" + (message.message?.let { ": $it" } ?: ""))
        else -> null
    }

    /** The progress indicator's text for a message, or null to leave it. */
    fun progressText(message: ProgressMessage): String? = when (message) {
        is ProgressMessage.NewTask -> message.name
        is ProgressMessage.Info -> message.message
        is ProgressMessage.Ready -> "mirrord session ready"
        else -> null
    }

    /** An error's notification: its message and causes; its help as the action text. */
    fun notice(error: Throwable): Notice = when (error) {
        is MirrordError -> Notice(NoticeLevel.ERROR, error.message + error.causes.joinToString("") { "\n• $it" }, help = error.help)
        is LaunchCancelled -> Notice(NoticeLevel.INFO, error.message ?: "cancelled")
        else -> Notice(NoticeLevel.ERROR, error.message ?: error.javaClass.simpleName)
    }

    val SESSION_COLUMNS = listOf("session", "target", "state", "processes", "age", "relayed out / in", "started by")

    /** The tool window's rows: one per live session, newest first. */
    fun sessionRows(status: DaemonStatus, nowEpochSeconds: Double): List<List<String>> =
        status.sessions.sortedByDescending { it.createdEpochSeconds }.map { s ->
            listOf(
                s.id,
                s.target,
                s.state,
                s.processes.toString(),
                duration(nowEpochSeconds - s.createdEpochSeconds),
                "${bytes(s.bytesToAgent)} / ${bytes(s.bytesToUser)}",
                s.label,
            )
        }

    fun duration(seconds: Double): String {
        val total = seconds.coerceAtLeast(0.0).toLong()
        val h = total / 3600
        val m = total % 3600 / 60
        val s = total % 60
        return if (h > 0) "%dh%02dm%02ds".format(h, m, s) else "%dm%02ds".format(m, s)
    }

    fun bytes(n: Long): String {
        var value = n.toDouble()
        for (unit in listOf("B", "KiB", "MiB", "GiB")) {
            if (value < 1024 || unit == "GiB") return if (unit == "B") "$n B" else "%.1f %s".format(value, unit)
            value /= 1024
        }
        return "$n B"
    }
}
