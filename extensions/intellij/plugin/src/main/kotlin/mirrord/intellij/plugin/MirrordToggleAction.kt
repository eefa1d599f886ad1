/* The toolbar's on/off toggle for mirrord in this project's launches. */
package mirrord.intellij.plugin

import com.intellij.openapi.actionSystem.ActionUpdateThread
import com.intellij.openapi.actionSystem.AnActionEvent
import com.intellij.openapi.project.DumbAware
import com.intellij.openapi.actionSystem.ToggleAction

class MirrordToggleAction : ToggleAction(), DumbAware {
    override fun getActionUpdateThread(): ActionUpdateThread = ActionUpdateThread.BGT

    override fun isSelected(e: AnActionEvent): Boolean =
        e.project?.let { MirrordSettings.of(it).enabled } ?: false

    override fun setSelected(e: AnActionEvent, state: Boolean) {
        e.project?.let { MirrordSettings.of(it).enabled = state }
    }

    override fun update(e: AnActionEvent) {
        super.update(e)
        e.presentation.isEnabled = e.project != null
        e.presentation.text = if (isSelected(e)) "mirrord: On" else "mirrord: Off"
    }
}
