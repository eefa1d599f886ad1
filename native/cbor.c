/* Minimal CBOR codec for the layer protocol (see cbor.h). Every read is bounds-checked and
 * a malformed item latches the reader's error: the caller treats that frame as a protocol
 * error and drops the daemon connection. */
#define _GNU_SOURCE
#include "cbor.h"

#include <stdlib.h>
#include <string.h>

void cw_init(cbor_w *w) {
    w->buf = NULL;
    w->len = w->cap = 0;
    w->err = 0;
}

void cw_free(cbor_w *w) {
    free(w->buf);
    cw_init(w);
}

void cw_reset(cbor_w *w) {
    w->len = 4;
    w->err = 0;
    if (w->cap < 4) {
        uint8_t *b = realloc(w->buf, 256);
        if (b == NULL) {
            w->err = 1;
            return;
        }
        w->buf = b;
        w->cap = 256;
    }
}

static void cw_put(cbor_w *w, const void *p, size_t n) {
    if (w->err) {
        return;
    }
    if (w->len + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->len + n) {
            cap *= 2;
        }
        uint8_t *b = realloc(w->buf, cap);
        if (b == NULL) {
            w->err = 1;
            return;
        }
        w->buf = b;
        w->cap = cap;
    }
    memcpy(w->buf + w->len, p, n);
    w->len += n;
}

static void cw_head(cbor_w *w, int major, uint64_t v) {
    uint8_t h[9];
    size_t n;
    uint8_t m = (uint8_t)(major << 5);
    if (v < 24) {
        h[0] = m | (uint8_t)v;
        n = 1;
    } else if (v <= 0xff) {
        h[0] = m | 24;
        h[1] = (uint8_t)v;
        n = 2;
    } else if (v <= 0xffff) {
        h[0] = m | 25;
        h[1] = (uint8_t)(v >> 8);
        h[2] = (uint8_t)v;
        n = 3;
    } else if (v <= 0xffffffffULL) {
        h[0] = m | 26;
        for (int i = 0; i < 4; i++) {
            h[1 + i] = (uint8_t)(v >> (24 - 8 * i));
        }
        n = 5;
    } else {
        h[0] = m | 27;
        for (int i = 0; i < 8; i++) {
            h[1 + i] = (uint8_t)(v >> (56 - 8 * i));
        }
        n = 9;
    }
    cw_put(w, h, n);
}

void cw_uint(cbor_w *w, uint64_t v) { cw_head(w, 0, v); }

void cw_int(cbor_w *w, int64_t v) {
    if (v >= 0) {
        cw_head(w, 0, (uint64_t)v);
    } else {
        cw_head(w, 1, (uint64_t)(-(v + 1)));
    }
}

void cw_bytes(cbor_w *w, const void *p, size_t n) {
    cw_head(w, 2, n);
    cw_put(w, p, n);
}

void cw_bytes_head(cbor_w *w, size_t n) { cw_head(w, 2, n); }

void cw_text(cbor_w *w, const char *s, size_t n) {
    cw_head(w, 3, n);
    cw_put(w, s, n);
}

void cw_str(cbor_w *w, const char *s) { cw_text(w, s, strlen(s)); }
void cw_array(cbor_w *w, size_t n) { cw_head(w, 4, n); }
void cw_map(cbor_w *w, size_t n) { cw_head(w, 5, n); }

void cw_null(cbor_w *w) {
    uint8_t b = 0xf6;
    cw_put(w, &b, 1);
}

void cw_bool(cbor_w *w, int v) {
    uint8_t b = v ? 0xf5 : 0xf4;
    cw_put(w, &b, 1);
}

/* ------------------------------------------------------------------ reading */

void cr_init(cbor_r *r, const uint8_t *p, size_t n) {
    r->p = p;
    r->end = p + n;
    r->err = 0;
}

/* Reads one head: major type and argument. Rejects indefinite lengths and reserved values. */
static int cr_head(cbor_r *r, int *major, uint64_t *arg) {
    if (r->err || r->p >= r->end) {
        r->err = 1;
        return -1;
    }
    uint8_t b = *r->p++;
    *major = b >> 5;
    uint8_t info = b & 0x1f;
    size_t extra;
    if (info < 24) {
        *arg = info;
        return 0;
    }
    switch (info) {
    case 24: extra = 1; break;
    case 25: extra = 2; break;
    case 26: extra = 4; break;
    case 27: extra = 8; break;
    default: r->err = 1; return -1; /* indefinite lengths and reserved values */
    }
    if ((size_t)(r->end - r->p) < extra) {
        r->err = 1;
        return -1;
    }
    uint64_t v = 0;
    for (size_t i = 0; i < extra; i++) {
        v = (v << 8) | r->p[i];
    }
    r->p += extra;
    *arg = v;
    return 0;
}

int cr_peek(cbor_r *r) {
    if (r->err || r->p >= r->end) {
        return CBOR_BAD;
    }
    return *r->p >> 5;
}

int cr_is_null(cbor_r *r) { return !r->err && r->p < r->end && *r->p == 0xf6; }

static int cr_expect(cbor_r *r, int want, uint64_t *arg) {
    int major;
    const uint8_t *save = r->p;
    if (cr_head(r, &major, arg) < 0) {
        return -1;
    }
    if (major != want) {
        r->p = save;
        r->err = 1;
        return -1;
    }
    return 0;
}

