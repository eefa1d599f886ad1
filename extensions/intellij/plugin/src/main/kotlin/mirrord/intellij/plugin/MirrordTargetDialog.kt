/*
 * The target chooser: core's model drawn as a namespace box, a filter field and a list (recent
 * targets first, unavailable ones greyed, targetless last).
 */
package mirrord.intellij.plugin

import com.intellij.openapi.application.ApplicationManager
import com.intellij.openapi.project.Project
import com.intellij.openapi.ui.ComboBox
import com.intellij.openapi.ui.DialogWrapper
import com.intellij.ui.ColoredListCellRenderer
import com.intellij.ui.DocumentAdapter
import com.intellij.ui.SearchTextField
import com.intellij.ui.SimpleTextAttributes
import com.intellij.ui.components.JBList
import com.intellij.ui.components.JBScrollPane
import mirrord.intellij.core.TargetChoice
import mirrord.intellij.core.TargetChooserModel
import mirrord.intellij.core.TargetItem
import java.awt.BorderLayout
import java.awt.Dimension
import javax.swing.DefaultListModel
import javax.swing.JComponent
import javax.swing.JList
import javax.swing.JPanel
import javax.swing.event.DocumentEvent

class MirrordTargetDialog(
    project: Project,
    private var model: TargetChooserModel,
    private val reload: (String) -> TargetChooserModel,
) : DialogWrapper(project, true) {
    private val items = DefaultListModel<TargetItem>()
    private val list = JBList(items)
    private val filter = SearchTextField(false)
    private val namespaces = ComboBox(model.namespaces().toTypedArray())

    init {
        title = "mirrord: Choose a Target"
        list.cellRenderer = object : ColoredListCellRenderer<TargetItem>() {
            override fun customizeCellRenderer(list: JList<out TargetItem>, value: TargetItem, index: Int, selected: Boolean, focus: Boolean) {
                append(value.path, if (value.available) SimpleTextAttributes.REGULAR_ATTRIBUTES else SimpleTextAttributes.GRAYED_ATTRIBUTES)
                if (value.recent) append("  recent", SimpleTextAttributes.GRAYED_SMALL_ATTRIBUTES)
            }
        }
        filter.addDocumentListener(object : DocumentAdapter() {
            override fun textChanged(e: DocumentEvent) = fill()
        })
        namespaces.addActionListener {
            val ns = namespaces.selectedItem as? String ?: return@addActionListener
            if (ns == model.currentNamespace) return@addActionListener
            // `mirrord ls -n NS` runs off the UI thread; the list refills when it answers.
            ApplicationManager.getApplication().executeOnPooledThread {
                val next = runCatching { reload(ns) }
                ApplicationManager.getApplication().invokeLater({
                    next.onSuccess { model = it; fill() }
                        .onFailure { setErrorText(it.message) }
                }, com.intellij.openapi.application.ModalityState.any())
            }
        }
        fill()
        model.initialSelection()?.let { list.setSelectedValue(it, true) }
        init()
    }

    private fun fill() {
        items.clear()
        model.items(filter.text).forEach(items::addElement)
        if (list.selectedIndex < 0 && !items.isEmpty) list.selectedIndex = 0
    }

    override fun createCenterPanel(): JComponent = JPanel(BorderLayout(0, 8)).apply {
        add(JPanel(BorderLayout(8, 0)).apply {
            add(namespaces, BorderLayout.WEST)
            add(filter, BorderLayout.CENTER)
        }, BorderLayout.NORTH)
        add(JBScrollPane(list), BorderLayout.CENTER)
        preferredSize = Dimension(520, 420)
    }

    override fun getPreferredFocusedComponent(): JComponent = filter

    /** The choice, or null when cancelled or nothing was selected. */
    fun choice(): TargetChoice? {
        if (!showAndGet()) return null
        val item = list.selectedValue ?: return null
        return TargetChoice(item.path, namespaces.selectedItem as? String)
    }
}
