/*
 * The glue between a run configuration extension and core's launcher: runs
 * MirrordLauncher.prepare with a progress indicator, shows the chooser and notices, remembers
 * the chosen target, and ties the session to the debuggee's process handler.
 */
package mirrord.intellij.plugin

import com.intellij.execution.ExecutionException
import com.intellij.execution.process.ProcessEvent
import com.intellij.execution.process.ProcessHandler
import com.intellij.execution.process.ProcessListener
import com.intellij.openapi.application.ApplicationManager
import com.intellij.openapi.application.ModalityState
import com.intellij.openapi.progress.ProgressIndicator
import com.intellij.openapi.progress.ProgressManager
import com.intellij.openapi.project.Project
import com.intellij.openapi.util.Key
import com.intellij.openapi.util.ThrowableComputable
import com.intellij.openapi.util.UserDataHolder
import mirrord.intellij.core.DebuggerKind
import mirrord.intellij.core.LaunchRequest
import mirrord.intellij.core.LaunchUi
import mirrord.intellij.core.MirrordError
import mirrord.intellij.core.MirrordLauncher
import mirrord.intellij.core.MirrordSession
import mirrord.intellij.core.Notice
import mirrord.intellij.core.NoticeLevel
import mirrord.intellij.core.NoticeStream
import mirrord.intellij.core.PreparedLaunch
import mirrord.intellij.core.Presentation
import mirrord.intellij.core.ProgressMessage
import mirrord.intellij.core.TargetChoice
import mirrord.intellij.core.TargetChooserModel

object MirrordLaunches {
    /** The session prepared for a run configuration, until its process handler exists. */
    private val PENDING = Key.create<MirrordSession>("mirrord.pending.session")

    /**
     * The launch under mirrord (the debuggee's environment, and the program to start: the
     * supervisor in [executable]'s place for a static or Go one), or null when mirrord is off for
     * this launch. [executable]: the file the command line starts, when known; [replaceable]:
     * whether the caller can start another in its place. The session waits in [holder] (the run
     * configuration) for [attach].
     */
    fun prepare(
        project: Project,
        holder: UserDataHolder,
        runEnvironment: Map<String, String>,
        executable: String?,
        debugger: DebuggerKind,
        replaceable: Boolean = true,
    ): PreparedLaunch? {
        val settings = MirrordSettings.of(project)
        val work = ThrowableComputable<PreparedLaunch?, ExecutionException> {
            try {
                // Core calls the UI from `ext`'s reader thread: the indicator is taken here.
                val launcher = MirrordLauncher(settings.cli(), Ui(project, ProgressManager.getInstance().progressIndicator))
                val request = LaunchRequest(
                    toggle = settings.enabled,
                    runEnvironment = runEnvironment,
                    executable = executable,
                    debugger = debugger,
                    configFile = settings.configFile(),
                    recentTargets = settings.state.recentTargets,
                    executableReplaceable = replaceable,
                )
                val launch = launcher.prepare(request) ?: return@ThrowableComputable null
                launch.chosen?.let { settings.rememberTarget(it.path) }
                holder.getUserData(PENDING)?.close() // an earlier launch whose process never started
                holder.putUserData(PENDING, launch.session)
                launch
            } catch (e: Exception) {
                if (e is ExecutionException) throw e
                val notice = Presentation.notice(e)
                MirrordNotifier.show(project, notice)
                throw ExecutionException("mirrord: " + notice.text, e)
            }
        }
        return if (ApplicationManager.getApplication().isDispatchThread) {
            ProgressManager.getInstance().runProcessWithProgressSynchronously(work, "mirrord", true, project)
        } else {
            work.compute()
        }
    }

    /** Keeps the pending session until [handler]'s process ends, then stops it (core's lifetime rule). */
    fun attach(holder: UserDataHolder, handler: ProcessHandler) {
        take(holder)?.let { handler.addProcessListener(closeWith(it)) }
    }

    /** The pending session of [holder], now the caller's to tie to the debuggee. */
    fun take(holder: UserDataHolder): MirrordSession? =
        holder.getUserData(PENDING)?.also { holder.putUserData(PENDING, null) }

    fun closeWith(session: MirrordSession): ProcessListener = object : ProcessListener {
        override fun processTerminated(event: ProcessEvent) {
            ApplicationManager.getApplication().executeOnPooledThread { session.close() }
        }
    }

    /** Core's UI calls, on the IDE's threads. */
    private class Ui(private val project: Project, private val indicator: ProgressIndicator?) : LaunchUi {
        private val notices = NoticeStream()

        override fun chooseTarget(model: TargetChooserModel, reload: (String) -> TargetChooserModel): TargetChoice? {
            var choice: TargetChoice? = null
            ApplicationManager.getApplication().invokeAndWait({
                choice = MirrordTargetDialog(project, model, reload).choice()
            }, ModalityState.any())
            return choice
        }

        override fun warn(text: String) {
            MirrordNotifier.show(project, Notice(NoticeLevel.WARNING, text))
        }

        override fun sessionBroken(error: MirrordError) {
            MirrordNotifier.show(project, Presentation.notice(error))
        }

        override fun onMessage(message: ProgressMessage) {
            Presentation.progressText(message)?.let { indicator?.text = it }
            notices.accept(message).forEach { MirrordNotifier.show(project, it) }
        }
    }
}