int cr_array(cbor_r *r, uint64_t *n) {
    if (cr_expect(r, 4, n) < 0) {
        return -1;
    }
    /* every item takes at least one byte: a count beyond the rest is malformed */
    if (*n > (uint64_t)(r->end - r->p)) {
        r->err = 1;
        return -1;
    }
    return 0;
}

int cr_map(cbor_r *r, uint64_t *n) {
    if (cr_expect(r, 5, n) < 0) {
        return -1;
    }
    if (*n > (uint64_t)(r->end - r->p) / 2) {
        r->err = 1;
        return -1;
    }
    return 0;
}

int cr_uint(cbor_r *r, uint64_t *v) { return cr_expect(r, 0, v); }

int cr_int(cbor_r *r, int64_t *v) {
    int major;
    uint64_t arg;
    if (cr_head(r, &major, &arg) < 0) {
        return -1;
    }
    if (major == 0 && arg <= (uint64_t)INT64_MAX) {
        *v = (int64_t)arg;
        return 0;
    }
    if (major == 1 && arg <= (uint64_t)INT64_MAX) {
        *v = -1 - (int64_t)arg;
        return 0;
    }
    r->err = 1;
    return -1;
}

static int cr_string(cbor_r *r, int major, const uint8_t **p, size_t *n) {
    uint64_t len;
    if (cr_expect(r, major, &len) < 0) {
        return -1;
    }
    if (len > (uint64_t)(r->end - r->p)) {
        r->err = 1;
        return -1;
    }
    *p = r->p;
    *n = (size_t)len;
    r->p += len;
    return 0;
}

int cr_bytes(cbor_r *r, const uint8_t **p, size_t *n) { return cr_string(r, 2, p, n); }

int cr_bytes_head(cbor_r *r, uint64_t *n) {
    int major;
    if (cr_head(r, &major, n) < 0 || major != 2) {
        r->err = 1;
        return -1;
    }
    return 0;
}

int cr_text(cbor_r *r, const char **p, size_t *n) {
    const uint8_t *u;
    if (cr_string(r, 3, &u, n) < 0) {
        return -1;
    }
    *p = (const char *)u;
    return 0;
}

int cr_strbuf(cbor_r *r, char *out, size_t cap) {
    const uint8_t *p;
    size_t n;
    int t = cr_peek(r);
    if (t != CBOR_TEXT && t != CBOR_BYTES) {
        r->err = 1;
        return -1;
    }
    if (cr_string(r, t, &p, &n) < 0) {
        return -1;
    }
    if (n + 1 > cap || memchr(p, 0, n) != NULL) {
        r->err = 1;
        return -1;
    }
    memcpy(out, p, n);
    out[n] = 0;
    return 0;
}

int cr_bool(cbor_r *r, int *v) {
    if (r->err || r->p >= r->end || (*r->p != 0xf4 && *r->p != 0xf5)) {
        r->err = 1;
        return -1;
    }
    *v = *r->p++ == 0xf5;
    return 0;
}

int cr_null(cbor_r *r) {
    if (!cr_is_null(r)) {
        r->err = 1;
        return -1;
    }
    r->p++;
    return 0;
}

/* RFC 3629 UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + len > n) {
            return 0;
        }
        for (size_t k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80) {
                return 0;
            }
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return 0;
        }
        i += len;
    }
    return 1;
}

static int cr_skip_depth(cbor_r *r, int depth) {
    int major;
    uint64_t arg;
    if (depth > CBOR_MAX_DEPTH || cr_head(r, &major, &arg) < 0) {
        r->err = 1;
        return -1;
    }
    switch (major) {
    case 0:
    case 1:
        return 0;
    case 2:
    case 3:
        if (arg > (uint64_t)(r->end - r->p) || (major == 3 && !utf8_valid(r->p, (size_t)arg))) {
            r->err = 1;
            return -1;
        }
        r->p += arg;
        return 0;
    case 4:
    case 5: {
        uint64_t items = major == 5 ? arg * 2 : arg;
        if (arg > (uint64_t)(r->end - r->p)) {
            r->err = 1;
            return -1;
        }
        for (uint64_t i = 0; i < items; i++) {
            /* map keys are scalars (ints, strings, bools, null): the protocol's maps have
             * text keys, and a container key is unusable on the Python side */
            if (major == 5 && i % 2 == 0) {
                int kt = cr_peek(r);
                if (kt == CBOR_ARRAY || kt == CBOR_MAP) {
                    r->err = 1;
                    return -1;
                }
            }
            if (cr_skip_depth(r, depth + 1) < 0) {
                return -1;
            }
        }
        return 0;
    }
    case 7:
        /* only false, true, null: no floats, undefined or other simple values */
        if (arg == 20 || arg == 21 || arg == 22) {
            if (r->p[-1] != (0xe0 | arg)) { /* simple values must use the short form */
                r->err = 1;
                return -1;
            }
            return 0;
        }
        r->err = 1;
        return -1;
    default: /* tags (6) are not part of the subset */
        r->err = 1;
        return -1;
    }
}

int cr_skip(cbor_r *r) { return cr_skip_depth(r, 0); }

int cbor_validate(const uint8_t *p, size_t n) {
    cbor_r r;
    cr_init(&r, p, n);
    if (cr_skip(&r) < 0 || r.p != r.end) {
        return -1;
    }
    return 0;
}
