/* Read-ahead and write-behind for handle-backed regular files (bigger than fetch_limit).
 *
 * A file within fetch_limit lives in a memfd (files_open.c) and needs none of this; a larger
 * one is read and written through its remote handle, a round trip per call: 4 KiB reads or
 * writes ran at a few MB/s. So the layer keeps the fd's offset itself and buffers:
 *
 * - Read-ahead (opened O_RDONLY): reads are served from a stream of pipelined FileRead
 *   requests (slots of up to FB_CHUNK, up to FB_RSLOTS in flight, replies in any order).
 *   Once a file is read on past its first window the stream gets a daemon connection of its
 *   own and runs ahead of the app: each slot the app consumes is asked for again at once, so
 *   the daemon and the agent carry the next MiBs while the app works on this one. A slot the
 *   app's read covers whole lands in its buffer directly. The window (how far ahead) starts
 *   at FB_MIN_WINDOW and doubles while reads stay sequential (after an lseek elsewhere it
 *   starts small again). A short reply is the end of the file as the target has it now;
 *   nothing past it is kept, so a growing file is seen.
 * - Write-behind (opened O_WRONLY or O_RDWR, not O_APPEND): writes that continue each other
 *   collect in a buffer of FB_WRITE_CAP bytes (one FileWrite at an explicit offset), sent
 *   when it is full or a write does not continue it, on a daemon connection of the buffer's
 *   own without waiting for the reply (up to FB_INFLIGHT in flight: the app writes on while
 *   the daemon and the agent carry them). Before anything that must see the file as written
 *   the buffer is sent and every reply read: close (of any fd of it), fsync/fdatasync, lseek,
 *   a read, pread/pwrite, fstat, ftruncate, mmap, fork, exec, posix_spawn, exit and _exit,
 *   and a remote open or stat of the same path by this process (read-your-writes). A failed
 *   write-back is the error of the next write, close or fsync of the fd (-1 with the agent's
 *   errno, as a local file system reports a failed write-back at fsync or close); the
 *   unwritten bytes are dropped, as the kernel drops pages it failed to write.
 *
 * dup'd fds share the open file and so its buffer and offset. A fork child shares the open
 * file with its parent but not the layer's memory: before fork (and posix_spawn) every buffer
 * is written back, the read-ahead dropped and the handle's offset on the agent set to the
 * fd's, and in both processes the fd goes back to plain handle calls, whose offset the agent
 * keeps for both; exec does the same for the fds the new image inherits (if the exec fails,
 * the others are still buffered). Buffering is therefore per process and per open file; two
 * processes writing the same remote file see each other's bytes at close/fsync, like NFS's
 * close-to-open consistency.
 *
 * Owns: struct fbuf and every use of it. Does not own: the requests' transport (conn.c) or
 * when a file gets a buffer (open_remote).
 */
#include "files.h"

#include <sys/mman.h>

#define FB_CHUNK MAX_DATA_CHUNK                   /* one FileRead */
#define FB_WCHUNK (MAX_DATA_CHUNK - 4096)         /* one FileWrite (room for its header) */
#define FB_INFLIGHT 4                             /* write-backs (and batches) in flight */
#define FB_RSLOTS 8                               /* read-ahead requests in flight */
#define FB_MIN_WINDOW fb_min_window()            /* the first read-ahead, and after a seek */
#define FB_MAX_WINDOW (FB_RSLOTS * FB_CHUNK)      /* read-ahead buffer */
#define FB_WRITE_CAP FB_WCHUNK                    /* write-behind buffer: one FileWrite */

enum { FB_READ = 1, FB_WRITE = 2 };

/* feature.fs.readonly_file_buffer (128000 by default), within [4 KiB, FB_CHUNK] */
static size_t fb_min_window(void) {
    long long w = g_set.read_ahead;
    return w < 4096 ? 4096 : w > FB_CHUNK ? FB_CHUNK : (size_t)w;
}
enum { RS_FLIGHT = 1, RS_DONE, RS_ERR };

/* read: one FileRead of the read-ahead stream: `n` bytes at `off`, in flight (its request id)
 * or come (`got` bytes, fewer at the file's end; or the agent's errno) */
struct rslot {
    off_t off;
    size_t n;
    size_t got;
    uint64_t rid;
    char *to; /* where its bytes go: its part of data, or the app's buffer it waits in */
    int state;
    int err;
};

static int g_nfbuf; /* buffers alive: the walks over every fd are skipped while there are none */

