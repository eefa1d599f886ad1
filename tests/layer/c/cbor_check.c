/* Feeds the layer's CBOR validator (native/cbor.c) with inputs from stdin, each prefixed by
 * a 4-byte big-endian length; prints 1 (accepted) or 0 per input. Built by test_cbor.py. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "cbor.h"

int main(void) {
    uint8_t h[4];
    while (fread(h, 1, 4, stdin) == 4) {
        size_t n = ((size_t)h[0] << 24) | ((size_t)h[1] << 16) | ((size_t)h[2] << 8) | h[3];
        uint8_t *buf = malloc(n ? n : 1);
        if (buf == NULL || fread(buf, 1, n, stdin) != n) {
            return 2;
        }
        putchar(cbor_validate(buf, n) == 0 ? '1' : '0');
        free(buf);
    }
    putchar('\n');
    return 0;
}
