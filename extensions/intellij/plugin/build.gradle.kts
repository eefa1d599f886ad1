// The IDE glue, on the IntelliJ Platform Gradle Plugin 2.x. `./gradlew buildPlugin` makes
// build/distributions/plugin-<version>.zip; `./gradlew runIde` starts an IDE with it.
import org.jetbrains.intellij.platform.gradle.TestFrameworkType

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
    jvmToolchain(17)
}

dependencies {
    // The IDE ships gson (and the Kotlin stdlib): the plugin must use the IDE's.
    implementation(project(":core")) {
        exclude(group = "com.google.code.gson")
        exclude(group = "org.jetbrains.kotlin")
    }
    intellijPlatform {
        intellijIdeaUltimate(providers.gradleProperty("platformVersion"))
        bundledPlugins("com.intellij.java", "JavaScript", "NodeJS")
        plugins(providers.gradleProperty("pythonPlugin"), providers.gradleProperty("goPlugin"))
        testFramework(TestFrameworkType.Platform)
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