struct fbuf {
    pthread_mutex_t lock;
    int mode;       /* FB_READ, FB_WRITE; 0: off (every call through the handle) */
    off_t pos;      /* the fd's offset (the handle's own offset on the agent is stale) */
    char *data;     /* FB_MAX_WINDOW or FB_WRITE_CAP bytes (cap), mapped at first use */
    size_t cap;
    off_t off;      /* write: the pending bytes [off, off+len) */
    size_t len;
    size_t window;  /* read: how far the stream runs ahead of the app */
    off_t next;     /* read: where a sequential read would continue */
    int eof;        /* read: a slot came short: the file ends there */
    int no_stream;  /* read: the daemon refused the stream a connection */
    off_t size;     /* read: the file's size as far as known (at open, or read since) */
    struct rslot rs[FB_RSLOTS]; /* read: the stream, rs[rhead] first, nr of them */
    int rhead, nr;
    /* the buffer's own connection (read: its stream's; write: the write-backs'); write: the
     * write-backs in flight on it (their replies not read yet), and the error of one that
     * failed, which the next write or flush reports */
    struct lconn *oc;
    uint64_t wrid[FB_INFLIGHT];
    size_t wlen[FB_INFLIGHT];
    int nw;
    int werr;
};

/* ---------------------------------------------------------------- pipelined requests */

/* One transfer of a batch: `n` bytes at `off` to or from `p`; `got`: bytes done, or -1. */
struct xfer {
    off_t off;
    size_t n;
    char *p;
    ssize_t got;
    uint64_t rid;
};

/* conn_into's dst for a batch of reads: the buffer of the transfer `rid` answers, if the
 * reply fits it (the bytes then go straight there, not through the connection's buffer). */
struct xfer_batch_ctx {
    struct xfer *x;
    int k;
};

static char *xfer_dst(void *ctx, uint64_t rid, size_t n) {
    struct xfer_batch_ctx *b = ctx;
    for (int i = 0; i < b->k; i++) {
        if (b->x[i].rid == rid && b->x[i].got < 0 && n <= b->x[i].n) {
            return b->x[i].p;
        }
    }
    return NULL;
}

/* Sends every transfer of x[0..k) on one connection, then reads the k replies in whatever
 * order they come. 0: each x[i].got is set (an ErrorReply: -1, its errno in *err); -1: the
 * connection broke (errno EIO), nothing is known. */
static int xfer_batch(uint64_t handle, struct xfer *x, int k, int write, int *err) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    int sent = 0, send_err = 0;
    for (; sent < k; sent++) {
        cbor_w *w = write ? conn_begin(c, M_FILE_WRITE, 3) : conn_begin(c, M_FILE_READ, 3);
        cw_uint(w, handle);
        if (write) {
            conn_bytes_ref(c, x[sent].p, x[sent].n); /* sent from the buffer, not copied */
        } else {
            cw_uint(w, x[sent].n);
        }
        cw_uint(w, (uint64_t)x[sent].off);
        x[sent].got = -1;
        if ((x[sent].rid = conn_send(c)) == 0) {
            send_err = errno; /* the replies of those sent are read all the same */
            break;
        }
    }
    int rc = send_err ? -1 : 0;
    struct xfer_batch_ctx batch = {.x = x, .k = sent};
    struct conn_into into = {.dst = xfer_dst, .ctx = &batch};
    for (int left = sent; left > 0; left--) {
        uint64_t rid;
        cbor_r r;
        int kind = write ? conn_reply(c, M_FILE_WRITTEN, &rid, &r) : conn_reply_into(c, &rid, &r, &into);
        if (kind < 0) {
            rc = -1;
            break;
        }
        struct xfer *t = NULL;
        for (int i = 0; i < sent; i++) {
            t = x[i].rid == rid ? &x[i] : t;
        }
        if (t == NULL) {
            conn_fail(c, "a reply to no request in flight"); /* out of step: dropped */
            rc = -1;
            break;
        }
        if (kind == 1) {
            *err = errno;
            continue;
        }
        const uint8_t *p;
        size_t len;
        uint64_t count;
        if (write && cr_uint(&r, &count) == 0 && count <= t->n) {
            t->got = (ssize_t)count;
        } else if (!write && into.got >= 0) {
            t->got = into.got; /* received into t->p already (xfer_dst chose t) */
        } else if (!write && cr_bytes(&r, &p, &len) == 0 && len <= t->n) {
            memcpy(t->p, p, len);
            t->got = (ssize_t)len;
        } else {
            *err = EIO;
        }
    }
    conn_release(c);
    if (send_err) {
        errno = send_err;
    }
    return rc;
}

/* Writes [off, off+n) from p through the handle, FB_INFLIGHT requests at a time: 0, or -1
 * with errno (a short write that is not an error counts as EIO: the file system gave up). */
static int write_through(uint64_t handle, const char *p, size_t n, off_t off) {
    size_t done = 0;
    while (done < n) {
        struct xfer x[FB_INFLIGHT];
        int k = 0;
        for (size_t at = done; k < FB_INFLIGHT && at < n; k++) {
            size_t len = n - at < FB_WCHUNK ? n - at : FB_WCHUNK;
            x[k] = (struct xfer){.off = off + (off_t)at, .n = len, .p = (char *)p + at};
            at += len;
        }
        int err = EIO;
        if (xfer_batch(handle, x, k, 1, &err) < 0) {
            return -1;
        }
        for (int i = 0; i < k; i++) {
            if (x[i].got != (ssize_t)x[i].n) {
                errno = x[i].got < 0 ? err : EIO;
                return -1;
            }
            done += x[i].n;
        }
    }
    return 0;
}

