/* Minimal CBOR (RFC 8949) for the layer protocol: definite lengths only, no tags, no floats.
 *
 * Owns: encoding requests into a growable buffer and reading replies with a bounds-checked
 * cursor. Does not own framing or message meaning (conn.c does).
 * Everything here is hidden from the application (-fvisibility=hidden).
 */
#ifndef MIRRORD_CBOR_H
#define MIRRORD_CBOR_H

#include <stddef.h>
#include <stdint.h>

/* Limits of what the layer accepts from the daemon: one frame is at most MAX_FRAME (the
 * Python side's MAX_FRAME_SIZE); nesting deeper than CBOR_MAX_DEPTH is malformed. */
#define CBOR_MAX_DEPTH 16

enum cbor_type {
    CBOR_UINT = 0,
    CBOR_NINT = 1,
    CBOR_BYTES = 2,
    CBOR_TEXT = 3,
    CBOR_ARRAY = 4,
    CBOR_MAP = 5,
    CBOR_SIMPLE = 7, /* false, true, null */
    CBOR_BAD = -1,
};

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    int err; /* set on allocation failure; every later write is a no-op */
} cbor_w;

void cw_init(cbor_w *w);
void cw_free(cbor_w *w);
void cw_reset(cbor_w *w); /* keeps room for the 4-byte frame header */
void cw_uint(cbor_w *w, uint64_t v);
void cw_int(cbor_w *w, int64_t v);
void cw_bytes(cbor_w *w, const void *p, size_t n);
void cw_bytes_head(cbor_w *w, size_t n); /* a byte string's head only: its n bytes follow elsewhere */
void cw_text(cbor_w *w, const char *s, size_t n);
void cw_str(cbor_w *w, const char *s); /* text from a C string */
void cw_array(cbor_w *w, size_t n);
void cw_map(cbor_w *w, size_t n);
void cw_null(cbor_w *w);
void cw_bool(cbor_w *w, int v);

typedef struct {
    const uint8_t *p, *end;
    int err; /* latched: once set, every read fails */
} cbor_r;

void cr_init(cbor_r *r, const uint8_t *p, size_t n);
/* Check that [p, p+n) is exactly one well-formed item of the supported subset. */
int cbor_validate(const uint8_t *p, size_t n);
int cr_peek(cbor_r *r);         /* enum cbor_type of the next item, CBOR_BAD at the end */
int cr_is_null(cbor_r *r);      /* the next item is null (not consumed) */
int cr_array(cbor_r *r, uint64_t *n);
int cr_map(cbor_r *r, uint64_t *n);
int cr_uint(cbor_r *r, uint64_t *v);
int cr_int(cbor_r *r, int64_t *v); /* uint up to INT64_MAX or a negative int */
int cr_bytes(cbor_r *r, const uint8_t **p, size_t *n);
int cr_bytes_head(cbor_r *r, uint64_t *n); /* a byte string's head only (its bytes may lie beyond the buffer) */
int cr_text(cbor_r *r, const char **p, size_t *n);
int cr_bool(cbor_r *r, int *v);
int cr_null(cbor_r *r);
int cr_skip(cbor_r *r);
/* Read text or bytes into a NUL-terminated buffer; fails if it does not fit. */
int cr_strbuf(cbor_r *r, char *out, size_t cap);

#endif
