/*
 * Preparing a launch under mirrord: every decision the plugin's run configuration extension
 * makes, in order.
 *
 * Owns: on/off (toggle and MIRRORD_ACTIVE), checking the config file (`verify-config --ide`;
 * its warnings shown, its errors an error), asking for a target only when the config names
 * none (`ls` then the chooser, recent targets first), starting `ext` and waiting for the
 * session, the debuggee's merged environment, and which program the IDE starts (the ready line's
 * `patched_path`, mirrord's system-call supervisor for a static or Go executable, in the named
 * executable's place). Does not own: any UI (the [LaunchUi] the glue implements), starting the
 * debuggee.
 */
package mirrord.intellij.core

import java.io.File

/** The user closed the target chooser: the launch does not happen. */
class LaunchCancelled : Exception("the launch was cancelled in mirrord's target chooser")

/** What the glue shows; called on the launching (background) thread. */
interface LaunchUi : ProgressListener {
    /**
     * Shows the target chooser for [model]; [reload] lists another namespace's targets.
     * Returns null when the user cancels.
     */
    fun chooseTarget(model: TargetChooserModel, reload: (String) -> TargetChooserModel): TargetChoice?

    /** A warning to show (config warnings, the CLI's Warning lines reach [onMessage]). */
    fun warn(text: String)

    /** The session ended with the CLI's error while the debuggee ran (e.g. the daemon stopped). */
    fun sessionBroken(error: MirrordError) {}
}

data class LaunchRequest(
    /** The IDE's on/off toggle. */
    val toggle: Boolean,
    /** The run configuration's own variables. */
    val runEnvironment: Map<String, String>,
    /**
     * The program the IDE starts (`ext -e`), when the run configuration knows it: the file the
     * IDE executes itself (a Go build's binary, the Python interpreter), not one it hands to a
     * debugger. A static or Go one is then started under the system-call supervisor.
     */
    val executable: String?,
    val debugger: DebuggerKind,
    /** The settings' mirrord config file, or null. */
    val configFile: File?,
    /** The recently used targets, most recent first. */
    val recentTargets: List<String> = emptyList(),
    val readyTimeoutSeconds: Long = 120,
    /**
     * Whether the glue can start another program in [executable]'s place. When it cannot, a
     * session that asks for the supervisor falls back to the layer alone, with a warning.
     */
    val executableReplaceable: Boolean = true,
)

/** A session ready for the debuggee. */
data class PreparedLaunch(
    val environment: Map<String, String>,
    val session: MirrordSession,
    /** The target the user chose in the chooser (to remember), null when the config named it. */
    val chosen: TargetChoice?,
    /**
     * The ready line's `patched_path` as applied: mirrord's system-call supervisor, started in
     * the request's executable's place (it runs that executable, named in [environment] as
     * `MIRRORD_SUPERVISE`, with the arguments it is given); null when the program runs as it is.
     */
    val patchedPath: String?,
    /** The program the IDE starts: [patchedPath] when set, else the request's executable. */
    val executable: String?,
) {
    /** The run configuration's command line ([original]: program, then arguments) as started. */
    fun commandLine(original: List<String>): List<String> = Supervision.commandLine(patchedPath, original)
}

class MirrordLauncher(private val cli: MirrordCli, private val ui: LaunchUi) {
    /** The prepared launch, or null when mirrord is off for it. */
    fun prepare(request: LaunchRequest): PreparedLaunch? {
        if (!SessionEnvironment.isActive(request.toggle, request.runEnvironment)) return null
        var configTarget: ConfigTarget = ConfigTarget.Unset
        var namespace: String? = null
        request.configFile?.let { config ->
            when (val verified = cli.verifyConfig(config)) {
                is VerifyConfigResult.Fail -> throw MirrordError(
                    message = "the mirrord config ${config.path} is not valid",
                    causes = verified.errors,
                    help = "Fix the values above (`mirrord verify-config ${config.path}` checks the file), " +
                        "or choose another file in Settings > Tools > mirrord.",
                )
                is VerifyConfigResult.Success -> {
                    verified.warnings.forEach(ui::warn)
                    configTarget = verified.target
                    namespace = verified.namespace
                }
            }
        }
        var chosen: TargetChoice? = null
        if (configTarget == ConfigTarget.Unset) {
            fun model(ns: String?) = TargetChooserModel(cli.ls(request.configFile, ns), request.recentTargets)
            chosen = ui.chooseTarget(model(namespace), ::model) ?: throw LaunchCancelled()
        }
        val session = cli.startExt(
            target = chosen?.path,
            config = request.configFile,
            executable = request.executable,
            namespace = chosen?.namespace,
            listener = ui,
            onBroken = ui::sessionBroken,
        )
        val execution = Supervision.applicable(session.awaitReady(request.readyTimeoutSeconds), request, ui::warn)
        return PreparedLaunch(
            environment = SessionEnvironment.merge(request.runEnvironment, execution, request.debugger),
            session = session,
            chosen = chosen,
            patchedPath = execution.patchedPath,
            executable = execution.patchedPath ?: request.executable,
        )
    }
}

/**
 * The ready line's `patched_path`: the system-call supervisor for a static or Go executable, with
 * `MIRRORD_SUPERVISE` (the program) and `MIRRORD_DONT_LOAD=1` (the layer inactive in the
 * supervisor's launcher) in the environment. Those two variables are only right when the
 * supervisor is started: in any other program `MIRRORD_DONT_LOAD` would switch the layer off.
 */
object Supervision {
    val VARIABLES = listOf("MIRRORD_SUPERVISE", "MIRRORD_DONT_LOAD")

    /** [original] (program, then arguments) with [patchedPath], when set, as its program. */
    fun commandLine(patchedPath: String?, original: List<String>): List<String> =
        if (patchedPath == null || original.isEmpty()) original else listOf(patchedPath) + original.drop(1)

    /**
     * [execution] as the launch can use it: unchanged when there is no patched path, or when the
     * glue starts it in place of the executable it named; otherwise (nothing named, or a program
     * the glue cannot replace) without the patched path and its variables, so that the layer
     * stays active, and [warn] says the supervisor is not used.
     */
    fun applicable(execution: MirrordExecution, request: LaunchRequest, warn: (String) -> Unit): MirrordExecution {
        val patched = execution.patchedPath ?: return execution
        if (request.executable != null && request.executableReplaceable) return execution
        warn(
            "mirrord asked to start ${request.executable ?: "the program"} under its system-call supervisor " +
                "($patched), which this run configuration cannot do: it runs with the layer alone, so a " +
                "static or Go program's own file and network calls stay on this machine.",
        )
        return MirrordExecution(
            environment = execution.environment - VARIABLES.toSet(),
            patchedPath = null,
            envToUnset = execution.envToUnset,
            usesOperator = execution.usesOperator,
        )
    }
}
