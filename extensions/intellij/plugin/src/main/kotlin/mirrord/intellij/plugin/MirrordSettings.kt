/*
 * The plugin's per-project state: the on/off toggle, the mirrord binary and config file, and
 * the recently used targets. Stored in .idea/mirrord.xml. Every use of it goes through core.
 */
package mirrord.intellij.plugin

import com.intellij.openapi.components.PersistentStateComponent
import com.intellij.openapi.components.Service
import com.intellij.openapi.components.State
import com.intellij.openapi.components.Storage
import com.intellij.openapi.components.service
import com.intellij.openapi.project.Project
import com.intellij.util.messages.Topic
import mirrord.intellij.core.BinaryResolver
import mirrord.intellij.core.MirrordCli
import mirrord.intellij.core.RecentTargets
import java.io.File

/** Told when the toggle changes, so the toolbar and status bar redraw. */
fun interface MirrordToggleListener {
    fun toggled(enabled: Boolean)

    companion object {
        @JvmField
        val TOPIC: Topic<MirrordToggleListener> = Topic.create("mirrord toggle", MirrordToggleListener::class.java)
    }
}

@Service(Service.Level.PROJECT)
@State(name = "MirrordSettings", storages = [Storage("mirrord.xml")])
class MirrordSettings(private val project: Project) : PersistentStateComponent<MirrordSettings.Data> {
    class Data {
        var enabled: Boolean = false
        var binaryPath: String = ""
        var configFile: String = ""
        var recentTargets: MutableList<String> = mutableListOf()
    }

    private var data = Data()

    override fun getState(): Data = data

    override fun loadState(state: Data) {
        data = state
    }

    var enabled: Boolean
        get() = data.enabled
        set(value) {
            data.enabled = value
            project.messageBus.syncPublisher(MirrordToggleListener.TOPIC).toggled(value)
        }

    /** The config file, relative paths against the project's directory; null when unset. */
    fun configFile(): File? = data.configFile.takeIf { it.isNotBlank() }?.let { path ->
        File(path).let { if (it.isAbsolute) it else File(project.basePath ?: ".", path) }
    }

    /** The CLI to run, found by core's rules (settings, project virtualenv, PATH, ~/.local/bin). */
    fun cli(): MirrordCli {
        val projectDir = project.basePath?.let(::File)
        val binary = BinaryResolver.resolve(data.binaryPath, projectDir)
        return MirrordCli(binary.path, System.getenv(), projectDir)
    }

    fun rememberTarget(path: String) {
        val recent = RecentTargets(data.recentTargets)
        recent.remember(path)
        data.recentTargets = recent.list().toMutableList()
    }

    companion object {
        fun of(project: Project): MirrordSettings = project.service()
    }
}