/* Reads [off, off+n) into p through the handle, FB_INFLIGHT requests at a time: the bytes
 * read (fewer at the end of the file), or -1 with errno. */
static ssize_t read_through(uint64_t handle, char *p, size_t n, off_t off) {
    size_t done = 0;
    while (done < n) {
        struct xfer x[FB_INFLIGHT];
        int k = 0;
        for (size_t at = done; k < FB_INFLIGHT && at < n; k++) {
            size_t len = n - at < FB_CHUNK ? n - at : FB_CHUNK;
            x[k] = (struct xfer){.off = off + (off_t)at, .n = len, .p = p + at};
            at += len;
        }
        int err = EIO;
        if (xfer_batch(handle, x, k, 0, &err) < 0) {
            return done > 0 ? (ssize_t)done : -1;
        }
        for (int i = 0; i < k; i++) {
            if (x[i].got < 0) {
                errno = err;
                return done > 0 ? (ssize_t)done : -1;
            }
            done += (size_t)x[i].got;
            if ((size_t)x[i].got < x[i].n) {
                return (ssize_t)done; /* the end of the file */
            }
        }
    }
    return (ssize_t)done;
}

/* ---------------------------------------------------------------- write-behind */

/* A full buffer goes out as one FileWrite on the buffer's own connection (wc), and the app
 * writes on while the daemon and the agent carry it: its reply is read when FB_INFLIGHT are in
 * flight or at the next flush (close, fsync, ...), which waits for all of them. The bytes are
 * in the socket when conn_send returns, so the buffer is free at once. A failed write-back is
 * the error of the next write or flush of the fd, as a local file system reports a failed
 * write-back at fsync or close. Without a connection of its own (the daemon refused one) a
 * write-back waits for its reply on the shared one. */

static void fb_oc_close(struct fbuf *fb, int inherited);

static void fb_oc_lost(struct fbuf *fb) {
    fb_oc_close(fb, 0);
    fb->nw = 0; /* nothing is known of those in flight: the fd's next call fails */
    fb->werr = fb->werr ? fb->werr : EIO;
}

/* Reads one write-back's reply: 0, or -1 when the connection broke (fb->werr set). */
static int fb_reap_one(struct fbuf *fb) {
    uint64_t rid, count;
    cbor_r r;
    int kind = conn_reply(fb->oc, M_FILE_WRITTEN, &rid, &r);
    int i = 0;
    while (kind >= 0 && i < fb->nw && fb->wrid[i] != rid) {
        i++;
    }
    if (kind >= 0 && i == fb->nw) {
        conn_fail(fb->oc, "a reply to no write-back in flight");
        kind = -1;
    }
    if (kind < 0) {
        fb_oc_lost(fb);
        return -1;
    }
    if (kind == 1) {
        fb->werr = fb->werr ? fb->werr : errno;
    } else if (cr_uint(&r, &count) < 0 || count != fb->wlen[i]) {
        fb->werr = fb->werr ? fb->werr : EIO; /* short: the file system gave up */
    }
    fb->nw--;
    fb->wrid[i] = fb->wrid[fb->nw];
    fb->wlen[i] = fb->wlen[fb->nw];
    return 0;
}

/* The error of an earlier write-back, once: -1 with errno, or 0. */
static int fb_take_err(struct fbuf *fb) {
    if (fb->werr == 0) {
        return 0;
    }
    errno = fb->werr;
    fb->werr = 0;
    return -1;
}

/* The pending bytes go out; their reply is read later. 0, or -1 with errno (the bytes are
 * dropped). Under fb->lock. */
static int fb_post_locked(struct ent *e, struct fbuf *fb) {
    size_t n = fb->len;
    if (n == 0) {
        return 0;
    }
    fb->len = 0;
    if (fb->oc == NULL && (fb->oc = conn_open_own()) == NULL) {
        return write_through(e->handle, fb->data, n, fb->off);
    }
    /* the replies that came meanwhile (a failure is then the next write's error), and the
     * oldest's when FB_INFLIGHT are in flight */
    while (fb->nw > 0 && (fb->nw == FB_INFLIGHT || conn_pending(fb->oc))) {
        if (fb_reap_one(fb) < 0) {
            return fb_take_err(fb);
        }
    }
    cbor_w *w = conn_begin(fb->oc, M_FILE_WRITE, 3);
    cw_uint(w, e->handle);
    conn_bytes_ref(fb->oc, fb->data, n); /* in the socket when conn_send returns */
    cw_uint(w, (uint64_t)fb->off);
    uint64_t rid = conn_send(fb->oc);
    if (rid == 0) {
        fb_oc_lost(fb);
        return fb_take_err(fb);
    }
    fb->wrid[fb->nw] = rid;
    fb->wlen[fb->nw] = n;
    fb->nw++;
    DBG("write-behind of %s: %zu bytes at %lld sent", e->path ? e->path : "?", n,
        (long long)fb->off);
    return 0;
}

