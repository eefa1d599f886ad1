/* GoLand (and IDEA with the Go plugin): Go run configurations; dlv and the toolchain are skipped. */
package mirrord.intellij.plugin.run

import com.goide.execution.GoRunConfigurationBase
import com.goide.execution.GoRunningState
import com.intellij.execution.configurations.RunnerSettings
import com.intellij.execution.target.TargetedCommandLineBuilder
import mirrord.intellij.core.DebuggerKind
import mirrord.intellij.core.SessionEnvironment
import mirrord.intellij.plugin.MirrordLaunches

class GoRunConfigurationExtension : com.goide.execution.extension.GoRunConfigurationExtension() {
    override fun isApplicableFor(configuration: GoRunConfigurationBase<*>): Boolean = true

    override fun isEnabledFor(applicableConfiguration: GoRunConfigurationBase<*>, runnerSettings: RunnerSettings?): Boolean = true

    override fun patchCommandLine(
        configuration: GoRunConfigurationBase<*>,
        runnerSettings: RunnerSettings?,
        cmdLine: TargetedCommandLineBuilder,
        runnerId: String,
        state: GoRunningState<out GoRunConfigurationBase<*>>,
        commandLineType: GoRunningState.CommandLineType,
    ) {
        // Only the program itself: `go build` runs as a command line of its own (BUILD).
        if (commandLineType == GoRunningState.CommandLineType.RUN) {
            val before = SessionEnvironment.effective(configuration.customEnvironment, configuration.isPassParentEnvironment)
            val after = MirrordLaunches.prepare(configuration.project, configuration, before, null, DebuggerKind.GO)
            if (after != null) {
                val changes = SessionEnvironment.changes(before, after)
                changes.set.forEach(cmdLine::addEnvironmentVariable)
                changes.unset.forEach(cmdLine::removeEnvironmentVariable)
                MirrordLaunches.take(configuration)?.let { state.addProcessListener(MirrordLaunches.closeWith(it)) }
            }
        }
        super.patchCommandLine(configuration, runnerSettings, cmdLine, runnerId, state, commandLineType)
    }
}
