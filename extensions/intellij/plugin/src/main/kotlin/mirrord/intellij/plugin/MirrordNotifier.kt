/* Balloons for core's notices: the CLI's warnings, IDE messages with their links, errors with their help. */
package mirrord.intellij.plugin

import com.intellij.ide.BrowserUtil
import com.intellij.notification.NotificationAction
import com.intellij.notification.NotificationGroupManager
import com.intellij.notification.NotificationType
import com.intellij.openapi.options.ShowSettingsUtil
import com.intellij.openapi.project.Project
import com.intellij.openapi.util.text.StringUtil
import mirrord.intellij.core.Notice
import mirrord.intellij.core.NoticeLevel

object MirrordNotifier {
    private const val GROUP = "mirrord"

    fun show(project: Project, notice: Notice) {
        val type = when (notice.level) {
            NoticeLevel.INFO -> NotificationType.INFORMATION
            NoticeLevel.WARNING -> NotificationType.WARNING
            NoticeLevel.ERROR -> NotificationType.ERROR
        }
        val body = StringUtil.escapeXmlEntities(notice.text).replace("\n", "<br>") +
            (notice.help?.let { "<br><b>What to do:</b> " + StringUtil.escapeXmlEntities(it) } ?: "")
        val notification = NotificationGroupManager.getInstance().getNotificationGroup(GROUP)
            .createNotification("mirrord", body, type)
        for (link in notice.links) {
            notification.addAction(NotificationAction.createSimple(link.label) { BrowserUtil.browse(link.link!!) })
        }
        if (notice.level == NoticeLevel.ERROR) {
            notification.addAction(
                NotificationAction.createSimple("mirrord settings") {
                    ShowSettingsUtil.getInstance().showSettingsDialog(project, MirrordConfigurable::class.java)
                },
            )
        }
        notification.notify(project)
    }
}
