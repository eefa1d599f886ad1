/*
 * Preparing a launch under mirrord: every decision the plugin's run configuration extension
 * makes, in order.
 *
 * Owns: on/off (toggle and MIRRORD_ACTIVE), checking the config file (`verify-config --ide`;
 * its warnings shown, its errors an error), asking for a target only when the config names
 * none (`ls` then the chooser, recent targets first), starting `ext` and waiting for the
 * session, and the debuggee's merged environment. Does not own: any UI (the [LaunchUi] the
 * glue implements), starting the debuggee.
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
    /** The program the debuggee runs (`ext -e`), when the run configuration knows it. */
    val executable: String?,
    val debugger: DebuggerKind,
    /** The settings' mirrord config file, or null. */
    val configFile: File?,
    /** The recently used targets, most recent first. */
    val recentTargets: List<String> = emptyList(),
    val readyTimeoutSeconds: Long = 120,
)

/** A session ready for the debuggee. */
data class PreparedLaunch(
    val environment: Map<String, String>,
    val session: MirrordSession,
    /** The target the user chose in the chooser (to remember), null when the config named it. */
    val chosen: TargetChoice?,
    /** macOS: the executable to start instead of the original, else null. */
    val patchedPath: String?,
)

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
        val execution = session.awaitReady(request.readyTimeoutSeconds)
        return PreparedLaunch(
            environment = SessionEnvironment.merge(request.runEnvironment, execution, request.debugger),
            session = session,
            chosen = chosen,
            patchedPath = execution.patchedPath,
        )
    }
}
