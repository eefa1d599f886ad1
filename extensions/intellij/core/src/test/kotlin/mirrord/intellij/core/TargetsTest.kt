package mirrord.intellij.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Test

class TargetsTest {
    private val listing = LsResult(
        targets = listOf(
            LsTarget("deployment/web", true),
            LsTarget("rollout/canary", false),
            LsTarget("pod/web-1/container/app", true),
            LsTarget("statefulset/db", true),
        ),
        currentNamespace = "prod",
        namespaces = listOf("default", "prod", "mirrord"),
    )

    @Test
    fun `recent targets first, then ls's order with unavailable ones last, targetless at the end`() {
        val model = TargetChooserModel(listing, recent = listOf("statefulset/db", "deployment/gone", "targetless"))
        assertEquals(
            listOf(
                TargetItem("statefulset/db", true, true),
                TargetItem("deployment/web", true, false),
                TargetItem("pod/web-1/container/app", true, false),
                TargetItem("rollout/canary", false, false),
                TargetItem(TARGETLESS, true, true),
            ),
            model.items(),
        )
        assertEquals(TargetItem("statefulset/db", true, true), model.initialSelection())
        assertEquals(listOf("deployment/web", "pod/web-1/container/app"), model.items(" WEB").map { it.path })
    }

    @Test
    fun `namespaces with the current one first`() {
        assertEquals(listOf("prod", "default", "mirrord"), TargetChooserModel(listing, emptyList()).namespaces())
    }

    @Test
    fun `recent targets are most recent first, without repeats, bounded`() {
        val recent = RecentTargets(listOf("b", "a"), capacity = 3)
        recent.remember("c")
        recent.remember("a")
        recent.remember("d")
        assertEquals(listOf("d", "a", "c"), recent.list())
        assertEquals(listOf("d", "a", "c"), RecentTargets(recent.list(), capacity = 3).list())
    }
}