/* Everything written so far is on the target: the pending bytes sent and every write-back's
 * reply read. 0, or -1 with errno (of the first that failed; the unwritten bytes are dropped,
 * as the kernel drops pages it failed to write). Under fb->lock. */
static int fb_flush_locked(struct ent *e, struct fbuf *fb) {
    if (fb->mode != FB_WRITE || (fb->len == 0 && fb->nw == 0 && fb->werr == 0)) {
        return 0;
    }
    if (fb_post_locked(e, fb) < 0) {
        fb->werr = fb->werr ? fb->werr : errno;
    }
    while (fb->nw > 0 && fb_reap_one(fb) == 0) {
    }
    return fb_take_err(fb);
}

/* fb->data of n bytes (`populate`: its pages now): 0, or -1 with errno ENOMEM. */
static int fb_alloc(struct fbuf *fb, size_t n, int populate) {
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0), -1, 0);
    if (p == MAP_FAILED) {
        errno = ENOMEM;
        return -1;
    }
    fb->data = p;
    fb->cap = n;
    return 0;
}

static ssize_t fb_write_locked(struct ent *e, struct fbuf *fb, const void *buf, size_t n) {
    if (fb_take_err(fb) < 0) {
        return -1; /* an earlier write-back failed: this call reports it */
    }
    if (fb->len > 0 && (fb->pos != fb->off + (off_t)fb->len || fb->len + n > FB_WRITE_CAP)) {
        if (fb_post_locked(e, fb) < 0) {
            return -1;
        }
    }
    if (n >= FB_WRITE_CAP) { /* a large write: straight through, pipelined */
        if (fb_flush_locked(e, fb) < 0 || write_through(e->handle, buf, n, fb->pos) < 0) {
            return -1;
        }
        fb->pos += (off_t)n;
        return (ssize_t)n;
    }
    /* populated at once: first touches of a fresh buffer page by page cost more than the
     * copies (a quarter of a 4 KiB write's time here) */
    if (fb->data == NULL && fb_alloc(fb, FB_WRITE_CAP, 1) < 0) {
        return -1;
    }
    if (fb->len == 0) {
        fb->off = fb->pos;
    }
    memcpy(fb->data + fb->len, buf, n);
    fb->len += n;
    fb->pos += (off_t)n;
    return (ssize_t)n;
}

/* ---------------------------------------------------------------- read-ahead */

/* The read-ahead is a stream of FileRead requests over the file, slot by slot (rs[], a ring of
 * FB_RSLOTS, contiguous from its head; each slot's bytes land in its FB_CHUNK of data).
 * With a connection of the buffer's own (oc) the stream runs ahead of the app: as the app
 * consumes a slot the next one is asked for at once, so the daemon and the agent carry the
 * next MiBs while the app works on this one, and a reply is read only when the app reaches
 * its slot (the slot the app waits for is received straight into the app's buffer when the
 * read covers it). Without one (the daemon refused it, or FB_STREAMS files stream already)
 * the slots are asked for and read in one batch on the shared connection when the app
 * reaches the end of those it has. */

#define FB_STREAMS 8 /* files of a process whose read-ahead runs on a connection of its own */

static int g_nstreams;

static struct rslot *rs_at(struct fbuf *fb, int i) {
    return &fb->rs[(fb->rhead + i) % FB_RSLOTS];
}

static char *rs_home(struct fbuf *fb, const struct rslot *s) {
    return fb->data + (size_t)(s - fb->rs) * FB_CHUNK;
}

static void rs_pop(struct fbuf *fb) {
    fb->rhead = (fb->rhead + 1) % FB_RSLOTS;
    fb->nr--;
}

/* conn_into's dst for the stream: where the slot that `rid` answers takes its bytes. */
static char *rs_dst(void *ctx, uint64_t rid, size_t n) {
    struct fbuf *fb = ctx;
    for (int i = 0; i < fb->nr; i++) {
        struct rslot *s = rs_at(fb, i);
        if (s->rid == rid && s->state == RS_FLIGHT && n <= s->n) {
            return s->to;
        }
    }
    return NULL;
}

/* Closes the buffer's own connection (in a fork child: `inherited`, the parent's); a
 * stream's slots are forgotten with it. */
static void fb_oc_close(struct fbuf *fb, int inherited) {
    if (fb->oc != NULL && fb->mode == FB_READ && !inherited) {
        __atomic_fetch_sub(&g_nstreams, 1, __ATOMIC_RELAXED);
    }
    conn_close_own(fb->oc, inherited);
    fb->oc = NULL;
    fb->nr = 0;
}

