/* IntelliJ IDEA: Java/Kotlin application run configurations (and anything built on JavaParameters). */
package mirrord.intellij.plugin.run

import com.intellij.execution.RunConfigurationExtension
import com.intellij.execution.configurations.DebuggingRunnerData
import com.intellij.execution.configurations.JavaParameters
import com.intellij.execution.configurations.RunConfigurationBase
import com.intellij.execution.configurations.RunnerSettings
import com.intellij.execution.process.ProcessHandler
import mirrord.intellij.core.DebuggerKind
import mirrord.intellij.core.SessionEnvironment
import mirrord.intellij.plugin.MirrordLaunches

class JavaRunConfigurationExtension : RunConfigurationExtension() {
    override fun isApplicableFor(configuration: RunConfigurationBase<*>): Boolean = true

    override fun <T : RunConfigurationBase<*>> updateJavaParameters(
        configuration: T,
        params: JavaParameters,
        runnerSettings: RunnerSettings?,
    ) {
        val before = SessionEnvironment.effective(params.env, params.isPassParentEnvs)
        val debugger = if (runnerSettings is DebuggingRunnerData) DebuggerKind.JAVA else DebuggerKind.NONE
        val java = params.jdk?.homePath?.let { "$it/bin/java" }
        // JavaParameters cannot start another program in java's place: a session that asks for the
        // supervisor (experimental.syscall_supervisor on) keeps the layer, with a warning (core).
        val launch = MirrordLaunches.prepare(configuration.project, configuration, before, java, debugger, replaceable = false)
            ?: return
        // The whole environment, so that env_to_unset also removes inherited variables.
        params.env = launch.environment
        params.isPassParentEnvs = false
    }

    override fun attachToProcess(configuration: RunConfigurationBase<*>, handler: ProcessHandler, runnerSettings: RunnerSettings?) {
        MirrordLaunches.attach(configuration, handler)
    }
}
