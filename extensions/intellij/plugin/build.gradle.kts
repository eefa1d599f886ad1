// The IDE glue, on the IntelliJ Platform Gradle Plugin 2.x. `./gradlew buildPlugin` makes
// plugin/build/distributions/plugin-<version>.zip; `./gradlew runIde` starts an IDE with it.
plugins {
    kotlin("jvm")
    id("org.jetbrains.intellij.platform")
}

repositories {
    mavenCentral()
    intellijPlatform {
        defaultRepositories()
    }
}

kotlin {
    // IntelliJ 2024.2 and later run on Java 21 and require plugins built for it.
    jvmToolchain(21)
}

dependencies {
    // The IDE ships gson and the Kotlin stdlib: the plugin uses the IDE's.
    implementation(project(":core")) {
        exclude(group = "com.google.code.gson")
        exclude(group = "org.jetbrains.kotlin")
    }
    intellijPlatform {
        intellijIdeaUltimate(providers.gradleProperty("platformVersion"))
        bundledPlugins(providers.gradleProperty("platformBundledPlugins").map { it.split(',') })
        plugins(providers.gradleProperty("platformPlugins").map { it.split(',') })
    }
}

intellijPlatform {
    pluginConfiguration {
        id = "mirrord.intellij"
        name = "mirrord"
        version = providers.gradleProperty("pluginVersion")
        ideaVersion {
            sinceBuild = providers.gradleProperty("sinceBuild")
            untilBuild = provider { null }
        }
    }
    pluginVerification {
        ides {
            recommended()
        }
    }
}