/* Reads the stream's next reply into its slot: 0, or -1 (the stream is gone, errno EIO). */
static int fb_stream_recv(struct fbuf *fb) {
    uint64_t rid;
    cbor_r r;
    struct conn_into into = {.dst = rs_dst, .ctx = fb};
    int kind = conn_reply_into(fb->oc, &rid, &r, &into);
    struct rslot *s = NULL;
    for (int i = 0; kind >= 0 && i < fb->nr; i++) {
        struct rslot *t = rs_at(fb, i);
        s = t->rid == rid && t->state == RS_FLIGHT ? t : s;
    }
    if (kind >= 0 && s == NULL) {
        conn_fail(fb->oc, "a reply to no read-ahead in flight");
    }
    if (kind < 0 || s == NULL) {
        fb_oc_close(fb, 0); /* nothing in flight is known any more */
        errno = EIO;
        return -1;
    }
    const uint8_t *p;
    size_t len;
    s->state = RS_ERR;
    if (kind == 1) {
        s->err = errno;
    } else if (into.got >= 0) {
        s->got = (size_t)into.got; /* in s->to already (rs_dst chose s) */
        s->state = RS_DONE;
    } else if (cr_bytes(&r, &p, &len) == 0 && len <= s->n) {
        memcpy(s->to, p, len);
        s->got = len;
        s->state = RS_DONE;
    }
    if (s->state == RS_DONE && s->off + (off_t)s->got > fb->size) {
        fb->size = s->off + (off_t)s->got; /* it grew */
    } else if (s->state != RS_DONE && kind != 1) {
        s->err = EIO;
    }
    return 0;
}

/* Reads and drops every reply in flight and forgets the slots (the app went elsewhere). */
static void fb_stream_drop(struct fbuf *fb) {
    for (int i = 0; fb->oc != NULL && i < fb->nr; i++) {
        struct rslot *s = rs_at(fb, i);
        s->to = rs_home(fb, s);
        while (fb->oc != NULL && s->state == RS_FLIGHT && fb_stream_recv(fb) == 0) {
        }
    }
    fb->nr = 0;
    fb->eof = 0;
}

/* Asks for slots past the stream's end until `want` bytes past fb->pos are asked for (at most
 * FB_RSLOTS slots; a slot of FB_CHUNK, or of `want` while that is smaller, ending on a
 * multiple of its size, so that sequential reads of a MiB meet whole slots). `into`: the app's
 * buffer, for a first slot that starts at fb->pos and fits in `room`. 0, or -1 with errno
 * (the stream is gone; batch mode: the connection broke). */
static int fb_stream_ask(struct ent *e, struct fbuf *fb, size_t want, char *into, size_t room) {
    if (want > FB_MAX_WINDOW) {
        want = FB_MAX_WINDOW;
    }
    size_t gran = want < FB_CHUNK ? want : FB_CHUNK;
    off_t end = fb->nr > 0 ? rs_at(fb, fb->nr - 1)->off + (off_t)rs_at(fb, fb->nr - 1)->n : fb->pos;
    int first = fb->nr;
    /* past the size known, one slot at most (the file may have grown: its reply says) */
    while (fb->nr < FB_RSLOTS && !fb->eof && end - fb->pos < (off_t)want &&
           (end < fb->size || fb->nr == 0)) {
        struct rslot *s = rs_at(fb, fb->nr);
        size_t n = gran - (size_t)(end % (off_t)gran);
        *s = (struct rslot){.off = end, .n = n, .state = RS_FLIGHT, .to = rs_home(fb, s)};
        if (into != NULL && end == fb->pos && n <= room) {
            s->to = into;
        }
        if (fb->oc != NULL) {
            cbor_w *w = conn_begin(fb->oc, M_FILE_READ, 3);
            cw_uint(w, e->handle);
            cw_uint(w, n);
            cw_uint(w, (uint64_t)end);
            if ((s->rid = conn_send(fb->oc)) == 0) {
                fb_oc_close(fb, 0); /* nothing in flight is known any more */
                errno = EIO;
                return -1;
            }
        }
        fb->nr++;
        end += (off_t)n;
    }
    if (fb->oc != NULL || first == fb->nr) {
        return 0;
    }
    /* batch mode: read them all now, on the shared connection */
    struct xfer x[FB_RSLOTS];
    int k = fb->nr - first;
    for (int i = 0; i < k; i++) {
        struct rslot *s = rs_at(fb, first + i);
        x[i] = (struct xfer){.off = s->off, .n = s->n, .p = s->to};
    }
    int err = EIO;
    if (xfer_batch(e->handle, x, k, 0, &err) < 0) {
        fb->nr = first;
        return -1;
    }
    for (int i = 0; i < k; i++) {
        struct rslot *s = rs_at(fb, first + i);
        s->state = x[i].got < 0 ? RS_ERR : RS_DONE;
        s->got = x[i].got < 0 ? 0 : (size_t)x[i].got;
        s->err = err;
        if (s->off + (off_t)s->got > fb->size) {
            fb->size = s->off + (off_t)s->got; /* it grew */
        }
    }
    return 0;
}

