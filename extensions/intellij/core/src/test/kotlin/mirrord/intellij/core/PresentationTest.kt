package mirrord.intellij.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class PresentationTest {
    @Test
    fun `warnings, infos and IDE messages become notifications, progress does not`() {
        assertEquals(Notice(NoticeLevel.WARNING, "slow"), Presentation.notice(ProgressMessage.Warning("slow")))
        assertNull(Presentation.notice(ProgressMessage.Info("hi")))
        assertEquals("hi", Presentation.progressText(ProgressMessage.Info("hi")))
        val link = IdeAction("Link", "Docs", "https://mirrord.dev")
        assertEquals(
            Notice(NoticeLevel.WARNING, "x", listOf(link)),
            Presentation.notice(ProgressMessage.IdeMessage("id", "Warning", "x", listOf(link, IdeAction("Other", "y", null)))),
        )
        assertNull(Presentation.notice(ProgressMessage.NewTask("a", null)))
        assertNull(Presentation.notice(ProgressMessage.FinishedTask("a", true, null)))
        assertEquals("a", Presentation.progressText(ProgressMessage.NewTask("a", null)))
    }

    @Test
    fun `an error's notification carries its causes and help`() {
        val notice = Presentation.notice(MirrordError("bad config", causes = listOf("a: no"), help = "fix a"))
        assertEquals(Notice(NoticeLevel.ERROR, "bad config\n• a: no", help = "fix a"), notice)
    }

    @Test
    fun `the tool window lists sessions newest first`() {
        val old = LiveSession("a", "pid/1", "open", 1, 1, "run", 400.0, 10, 3000)
        val new = LiveSession("b", "deployment/web", "open", 0, 0, "ext", 4000.0, 0, 0)
        val rows = Presentation.sessionRows(DaemonStatus(true, 1, "0.1.0", listOf(old, new)), 4065.0)
        assertEquals(listOf("b", "deployment/web", "open", "0", "1m05s", "0 B / 0 B", "ext"), rows[0])
        assertEquals(listOf("a", "pid/1", "open", "1", "1h01m05s", "10 B / 2.9 KiB", "run"), rows[1])
        assertEquals(Presentation.SESSION_COLUMNS.size, rows[0].size)
    }

    @Test
    fun `our ext's config summary is one notification, the rest of a good start none`() {
        val stream = NoticeStream()
        val lines = javaClass.getResource("/recorded/ours/ext.jsonl")!!.readText().lines().filter { it.isNotBlank() }
        val notices = lines.map(ProtocolParser::progressLine).flatMap(stream::accept)
        assertEquals(1, notices.size, notices.toString())
        val summary = notices.single()
        assertEquals(NoticeLevel.INFO, summary.level)
        assertTrue(summary.text.startsWith("config summary:\ntarget: pid/"), summary.text)
        assertEquals(8, summary.text.lines().size, summary.text)
    }

    @Test
    fun `warnings come at once, and infos without a task end at the ready line`() {
        val stream = NoticeStream()
        assertEquals(listOf(Notice(NoticeLevel.WARNING, "w")), stream.accept(ProgressMessage.Warning("w")))
        assertEquals(emptyList<Notice>(), stream.accept(ProgressMessage.Info("a")))
        val ready = ProgressMessage.Ready(MirrordExecution(emptyMap(), null, emptyList(), false))
        assertEquals(listOf(Notice(NoticeLevel.INFO, "a")), stream.accept(ready))
    }
}
