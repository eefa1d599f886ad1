/*
 * GoLand (and IDEA with the Go plugin): Go run configurations; dlv and the toolchain are skipped,
 * and a run (not debug) starts the built program under the system-call supervisor.
 */
package mirrord.intellij.plugin.run

import com.goide.execution.GoRunConfigurationBase
import com.goide.execution.GoRunningState
import com.intellij.execution.configurations.RunnerSettings
import com.intellij.execution.target.TargetedCommandLineBuilder
import com.intellij.execution.target.value.TargetValue
import mirrord.intellij.core.DebuggerKind
import mirrord.intellij.core.SessionEnvironment
import mirrord.intellij.plugin.MirrordLaunches
import java.util.concurrent.TimeUnit

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
            // Run: the command line starts the built program, a Go build, which `ext -e` then puts
            // under the system-call supervisor (the ready line's patched path, started in its
            // place with its arguments). Debug: it starts dlv, which starts the program itself;
            // the supervisor cannot come between them, so the program has the layer alone.
            val program = if (state.isDebug) null else cmdLine.exePath.localValue.blockingGet(10, TimeUnit.SECONDS)
            val launch = MirrordLaunches.prepare(configuration.project, configuration, before, program, DebuggerKind.GO)
            if (launch != null) {
                launch.patchedPath?.let { cmdLine.exePath = TargetValue.fixed(it) }
                val changes = SessionEnvironment.changes(before, launch.environment)
                changes.set.forEach(cmdLine::addEnvironmentVariable)
                changes.unset.forEach(cmdLine::removeEnvironmentVariable)
                MirrordLaunches.take(configuration)?.let { state.addProcessListener(MirrordLaunches.closeWith(it)) }
            }
        }
        super.patchCommandLine(configuration, runnerSettings, cmdLine, runnerId, state, commandLineType)
    }
}