/* A connection of the buffer's own for a file read sequentially past its first window, while
 * fewer than FB_STREAMS files of this process have one. */
static void fb_stream_open(struct fbuf *fb) {
    if (fb->oc != NULL || fb->no_stream || fb->window <= FB_MIN_WINDOW) {
        return;
    }
    if (__atomic_add_fetch(&g_nstreams, 1, __ATOMIC_RELAXED) > FB_STREAMS) {
        __atomic_fetch_sub(&g_nstreams, 1, __ATOMIC_RELAXED); /* batch mode while they do */
        return;
    }
    if ((fb->oc = conn_open_own()) == NULL) {
        __atomic_fetch_sub(&g_nstreams, 1, __ATOMIC_RELAXED);
        fb->no_stream = 1; /* the daemon refused it: batch mode from now on */
    }
}

/* [off, off+n) from a slot that came: 1 (copied to buf), else 0. */
static int fb_stream_copy(struct fbuf *fb, void *buf, size_t n, off_t off) {
    for (int i = 0; i < fb->nr; i++) {
        struct rslot *s = rs_at(fb, i);
        if (s->state == RS_DONE && off >= s->off && off + (off_t)n <= s->off + (off_t)s->got) {
            memcpy(buf, s->to + (off - s->off), n);
            return 1;
        }
    }
    return 0;
}

static ssize_t fb_read_locked(struct ent *e, struct fbuf *fb, char *buf, size_t n) {
    if (n == 0) {
        return 0;
    }
    if (fb->data == NULL && fb_alloc(fb, FB_MAX_WINDOW, 0) < 0) {
        return -1;
    }
    /* Sequential or not is a property of the call, where it starts: within one call the
     * offset moves through the stream, which is not a seek. */
    if (fb->pos != fb->next) {
        fb->window = FB_MIN_WINDOW; /* not sequential: start small again */
    }
    size_t total = 0;
    int err = EIO; /* the read's error when it ends with nothing: nothing came in 64 rounds */
    for (int rounds = 0; total < n && rounds < 64; rounds++) {
        struct rslot *s = fb->nr > 0 ? rs_at(fb, 0) : NULL;
        if (s == NULL || fb->pos < s->off || fb->pos >= s->off + (off_t)s->n) {
            /* nothing asked for here: the stream starts over at fb->pos */
            if (s != NULL && fb->eof) {
                fb->window = FB_MIN_WINDOW; /* past the file's end, as it was: ask little */
            }
            fb_stream_drop(fb);
            fb_stream_open(fb);
            size_t want = n - total > fb->window ? n - total : fb->window;
            if (fb_stream_ask(e, fb, want, buf + total, n - total) < 0) {
                err = errno;
                break;
            }
            continue;
        }
        if (s->state == RS_FLIGHT) {
            if (fb->pos == s->off && s->n <= n - total) {
                s->to = buf + total; /* straight into the app's buffer */
            }
            while (fb->oc != NULL && s->state == RS_FLIGHT && fb_stream_recv(fb) == 0) {
            }
            if (fb->oc == NULL) {
                err = EIO; /* the stream is gone */
                break;
            }
        }
        if (s->state == RS_ERR) {
            err = s->err;
            fb_stream_drop(fb);
            break;
        }
        off_t have = s->off + (off_t)s->got;
        if (fb->pos < have) {
            size_t k = (size_t)(have - fb->pos) < n - total ? (size_t)(have - fb->pos) : n - total;
            if (s->to != buf + total) {
                memcpy(buf + total, s->to + (fb->pos - s->off), k);
            }
            total += k;
            fb->pos += (off_t)k;
        }
        if (fb->pos == s->off + (off_t)s->n) {
            rs_pop(fb); /* consumed: the next one is asked for now, the app works on */
            if (fb->window < FB_MAX_WINDOW) {
                fb->window *= 2;
            }
            if (fb->oc != NULL && fb_stream_ask(e, fb, fb->window, NULL, 0) < 0) {
                err = errno;
                break;
            }
        } else if (fb->pos >= have) {
            rs_pop(fb); /* a short slot: the file ends here, as the target has it now */
            fb->eof = 1;
            break;
        }
    }
    fb->next = fb->pos;
    if (total == 0 && !fb->eof) {
        errno = err;
        return -1;
    }
    return (ssize_t)total;
}

/* ---------------------------------------------------------------- the hooks' side */

