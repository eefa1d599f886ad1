/* The open family: a remote open becomes a real local fd.
 *
 * Owns: open/open64/openat/openat64/__open_2.../creat, the bypass path that keeps a local open
 * free of any call but the real one, and open_remote: one FileFetch (open, fstat and the
 * content of a small file in one round trip), then the fd the app gets: the target's file
 * itself when a local target's agent handed it over (FileHanded), a memfd with the content,
 * a write-back or append cache, or an empty placeholder for a handle-backed file.
 * Does not own: flushing caches (files_cache.c) or reading through handles (files_io.c).
 */
#include "files.h"

#include <stdarg.h>
#include <time.h>

int placeholder_fd(int flags, const char *path) {
    const char *b = strrchr(path, '/');
    char name[64];
    snprintf(name, sizeof name, "mirrord:%s", b ? b + 1 : path);
    int fd = memfd_create(name, (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    if (fd < 0) {
        errno = EMFILE;
    }
    return fd;
}

static int write_all(int fd, const void *buf, size_t n) {
    for (size_t off = 0; off < n;) {
        ssize_t k = REAL(write)(fd, (const char *)buf + off, n - off);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k < 0) {
            errno = EIO;
            return -1;
        }
        off += (size_t)k;
    }
    return 0;
}

void cache_adopt(struct ent *e, int fd) {
    struct stat cst;
    e->writeback = 1;
    e->cache_fd = layer_fd_protect(REAL(fcntl)(fd, F_DUPFD_CLOEXEC, 0));
    if (REAL(fstat)(e->cache_fd, &cst) == 0) {
        e->synced_mtim = cst.st_mtim;
        e->synced_size = cst.st_size;
    }
}

/* ---------------------------------------------------------------- asking the agent */

/* One remote open: what the app asked, what went to the agent and what came back. */
struct ropen {
    const char *path;
    int flags;  /* the app's */
    int rflags; /* the agent's */
    mode_t mode;
    int writing;
    int append_only; /* O_WRONLY|O_APPEND (`>>`, logging): an append cache */
    struct stat st;
    uint64_t handle;
    int has_handle;
    int fetched; /* a memfd with the content that came with FileFetched, or -1 */
    size_t fetched_size;
    int handed; /* the agent's own open file (FileHanded: a local target), or -1 */
};

/* Writes go to a write-back cache flushed at explicit offsets: the remote handle needs no
 * O_APPEND (with it, pwrite appends on Linux), and read access to fetch the content first
 * unless the open truncates. An append cache keeps O_APPEND: its write-back appends
 * atomically however many processes append. */
static void ropen_init(struct ropen *o, const char *path, int flags, mode_t mode) {
    memset(o, 0, sizeof *o);
    o->path = path;
    o->flags = flags;
    o->mode = mode;
    o->writing = open_is_write(flags);
    o->append_only = (flags & O_APPEND) && (flags & O_ACCMODE) == O_WRONLY && !(flags & O_TRUNC);
    o->rflags = flags & ~(O_CLOEXEC | O_NONBLOCK | O_NOCTTY | (o->append_only ? 0 : O_APPEND));
    if (o->writing && !(flags & O_TRUNC)) {
        o->rflags = (o->rflags & ~O_ACCMODE) | O_RDWR;
    }
    o->fetched = -1;
    o->handed = -1;
}

static void ropen_drop_fetched(struct ropen *o) {
    if (o->fetched >= 0) {
        REAL(close)(o->fetched);
        o->fetched = -1;
    }
}

/* FileFetched: [stat, handle or null, content or null]. */
static int fetched_reply(cbor_r *r, struct ropen *o) {
    if (stat_from_wire(r, &o->st) < 0) {
        errno = EIO;
        return -1;
    }
    if (cr_is_null(r)) {
        (void)cr_null(r);
    } else if (cr_uint(r, &o->handle) == 0) {
        o->has_handle = 1;
    } else {
        errno = EIO;
        return -1;
    }
    const uint8_t *data = NULL;
    size_t n = 0;
    if (!cr_is_null(r) && cr_bytes(r, &data, &n) < 0) {
        errno = EIO;
        return -1;
    }
    if (data == NULL) {
        if (!o->has_handle) {
            errno = EIO; /* neither content nor handle: not a valid reply */
            return -1;
        }
        return 0;
    }
    int fd = placeholder_fd(o->flags, o->path);
    if (fd < 0 || write_all(fd, data, n) < 0) {
        if (fd >= 0) {
            REAL(close)(fd);
        }
        return -1;
    }
    REAL(lseek)(fd, 0, SEEK_SET);
    o->fetched = fd;
    o->fetched_size = n;
    return 0;
}

/* FileFetch: open + fstat, and the whole content of a small readable regular file, in one
 * round trip (a small read-only file costs one round trip instead of four). The agent keeps
 * the handle unless the open was read-only and the content came with the reply. Returns 0,
 * -1 with errno, or -2 when the agent does not know FileFetch (ENOSYS: an older agent). */
static int rfile_fetch(struct ropen *o, uint64_t max) {
    struct rreq q = RREQ_INIT;
    int rc;
    if (g_set.fs_handover && !(o->flags & O_PATH)) {
        /* hand-over: the agent may open it with the app's own flags and pass the file */
        rc = RREQ(&q, M_FILE_FETCH, M_FILE_FETCHED, WF_PATH(o->path), WF_U(o->rflags),
                  WF_U(o->mode), WF_U(max), WF_U((unsigned)(o->flags & ~O_CLOEXEC)));
    } else {
        rc = RREQ(&q, M_FILE_FETCH, M_FILE_FETCHED, WF_PATH(o->path), WF_U(o->rflags),
                  WF_U(o->mode), WF_U(max));
    }
    if (rc == 0 && conn_reply_kind(q.c) == M_FILE_HANDED) {
        o->handed = conn_take_fd(q.c);
        if (o->handed < 0) {
            errno = EIO;
            rc = -1;
        }
    } else if (rc == 0) {
        rc = fetched_reply(&q.r, o);
    }
    rreq_end(&q);
    if (rc < 0 && o->has_handle) {
        int e = errno;
        rfile_close_handle(o->handle);
        o->has_handle = 0;
        errno = e;
    }
    return rc < 0 && errno == ENOSYS ? -2 : rc;
}

static int ropen_ask(struct ropen *o) {
    uint64_t max = 0;
    /* O_PATH, a truncating open and an append cache have nothing to fetch */
    if (!(o->flags & O_PATH) && !(o->writing && (o->flags & O_TRUNC)) && !o->append_only) {
        max = g_set.fetch_limit < MAX_DATA_CHUNK ? (uint64_t)g_set.fetch_limit : MAX_DATA_CHUNK;
    }
    int frc = rfile_fetch(o, max);
    if (frc != -2) {
        return frc;
    }
    /* an agent without FileFetch: open, then fstat */
    if (rfile_open(o->path, o->rflags, o->mode, &o->handle) < 0) {
        return -1;
    }
    o->has_handle = 1;
    if (rstat(NULL, o->handle, 1, &o->st) < 0) {
        memset(&o->st, 0, sizeof o->st);
        o->st.st_mode = S_IFREG | 0644;
    }
    return 0;
}

/* ---------------------------------------------------------------- the app's fd */

/* Fetches the whole file into a memfd; -2 if it turned out too big (the handle stays open
 * and is rewound), -1 on error. */
static int fetch_to_memfd(struct ent *e, const struct ropen *o, size_t *size) {
    int fd = placeholder_fd(o->flags, o->path);
    if (fd < 0) {
        return -1;
    }
    size_t cap = 1024 * 1024, total = 0;
    char *buf = malloc(cap);
    int rc = buf == NULL ? (errno = ENOMEM, -1) : 0;
    while (rc == 0) {
        ssize_t n = rfile_read_chunk(e->handle, buf, cap, -1);
        if (n <= 0 || write_all(fd, buf, (size_t)n) < 0) {
            rc = n == 0 ? 1 : -1;
            break;
        }
        total += (size_t)n;
        if (o->st.st_size > 0 && (size_t)n < cap && (off_t)total >= o->st.st_size) {
            break; /* a short read reaching the size fstat gave: no need to ask for the end */
        }
        if ((long long)total > g_set.fetch_limit) {
            rc = rfile_seek(e, 0, SEEK_SET) == 0 ? -2 : -1;
        }
    }
    free(buf);
    if (rc < 0) {
        int err = errno;
        REAL(close)(fd);
        errno = err;
        return rc;
    }
    REAL(lseek)(fd, 0, SEEK_SET);
    *size = total;
    return fd;
}

/* An append cache: a sparse memfd as long as the file, so that fstat, lseek(SEEK_END) and
 * tell() show the file's size without fetching it; writes append to it natively (stdio
 * included) and at write-back only the appended bytes go to the target's end of file, so
 * appenders (two loggers, `>>` from several commands) do not overwrite each other. */
static int ropen_append_cache(const struct ropen *o, struct ent *e) {
    int fd = placeholder_fd(o->flags, o->path);
    if (fd < 0) {
        return -1;
    }
    if (REAL(ftruncate)(fd, o->st.st_size) != 0) {
        REAL(close)(fd);
        errno = ENOMEM;
        return -1;
    }
    e->kind = K_MFILE;
    e->append_only = 1;
    cache_adopt(e, fd);
    /* writes land at the end (O_APPEND); the offset stays 0 until the first one, as the
     * kernel leaves it after open(O_APPEND) */
    REAL(fcntl)(fd, F_SETFL, O_APPEND);
    return fd;
}

/* A regular file within fetch_limit: a memfd with its content, read-only (the handle is
 * closed) or a write-back cache. -1 on error, -2 when it turned out too big. */
static int ropen_memfd(struct ropen *o, struct ent *e) {
    size_t size = 0;
    int fd;
    if (o->writing && ((o->flags & O_TRUNC) ||
                       ((o->flags & O_ACCMODE) == O_WRONLY && o->st.st_size == 0))) {
        fd = placeholder_fd(o->flags, o->path); /* nothing to fetch (truncated, or new) */
    } else if (o->fetched >= 0) {
        fd = o->fetched; /* the content came with FileFetched */
        o->fetched = -1;
        size = o->fetched_size;
    } else if (e->has_handle) {
        fd = fetch_to_memfd(e, o, &size);
    } else {
        errno = EIO;
        fd = -1;
    }
    if (fd < 0) {
        return fd;
    }
    e->kind = K_MFILE;
    if (!o->writing) {
        if (e->has_handle) {
            rfile_close_handle(e->handle);
            e->has_handle = 0;
            __atomic_fetch_sub(&g_nhandles, 1, __ATOMIC_RELAXED);
        }
        e->st.st_size = (off_t)size;
        clock_gettime(CLOCK_MONOTONIC, &e->checked);
        return fd;
    }
    if (!e->has_handle) {
        REAL(close)(fd); /* a write-back cache needs the handle: never without one */
        errno = EIO;
        return -1;
    }
    cache_adopt(e, fd);
    if (o->flags & O_APPEND) {
        REAL(fcntl)(fd, F_SETFL, O_APPEND); /* only the writes move to the end: reads start at 0 */
    }
    return fd;
}

/* A handle-backed file opened with O_APPEND (not write-only): its handle was opened without
 * it, as a write-back cache needs (the size decides which the file gets, and the size comes
 * with the handle), so the file is opened again with O_APPEND and that handle replaces the
 * first: the target's kernel then does what the app's own would, reads from 0 and every write
 * at the end, also after a seek. Should that open fail, the handle starts at the end of the
 * file instead (appends from one process still land; a read needs a seek first). */
static void ropen_handle_append(struct ropen *o, struct ent *e) {
    uint64_t handle;
    int flags = (o->rflags | O_APPEND) & ~(O_TRUNC | O_CREAT | O_EXCL);
    if (!S_ISREG(o->st.st_mode) || rfile_open(o->path, flags, 0, &handle) < 0) {
        (void)rfile_seek(e, 0, SEEK_END);
        return;
    }
    (void)rfile_close_handle(e->handle);
    e->handle = handle;
}

/* The fd the app gets for a remote open (e owns the handle, if any); -1 with errno. */
static int ropen_local_fd(struct ropen *o, struct ent *e) {
    if (o->append_only && e->has_handle && S_ISREG(o->st.st_mode)) {
        return ropen_append_cache(o, e);
    }
    int fd = -2;
    if (S_ISREG(o->st.st_mode) && o->st.st_size <= g_set.fetch_limit && !(o->flags & O_PATH)) {
        fd = ropen_memfd(o, e);
    }
    ropen_drop_fetched(o); /* content of a file not kept in a memfd after all */
    if (fd != -2) {
        return fd;
    }
    /* handle-backed (large, a directory, O_PATH): an empty placeholder */
    if (!e->has_handle) {
        errno = EIO;
        return -1;
    }
    fd = placeholder_fd(o->flags, o->path);
    if (fd >= 0 && (o->flags & O_APPEND) && !(o->rflags & O_APPEND)) {
        ropen_handle_append(o, e);
    }
    return fd;
}

static int ropen_fail(struct ent *e, int fd) {
    int err = errno;
    if (fd >= 0) {
        REAL(close)(fd);
    }
    ent_put(e); /* closes the handle e owns */
    errno = err;
    return -1;
}

int open_remote(const char *path, int flags, mode_t mode) {
    flush_pending_for(path);
    struct ropen o;
    ropen_init(&o, path, flags, mode);
    if (ropen_ask(&o) < 0) {
        return -1;
    }
    if (o.handed >= 0) {
        /* the target's file itself, opened with the app's flags: no entry, every later call
         * on it is the kernel's (the passed fd came close-on-exec) */
        if (!(flags & O_CLOEXEC)) {
            REAL(fcntl)(o.handed, F_SETFD, 0);
        }
        DBG("open %s remotely: fd %d (handed over)", path, o.handed);
        return local_fd(o.handed);
    }
    struct ent *e = ent_new(K_RFILE);
    if (e == NULL) {
        if (o.has_handle) {
            rfile_close_handle(o.handle);
        }
        ropen_drop_fetched(&o);
        errno = ENOMEM;
        return -1;
    }
    e->path = strdup(path);
    e->oflags = flags;
    e->st = o.st;
    e->is_dir = S_ISDIR(o.st.st_mode);
    if (o.has_handle) {
        e->has_handle = 1;
        e->handle = o.handle;
        __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
    }
    int fd = ropen_local_fd(&o, e);
    if (fd < 0) {
        return ropen_fail(e, -1);
    }
    if (flags & O_NONBLOCK) {
        REAL(fcntl)(fd, F_SETFL, O_NONBLOCK);
    }
    if (fd >= MAX_FDS) {
        errno = EMFILE;
        return ropen_fail(e, fd);
    }
    fbuf_attach(e, flags); /* a large regular file: read-ahead or write-behind */
    fd_set_ent(fd, e);
    DBG("open %s remotely: fd %d (%s)", path, fd,
        e->writeback ? "write-back" : e->kind == K_MFILE ? "fetched" : "handle");
    return fd;
}

/* ---------------------------------------------------------------- the hooks */

int do_open(int dirfd, const char *path, int flags, mode_t mode, int *ret) {
    ROUTE_PATH(dirfd, path, open_is_write(flags), ret,
               local_fd(REAL(openat)(AT_FDCWD, full, flags, mode)), open_remote(full, flags, mode));
}

#define OPEN_MODE(flags, mode)                                      \
    mode_t mode = 0;                                                \
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) {    \
        va_list ap;                                                 \
        va_start(ap, flags);                                        \
        mode = (mode_t)va_arg(ap, int);                             \
        va_end(ap);                                                 \
    }

