// Plain Kotlin: no IntelliJ Platform dependency, so it is compiled and tested anywhere (here also
// without Gradle: scripts/test-core, with the same sources and tests).
plugins {
    kotlin("jvm")
}

repositories {
    mavenCentral()
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    implementation("com.google.code.gson:gson:2.10.1")
    implementation(kotlin("stdlib"))
    testImplementation(platform("org.junit:junit-bom:5.9.2"))
    testImplementation("org.junit.jupiter:junit-jupiter")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher")
}

tasks.test {
    // The real-CLI tests read MIRRORD_TEST_* (tests/ide/test_intellij_core.py sets them) and are
    // skipped without them.
    useJUnitPlatform()
}