void fbuf_attach(struct ent *e, int flags) {
    if (e->kind != K_RFILE || !e->has_handle || e->is_dir || !S_ISREG(e->st.st_mode) ||
        (flags & (O_APPEND | O_PATH))) {
        return;
    }
    if ((flags & O_ACCMODE) == O_RDONLY && g_set.read_ahead == 0) {
        return; /* readonly_file_buffer 0: no read-ahead */
    }
    struct fbuf *fb = calloc(1, sizeof *fb);
    if (fb == NULL) {
        return; /* unbuffered: slower, still right */
    }
    pthread_mutex_init(&fb->lock, NULL);
    fb->mode = (flags & O_ACCMODE) == O_RDONLY ? FB_READ : FB_WRITE;
    fb->window = FB_MIN_WINDOW;
    fb->size = e->st.st_size;
    e->fb = fb;
    __atomic_fetch_add(&g_nfbuf, 1, __ATOMIC_RELAXED);
}

/* Locks e's buffer when it is on: the buffer, or NULL (no buffer: the handle's way). */
static struct fbuf *fb_lock(struct ent *e) {
    struct fbuf *fb = e->fb;
    if (fb == NULL) {
        return NULL;
    }
    pthread_mutex_lock(&fb->lock);
    if (fb->mode == 0) {
        pthread_mutex_unlock(&fb->lock);
        return NULL;
    }
    return fb;
}

/* A read through e (rfile_read): at the fd's offset (off -1) from the read-ahead, or for a
 * write-behind file (O_RDWR) after its pending bytes went out; at an explicit offset from the
 * read-ahead when it holds all of it. 1: done (*ret), 0: the handle's way. */
int fbuf_read(struct ent *e, void *buf, size_t n, off_t off, ssize_t *ret) {
    struct fbuf *fb = fb_lock(e);
    if (fb == NULL) {
        return 0;
    }
    int done = 1;
    if (fb->mode == FB_READ && off < 0) {
        *ret = fb_read_locked(e, fb, buf, n);
    } else if (fb->mode == FB_READ && fb_stream_copy(fb, buf, n, off)) {
        *ret = (ssize_t)n; /* inside what the read-ahead holds */
    } else if (fb->mode == FB_READ) {
        *ret = read_through(e->handle, buf, n, off);
    } else if (fb_flush_locked(e, fb) < 0) {
        *ret = -1;
    } else if (off >= 0) {
        done = 0;
    } else {
        *ret = rfile_read_chunk(e->handle, buf, n > MAX_DATA_CHUNK ? MAX_DATA_CHUNK : n, fb->pos);
        fb->pos += *ret > 0 ? *ret : 0;
    }
    pthread_mutex_unlock(&fb->lock);
    return done;
}

/* A write through e (rfile_write): at the fd's offset into the write-behind buffer; at an
 * explicit offset after the pending bytes went out (the handle's way). 1: done, 0: not. */
int fbuf_write(struct ent *e, const void *buf, size_t n, off_t off, ssize_t *ret) {
    struct fbuf *fb = fb_lock(e);
    if (fb == NULL) {
        return 0;
    }
    int done = 1;
    if (fb->mode != FB_WRITE) {
        errno = EBADF;
        *ret = -1;
    } else if (off < 0) {
        *ret = fb_write_locked(e, fb, buf, n);
    } else if (fb_flush_locked(e, fb) < 0) {
        *ret = -1;
    } else {
        done = 0;
    }
    pthread_mutex_unlock(&fb->lock);
    return done;
}

int fbuf_seek(struct ent *e, off_t off, int whence, off_t *ret) {
    struct fbuf *fb = fb_lock(e);
    if (fb == NULL) {
        return 0;
    }
    if (fb_flush_locked(e, fb) < 0) {
        *ret = -1;
    } else if (whence == SEEK_SET || whence == SEEK_CUR) {
        off_t to = whence == SEEK_SET ? off : fb->pos + off;
        if (to < 0) {
            errno = EINVAL;
            *ret = -1;
        } else {
            *ret = fb->pos = to;
        }
    } else { /* SEEK_END, SEEK_DATA, SEEK_HOLE: the target knows */
        *ret = rfile_seek_handle(e, off, whence);
        if (*ret >= 0) {
            fb->pos = *ret;
        }
    }
    pthread_mutex_unlock(&fb->lock);
    return 1;
}

int fbuf_flush(struct ent *e) {
    struct fbuf *fb = fb_lock(e);
    if (fb == NULL) {
        return 0;
    }
    int rc = fb_flush_locked(e, fb);
    pthread_mutex_unlock(&fb->lock);
    return rc;
}

/* The fd goes back to plain handle calls: pending bytes written, the handle's offset on the
 * agent set to the fd's. 0, or -1 with errno (of the write-back). */
