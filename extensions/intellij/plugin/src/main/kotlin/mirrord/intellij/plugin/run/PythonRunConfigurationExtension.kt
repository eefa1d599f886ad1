/* PyCharm (and IDEA with the Python plugin): Python run configurations, run or debugged with pydevd. */
package mirrord.intellij.plugin.run

import com.intellij.execution.configurations.GeneralCommandLine
import com.intellij.execution.configurations.RunnerSettings
import com.intellij.execution.process.ProcessHandler
import com.jetbrains.python.run.AbstractPythonRunConfiguration
import mirrord.intellij.core.DebuggerKind
import mirrord.intellij.plugin.MirrordLaunches

class PythonRunConfigurationExtension : com.jetbrains.python.run.PythonRunConfigurationExtension() {
    override fun isApplicableFor(configuration: AbstractPythonRunConfiguration<*>): Boolean = true

    override fun isEnabledFor(applicableConfiguration: AbstractPythonRunConfiguration<*>, runnerSettings: RunnerSettings?): Boolean = true

    override fun patchCommandLine(
        configuration: AbstractPythonRunConfiguration<*>,
        runnerSettings: RunnerSettings?,
        cmdLine: GeneralCommandLine,
        runnerId: String,
    ) {
        val debugger = if (runnerId == "PyDebugRunner") DebuggerKind.PYDEVD else DebuggerKind.NONE
        val launch = MirrordLaunches.prepare(
            configuration.project, configuration, cmdLine.effectiveEnvironment, cmdLine.exePath, debugger,
        ) ?: return
        // The interpreter is the program: a static one (or any, with experimental.syscall_supervisor
        // on) is started through the supervisor, pydevd's and the script's arguments unchanged.
        launch.patchedPath?.let { cmdLine.exePath = it }
        cmdLine.environment.clear()
        cmdLine.environment.putAll(launch.environment)
        cmdLine.withParentEnvironmentType(GeneralCommandLine.ParentEnvironmentType.NONE)
    }

    override fun attachToProcess(configuration: AbstractPythonRunConfiguration<*>, handler: ProcessHandler, runnerSettings: RunnerSettings?) {
        MirrordLaunches.attach(configuration, handler)
    }
}
