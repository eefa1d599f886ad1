/* WebStorm (and IDEA Ultimate): Node.js run configurations, run or debugged with node's inspector. */
package mirrord.intellij.plugin.run

import com.intellij.execution.executors.DefaultDebugExecutor
import com.intellij.execution.process.ProcessListener
import com.intellij.execution.runners.ExecutionEnvironment
import com.intellij.javascript.nodejs.execution.AbstractNodeTargetRunProfile
import com.intellij.javascript.nodejs.execution.NodeTargetRun
import com.intellij.javascript.nodejs.execution.runConfiguration.AbstractNodeRunConfigurationExtension
import com.intellij.javascript.nodejs.execution.runConfiguration.NodeRunConfigurationLaunchSession
import com.jetbrains.nodejs.run.NodeJsRunConfiguration
import mirrord.intellij.core.DebuggerKind
import mirrord.intellij.core.SessionEnvironment
import mirrord.intellij.plugin.MirrordLaunches

class NodeRunConfigurationExtension : AbstractNodeRunConfigurationExtension() {
    override fun isApplicableFor(profile: AbstractNodeTargetRunProfile): Boolean = true

    override fun getEditorTitle(): String? = null

    override fun createLaunchSession(
        configuration: AbstractNodeTargetRunProfile,
        environment: ExecutionEnvironment,
    ): NodeRunConfigurationLaunchSession? {
        val node = configuration as? NodeJsRunConfiguration
        val before = SessionEnvironment.effective(node?.envs ?: emptyMap(), node?.isPassParentEnvs ?: true)
        val debugger = if (environment.executor.id == DefaultDebugExecutor.EXECUTOR_ID) DebuggerKind.NODE else DebuggerKind.NONE
        // node is named to no one (`ext` without -e): a dynamic program the layer reaches, no supervisor.
        val launch = MirrordLaunches.prepare(configuration.project, configuration, before, null, debugger)
            ?: return null
        val changes = SessionEnvironment.changes(before, launch.environment)
        val session = MirrordLaunches.take(configuration)
        return object : NodeRunConfigurationLaunchSession() {
            override fun addNodeOptionsTo(targetRun: NodeTargetRun) {
                changes.set.forEach(targetRun.commandLineBuilder::addEnvironmentVariable)
                changes.unset.forEach(targetRun.commandLineBuilder::removeEnvironmentVariable)
            }

            override fun getProcessListener(): ProcessListener? = session?.let(MirrordLaunches::closeWith)
        }
    }
}