/* Every open-like hook past the bypass path: R_BYPASS (the hook does the real call), or
 * R_DONE with *ret. An absolute path the policy keeps local is decided before do_open sets
 * up its path buffer. */
static __attribute__((noinline)) int open_slow(int dirfd, const char *path, int flags, mode_t mode, int *ret) {
    int saved = errno;
    if (path != NULL && path[0] == '/' && !g_nmap &&
        policy_file(path, open_is_write(flags)) == P_LOCAL) {
        errno = saved;
        return R_BYPASS;
    }
    if (do_open(dirfd, path, flags, mode, ret) == R_DONE) {
        return R_DONE;
    }
    errno = saved;
    return R_BYPASS;
}

/* The bypass path (inactive, the layer's own call, or a system directory) makes no call but
 * the real one; the app's fd is checked against the table afterwards (local_fd). */
#define OPEN_BODY(realcall, dirfd, path, flags, mode)                   \
    if (__builtin_expect(!g_active || t_guard, 0)) {                    \
        return realcall;                                                \
    }                                                                   \
    int ret;                                                            \
    if (__builtin_expect(!path_fast_local(path), 0) &&                  \
        open_slow(dirfd, path, flags, mode, &ret) == R_DONE) {          \
        return ret;                                                     \
    }                                                                   \
    return local_fd(realcall);

