/* mirrord layer: LD_PRELOAD library placeholder (hooks land with the layer issue). */
#define _GNU_SOURCE
#include <stdlib.h>

#ifndef MIRRORD_BUILD_ID
#define MIRRORD_BUILD_ID "dev"
#endif

/* Scanned for by mirrord.layer.build_id(): both ends of the layer protocol must match. */
__attribute__((used)) static const char build_id_marker[] = "MIRRORD_BUILD_ID=" MIRRORD_BUILD_ID ";";

__attribute__((constructor)) static void mirrord_layer_init(void) {
    if (getenv("MIRRORD_DONT_LOAD") != NULL || getenv("MIRRORD_LAYER_SOCKET") == NULL) {
        return; /* not configured: do nothing */
    }
}
