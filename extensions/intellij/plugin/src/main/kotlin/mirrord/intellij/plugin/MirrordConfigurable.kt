/*
 * Settings > Tools > mirrord: the binary path and the config file, and which binary core
 * resolves with them (its version, or why none was found).
 */
package mirrord.intellij.plugin

import com.intellij.openapi.application.ApplicationManager
import com.intellij.openapi.application.ModalityState
import com.intellij.openapi.fileChooser.FileChooserDescriptorFactory
import com.intellij.openapi.options.BoundConfigurable
import com.intellij.openapi.project.Project
import com.intellij.openapi.ui.DialogPanel
import com.intellij.ui.dsl.builder.AlignX
import com.intellij.ui.dsl.builder.bindText
import com.intellij.ui.dsl.builder.panel

class MirrordConfigurable(private val project: Project) : BoundConfigurable("mirrord") {
    private val settings = MirrordSettings.of(project)

    override fun createPanel(): DialogPanel = panel {
        row("mirrord binary:") {
            textFieldWithBrowseButton(
                FileChooserDescriptorFactory.createSingleFileNoJarsDescriptor().withTitle("mirrord Binary"),
                project,
            ).bindText(settings.state::binaryPath).align(AlignX.FILL)
                .comment("Empty: the project's .venv, then PATH, then ~/.local/bin")
        }
        row("Config file:") {
            textFieldWithBrowseButton(
                FileChooserDescriptorFactory.createSingleFileDescriptor().withTitle("mirrord Config File"),
                project,
            ).bindText(settings.state::configFile).align(AlignX.FILL)
                .comment("mirrord.json, .toml or .yaml; relative to the project. Checked with `mirrord verify-config --ide` before each launch")
        }
        row {
            // Finding the binary and asking its version runs processes: not on the UI thread.
            val found = comment("Looking for mirrord...")
            ApplicationManager.getApplication().executeOnPooledThread {
                val text = describeBinary()
                ApplicationManager.getApplication().invokeLater({ found.component.text = text }, ModalityState.any())
            }
        }
    }

    private fun describeBinary(): String = try {
        val cli = settings.cli()
        "Uses ${cli.binary.path} (mirrord ${cli.version()})"
    } catch (e: Exception) {
        e.message ?: e.javaClass.simpleName
    }
}
