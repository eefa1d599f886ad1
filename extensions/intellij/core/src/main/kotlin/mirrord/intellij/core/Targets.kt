/*
 * Choosing a target.
 *
 * Owns: the recently used targets (most recent first, bounded, stored by the plugin as a plain
 * list), and the target chooser's model: which targets to offer in which order (recent ones
 * first, then the rest as `mirrord ls` listed them, unavailable ones last), the namespaces,
 * and the targetless choice. Does not own: the dialog (the plugin's glue).
 */
package mirrord.intellij.core

/** The choice of the targetless mode in the chooser and in `mirrord ext -t`. */
const val TARGETLESS = "targetless"

class RecentTargets(initial: List<String> = emptyList(), private val capacity: Int = 10) {
    private val paths = ArrayDeque<String>()

    init {
        require(capacity > 0) { "capacity must be positive" }
        initial.asReversed().forEach(::remember)
    }

    /** [path] becomes the most recent. */
    fun remember(path: String) {
        paths.remove(path)
        paths.addFirst(path)
        while (paths.size > capacity) paths.removeLast()
    }

    /** Most recent first (what the settings store). */
    fun list(): List<String> = paths.toList()
}

/** One row of the chooser. */
data class TargetItem(val path: String, val available: Boolean, val recent: Boolean)

/** What the user picked: a target path or [TARGETLESS], in a namespace (null: the config's). */
data class TargetChoice(val path: String, val namespace: String?)

class TargetChooserModel(
    private val listing: LsResult,
    private val recent: List<String>,
) {
    /** Recent targets that still exist first, then the others, unavailable last; targetless at the end. */
    fun items(filter: String = ""): List<TargetItem> {
        val byPath = listing.targets.associateBy { it.path }
        val recentItems = recent.mapNotNull { byPath[it] }.map { TargetItem(it.path, it.available, true) }
        val recentPaths = recentItems.map { it.path }.toSet()
        val rest = listing.targets.filter { it.path !in recentPaths }
            .sortedBy { !it.available } // stable: keeps ls's order within each group
            .map { TargetItem(it.path, it.available, false) }
        val all = recentItems + rest + TargetItem(TARGETLESS, true, TARGETLESS in recent)
        val needle = filter.trim().lowercase()
        return if (needle.isEmpty()) all else all.filter { needle in it.path.lowercase() }
    }

    /** The namespaces to offer, the current one first. */
    fun namespaces(): List<String> {
        val current = listing.currentNamespace ?: return listing.namespaces
        return listOf(current) + listing.namespaces.filter { it != current }
    }

    val currentNamespace: String? get() = listing.currentNamespace

    /** The row selected when the dialog opens: the most recent target still listed, else the first. */
    fun initialSelection(): TargetItem? = items().firstOrNull { it.available }
}