#define OPEN_HOOK(name, params, dirfd, realargs)                        \
    HOOK int name params {                                              \
        OPEN_MODE(flags, mode)                                          \
        OPEN_BODY(REAL(name) realargs, dirfd, path, flags, mode)        \
    }
OPEN_HOOK(open, (const char *path, int flags, ...), AT_FDCWD, (path, flags, mode))
OPEN_HOOK(open64, (const char *path, int flags, ...), AT_FDCWD, (path, flags, mode))
OPEN_HOOK(openat, (int dirfd, const char *path, int flags, ...), dirfd, (dirfd, path, flags, mode))
OPEN_HOOK(openat64, (int dirfd, const char *path, int flags, ...), dirfd, (dirfd, path, flags, mode))

/* The fortified opens (no mode: they are used without O_CREAT) and creat. */
#define OPEN2_HOOK(name, params, real, dirfd, realargs, oflags, mode)   \
    HOOK int name params {                                              \
        int flags_ = (oflags);                                          \
        OPEN_BODY(REAL(real) realargs, dirfd, path, flags_, mode)       \
    }
OPEN2_HOOK(__open_2, (const char *path, int flags), open, AT_FDCWD, (path, flags), flags, 0)
OPEN2_HOOK(__open64_2, (const char *path, int flags), open64, AT_FDCWD, (path, flags), flags, 0)
OPEN2_HOOK(__openat_2, (int dirfd, const char *path, int flags), openat, dirfd,
           (dirfd, path, flags), flags, 0)
OPEN2_HOOK(__openat64_2, (int dirfd, const char *path, int flags), openat64, dirfd,
           (dirfd, path, flags), flags, 0)
OPEN2_HOOK(creat, (const char *path, mode_t mode), creat, AT_FDCWD, (path, mode),
           O_CREAT | O_WRONLY | O_TRUNC, mode)
OPEN2_HOOK(creat64, (const char *path, mode_t mode), creat64, AT_FDCWD, (path, mode),
           O_CREAT | O_WRONLY | O_TRUNC, mode)