static int fb_unbuffer(struct ent *e) {
    struct fbuf *fb = fb_lock(e);
    if (fb == NULL) {
        return 0;
    }
    int rc = fb_flush_locked(e, fb);
    int saved = errno;
    (void)rfile_seek_handle(e, fb->pos, SEEK_SET);
    fb_oc_close(fb, 0); /* a stream's replies in flight are dropped with it */
    fb->mode = 0;
    fb->len = 0;
    pthread_mutex_unlock(&fb->lock);
    errno = saved;
    return rc;
}

/* Calls fn(fd, e) on every fd below `limit` with a buffer that is on. */
static void each_buffered(int limit, void (*fn)(int fd, struct ent *e)) {
    if (__atomic_load_n(&g_nfbuf, __ATOMIC_RELAXED) == 0) {
        return;
    }
    for (int fd = 0; fd < limit; fd++) {
        struct ent *pe = fd_peek(fd);
        if (pe == NULL || pe->kind != K_RFILE || pe->fb == NULL || pe->fb->mode == 0) {
            continue;
        }
        struct ent *e = ent_get(fd);
        if (e != NULL) {
            fn(fd, e);
            ent_put(e);
        }
    }
}

static void flush_fd(int fd, struct ent *e) {
    (void)fd;
    int saved = errno;
    (void)fbuf_flush(e);
    errno = saved;
}

void fbuf_flush_all(void) {
    each_buffered(MAX_FDS, flush_fd);
}

void fbuf_flush_path(const char *path) {
    if (__atomic_load_n(&g_nfbuf, __ATOMIC_RELAXED) == 0) {
        return;
    }
    for (int fd = 0; fd < 4096; fd++) {
        struct ent *pe = fd_peek(fd);
        if (pe != NULL && pe->kind == K_RFILE && pe->fb != NULL && pe->fb->mode == FB_WRITE &&
            pe->path != NULL && strcmp(pe->path, path) == 0) {
            struct ent *e = ent_get(fd);
            if (e != NULL) {
                flush_fd(fd, e);
                ent_put(e);
            }
        }
    }
}

/* Before exec, the fds the new image inherits: the open file is about to be shared with
 * another program, which sees the handle's offset only. */
static void unbuffer_shared(int fd, struct ent *e) {
    int fl = REAL(fcntl)(fd, F_GETFD);
    int saved = errno;
    if (fl >= 0 && !(fl & FD_CLOEXEC)) {
        (void)fb_unbuffer(e);
    }
    errno = saved;
}

/* Before fork: the child shares every open file (until it execs, and the fds it keeps after),
 * and neither process can know when the other is done with it, so both go back to the handle,
 * whose offset the agent keeps for both. */
static void unbuffer_fd(int fd, struct ent *e) {
    (void)fd;
    int saved = errno;
    (void)fb_unbuffer(e);
    errno = saved;
}

/* posix_spawn too: its file actions may dup2 a close-on-exec fd into the child. */
void fbuf_before_fork(void) {
    each_buffered(MAX_FDS, unbuffer_fd);
}

void fbuf_before_exec(void) {
    each_buffered(MAX_FDS, unbuffer_shared);
}

/* In a fork child: the parent's buffers are copies here; every fd goes through its handle. */
void fbuf_after_fork_child(void) {
    g_nstreams = 0; /* the child streams none: its buffers are off */
    if (__atomic_load_n(&g_nfbuf, __ATOMIC_RELAXED) == 0) {
        return;
    }
    for (int fd = 0; fd < MAX_FDS; fd++) {
        struct ent *e = fd_peek(fd);
        if (e != NULL && e->kind == K_RFILE && e->fb != NULL) {
            pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
            e->fb->lock = fresh;
            fb_oc_close(e->fb, 1); /* the parent's (closed before fork: none here) */
            e->fb->mode = 0;
            e->fb->len = 0;
            e->fb->nw = 0;
            e->fb->werr = 0;
        }
    }
}

/* The app closes an fd of the file: what it wrote reaches the target now, and a failure is
 * close's error. 0, or -1 with errno. */
int fbuf_close(int fd) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_RFILE || pe->fb == NULL || pe->fb->mode != FB_WRITE) {
        return 0;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return 0;
    }
    t_guard++;
    int rc = fbuf_flush(e);
    t_guard--;
    int saved = errno;
    ent_put(e);
    errno = saved;
    return rc;
}

/* The last reference: anything still pending is written back (nobody is left to hear of a
 * failure), and the buffer freed. */
void fbuf_free(struct ent *e) {
    struct fbuf *fb = e->fb;
    if (fb == NULL) {
        return;
    }
    if (fb->mode == FB_WRITE) {
        int saved = errno;
        (void)fb_flush_locked(e, fb);
        errno = saved;
    }
    fb_oc_close(fb, 0);
    pthread_mutex_destroy(&fb->lock);
    __atomic_fetch_sub(&g_nfbuf, 1, __ATOMIC_RELAXED);
    if (fb->data != NULL) {
        munmap(fb->data, fb->cap);
    }
    free(fb);
    e->fb = NULL;
}
