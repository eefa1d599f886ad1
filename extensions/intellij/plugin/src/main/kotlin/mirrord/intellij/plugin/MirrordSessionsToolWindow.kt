/*
 * The "mirrord" tool window: the daemon's live sessions (`mirrord daemon status --json`, parsed
 * and laid out by core), refreshed every few seconds while the window is open.
 */
package mirrord.intellij.plugin

import com.intellij.openapi.application.ApplicationManager
import com.intellij.openapi.project.DumbAware
import com.intellij.openapi.project.Project
import com.intellij.openapi.util.Disposer
import com.intellij.openapi.wm.ToolWindow
import com.intellij.openapi.wm.ToolWindowFactory
import com.intellij.ui.components.JBLabel
import com.intellij.ui.components.JBScrollPane
import com.intellij.ui.content.ContentFactory
import com.intellij.ui.table.JBTable
import com.intellij.util.concurrency.AppExecutorUtil
import mirrord.intellij.core.Presentation
import java.awt.BorderLayout
import java.util.concurrent.TimeUnit
import javax.swing.JPanel
import javax.swing.table.DefaultTableModel

class MirrordSessionsToolWindowFactory : ToolWindowFactory, DumbAware {
    override fun createToolWindowContent(project: Project, toolWindow: ToolWindow) {
        val rows = DefaultTableModel(Presentation.SESSION_COLUMNS.toTypedArray(), 0)
        val status = JBLabel("Reading the daemon's sessions...")
        val panel = JPanel(BorderLayout()).apply {
            add(status, BorderLayout.NORTH)
            add(JBScrollPane(JBTable(rows)), BorderLayout.CENTER)
        }
        val content = ContentFactory.getInstance().createContent(panel, "Sessions", false)
        toolWindow.contentManager.addContent(content)

        fun refresh() {
            val result = runCatching { MirrordSettings.of(project).cli().daemonStatus() }
            ApplicationManager.getApplication().invokeLater {
                rows.rowCount = 0
                result.onSuccess { daemon ->
                    Presentation.sessionRows(daemon, System.currentTimeMillis() / 1000.0)
                        .forEach { rows.addRow(it.toTypedArray()) }
                    status.text = when {
                        !daemon.running -> "No mirrord daemon is running (it starts with the first session)."
                        daemon.sessions.isEmpty() -> "mirrordd ${daemon.version} (pid ${daemon.pid}): no live sessions."
                        else -> "mirrordd ${daemon.version} (pid ${daemon.pid}): ${daemon.sessions.size} live session(s)."
                    }
                }.onFailure { status.text = it.message ?: it.javaClass.simpleName }
            }
        }
        val task = AppExecutorUtil.getAppScheduledExecutorService().scheduleWithFixedDelay(
            { if (toolWindow.isVisible) refresh() }, 0, 3, TimeUnit.SECONDS,
        )
        Disposer.register(content) { task.cancel(false) }
    }
}
