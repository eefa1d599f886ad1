// The mirrord plugin for JetBrains IDEs: `core` (plain Kotlin, the CLI protocol and every
// decision; also built and tested without Gradle by scripts/test-core) and `plugin` (the IDE glue).
rootProject.name = "mirrord-intellij"

pluginManagement {
    repositories {
        gradlePluginPortal()
        mavenCentral()
    }
}

include("core", "plugin")
