/* The status bar's "mirrord: on/off"; a click toggles it. */
package mirrord.intellij.plugin

import com.intellij.openapi.project.Project
import com.intellij.openapi.wm.StatusBar
import com.intellij.openapi.wm.StatusBarWidget
import com.intellij.openapi.wm.StatusBarWidgetFactory
import com.intellij.util.Consumer
import java.awt.Component
import java.awt.event.MouseEvent

class MirrordStatusBarWidgetFactory : StatusBarWidgetFactory {
    override fun getId(): String = MirrordStatusBarWidget.ID

    override fun getDisplayName(): String = "mirrord"

    override fun createWidget(project: Project): StatusBarWidget = MirrordStatusBarWidget(project)
}

class MirrordStatusBarWidget(private val project: Project) : StatusBarWidget, StatusBarWidget.TextPresentation {
    private var statusBar: StatusBar? = null

    override fun ID(): String = ID

    override fun install(statusBar: StatusBar) {
        this.statusBar = statusBar
        project.messageBus.connect(this).subscribe(
            MirrordToggleListener.TOPIC,
            MirrordToggleListener { statusBar.updateWidget(ID) },
        )
    }

    override fun getPresentation(): StatusBarWidget.WidgetPresentation = this

    override fun getText(): String = if (MirrordSettings.of(project).enabled) "mirrord: on" else "mirrord: off"

    override fun getAlignment(): Float = Component.CENTER_ALIGNMENT

    override fun getTooltipText(): String = "Click to turn mirrord on or off for this project's launches"

    override fun getClickConsumer(): Consumer<MouseEvent> = Consumer {
        val settings = MirrordSettings.of(project)
        settings.enabled = !settings.enabled
    }

    override fun dispose() {
        statusBar = null
    }

    companion object {
        const val ID = "mirrord.status"
    }
}
