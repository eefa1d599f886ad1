/* File and directory hooks.
 *
 * A remote file gets a real local fd so fd numbers, dup, select and close behave:
 * - K_MFILE: a file opened read-only whose content fits g_set.fetch_limit is fetched whole into a
 *   memfd (then read, mmap, sendfile, copy_file_range and stdio work natively); fstat
 *   reports the remote stat.
 * - K_RFILE: other remote files (writable, large, directories) get an empty memfd as a
 *   placeholder and every read/write/seek/stat on it is a request on the remote handle.
 * Directories from opendir() are DIR pointers of our own, allocated in one arena so that
 * readdir()/closedir() recognise them with a range check and no lock.
 */
#include "layer.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/xattr.h>
#include <limits.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <utime.h>
#include <sys/time.h>
#include <sys/statvfs.h>
#include <glob.h>
#include <linux/close_range.h>

#define PATH_CAP 4096

#define BYPASS_UNLESS_ACTIVE(call)          \
    do {                                    \
        if (!g_active || t_guard) {         \
            return call;                    \
        }                                   \
    } while (0)

/* ---------------------------------------------------------------- decisions */

/* A remote working directory (after chdir/fchdir into a remote directory): relative paths
 * are then remote, below it. Empty when the working directory is local (the common case:
 * one load on the bypass path). The process's real working directory does not change. */
static char g_vcwd[PATH_CAP];
static pthread_mutex_t g_vcwd_lock = PTHREAD_MUTEX_INITIALIZER;

/* Lexically removes ".", "..", and repeated or trailing slashes from an absolute path. */
static void normalize_path(char *p) {
    char *out = p;
    const char *in = p;
    while (*in) {
        while (*in == '/') {
            in++;
        }
        const char *seg = in;
        while (*in && *in != '/') {
            in++;
        }
        size_t n = (size_t)(in - seg);
        if (n == 0 || (n == 1 && seg[0] == '.')) {
            continue;
        }
        if (n == 2 && seg[0] == '.' && seg[1] == '.') {
            while (out > p && *--out != '/') {
            }
            continue;
        }
        *out++ = '/';
        memmove(out, seg, n);
        out += n;
    }
    if (out == p) {
        *out++ = '/';
    }
    *out = 0;
}

static int vcwd_join(const char *rel, char *out, size_t cap) {
    pthread_mutex_lock(&g_vcwd_lock);
    int ok = g_vcwd[0] != 0 && (size_t)snprintf(out, cap, "%s/%s", g_vcwd, rel) < cap;
    pthread_mutex_unlock(&g_vcwd_lock);
    if (ok) {
        normalize_path(out);
    }
    return ok;
}

void files_set_vcwd(const char *path) {
    pthread_mutex_lock(&g_vcwd_lock);
    snprintf(g_vcwd, sizeof g_vcwd, "%s", path ? path : "");
    pthread_mutex_unlock(&g_vcwd_lock);
}

int files_get_vcwd(char *out, size_t cap) {
    pthread_mutex_lock(&g_vcwd_lock);
    int set = g_vcwd[0] != 0 && strlen(g_vcwd) < cap;
    if (set) {
        strcpy(out, g_vcwd);
    }
    pthread_mutex_unlock(&g_vcwd_lock);
    return set;
}

/* feature.fs.mapping on a path that stays local: the local call is made under the mapped
 * name, as mirrord does. decide() leaves it here (NULL when the last decision was not a
 * mapped local one); every hook that takes an absolute path makes its local call under it
 * (local_name()). */
static LAYER_TLS const char *t_local_mapped;
static LAYER_TLS char t_local_mapped_buf[PATH_CAP];

/* Where does (dirfd, path) live? Fills `out` with the absolute remote path when remote. */
static int decide(int dirfd, const char *path, int write, char *out, size_t cap) {
    t_local_mapped = NULL;
    if (path == NULL || path_fast_local(path)) {
        return P_LOCAL;
    }
    char mapped[PATH_CAP];
    int was_mapped = 0;
    if (path[0] == '/' && g_nmap && policy_map_path(path, mapped, sizeof mapped)) {
        path = mapped;
        was_mapped = 1;
    }
    if (path[0] == '/') {
        int d = policy_file(path, write);
        if (d == P_LOCAL && was_mapped && strlen(path) < sizeof t_local_mapped_buf) {
            strcpy(t_local_mapped_buf, path);
            t_local_mapped = t_local_mapped_buf;
        }
        if (d != P_LOCAL) {
            if (strlen(path) >= cap) {
                return P_LOCAL; /* the real call reports ENAMETOOLONG */
            }
            strcpy(out, path);
        }
        return d;
    }
    if (dirfd == AT_FDCWD) {
        if (__builtin_expect(__atomic_load_n(&g_vcwd[0], __ATOMIC_RELAXED) == 0, 1)) {
            return P_LOCAL; /* relative to a local working directory */
        }
        return vcwd_join(path, out, cap) ? P_REMOTE : P_LOCAL;
    }
    struct ent *e = fd_peek(dirfd);
    if (e == NULL || (e->kind != K_RFILE && e->kind != K_MFILE)) {
        return P_LOCAL;
    }
    e = ent_get(dirfd);
    if (e == NULL) {
        return P_LOCAL;
    }
    int d = P_LOCAL;
    if (e->path != NULL && (size_t)snprintf(out, cap, "%s/%s", e->path, path) < cap) {
        d = P_REMOTE; /* relative to a remote directory */
    }
    ent_put(e);
    return d;
}

/* decide() for a hook that answers through *ret: R_BYPASS (local), R_DONE (a "not found"
 * path: -1 with ENOENT), or R_REMOTE (the target's path is in out: the caller makes the call
 * under t_guard). */
enum { R_REMOTE = 2 };
static int decide_hook(int dirfd, const char *path, int write, char *out, size_t cap, int *ret) {
    int d = decide(dirfd, path, write, out, cap);
    if (d == P_LOCAL) {
        return R_BYPASS;
    }
    if (d == P_NOT_FOUND) {
        errno = ENOENT;
        *ret = -1;
        return R_DONE;
    }
    return R_REMOTE;
}

/* After decide() kept a path local: the name the local call uses. With a feature.fs.mapping
 * rewrite it is the mapped name, copied into `buf` (PATH_CAP; *dirfd becomes AT_FDCWD, the
 * mapped name being absolute); otherwise the app's own. */
static const char *local_name(const char *path, int *dirfd, char *buf) {
    if (t_local_mapped == NULL) {
        return path;
    }
    strcpy(buf, t_local_mapped);
    if (dirfd != NULL) {
        *dirfd = AT_FDCWD;
    }
    return buf;
}

static int open_is_write(int flags) {
    return (flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC | O_APPEND)) != 0;
}

/* ---------------------------------------------------------------- wire helpers */

int stat_from_wire(cbor_r *r, struct stat *st) {
    uint64_t n, v[13];
    if (cr_array(r, &n) < 0 || n != 13) {
        return -1;
    }
    for (int i = 0; i < 13; i++) {
        int64_t s;
        if (cr_peek(r) == CBOR_NINT) {
            if (cr_int(r, &s) < 0) {
                return -1;
            }
            v[i] = (uint64_t)s;
        } else if (cr_uint(r, &v[i]) < 0) {
            return -1;
        }
    }
    memset(st, 0, sizeof *st);
    st->st_dev = v[0];
    st->st_ino = v[1];
    st->st_mode = (mode_t)v[2];
    st->st_nlink = v[3];
    st->st_uid = (uid_t)v[4];
    st->st_gid = (gid_t)v[5];
    st->st_rdev = v[6];
    st->st_size = (off_t)v[7];
    st->st_blksize = (blksize_t)v[8];
    st->st_blocks = (blkcnt_t)v[9];
    st->st_atim.tv_sec = (time_t)((int64_t)v[10] / 1000000000);
    st->st_atim.tv_nsec = (long)((int64_t)v[10] % 1000000000);
    st->st_mtim.tv_sec = (time_t)((int64_t)v[11] / 1000000000);
    st->st_mtim.tv_nsec = (long)((int64_t)v[11] % 1000000000);
    st->st_ctim.tv_sec = (time_t)((int64_t)v[12] / 1000000000);
    st->st_ctim.tv_nsec = (long)((int64_t)v[12] % 1000000000);
    return 0;
}

/* One request that answers Ok: returns 0, or -1 with errno. */
#define SIMPLE_CALL(kind, nfields, FIELDS)                   \
    do {                                                     \
        struct lconn *c_ = conn_acquire();                   \
        if (c_ == NULL) {                                    \
            return -1;                                       \
        }                                                    \
        cbor_w *w = conn_begin(c_, kind, nfields);           \
        FIELDS;                                              \
        cbor_r r_;                                           \
        int rc_ = conn_call(c_, M_OK, &r_);                  \
        conn_release(c_);                                    \
        return rc_;                                          \
    } while (0)

/* A request naming two paths (rename, symlink; link with its follow flag when follow >= 0)
 * that answers Ok: 0, or -1 with errno. */
static int remote_two_paths(int kind, const char *a, const char *b, int follow) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, kind, follow >= 0 ? 3 : 2);
    cw_bytes(w, a, strlen(a));
    cw_bytes(w, b, strlen(b));
    if (follow >= 0) {
        cw_bool(w, follow != 0);
    }
    cbor_r r;
    int rc = conn_call(c, M_OK, &r);
    conn_release(c);
    return rc;
}

static int rstat(const char *path, int has_handle, uint64_t handle, int follow, struct stat *st) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_FILE_STAT, 3);
    if (path != NULL) {
        cw_bytes(w, path, strlen(path));
        cw_null(w);
    } else {
        (void)has_handle;
        cw_null(w);
        cw_uint(w, handle);
    }
    cw_bool(w, follow);
    cbor_r r;
    int rc = conn_call(c, M_STAT_REPLY, &r);
    if (rc == 0 && stat_from_wire(&r, st) < 0) {
        errno = EIO;
        rc = -1;
    }
    conn_release(c);
    return rc;
}

int remote_stat_path(const char *path, int follow, struct stat *st) {
    return rstat(path, 0, 0, follow, st);
}

static int rfile_close_handle(uint64_t handle) {
    SIMPLE_CALL(M_FILE_CLOSE, 1, cw_uint(w, handle));
}

/* Read up to n bytes (n <= MAX_DATA_CHUNK) at off (-1: the handle's position). */
static ssize_t rfile_read_chunk(uint64_t handle, void *buf, size_t n, off_t off) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_FILE_READ, 3);
    cw_uint(w, handle);
    cw_uint(w, n);
    if (off < 0) {
        cw_null(w);
    } else {
        cw_uint(w, (uint64_t)off);
    }
    cbor_r r;
    ssize_t got = -1;
    if (conn_call(c, M_FILE_DATA, &r) == 0) {
        const uint8_t *p;
        size_t len;
        if (cr_bytes(&r, &p, &len) < 0 || len > n) {
            errno = EIO;
        } else {
            memcpy(buf, p, len);
            got = (ssize_t)len;
        }
    }
    conn_release(c);
    return got;
}

static ssize_t rfile_write_chunk(uint64_t handle, const void *buf, size_t n, off_t off) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_FILE_WRITE, 3);
    cw_uint(w, handle);
    cw_bytes(w, buf, n);
    if (off < 0) {
        cw_null(w);
    } else {
        cw_uint(w, (uint64_t)off);
    }
    cbor_r r;
    ssize_t done = -1;
    if (conn_call(c, M_FILE_WRITTEN, &r) == 0) {
        uint64_t k;
        if (cr_uint(&r, &k) < 0 || k > n) {
            errno = EIO;
        } else {
            done = (ssize_t)k;
        }
    }
    conn_release(c);
    return done;
}

static ssize_t rfile_read(struct ent *e, void *buf, size_t n, off_t off) {
    if (!e->has_handle || e->is_dir) {
        errno = e->is_dir ? EISDIR : EBADF;
        return -1;
    }
    if ((e->oflags & O_ACCMODE) == O_WRONLY) {
        errno = EBADF;
        return -1;
    }
    return rfile_read_chunk(e->handle, buf, n > MAX_DATA_CHUNK ? MAX_DATA_CHUNK : n, off);
}

static ssize_t rfile_write(struct ent *e, const void *buf, size_t n, off_t off) {
    if (!e->has_handle || e->is_dir || (e->oflags & O_ACCMODE) == O_RDONLY) {
        errno = EBADF;
        return -1;
    }
    size_t done = 0;
    while (done < n) {
        size_t k = n - done > MAX_DATA_CHUNK - 4096 ? MAX_DATA_CHUNK - 4096 : n - done;
        ssize_t w = rfile_write_chunk(e->handle, (const char *)buf + done, k,
                                      off < 0 ? -1 : off + (off_t)done);
        if (w < 0) {
            return done ? (ssize_t)done : -1;
        }
        done += (size_t)w;
        if ((size_t)w < k) {
            break;
        }
    }
    return (ssize_t)done;
}

/* readv/writev on a remote file: the vectors in order, stopping at a short transfer like the
 * kernel would. Drops the caller's reference to e. */
static ssize_t rfile_iov(struct ent *e, const struct iovec *iov, int cnt, int write) {
    ssize_t total = 0;
    t_guard++;
    for (int i = 0; i < cnt; i++) {
        if (iov[i].iov_len == 0) {
            continue;
        }
        ssize_t r = write ? rfile_write(e, iov[i].iov_base, iov[i].iov_len, -1)
                          : rfile_read(e, iov[i].iov_base, iov[i].iov_len, -1);
        if (r < 0) {
            total = total ? total : -1;
            break;
        }
        total += r;
        if ((size_t)r < iov[i].iov_len) {
            break;
        }
    }
    t_guard--;
    ent_put(e);
    return total;
}

static off_t rfile_seek(struct ent *e, off_t off, int whence) {
    if (!e->has_handle) {
        errno = ESPIPE;
        return -1;
    }
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_FILE_SEEK, 3);
    cw_uint(w, e->handle);
    cw_int(w, off);
    cw_int(w, whence);
    cbor_r r;
    off_t pos = -1;
    if (conn_call(c, M_FILE_POSITION, &r) == 0) {
        uint64_t p;
        if (cr_uint(&r, &p) < 0) {
            errno = EIO;
        } else {
            pos = (off_t)p;
        }
    }
    conn_release(c);
    return pos;
}

/* An append cache: the bytes appended since the last flush go to the target's current end of
 * file (another appender may have moved it), appended by the target's kernel (O_APPEND). */
static int wfile_flush_appended(struct ent *e, const struct stat *cur) {
    off_t from = e->synced_size;
    char *buf = cur->st_size > from ? malloc(MAX_DATA_CHUNK) : NULL;
    int rc = 0;
    if (cur->st_size > from && buf == NULL) {
        errno = ENOMEM;
        return -1;
    }
    while (rc == 0 && from < cur->st_size) {
        size_t want = MAX_DATA_CHUNK - 4096;
        ssize_t n = REAL(pread)(e->cache_fd, buf, want, from);
        if (n <= 0) {
            break;
        }
        for (ssize_t done = 0; done < n && rc == 0;) {
            /* no offset: the handle has O_APPEND, the target's kernel appends */
            ssize_t w = rfile_write_chunk(e->handle, buf + done, (size_t)(n - done), -1);
            if (w <= 0) {
                rc = -1;
            } else {
                done += w;
            }
        }
        from += n;
    }
    free(buf);
    if (rc == 0 && cur->st_size > e->synced_size) {
        /* Back to the size at open: every holder of this memfd (a fork child, the image after
         * an exec, the shell that opened it for them) shares it and starts from that size, so
         * none of them appends these bytes again. */
        struct stat now;
        REAL(ftruncate)(e->cache_fd, e->synced_size);
        if (REAL(fstat)(e->cache_fd, &now) == 0) {
            e->synced_mtim = now.st_mtim;
        }
    }
    return rc;
}

/* Writes the memfd's content back to the remote file if it changed since the last flush. */
int wfile_flush(struct ent *e) {
    struct stat cur;
    if (!e->writeback || REAL(fstat)(e->cache_fd, &cur) < 0) {
        return 0;
    }
    if (cur.st_mtim.tv_sec == e->synced_mtim.tv_sec && cur.st_mtim.tv_nsec == e->synced_mtim.tv_nsec &&
        cur.st_size == e->synced_size) {
        return 0;
    }
    if (e->append_only && cur.st_size >= e->synced_size) {
        return wfile_flush_appended(e, &cur);
    }
    char *buf = malloc(MAX_DATA_CHUNK);
    if (buf == NULL) {
        errno = ENOMEM;
        return -1;
    }
    int rc = 0;
    for (off_t off = 0; off < cur.st_size && rc == 0;) {
        size_t want = MAX_DATA_CHUNK - 4096;
        ssize_t n = REAL(pread)(e->cache_fd, buf, want, off);
        if (n <= 0) {
            break;
        }
        for (ssize_t done = 0; done < n && rc == 0;) {
            ssize_t w = rfile_write_chunk(e->handle, buf + done, (size_t)(n - done), off + done);
            if (w <= 0) {
                rc = -1;
            } else {
                done += w;
            }
        }
        off += n;
    }
    free(buf);
    if (rc == 0) {
        struct lconn *c = conn_acquire();
        if (c == NULL) {
            return -1;
        }
        cbor_w *w = conn_begin(c, M_FTRUNCATE, 2);
        cw_uint(w, e->handle);
        cw_uint(w, (uint64_t)cur.st_size);
        cbor_r r;
        rc = conn_call(c, M_OK, &r);
        conn_release(c);
    }
    if (rc == 0) {
        e->synced_mtim = cur.st_mtim;
        e->synced_size = cur.st_size;
    }
    return rc;
}

void wfile_flush_all(void) {
    for (int fd = 0; fd < MAX_FDS; fd++) {
        struct ent *pe = fd_peek(fd);
        if (pe != NULL && pe->kind == K_MFILE && pe->writeback) {
            struct ent *e = ent_get(fd);
            if (e != NULL) {
                (void)wfile_flush(e);
                ent_put(e);
            }
        }
    }
}

/* ---------------------------------------------------------------- open */

static int placeholder_fd(int flags, const char *path) {
    const char *b = strrchr(path, '/');
    char name[64];
    snprintf(name, sizeof name, "mirrord:%s", b ? b + 1 : path);
    int fd = memfd_create(name, (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    if (fd < 0) {
        errno = EMFILE;
    }
    return fd;
}

/* Fetches the whole file into a memfd; -2 if it turned out too big (handle stays open and
 * is rewound), -1 on error. */
static int fetch_to_memfd(uint64_t handle, int flags, const char *path, off_t expect, size_t *size) {
    int fd = placeholder_fd(flags, path);
    if (fd < 0) {
        return -1;
    }
    size_t cap = 1024 * 1024, total = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        REAL(close)(fd);
        errno = ENOMEM;
        return -1;
    }
    for (;;) {
        ssize_t n = rfile_read_chunk(handle, buf, cap, -1);
        if (n < 0) {
            int e = errno;
            free(buf);
            REAL(close)(fd);
            errno = e;
            return -1;
        }
        if (n == 0) {
            break;
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t k = REAL(write)(fd, buf + off, (size_t)(n - off));
            if (k < 0) {
                if (errno == EINTR) {
                    continue;
                }
                free(buf);
                REAL(close)(fd);
                errno = EIO;
                return -1;
            }
            off += k;
        }
        total += (size_t)n;
        if (expect > 0 && (size_t)n < cap && (off_t)total >= expect) {
            break; /* a short read reaching the size fstat gave: no need to ask for the end */
        }
        if ((long long)total > g_set.fetch_limit) {
            free(buf);
            REAL(close)(fd);
            struct ent tmp = {.has_handle = 1, .handle = handle};
            return rfile_seek(&tmp, 0, SEEK_SET) == 0 ? -2 : -1;
        }
    }
    free(buf);
    REAL(lseek)(fd, 0, SEEK_SET);
    *size = total;
    return fd;
}

/* FileFetch: open + fstat, and the whole content of a small readable regular file, in one
 * round trip (a small read-only file costs one round trip instead of four). The agent keeps
 * the handle (*has_handle) unless the open was read-only and the content came with the
 * reply; the content goes into a new memfd (*memfd, -1 if none came). Returns 0, -1 with
 * errno, or -2 when the agent does not know FileFetch (ENOSYS: an older agent). */
static int rfile_fetch(const char *path, int rflags, mode_t mode, int flags, uint64_t max,
                       uint64_t *handle, int *has_handle, struct stat *st, int *memfd,
                       size_t *size) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_FILE_FETCH, 4);
    cw_bytes(w, path, strlen(path));
    cw_uint(w, (uint64_t)rflags);
    cw_uint(w, mode);
    cw_uint(w, max);
    cbor_r r;
    *has_handle = 0;
    *memfd = -1;
    int rc = conn_call(c, M_FILE_FETCHED, &r);
    if (rc == 0 && stat_from_wire(&r, st) < 0) {
        errno = EIO;
        rc = -1;
    }
    if (rc == 0) {
        if (cr_is_null(&r)) {
            rc = cr_null(&r);
        } else if (cr_uint(&r, handle) == 0) {
            *has_handle = 1;
        } else {
            rc = -1;
        }
    }
    const uint8_t *data = NULL;
    size_t n = 0;
    if (rc == 0 && !cr_is_null(&r) && cr_bytes(&r, &data, &n) < 0) {
        rc = -1;
    }
    if (rc == 0 && data != NULL) {
        int fd = placeholder_fd(flags, path);
        for (size_t off = 0; fd >= 0 && off < n;) {
            ssize_t k = REAL(write)(fd, data + off, n - off);
            if (k < 0 && errno == EINTR) {
                continue;
            }
            if (k < 0) {
                REAL(close)(fd);
                fd = -1;
                errno = EIO;
                break;
            }
            off += (size_t)k;
        }
        if (fd >= 0) {
            REAL(lseek)(fd, 0, SEEK_SET);
            *memfd = fd;
            *size = n;
        } else {
            rc = -1;
        }
    } else if (rc == 0 && !*has_handle) {
        errno = EIO; /* neither content nor handle: not a valid reply */
        rc = -1;
    }
    conn_release(c);
    if (rc < 0 && *has_handle) {
        int e = errno;
        rfile_close_handle(*handle);
        *has_handle = 0;
        errno = e;
    }
    if (rc < 0 && errno == ENOSYS) {
        return -2;
    }
    return rc;
}

/* Read-your-writes: a write-back cache reaches the target at close, fsync, exec or exit, so
 * before a remote open or stat of `path` this process's pending writes to it on other fds are
 * written back (a node stream reading its file back in its 'finish' callback, before the fd
 * closes, saw nothing). Only while the process holds remote handles; a look at 4096 fds. */
static void flush_pending_for(const char *path) {
    if (__atomic_load_n(&g_nhandles, __ATOMIC_RELAXED) == 0) {
        return;
    }
    for (int fd = 0; fd < 4096; fd++) {
        struct ent *pe = fd_peek(fd);
        if (pe == NULL || pe->kind != K_MFILE || !pe->writeback) {
            continue;
        }
        struct ent *e = ent_get(fd);
        if (e != NULL && e->path != NULL && strcmp(e->path, path) == 0) {
            int saved = errno;
            (void)wfile_flush(e);
            errno = saved;
        }
        if (e != NULL) {
            ent_put(e);
        }
    }
}

static int open_remote(const char *path, int flags, mode_t mode) {
    flush_pending_for(path);
    /* Writes go to a write-back cache flushed at explicit offsets: the remote handle needs
     * no O_APPEND (with it, pwrite appends on Linux), and read access to fetch the content
     * first unless the open truncates. An append cache (O_WRONLY|O_APPEND, below) keeps
     * O_APPEND: its write-back appends atomically however many processes append. */
    int append_only = (flags & O_APPEND) && (flags & O_ACCMODE) == O_WRONLY && !(flags & O_TRUNC);
    int rflags = flags & ~(O_CLOEXEC | O_NONBLOCK | O_NOCTTY | (append_only ? 0 : O_APPEND));
    if (open_is_write(flags) && !(flags & O_TRUNC)) {
        rflags = (rflags & ~O_ACCMODE) | O_RDWR;
    }
    uint64_t handle = 0;
    int has_handle = 0, fetched = -1;
    size_t fetched_size = 0;
    struct stat st;
    memset(&st, 0, sizeof st);
    uint64_t max = 0;
    /* O_WRONLY|O_APPEND (`>>`, logging): an append cache, nothing to fetch (see below) */
    if (!(flags & O_PATH) && !(open_is_write(flags) && (flags & O_TRUNC)) && !append_only) {
        max = g_set.fetch_limit < MAX_DATA_CHUNK ? (uint64_t)g_set.fetch_limit : MAX_DATA_CHUNK;
    }
    int frc = rfile_fetch(path, rflags, mode, flags, max, &handle, &has_handle, &st, &fetched,
                          &fetched_size);
    if (frc == -1) {
        return -1;
    }
    if (frc == -2) { /* an agent without FileFetch: open, then fstat */
        struct lconn *c = conn_acquire();
        if (c == NULL) {
            return -1;
        }
        cbor_w *w = conn_begin(c, M_FILE_OPEN, 3);
        cw_bytes(w, path, strlen(path));
        cw_uint(w, (uint64_t)rflags);
        cw_uint(w, mode);
        cbor_r r;
        int rc = conn_call(c, M_FILE_OPENED, &r);
        if (rc == 0 && cr_uint(&r, &handle) < 0) {
            errno = EIO;
            rc = -1;
        }
        conn_release(c);
        if (rc < 0) {
            return -1;
        }
        has_handle = 1;
        if (rstat(NULL, 1, handle, 1, &st) < 0) {
            memset(&st, 0, sizeof st);
            st.st_mode = S_IFREG | 0644;
        }
    }
    struct ent *e = ent_new(K_RFILE);
    if (e == NULL) {
        if (has_handle) {
            rfile_close_handle(handle);
        }
        if (fetched >= 0) {
            REAL(close)(fetched);
        }
        errno = ENOMEM;
        return -1;
    }
    e->path = strdup(path);
    e->oflags = flags;
    e->st = st;
    e->is_dir = S_ISDIR(st.st_mode);
    int fd = -1;
    int writing = open_is_write(flags);
    /* O_PATH: a handle for fstat, *at() and fchdir only, nothing to fetch */
    /* An append cache: a sparse memfd as long as the file, so that fstat, lseek(SEEK_END) and
     * tell() show the file's size without fetching it; writes append to it natively (stdio
     * included) and at write-back only the appended bytes go to the target's end of file, so
     * appenders (two loggers, `>>` from several commands) do not overwrite each other. */
    if (append_only && has_handle && S_ISREG(st.st_mode)) {
        fd = placeholder_fd(flags, path);
        struct stat cst;
        if (fd >= 0 && REAL(ftruncate)(fd, st.st_size) == 0) {
            e->kind = K_MFILE;
            e->writeback = 1;
            e->append_only = 1;
            e->has_handle = 1;
            e->handle = handle;
            e->cache_fd = layer_fd_protect(REAL(fcntl)(fd, F_DUPFD_CLOEXEC, 0));
            if (REAL(fstat)(e->cache_fd, &cst) == 0) {
                e->synced_mtim = cst.st_mtim;
                e->synced_size = cst.st_size;
            }
            REAL(fcntl)(fd, F_SETFL, O_APPEND);
            REAL(lseek)(fd, 0, SEEK_END);
            __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
        } else {
            /* not a write-back cache: the handle has O_APPEND, which pwrite would not respect */
            int err = fd >= 0 ? ENOMEM : errno;
            if (fd >= 0) {
                REAL(close)(fd);
            }
            rfile_close_handle(handle);
            ent_put(e);
            errno = err;
            return -1;
        }
    }
    if (fd < 0 && S_ISREG(st.st_mode) && st.st_size <= g_set.fetch_limit && !(flags & O_PATH)) {
        size_t size = 0;
        if (writing && (flags & O_TRUNC)) {
            fd = placeholder_fd(flags, path);
        } else if (writing && (flags & O_ACCMODE) == O_WRONLY && st.st_size == 0) {
            fd = placeholder_fd(flags, path); /* nothing to fetch (a new file) */
        } else if (fetched >= 0) {
            fd = fetched; /* the content came with FileFetched */
            fetched = -1;
            size = fetched_size;
        } else if (has_handle) {
            fd = fetch_to_memfd(handle, flags, path, st.st_size, &size);
        }
        if (fetched >= 0) {
            REAL(close)(fetched);
            fetched = -1;
        }
        if (fd >= 0 && writing && !has_handle) {
            REAL(close)(fd); /* a write-back cache needs the handle: never without one */
            ent_put(e);
            errno = EIO;
            return -1;
        }
        if (fd >= 0 && !writing) {
            if (has_handle) {
                rfile_close_handle(handle);
            }
            e->kind = K_MFILE;
            e->st.st_size = (off_t)size;
            clock_gettime(CLOCK_MONOTONIC, &e->checked);
        } else if (fd >= 0) {
            struct stat cst;
            e->kind = K_MFILE;
            e->writeback = 1;
            e->has_handle = 1;
            e->handle = handle;
            e->cache_fd = layer_fd_protect(REAL(fcntl)(fd, F_DUPFD_CLOEXEC, 0));
            if (REAL(fstat)(e->cache_fd, &cst) == 0) {
                e->synced_mtim = cst.st_mtim;
                e->synced_size = cst.st_size;
            }
            if (flags & O_APPEND) {
                REAL(fcntl)(fd, F_SETFL, O_APPEND);
                REAL(lseek)(fd, 0, SEEK_END);
            }
            __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
        } else if (fd == -1) {
            int err = errno;
            if (has_handle) {
                rfile_close_handle(handle);
            }
            ent_put(e);
            errno = err;
            return -1;
        }
    }
    if (fetched >= 0) {
        REAL(close)(fetched); /* content of a file not kept in a memfd after all */
        fetched = -1;
    }
    if (fd < 0 && !has_handle) {
        ent_put(e);
        errno = EIO;
        return -1;
    }
    if (fd < 0) {
        fd = placeholder_fd(flags, path);
        if (fd < 0) {
            rfile_close_handle(handle);
            ent_put(e);
            return -1;
        }
        e->has_handle = 1;
        e->handle = handle;
        __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
        if (flags & O_APPEND) {
            (void)rfile_seek(e, 0, SEEK_END); /* large file: append from its end */
        }
    }
    if (flags & O_NONBLOCK) {
        REAL(fcntl)(fd, F_SETFL, O_NONBLOCK);
    }
    if (fd >= MAX_FDS) {
        REAL(close)(fd);
        ent_put(e);
        errno = EMFILE;
        return -1;
    }
    fd_set_ent(fd, e);
    DBG("open %s remotely: fd %d (%s)", path, fd,
        e->writeback ? "write-back" : e->kind == K_MFILE ? "fetched" : "handle");
    return fd;
}

/* Shared by every open-like hook: R_BYPASS, or R_DONE with *ret. With `map_local`, a local
 * path that feature.fs.mapping rewrote is opened here under its mapped name. */
static int do_open_ex(int dirfd, const char *path, int flags, mode_t mode, int *ret,
                      int map_local) {
    char full[PATH_CAP];
    int d = decide_hook(dirfd, path, open_is_write(flags), full, sizeof full, ret);
    if (d == R_BYPASS && map_local && t_local_mapped != NULL) {
        *ret = REAL(openat)(AT_FDCWD, t_local_mapped, flags, mode);
        if (*ret >= 0 && fd_peek(*ret) != NULL) {
            fd_forget(*ret); /* a new local fd reusing a number the layer still tracked */
        }
        return R_DONE;
    }
    if (d != R_REMOTE) {
        return d;
    }
    t_guard++;
    *ret = open_remote(full, flags, mode);
    t_guard--;
    return R_DONE;
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode, int *ret) {
    return do_open_ex(dirfd, path, flags, mode, ret, 1);
}

static inline int local_fd(int fd) {
    /* a new local fd reusing a number the layer still tracked (closed behind our back) */
    if (__builtin_expect(fd_peek(fd) != NULL, 0)) {
        fd_forget(fd);
    }
    return fd;
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

HOOK int open(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode)
    OPEN_BODY(REAL(open)(path, flags, mode), AT_FDCWD, path, flags, mode)
}

HOOK int open64(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode)
    OPEN_BODY(REAL(open64)(path, flags, mode), AT_FDCWD, path, flags, mode)
}

HOOK int openat(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode)
    OPEN_BODY(REAL(openat)(dirfd, path, flags, mode), dirfd, path, flags, mode)
}

HOOK int openat64(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode)
    OPEN_BODY(REAL(openat64)(dirfd, path, flags, mode), dirfd, path, flags, mode)
}

HOOK int __open_2(const char *path, int flags) {
    OPEN_BODY(REAL(open)(path, flags), AT_FDCWD, path, flags, 0)
}

HOOK int __open64_2(const char *path, int flags) {
    OPEN_BODY(REAL(open64)(path, flags), AT_FDCWD, path, flags, 0)
}

HOOK int __openat_2(int dirfd, const char *path, int flags) {
    OPEN_BODY(REAL(openat)(dirfd, path, flags), dirfd, path, flags, 0)
}

HOOK int __openat64_2(int dirfd, const char *path, int flags) {
    OPEN_BODY(REAL(openat64)(dirfd, path, flags), dirfd, path, flags, 0)
}

HOOK int creat(const char *path, mode_t mode) {
    int flags = O_CREAT | O_WRONLY | O_TRUNC;
    OPEN_BODY(REAL(creat)(path, mode), AT_FDCWD, path, flags, mode)
}

HOOK int creat64(const char *path, mode_t mode) {
    int flags = O_CREAT | O_WRONLY | O_TRUNC;
    OPEN_BODY(REAL(creat64)(path, mode), AT_FDCWD, path, flags, mode)
}

/* ---------------------------------------------------------------- read / write */

/* Handle-backed fds only; memfd-backed ones read natively. */
#define RFILE_OR_BYPASS(fd, realcall)                                                   \
    struct ent *pe = fd_peek(fd);                                                       \
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {        \
        return realcall;                                                                \
    }

/* A fetched file is a snapshot taken at open. A program that keeps it open (tail -f, a log
 * follower) must see it grow or shrink on the target as it would locally: at fstat, and at a
 * read that hits the end, once the last look is a second old, the target's size is checked
 * again (by path; the same inode only: a replaced file is not the open one) and what it grew
 * by is appended to the memfd (or the memfd is cut). A file read whole right after its open
 * never pays for this; a followed file pays one stat a second. */
static void mfile_refresh(int fd, struct ent *e) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long age_ms = (long long)(now.tv_sec - e->checked.tv_sec) * 1000 +
                       (now.tv_nsec - e->checked.tv_nsec) / 1000000;
    if (e->writeback || e->path == NULL || age_ms < 1000 ||
        __atomic_exchange_n(&e->refreshing, 1, __ATOMIC_ACQUIRE)) {
        return;
    }
    int saved = errno;
    t_guard++;
    struct stat rst, lst;
    if (REAL(fstat)(fd, &lst) == 0 && rstat(e->path, 0, 0, 1, &rst) == 0 &&
        rst.st_ino == e->st.st_ino && rst.st_dev == e->st.st_dev && S_ISREG(rst.st_mode)) {
        off_t have = lst.st_size;
        if (rst.st_size < have) {
            REAL(ftruncate)(fd, rst.st_size); /* truncated on the target (tail says so) */
            have = rst.st_size;
        } else if (rst.st_size > have) {
            struct lconn *c = conn_acquire();
            uint64_t h = 0;
            int rc = -1;
            if (c != NULL) {
                cbor_w *w = conn_begin(c, M_FILE_OPEN, 3);
                cw_bytes(w, e->path, strlen(e->path));
                cw_uint(w, O_RDONLY);
                cw_uint(w, 0);
                cbor_r r;
                rc = conn_call(c, M_FILE_OPENED, &r);
                if (rc == 0 && cr_uint(&r, &h) < 0) {
                    rc = -1;
                }
                conn_release(c);
            }
            char *buf = rc == 0 ? malloc(MAX_DATA_CHUNK) : NULL;
            /* at most what fetch_limit allows in one look: a runaway file is read in steps */
            off_t end = rst.st_size - have > g_set.fetch_limit ? have + g_set.fetch_limit : rst.st_size;
            while (buf != NULL && have < end) {
                size_t want = end - have > MAX_DATA_CHUNK ? MAX_DATA_CHUNK : (size_t)(end - have);
                ssize_t n = rfile_read_chunk(h, buf, want, have);
                if (n <= 0 || REAL(pwrite)(fd, buf, (size_t)n, have) != n) {
                    break;
                }
                have += n;
            }
            free(buf);
            if (rc == 0) {
                rfile_close_handle(h);
            }
        }
        e->st = rst;
        e->st.st_size = have;
    }
    clock_gettime(CLOCK_MONOTONIC, &e->checked);
    t_guard--;
    __atomic_store_n(&e->refreshing, 0, __ATOMIC_RELEASE);
    errno = saved;
}

/* read() at the end of a fetched file: look again (mfile_refresh), then read once more. */
static __attribute__((noinline)) ssize_t mfile_read_at_end(int fd, void *buf, size_t n) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return 0;
    }
    mfile_refresh(fd, e);
    ent_put(e);
    return REAL(read)(fd, buf, n);
}

/* The memfd of a file opened write-only is readable: refuse as the real fd would. */
static int mfile_writeonly(int fd, struct ent *pe) {
    if (pe->kind == K_MFILE && pe->writeback && (pe->oflags & O_ACCMODE) == O_WRONLY) {
        struct ent *e = ent_get(fd);
        if (e == NULL) {
            return 0;
        }
        ent_put(e);
        errno = EBADF;
        return 1;
    }
    return 0;
}

HOOK ssize_t read(int fd, void *buf, size_t n) {
    RFILE_OR_BYPASS(fd, REAL(read)(fd, buf, n))
    if (pe->kind == K_MFILE) {
        if (mfile_writeonly(fd, pe)) {
            return -1;
        }
        ssize_t r = REAL(read)(fd, buf, n);
        if (__builtin_expect(r == 0 && n > 0 && !pe->writeback, 0)) {
            r = mfile_read_at_end(fd, buf, n);
        }
        return r;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(read)(fd, buf, n);
    }
    t_guard++;
    ssize_t r = rfile_read(e, buf, n, -1);
    t_guard--;
    ent_put(e);
    return r;
}

static ssize_t pread_common(int fd, void *buf, size_t n, off_t off) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(pread)(fd, buf, n, off);
    }
    ssize_t r;
    t_guard++;
    if (off < 0) {
        errno = EINVAL;
        r = -1;
    } else {
        r = rfile_read(e, buf, n, off);
    }
    t_guard--;
    ent_put(e);
    return r;
}

HOOK ssize_t pread(int fd, void *buf, size_t n, off_t off) {
    RFILE_OR_BYPASS(fd, REAL(pread)(fd, buf, n, off))
    if (pe->kind == K_MFILE) {
        return mfile_writeonly(fd, pe) ? -1 : REAL(pread)(fd, buf, n, off);
    }
    return pread_common(fd, buf, n, off);
}

HOOK ssize_t pread64(int fd, void *buf, size_t n, off64_t off) {
    RFILE_OR_BYPASS(fd, REAL(pread64)(fd, buf, n, off))
    if (pe->kind == K_MFILE) {
        return mfile_writeonly(fd, pe) ? -1 : REAL(pread64)(fd, buf, n, off);
    }
    return pread_common(fd, buf, n, off);
}

HOOK ssize_t readv(int fd, const struct iovec *iov, int cnt) {
    RFILE_OR_BYPASS(fd, REAL(readv)(fd, iov, cnt))
    if (pe->kind == K_MFILE) {
        return mfile_writeonly(fd, pe) ? -1 : REAL(readv)(fd, iov, cnt);
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(readv)(fd, iov, cnt);
    }
    return rfile_iov(e, iov, cnt, 0);
}

/* A memfd-backed file opened read-only: the memfd itself is writable, so refuse. A
 * write-back file is written natively (the memfd is the cache). Returns 1: refused,
 * 2: write natively, 0: handle-backed. */
static int mfile_readonly(int fd, struct ent *pe) {
    if (pe->kind == K_MFILE && !pe->writeback) {
        struct ent *e = ent_get(fd); /* still ours? (else: write natively) */
        if (e == NULL) {
            return 2;
        }
        ent_put(e);
        errno = EBADF;
        return 1;
    }
    return pe->kind == K_MFILE ? 2 : 0;
}

HOOK ssize_t write(int fd, const void *buf, size_t n) {
    RFILE_OR_BYPASS(fd, REAL(write)(fd, buf, n))
    switch (mfile_readonly(fd, pe)) {
    case 1: return -1;
    case 2: return REAL(write)(fd, buf, n);
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(write)(fd, buf, n);
    }
    t_guard++;
    ssize_t r = rfile_write(e, buf, n, (e->oflags & O_APPEND) ? -1 : -1);
    t_guard--;
    ent_put(e);
    return r;
}

static ssize_t pwrite_common(int fd, const void *buf, size_t n, off_t off) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(pwrite)(fd, buf, n, off);
    }
    ssize_t r;
    t_guard++;
    if (off < 0) {
        errno = EINVAL;
        r = -1;
    } else {
        r = rfile_write(e, buf, n, off);
    }
    t_guard--;
    ent_put(e);
    return r;
}

HOOK ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    RFILE_OR_BYPASS(fd, REAL(pwrite)(fd, buf, n, off))
    switch (mfile_readonly(fd, pe)) {
    case 1: return -1;
    case 2: return REAL(pwrite)(fd, buf, n, off);
    }
    return pwrite_common(fd, buf, n, off);
}

HOOK ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    RFILE_OR_BYPASS(fd, REAL(pwrite64)(fd, buf, n, off))
    switch (mfile_readonly(fd, pe)) {
    case 1: return -1;
    case 2: return REAL(pwrite64)(fd, buf, n, off);
    }
    return pwrite_common(fd, buf, n, off);
}

HOOK ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    RFILE_OR_BYPASS(fd, REAL(writev)(fd, iov, cnt))
    switch (mfile_readonly(fd, pe)) {
    case 1: return -1;
    case 2: return REAL(writev)(fd, iov, cnt);
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(writev)(fd, iov, cnt);
    }
    return rfile_iov(e, iov, cnt, 1);
}

static off_t lseek_common(int fd, off_t off, int whence) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(lseek)(fd, off, whence);
    }
    t_guard++;
    off_t r = rfile_seek(e, off, whence);
    t_guard--;
    ent_put(e);
    return r;
}

HOOK off_t lseek(int fd, off_t off, int whence) {
    RFILE_OR_BYPASS(fd, REAL(lseek)(fd, off, whence))
    if (pe->kind == K_MFILE) {
        return REAL(lseek)(fd, off, whence);
    }
    return lseek_common(fd, off, whence);
}

HOOK off64_t lseek64(int fd, off64_t off, int whence) {
    RFILE_OR_BYPASS(fd, REAL(lseek64)(fd, off, whence))
    if (pe->kind == K_MFILE) {
        return REAL(lseek64)(fd, off, whence);
    }
    return lseek_common(fd, off, whence);
}

/* copy_file_range / sendfile cannot reach a handle-backed file: emulate sendfile with reads,
 * and make copy_file_range fail with EXDEV, which callers (cat, cp) treat as "fall back". */
HOOK ssize_t copy_file_range(int in, off64_t *ioff, int out, off64_t *ooff, size_t n, unsigned flags) {
    struct ent *a = fd_peek(in), *b = fd_peek(out);
    if (t_guard || ((a == NULL || a->kind != K_RFILE) && (b == NULL || b->kind != K_RFILE))) {
        return REAL(copy_file_range)(in, ioff, out, ooff, n, flags);
    }
    errno = EXDEV;
    return -1;
}

static ssize_t sendfile_emulated(int out, int in, off_t *off, size_t n) {
    char buf[65536];
    size_t want = n < sizeof buf ? n : sizeof buf;
    ssize_t r = off ? pread(in, buf, want, *off) : read(in, buf, want);
    if (r <= 0) {
        return r;
    }
    ssize_t w = write(out, buf, (size_t)r);
    if (w > 0 && off) {
        *off += w;
    } else if (w >= 0 && w < r && !off) {
        lseek(in, w - r, SEEK_CUR);
    }
    return w;
}

HOOK ssize_t sendfile(int out, int in, off_t *off, size_t n) {
    struct ent *a = fd_peek(in);
    if (t_guard || a == NULL || a->kind != K_RFILE) {
        return REAL(sendfile)(out, in, off, n);
    }
    return sendfile_emulated(out, in, off, n);
}

HOOK ssize_t sendfile64(int out, int in, off64_t *off, size_t n) {
    struct ent *a = fd_peek(in);
    if (t_guard || a == NULL || a->kind != K_RFILE) {
        return REAL(sendfile64)(out, in, off, n);
    }
    return sendfile_emulated(out, in, off, n);
}

/* ---------------------------------------------------------------- close, dup */

/* close of an fd the layer tracks; kept out of close() so that the untracked path is one
 * table load and a tail call. */
static __attribute__((noinline)) int close_tracked(int fd, struct ent *pe) {
    if (pe->kind == K_LAYER) {
        if (t_guard) {
            return REAL(close)(fd);
        }
        errno = EBADF; /* the layer's own connection: invisible to the app */
        return -1;
    }
    struct ent *e = fd_take(fd);
    int r = REAL(close)(fd);
    int saved = errno;
    ent_put(e);
    errno = saved;
    return r;
}

HOOK int close(int fd) {
    struct ent *pe = fd_peek(fd);
    if (__builtin_expect(pe == NULL, 1)) {
        return REAL(close)(fd);
    }
    return close_tracked(fd, pe);
}

/* The app may close ranges of fds (close_range): keep the layer's own fds open. */
HOOK int close_range(unsigned first, unsigned last, int flags) {
    if (t_guard || !g_active) {
        return REAL(close_range)(first, last, flags);
    }
    unsigned lo = first;
    int rc = 0;
    unsigned top = last < MAX_FDS ? last : MAX_FDS - 1;
    for (unsigned fd = first; fd <= top; fd++) {
        struct ent *pe = fd_peek((int)fd);
        if (pe == NULL) {
            continue;
        }
        if (pe->kind == K_LAYER) {
            if (fd > lo && REAL(close_range)(lo, fd - 1, flags) < 0) {
                rc = -1;
            }
            lo = fd + 1;
        } else if (!(flags & CLOSE_RANGE_CLOEXEC)) {
            ent_put(fd_take((int)fd));
        }
    }
    if (lo <= last && REAL(close_range)(lo, last, flags) < 0) {
        rc = -1;
    }
    return rc;
}

static int dup_track(int oldfd, int newfd) {
    if (newfd >= 0) {
        struct ent *e = ent_get(oldfd);
        if (e != NULL) {
            fd_set_ent(newfd, e);
        } else {
            fd_forget(newfd);
        }
    }
    return newfd;
}

HOOK int dup(int fd) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard) {
        return local_fd(REAL(dup)(fd));
    }
    if (pe->kind == K_LAYER) {
        errno = EBADF;
        return -1;
    }
    return dup_track(fd, REAL(dup)(fd));
}

static int dup2_common(int oldfd, int newfd, int flags, int three) {
    struct ent *po = fd_peek(oldfd), *pn = fd_peek(newfd);
    if (t_guard || (po == NULL && pn == NULL)) {
        return three ? REAL(dup3)(oldfd, newfd, flags) : REAL(dup2)(oldfd, newfd);
    }
    if (po != NULL && po->kind == K_LAYER) {
        errno = EBADF;
        return -1;
    }
    if (pn != NULL && pn->kind == K_LAYER) {
        t_guard++;
        layer_fd_relocate(newfd);
        t_guard--;
    }
    int r = three ? REAL(dup3)(oldfd, newfd, flags) : REAL(dup2)(oldfd, newfd);
    if (r >= 0 && oldfd != newfd) {
        struct ent *gone = fd_take(newfd);
        ent_put(gone);
        dup_track(oldfd, newfd);
    }
    return r;
}

HOOK int dup2(int oldfd, int newfd) { return dup2_common(oldfd, newfd, 0, 0); }
HOOK int dup3(int oldfd, int newfd, int flags) { return dup2_common(oldfd, newfd, flags, 1); }

static int fcntl_common(int fd, int cmd, void *arg, int is64) {
    struct ent *pe = fd_peek(fd);
    int r;
    if (cmd == F_GETFL && pe != NULL && !t_guard && (pe->kind == K_RFILE || pe->kind == K_MFILE)) {
        /* the memfd is read-write whatever the app asked for: report the app's access mode */
        r = is64 ? REAL(fcntl64)(fd, cmd, arg) : REAL(fcntl)(fd, cmd, arg);
        struct ent *e = r < 0 ? NULL : ent_get(fd);
        if (e != NULL) {
            r = (r & ~O_ACCMODE) | (e->oflags & O_ACCMODE);
            ent_put(e);
        }
        return r;
    }
    if (pe != NULL && pe->kind == K_LAYER && !t_guard) {
        errno = EBADF; /* the layer's own connection: invisible to the app */
        return -1;
    }
    if (pe == NULL || t_guard || (cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC)) {
        r = is64 ? REAL(fcntl64)(fd, cmd, arg) : REAL(fcntl)(fd, cmd, arg);
        if (pe == NULL && !t_guard && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) {
            local_fd(r);
        }
        return r;
    }
    if (pe->kind == K_LAYER) {
        errno = EBADF;
        return -1;
    }
    r = is64 ? REAL(fcntl64)(fd, cmd, arg) : REAL(fcntl)(fd, cmd, arg);
    return dup_track(fd, r);
}

HOOK int fcntl(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(fd, cmd, arg, 0);
}

HOOK int fcntl64(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(fd, cmd, arg, 1);
}

/* ---------------------------------------------------------------- stat family */

static int fstat_remote(int fd, struct stat *st, int *ret) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {
        return R_BYPASS;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    t_guard++;
    if (e->kind == K_MFILE) {
        struct stat real;
        mfile_refresh(fd, e);
        *st = e->st;
        if (REAL(fstat)(fd, &real) == 0) {
            st->st_size = real.st_size;
            st->st_blocks = real.st_blocks;
            if (e->writeback) {
                st->st_mtim = real.st_mtim;
                st->st_ctim = real.st_ctim;
            }
        }
        *ret = 0;
    } else {
        *ret = e->has_handle ? rstat(NULL, 1, e->handle, 1, st) : rstat(e->path, 0, 0, 1, st);
    }
    t_guard--;
    ent_put(e);
    return R_DONE;
}

/* stat/lstat/fstatat on a path (dirfd-relative). */
static int stat_path(int dirfd, const char *path, struct stat *st, int flags, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    if (path != NULL && path[0] == 0 && (flags & AT_EMPTY_PATH)) {
        return fstat_remote(dirfd, st, ret);
    }
    char full[PATH_CAP];
    int d = decide_hook(dirfd, path, 0, full, sizeof full, ret);
    if (d == R_BYPASS && t_local_mapped != NULL) { /* local, under its mapped name */
        *ret = REAL(fstatat)(AT_FDCWD, t_local_mapped, st, flags & AT_SYMLINK_NOFOLLOW);
        return R_DONE;
    }
    if (d != R_REMOTE) {
        return d;
    }
    t_guard++;
    flush_pending_for(full);
    *ret = rstat(full, 0, 0, !(flags & AT_SYMLINK_NOFOLLOW), st);
    t_guard--;
    return R_DONE;
}

#define STAT_HOOK(name, type, dirfd, path, flags, realcall)          \
    HOOK int name {                                                   \
        int ret;                                                      \
        struct stat tmp;                                              \
        if (stat_path(dirfd, path, &tmp, flags, &ret) == R_DONE) {    \
            if (ret == 0) {                                           \
                memcpy(buf, &tmp, sizeof(type));                      \
            }                                                         \
            return ret;                                               \
        }                                                             \
        return realcall;                                              \
    }

STAT_HOOK(stat(const char *path, struct stat *buf), struct stat, AT_FDCWD, path, 0,
          REAL(stat)(path, buf))
STAT_HOOK(stat64(const char *path, struct stat64 *buf), struct stat64, AT_FDCWD, path, 0,
          REAL(stat64)(path, buf))
STAT_HOOK(lstat(const char *path, struct stat *buf), struct stat, AT_FDCWD, path,
          AT_SYMLINK_NOFOLLOW, REAL(lstat)(path, buf))
STAT_HOOK(lstat64(const char *path, struct stat64 *buf), struct stat64, AT_FDCWD, path,
          AT_SYMLINK_NOFOLLOW, REAL(lstat64)(path, buf))
STAT_HOOK(fstatat(int dirfd, const char *path, struct stat *buf, int flags), struct stat, dirfd,
          path, flags, REAL(fstatat)(dirfd, path, buf, flags))
STAT_HOOK(fstatat64(int dirfd, const char *path, struct stat64 *buf, int flags), struct stat64,
          dirfd, path, flags, REAL(fstatat64)(dirfd, path, buf, flags))

HOOK int fstat(int fd, struct stat *buf) {
    int ret;
    if (fstat_remote(fd, buf, &ret) == R_DONE) {
        return ret;
    }
    return REAL(fstat)(fd, buf);
}

HOOK int fstat64(int fd, struct stat64 *buf) {
    int ret;
    struct stat tmp;
    if (fstat_remote(fd, &tmp, &ret) == R_DONE) {
        if (ret == 0) {
            memcpy(buf, &tmp, sizeof *buf);
        }
        return ret;
    }
    return REAL(fstat64)(fd, buf);
}

/* The __xstat family (old binaries): same layout as struct stat on x86_64/aarch64. */
HOOK int __xstat(int ver, const char *path, struct stat *buf) {
    (void)ver;
    return fstatat(AT_FDCWD, path, buf, 0);
}
HOOK int __lxstat(int ver, const char *path, struct stat *buf) {
    (void)ver;
    return fstatat(AT_FDCWD, path, buf, AT_SYMLINK_NOFOLLOW);
}
HOOK int __fxstat(int ver, int fd, struct stat *buf) {
    (void)ver;
    return fstat(fd, buf);
}
HOOK int __fxstatat(int ver, int dirfd, const char *path, struct stat *buf, int flags) {
    (void)ver;
    return fstatat(dirfd, path, buf, flags);
}
HOOK int __xstat64(int ver, const char *path, struct stat64 *buf) {
    (void)ver;
    return fstatat64(AT_FDCWD, path, buf, 0);
}
HOOK int __lxstat64(int ver, const char *path, struct stat64 *buf) {
    (void)ver;
    return fstatat64(AT_FDCWD, path, buf, AT_SYMLINK_NOFOLLOW);
}
HOOK int __fxstat64(int ver, int fd, struct stat64 *buf) {
    (void)ver;
    return fstat64(fd, buf);
}
HOOK int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *buf, int flags) {
    (void)ver;
    return fstatat64(dirfd, path, buf, flags);
}

HOOK int statx(int dirfd, const char *path, int flags, unsigned mask, struct statx *sx) {
    int ret;
    struct stat st;
    if (stat_path(dirfd, path, &st, flags, &ret) != R_DONE) {
        return REAL(statx)(dirfd, path, flags, mask, sx);
    }
    if (ret == 0) {
        memset(sx, 0, sizeof *sx);
        sx->stx_mask = STATX_BASIC_STATS;
        sx->stx_blksize = (uint32_t)st.st_blksize;
        sx->stx_nlink = (uint32_t)st.st_nlink;
        sx->stx_uid = st.st_uid;
        sx->stx_gid = st.st_gid;
        sx->stx_mode = (uint16_t)st.st_mode;
        sx->stx_ino = st.st_ino;
        sx->stx_size = (uint64_t)st.st_size;
        sx->stx_blocks = (uint64_t)st.st_blocks;
        sx->stx_atime.tv_sec = st.st_atim.tv_sec;
        sx->stx_atime.tv_nsec = (uint32_t)st.st_atim.tv_nsec;
        sx->stx_mtime.tv_sec = st.st_mtim.tv_sec;
        sx->stx_mtime.tv_nsec = (uint32_t)st.st_mtim.tv_nsec;
        sx->stx_ctime.tv_sec = st.st_ctim.tv_sec;
        sx->stx_ctime.tv_nsec = (uint32_t)st.st_ctim.tv_nsec;
        sx->stx_rdev_major = major(st.st_rdev);
        sx->stx_rdev_minor = minor(st.st_rdev);
        sx->stx_dev_major = major(st.st_dev);
        sx->stx_dev_minor = minor(st.st_dev);
    }
    return ret;
}

/* statfs: [type, bsize, blocks, bfree, bavail, files, ffree, namelen, frsize, flags] */
static int rstatfs(const char *path, int has_handle, uint64_t handle, struct statfs *sf) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_STATFS, 2);
    if (has_handle) {
        cw_null(w);
        cw_uint(w, handle);
    } else {
        cw_bytes(w, path, strlen(path));
        cw_null(w);
    }
    cbor_r r;
    int rc = conn_call(c, M_STATFS_REPLY, &r);
    if (rc == 0) {
        uint64_t n, v[10];
        if (cr_array(&r, &n) < 0 || n != 10) {
            errno = EIO;
            rc = -1;
        } else {
            for (int i = 0; i < 10 && rc == 0; i++) {
                if (cr_uint(&r, &v[i]) < 0) {
                    errno = EIO;
                    rc = -1;
                }
            }
            if (rc == 0) {
                memset(sf, 0, sizeof *sf);
                sf->f_type = (long)v[0];
                sf->f_bsize = (long)v[1];
                sf->f_blocks = v[2];
                sf->f_bfree = v[3];
                sf->f_bavail = v[4];
                sf->f_files = v[5];
                sf->f_ffree = v[6];
                sf->f_namelen = (long)v[7];
                sf->f_frsize = (long)v[8];
                sf->f_flags = (long)v[9];
            }
        }
    }
    conn_release(c);
    return rc;
}

static int statfs_path(const char *path, struct statfs *sf, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int d = decide_hook(AT_FDCWD, path, 0, full, sizeof full, ret);
    if (d == R_BYPASS && t_local_mapped != NULL) { /* local, under its mapped name */
        *ret = REAL(statfs)(local_name(path, NULL, full), sf);
        return R_DONE;
    }
    if (d != R_REMOTE) {
        return d;
    }
    t_guard++;
    *ret = rstatfs(full, 0, 0, sf);
    t_guard--;
    return R_DONE;
}

static int fstatfs_fd(int fd, struct statfs *sf, int *ret) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {
        return R_BYPASS;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    t_guard++;
    *ret = e->has_handle ? rstatfs(NULL, 1, e->handle, sf) : rstatfs(e->path, 0, 0, sf);
    t_guard--;
    ent_put(e);
    return R_DONE;
}

HOOK int statfs(const char *path, struct statfs *buf) {
    int ret;
    return statfs_path(path, buf, &ret) == R_DONE ? ret : REAL(statfs)(path, buf);
}
HOOK int statfs64(const char *path, struct statfs64 *buf) {
    int ret;
    struct statfs tmp;
    if (statfs_path(path, &tmp, &ret) == R_DONE) {
        if (ret == 0) {
            memcpy(buf, &tmp, sizeof *buf);
        }
        return ret;
    }
    return REAL(statfs64)(path, buf);
}
HOOK int fstatfs(int fd, struct statfs *buf) {
    int ret;
    return fstatfs_fd(fd, buf, &ret) == R_DONE ? ret : REAL(fstatfs)(fd, buf);
}
HOOK int fstatfs64(int fd, struct statfs64 *buf) {
    int ret;
    struct statfs tmp;
    if (fstatfs_fd(fd, &tmp, &ret) == R_DONE) {
        if (ret == 0) {
            memcpy(buf, &tmp, sizeof *buf);
        }
        return ret;
    }
    return REAL(fstatfs64)(fd, buf);
}

/* ---------------------------------------------------------------- path operations */

static int raccess(const char *path, int mode) {
    SIMPLE_CALL(M_FILE_ACCESS, 2, (cw_bytes(w, path, strlen(path)), cw_uint(w, (uint64_t)mode)));
}

/* access, euidaccess/eaccess (flags AT_EACCESS) and faccessat: a mapped local path is checked
 * by faccessat with the caller's own flags, so each keeps its semantics. */
static int access_common(int dirfd, const char *path, int mode, int flags, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int d = decide_hook(dirfd, path, 0, full, sizeof full, ret);
    if (d == R_BYPASS && t_local_mapped != NULL) { /* local, under its mapped name */
        *ret = REAL(faccessat)(AT_FDCWD, local_name(path, NULL, full), mode, flags);
        return R_DONE;
    }
    if (d != R_REMOTE) {
        return d;
    }
    t_guard++;
    *ret = raccess(full, mode);
    t_guard--;
    return R_DONE;
}

HOOK int access(const char *path, int mode) {
    int ret;
    return access_common(AT_FDCWD, path, mode, 0, &ret) == R_DONE ? ret : REAL(access)(path, mode);
}

/* euidaccess/eaccess (sort, test): glibc stats internally, out of the hooks' reach */
HOOK int euidaccess(const char *path, int mode) {
    int ret;
    return access_common(AT_FDCWD, path, mode, AT_EACCESS, &ret) == R_DONE ? ret
                                                                           : REAL(euidaccess)(path, mode);
}

HOOK int eaccess(const char *path, int mode) {
    int ret;
    return access_common(AT_FDCWD, path, mode, AT_EACCESS, &ret) == R_DONE ? ret
                                                                           : REAL(eaccess)(path, mode);
}

HOOK int faccessat(int dirfd, const char *path, int mode, int flags) {
    int ret;
    if (access_common(dirfd, path, mode, flags, &ret) == R_DONE) {
        return ret;
    }
    return REAL(faccessat)(dirfd, path, mode, flags);
}

static ssize_t rreadlink(const char *path, char *buf, size_t size) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_READLINK, 1);
    cw_bytes(w, path, strlen(path));
    cbor_r r;
    ssize_t n = -1;
    if (conn_call(c, M_READLINK_REPLY, &r) == 0) {
        const uint8_t *p;
        size_t len;
        if (cr_bytes(&r, &p, &len) < 0) {
            errno = EIO;
        } else {
            n = (ssize_t)(len < size ? len : size); /* truncated, no NUL: like readlink(2) */
            memcpy(buf, p, (size_t)n);
        }
    }
    conn_release(c);
    return n;
}

static int readlink_common(int dirfd, const char *path, char *buf, size_t size, ssize_t *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int r = 0;
    int d = decide_hook(dirfd, path, 0, full, sizeof full, &r);
    if (d == R_BYPASS && t_local_mapped != NULL) { /* local, under its mapped name */
        *ret = REAL(readlink)(local_name(path, NULL, full), buf, size);
        return R_DONE;
    }
    if (d != R_REMOTE) {
        *ret = r;
        return d;
    }
    t_guard++;
    *ret = rreadlink(full, buf, size);
    t_guard--;
    return R_DONE;
}

HOOK ssize_t readlink(const char *path, char *buf, size_t size) {
    ssize_t ret;
    if (readlink_common(AT_FDCWD, path, buf, size, &ret) == R_DONE) {
        return ret;
    }
    return REAL(readlink)(path, buf, size);
}

HOOK ssize_t readlinkat(int dirfd, const char *path, char *buf, size_t size) {
    ssize_t ret;
    if (readlink_common(dirfd, path, buf, size, &ret) == R_DONE) {
        return ret;
    }
    return REAL(readlinkat)(dirfd, path, buf, size);
}

static int rpath_op(int kind, const char *path, int mode) {
    if (kind == M_MKDIR) {
        SIMPLE_CALL(kind, 2, (cw_bytes(w, path, strlen(path)), cw_uint(w, (uint64_t)mode)));
    }
    SIMPLE_CALL(kind, 1, cw_bytes(w, path, strlen(path)));
}

/* mkdir/rmdir/unlink: they modify, so in read mode they stay local. */
static int path_op(int kind, int dirfd, const char *path, int mode, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int d = decide_hook(dirfd, path, 1, full, sizeof full, ret);
    if (d == R_BYPASS && t_local_mapped != NULL) { /* local, under its mapped name */
        *ret = kind == M_MKDIR   ? REAL(mkdir)(t_local_mapped, (mode_t)mode)
               : kind == M_RMDIR ? REAL(rmdir)(t_local_mapped)
                                 : REAL(unlink)(t_local_mapped);
        return R_DONE;
    }
    if (d != R_REMOTE) {
        return d;
    }
    t_guard++;
    *ret = rpath_op(kind, full, mode);
    t_guard--;
    return R_DONE;
}

HOOK int mkdir(const char *path, mode_t mode) {
    int ret;
    return path_op(M_MKDIR, AT_FDCWD, path, (int)mode, &ret) == R_DONE ? ret : REAL(mkdir)(path, mode);
}
HOOK int mkdirat(int dirfd, const char *path, mode_t mode) {
    int ret;
    if (path_op(M_MKDIR, dirfd, path, (int)mode, &ret) == R_DONE) {
        return ret;
    }
    return REAL(mkdirat)(dirfd, path, mode);
}
HOOK int rmdir(const char *path) {
    int ret;
    return path_op(M_RMDIR, AT_FDCWD, path, 0, &ret) == R_DONE ? ret : REAL(rmdir)(path);
}
HOOK int unlink(const char *path) {
    int ret;
    return path_op(M_UNLINK, AT_FDCWD, path, 0, &ret) == R_DONE ? ret : REAL(unlink)(path);
}
HOOK int unlinkat(int dirfd, const char *path, int flags) {
    int ret;
    if (path_op((flags & AT_REMOVEDIR) ? M_RMDIR : M_UNLINK, dirfd, path, 0, &ret) == R_DONE) {
        return ret;
    }
    return REAL(unlinkat)(dirfd, path, flags);
}

/* rename, renameat and renameat2 (its flags kept for the local call under mapped names). */
static int rename_common(int olddir, const char *old, int newdir, const char *new, unsigned flags,
                         int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char a[PATH_CAP], b[PATH_CAP];
    int da = decide(olddir, old, 1, a, sizeof a);
    const char *mapped_old = NULL;
    char old_buf[PATH_CAP];
    if (t_local_mapped != NULL) {
        strcpy(old_buf, t_local_mapped);
        mapped_old = old_buf;
    }
    int db = decide(newdir, new, 1, b, sizeof b);
    if (da == P_LOCAL && db == P_LOCAL) {
        if (mapped_old == NULL && t_local_mapped == NULL) {
            return R_BYPASS;
        }
        /* local, under the mapped name(s); an unmapped relative side keeps its directory */
        *ret = REAL(renameat2)(mapped_old ? AT_FDCWD : olddir, mapped_old ? mapped_old : old,
                               t_local_mapped ? AT_FDCWD : newdir,
                               t_local_mapped ? t_local_mapped : new, flags);
        return R_DONE;
    }
    t_guard++;
    if (da == P_NOT_FOUND || db == P_NOT_FOUND) {
        errno = ENOENT;
        *ret = -1;
    } else if (da != db) {
        errno = EXDEV; /* between the user's machine and the target */
        *ret = -1;
    } else {
        *ret = remote_two_paths(M_RENAME, a, b, -1);
    }
    t_guard--;
    return R_DONE;
}

/* renameat2 (mv): flags 0 is renameat; RENAME_NOREPLACE is checked with a FileStat first (not
 * atomic on the target); other flags are not supported remotely. */
HOOK int renameat2(int olddir, const char *old, int newdir, const char *new, unsigned flags) {
    if (!g_active || t_guard || (flags & ~RENAME_NOREPLACE) != 0) {
        if (g_active && !t_guard && flags != 0) {
            char a[PATH_CAP], b[PATH_CAP];
            int da = decide(olddir, old, 1, a, sizeof a);
            int old_mapped = t_local_mapped != NULL;
            int db = decide(newdir, new, 1, b, sizeof b);
            if (da != P_LOCAL || db != P_LOCAL) {
                errno = EINVAL; /* callers (mv) fall back to rename */
                return -1;
            }
            int ret;
            if ((old_mapped || t_local_mapped != NULL) &&
                rename_common(olddir, old, newdir, new, flags, &ret) == R_DONE) {
                return ret; /* RENAME_EXCHANGE and co. under the mapped names */
            }
        }
        return REAL(renameat2)(olddir, old, newdir, new, flags);
    }
    char b[PATH_CAP];
    int db = decide(newdir, new, 1, b, sizeof b);
    if (flags & RENAME_NOREPLACE) {
        if (db == P_REMOTE) {
            struct stat st;
            t_guard++;
            int saved = errno;
            int exists = rstat(b, 0, 0, 0, &st) == 0;
            errno = saved;
            t_guard--;
            if (exists) {
                errno = EEXIST;
                return -1;
            }
        }
    }
    int ret;
    if (rename_common(olddir, old, newdir, new, flags, &ret) == R_DONE) {
        return ret;
    }
    return REAL(renameat2)(olddir, old, newdir, new, flags);
}

HOOK int rename(const char *old, const char *new) {
    int ret;
    if (rename_common(AT_FDCWD, old, AT_FDCWD, new, 0, &ret) == R_DONE) {
        return ret;
    }
    return REAL(rename)(old, new);
}

HOOK int renameat(int olddir, const char *old, int newdir, const char *new) {
    int ret;
    if (rename_common(olddir, old, newdir, new, 0, &ret) == R_DONE) {
        return ret;
    }
    return REAL(renameat)(olddir, old, newdir, new);
}

/* A fetched read-only file whose times, owner or mode were changed through its fd: its fstat
 * (the stat taken at open) follows. */
static void mfile_restat(struct ent *e) {
    struct stat nst;
    t_guard++;
    if (e->path != NULL && rstat(e->path, 0, 0, 1, &nst) == 0 && nst.st_ino == e->st.st_ino) {
        nst.st_size = e->st.st_size;
        e->st = nst;
    }
    t_guard--;
}

/* ftruncate / fchmod / fsync on a handle-backed file */
static int handle_op(int fd, int kind, int64_t arg, int *ret) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {
        return R_BYPASS;
    }
    if (pe->kind == K_MFILE && !pe->writeback) {
        /* opened read-only and fetched: no handle; fchmod (allowed on a read-only fd, as
         * Linux allows it) goes by path, and the fd's stat follows */
        struct ent *e = kind == M_FCHMOD ? ent_get(fd) : NULL;
        if (e != NULL) {
            char *path = e->path != NULL ? strdup(e->path) : NULL;
            *ret = path != NULL ? chmod(path, (mode_t)arg) : (errno = EBADF, -1);
            if (*ret == 0) {
                mfile_restat(e);
            }
            free(path);
            ent_put(e);
            return R_DONE;
        }
        if (kind == M_FSYNC) {
            *ret = 0;
        } else {
            errno = kind == M_FTRUNCATE ? EINVAL : EPERM;
            *ret = -1;
        }
        return R_DONE;
    }
    if (pe->kind == K_MFILE && kind == M_FTRUNCATE) {
        return R_BYPASS; /* the cache; written back later */
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    t_guard++;
    if (!e->has_handle) {
        errno = EBADF;
        *ret = -1;
    } else if (e->writeback && kind == M_FSYNC && wfile_flush(e) < 0) {
        *ret = -1;
    } else {
        struct lconn *c = conn_acquire();
        if (c == NULL) {
            *ret = -1;
        } else {
            cbor_w *w = conn_begin(c, kind, kind == M_FSYNC ? 1 : 2);
            cw_uint(w, e->handle);
            if (kind != M_FSYNC) {
                cw_uint(w, (uint64_t)arg);
            }
            cbor_r r;
            *ret = conn_call(c, M_OK, &r);
            conn_release(c);
        }
    }
    t_guard--;
    ent_put(e);
    return R_DONE;
}

HOOK int ftruncate(int fd, off_t len) {
    int ret;
    if (len >= 0 && handle_op(fd, M_FTRUNCATE, len, &ret) == R_DONE) {
        return ret;
    }
    return REAL(ftruncate)(fd, len);
}
HOOK int ftruncate64(int fd, off64_t len) {
    int ret;
    if (len >= 0 && handle_op(fd, M_FTRUNCATE, len, &ret) == R_DONE) {
        return ret;
    }
    return REAL(ftruncate64)(fd, len);
}
HOOK int fchmod(int fd, mode_t mode) {
    int ret;
    return handle_op(fd, M_FCHMOD, mode, &ret) == R_DONE ? ret : REAL(fchmod)(fd, mode);
}
HOOK int fsync(int fd) {
    int ret;
    return handle_op(fd, M_FSYNC, 0, &ret) == R_DONE ? ret : REAL(fsync)(fd);
}

/* truncate/chmod by path: no message of their own; open the remote file, change it through
 * the handle, close it. In read mode they modify, so they stay local. */
static int path_via_handle(const char *path, int oflags, int kind, uint64_t arg, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int d = decide(AT_FDCWD, path, 1, full, sizeof full);
    if (d == P_LOCAL && t_local_mapped != NULL) { /* local, under its mapped name */
        const char *name = local_name(path, NULL, full);
        *ret = kind == M_FTRUNCATE ? REAL(truncate)(name, (off_t)arg) : REAL(chmod)(name, (mode_t)arg);
        return R_DONE;
    }
    if (d == P_LOCAL) {
        return R_BYPASS;
    }
    t_guard++;
    *ret = -1;
    if (d == P_NOT_FOUND) {
        errno = ENOENT;
    } else {
        struct lconn *c = conn_acquire();
        uint64_t handle = 0;
        int rc = -1;
        if (c != NULL) {
            cbor_w *w = conn_begin(c, M_FILE_OPEN, 3);
            cw_bytes(w, full, strlen(full));
            cw_uint(w, (uint64_t)oflags);
            cw_uint(w, 0);
            cbor_r r;
            rc = conn_call(c, M_FILE_OPENED, &r);
            if (rc == 0 && cr_uint(&r, &handle) < 0) {
                errno = EIO;
                rc = -1;
            }
            if (rc == 0) {
                w = conn_begin(c, kind, 2);
                cw_uint(w, handle);
                cw_uint(w, arg);
                rc = conn_call(c, M_OK, &r);
                int saved = errno;
                w = conn_begin(c, M_FILE_CLOSE, 1);
                cw_uint(w, handle);
                (void)conn_call(c, M_OK, &r);
                errno = saved;
            }
            conn_release(c);
        }
        *ret = rc;
    }
    t_guard--;
    return R_DONE;
}

HOOK int truncate(const char *path, off_t len) {
    int ret;
    if (len >= 0 && path_via_handle(path, O_WRONLY, M_FTRUNCATE, (uint64_t)len, &ret) == R_DONE) {
        return ret;
    }
    return REAL(truncate)(path, len);
}

HOOK int truncate64(const char *path, off64_t len) {
    int ret;
    if (len >= 0 && path_via_handle(path, O_WRONLY, M_FTRUNCATE, (uint64_t)len, &ret) == R_DONE) {
        return ret;
    }
    return REAL(truncate64)(path, len);
}

HOOK int chmod(const char *path, mode_t mode) {
    int ret;
    if (path_via_handle(path, O_RDONLY, M_FCHMOD, mode, &ret) == R_DONE) {
        return ret;
    }
    return REAL(chmod)(path, mode);
}

/* Extended attributes have no message in the protocol: on a remote path or fd they are
 * "not supported", which copy tools (shutil, cp --preserve) treat as nothing to copy. */
/* R_BYPASS sets *path to the name of the local call (mapped into buf, PATH_CAP). */
static int xattr_path_remote(const char **path, char *buf, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int saved = errno;
    int d = decide(AT_FDCWD, *path, 0, full, sizeof full);
    errno = saved;
    if (d == P_LOCAL) {
        *path = local_name(*path, NULL, buf);
        return R_BYPASS;
    }
    errno = d == P_NOT_FOUND ? ENOENT : ENOTSUP;
    *ret = -1;
    return R_DONE;
}

static int xattr_fd_remote(int fd, int *ret) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {
        return R_BYPASS;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    ent_put(e);
    errno = ENOTSUP;
    *ret = -1;
    return R_DONE;
}

HOOK ssize_t getxattr(const char *path, const char *name, void *value, size_t size) {
    int ret;
    char buf[PATH_CAP];
    return xattr_path_remote(&path, buf, &ret) == R_DONE ? ret : REAL(getxattr)(path, name, value, size);
}
HOOK ssize_t lgetxattr(const char *path, const char *name, void *value, size_t size) {
    int ret;
    char buf[PATH_CAP];
    return xattr_path_remote(&path, buf, &ret) == R_DONE ? ret : REAL(lgetxattr)(path, name, value, size);
}
HOOK ssize_t fgetxattr(int fd, const char *name, void *value, size_t size) {
    int ret;
    return xattr_fd_remote(fd, &ret) == R_DONE ? ret : REAL(fgetxattr)(fd, name, value, size);
}
/* Setting one is refused too: libacl's acl_set_fd (cp -p's mode) would otherwise succeed on
 * the local placeholder and never fall back to fchmod. */
HOOK int setxattr(const char *path, const char *name, const void *value, size_t size, int flags) {
    int ret;
    char buf[PATH_CAP];
    return xattr_path_remote(&path, buf, &ret) == R_DONE ? ret : REAL(setxattr)(path, name, value, size, flags);
}
HOOK int lsetxattr(const char *path, const char *name, const void *value, size_t size, int flags) {
    int ret;
    char buf[PATH_CAP];
    return xattr_path_remote(&path, buf, &ret) == R_DONE ? ret : REAL(lsetxattr)(path, name, value, size, flags);
}
HOOK int fsetxattr(int fd, const char *name, const void *value, size_t size, int flags) {
    int ret;
    return xattr_fd_remote(fd, &ret) == R_DONE ? ret : REAL(fsetxattr)(fd, name, value, size, flags);
}
HOOK ssize_t listxattr(const char *path, char *list, size_t size) {
    int ret;
    char buf[PATH_CAP];
    return xattr_path_remote(&path, buf, &ret) == R_DONE ? ret : REAL(listxattr)(path, list, size);
}
HOOK ssize_t llistxattr(const char *path, char *list, size_t size) {
    int ret;
    char buf[PATH_CAP];
    return xattr_path_remote(&path, buf, &ret) == R_DONE ? ret : REAL(llistxattr)(path, list, size);
}
HOOK ssize_t flistxattr(int fd, char *list, size_t size) {
    int ret;
    return xattr_fd_remote(fd, &ret) == R_DONE ? ret : REAL(flistxattr)(fd, list, size);
}

/* ---------------------------------------------------------------- directories */

#define DIR_SLOTS 512
#define DIR_MAGIC 0x6d6972726f726444ULL
#define DIR_BATCH 256

struct rdir {
    uint64_t magic;
    int used;
    int fd; /* placeholder fd for dirfd(); owned */
    uint64_t handle;
    int eof;
    int n, pos;
    long consumed; /* entries returned so far: telldir's position */
    char *path;    /* for rewinddir (a fresh DirOpen) */
    struct dirent64 *ents;
};

static struct rdir *g_dirs;
static pthread_mutex_t g_dirs_lock = PTHREAD_MUTEX_INITIALIZER;

void files_after_fork_child(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    g_dirs_lock = fresh;
    g_vcwd_lock = fresh;
}

/* ---------------------------------------------------------------- working directory */

HOOK int chdir(const char *path) {
    if (!g_active || t_guard) {
        return REAL(chdir)(path);
    }
    char full[PATH_CAP];
    int saved = errno;
    int d = decide(AT_FDCWD, path, 0, full, sizeof full);
    if (d == P_LOCAL) {
        errno = saved;
        int r = REAL(chdir)(local_name(path, NULL, full));
        if (r == 0) {
            files_set_vcwd(NULL);
        }
        return r;
    }
    if (d == P_NOT_FOUND) {
        errno = ENOENT;
        return -1;
    }
    normalize_path(full);
    struct stat st;
    t_guard++;
    int r = rstat(full, 0, 0, 1, &st);
    t_guard--;
    if (r == 0 && !S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        r = -1;
    }
    if (r == 0) {
        files_set_vcwd(full);
        DBG("working directory %s is remote", full);
    }
    return r;
}

HOOK int fchdir(int fd) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {
        int r = REAL(fchdir)(fd);
        if (r == 0 && g_active && !t_guard) {
            files_set_vcwd(NULL);
        }
        return r;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(fchdir)(fd);
    }
    int r = 0;
    if (!e->is_dir || e->path == NULL) {
        errno = ENOTDIR;
        r = -1;
    } else {
        files_set_vcwd(e->path);
    }
    ent_put(e);
    return r;
}

HOOK char *getcwd(char *buf, size_t size) {
    char v[PATH_CAP];
    if (!g_active || t_guard || !files_get_vcwd(v, sizeof v)) {
        return REAL(getcwd)(buf, size);
    }
    size_t need = strlen(v) + 1;
    if (buf == NULL) {
        buf = malloc(size > need ? size : need);
        if (buf == NULL) {
            errno = ENOMEM;
            return NULL;
        }
    } else if (size < need) {
        errno = size == 0 ? EINVAL : ERANGE;
        return NULL;
    }
    memcpy(buf, v, need);
    return buf;
}

static struct rdir *rdir_of(void *d) {
    struct rdir *base = __atomic_load_n(&g_dirs, __ATOMIC_ACQUIRE);
    if (base == NULL || (uintptr_t)d < (uintptr_t)base ||
        (uintptr_t)d >= (uintptr_t)(base + DIR_SLOTS)) {
        return NULL;
    }
    struct rdir *r = d;
    return r->magic == DIR_MAGIC && r->used ? r : NULL;
}

static struct rdir *rdir_alloc(void) {
    pthread_mutex_lock(&g_dirs_lock);
    if (g_dirs == NULL) {
        void *m = mmap(NULL, sizeof(struct rdir) * DIR_SLOTS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m != MAP_FAILED) {
            __atomic_store_n(&g_dirs, (struct rdir *)m, __ATOMIC_RELEASE);
        }
    }
    struct rdir *r = NULL;
    for (int i = 0; g_dirs != NULL && i < DIR_SLOTS; i++) {
        if (!g_dirs[i].used) {
            r = &g_dirs[i];
            memset(r, 0, sizeof *r);
            r->magic = DIR_MAGIC;
            r->used = 1;
            r->fd = -1;
            break;
        }
    }
    pthread_mutex_unlock(&g_dirs_lock);
    if (r == NULL) {
        errno = EMFILE;
    }
    return r;
}

static void rdir_free(struct rdir *r) {
    free(r->ents);
    free(r->path);
    pthread_mutex_lock(&g_dirs_lock);
    r->used = 0;
    r->magic = 0;
    pthread_mutex_unlock(&g_dirs_lock);
}

/* DirOpen by path or by the handle of an open file; returns our DIR or NULL. */
static DIR *rdir_open(const char *path, int has_handle, uint64_t handle, int fd) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return NULL;
    }
    cbor_w *w = conn_begin(c, M_DIR_OPEN, 2);
    if (has_handle) {
        cw_null(w);
        cw_uint(w, handle);
    } else {
        cw_bytes(w, path, strlen(path));
        cw_null(w);
    }
    cbor_r r;
    uint64_t h = 0;
    int rc = conn_call(c, M_DIR_OPENED, &r);
    if (rc == 0 && cr_uint(&r, &h) < 0) {
        errno = EIO;
        rc = -1;
    }
    conn_release(c);
    if (rc < 0) {
        return NULL;
    }
    struct rdir *d = rdir_alloc();
    if (d == NULL) {
        return NULL;
    }
    d->handle = h;
    d->path = path ? strdup(path) : NULL;
    if (fd < 0) {
        /* a placeholder fd so dirfd()/fstat()/openat() work on the directory */
        fd = memfd_create("mirrord:dir", MFD_CLOEXEC);
        struct ent *e = fd >= 0 ? ent_new(K_RFILE) : NULL;
        if (e != NULL) {
            e->path = strdup(path);
            e->is_dir = 1;
            e->oflags = O_RDONLY | O_DIRECTORY;
            fd_set_ent(fd, e);
        }
    }
    d->fd = fd;
    DBG("opendir %s remotely", path ? path : "(fd)");
    return (DIR *)d;
}

HOOK DIR *opendir(const char *path) {
    if (!g_active || t_guard) {
        return REAL(opendir)(path);
    }
    char full[PATH_CAP];
    int saved = errno;
    int d = decide(AT_FDCWD, path, 0, full, sizeof full);
    if (d == P_LOCAL) {
        errno = saved;
        return REAL(opendir)(local_name(path, NULL, full));
    }
    if (d == P_NOT_FOUND) {
        errno = ENOENT;
        return NULL;
    }
    t_guard++;
    DIR *r = rdir_open(full, 0, 0, -1);
    t_guard--;
    return r;
}

HOOK DIR *fdopendir(int fd) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {
        return REAL(fdopendir)(fd);
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(fdopendir)(fd);
    }
    DIR *r = NULL;
    t_guard++;
    if (!e->is_dir) {
        errno = ENOTDIR;
    } else {
        r = rdir_open(e->path, e->has_handle, e->handle, fd);
    }
    t_guard--;
    ent_put(e);
    return r;
}

static struct dirent64 *rdir_next(struct rdir *d) {
    if (d->pos < d->n) {
        d->consumed++;
        return &d->ents[d->pos++];
    }
    if (d->eof) {
        return NULL;
    }
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return NULL; /* errno EIO: readdir reports an error with NULL and errno set */
    }
    cbor_w *w = conn_begin(c, M_DIR_READ, 2);
    cw_uint(w, d->handle);
    cw_uint(w, DIR_BATCH);
    cbor_r r;
    struct dirent64 *out = NULL;
    if (conn_call(c, M_DIR_ENTRIES, &r) == 0) {
        uint64_t n;
        if (cr_array(&r, &n) < 0 || n > 4096) {
            errno = EIO;
        } else if (n == 0) {
            d->eof = 1;
        } else {
            struct dirent64 *ents = realloc(d->ents, sizeof *ents * n);
            if (ents == NULL) {
                errno = ENOMEM;
            } else {
                d->ents = ents;
                d->n = 0;
                d->pos = 0;
                for (uint64_t i = 0; i < n; i++) {
                    uint64_t k, ino, type;
                    struct dirent64 *de = &ents[d->n];
                    memset(de, 0, sizeof *de);
                    if (cr_array(&r, &k) < 0 || k != 3 ||
                        cr_strbuf(&r, de->d_name, sizeof de->d_name) < 0 ||
                        cr_uint(&r, &ino) < 0 || cr_uint(&r, &type) < 0) {
                        errno = EIO;
                        d->n = 0;
                        break;
                    }
                    de->d_ino = ino;
                    de->d_type = (unsigned char)type;
                    de->d_reclen = sizeof *de;
                    de->d_off = d->n + 1;
                    d->n++;
                }
                if (d->n > 0) {
                    out = &d->ents[d->pos++];
                    d->consumed++;
                }
            }
        }
    }
    conn_release(c);
    return out;
}

HOOK struct dirent *readdir(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(readdir)(dirp);
    }
    t_guard++;
    struct dirent64 *e = rdir_next(d);
    t_guard--;
    return (struct dirent *)e;
}

HOOK struct dirent64 *readdir64(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(readdir64)(dirp);
    }
    t_guard++;
    struct dirent64 *e = rdir_next(d);
    t_guard--;
    return e;
}

HOOK int closedir(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(closedir)(dirp);
    }
    t_guard++;
    struct lconn *c = conn_acquire();
    if (c != NULL) {
        cbor_w *w = conn_begin(c, M_DIR_CLOSE, 1);
        cw_uint(w, d->handle);
        cbor_r r;
        (void)conn_call(c, M_OK, &r);
        conn_release(c);
    }
    if (d->fd >= 0) {
        struct ent *e = fd_take(d->fd);
        REAL(close)(d->fd);
        ent_put(e);
    }
    t_guard--;
    rdir_free(d);
    return 0;
}

/* Start over: a fresh remote listing (a directory handle only reads forward). */
static void rdir_rewind(struct rdir *d) {
    if (d->path == NULL) {
        return; /* from fdopendir on a handle: cannot reopen, stays where it is */
    }
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return;
    }
    cbor_w *w = conn_begin(c, M_DIR_CLOSE, 1);
    cw_uint(w, d->handle);
    cbor_r r;
    (void)conn_call(c, M_OK, &r);
    w = conn_begin(c, M_DIR_OPEN, 2);
    cw_bytes(w, d->path, strlen(d->path));
    cw_null(w);
    uint64_t h;
    if (conn_call(c, M_DIR_OPENED, &r) == 0 && cr_uint(&r, &h) == 0) {
        d->handle = h;
        d->n = d->pos = 0;
        d->eof = 0;
        d->consumed = 0;
    }
    conn_release(c);
}

HOOK void rewinddir(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        REAL(rewinddir)(dirp);
        return;
    }
    int saved = errno;
    t_guard++;
    rdir_rewind(d);
    t_guard--;
    errno = saved;
}

HOOK long telldir(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    return d == NULL ? REAL(telldir)(dirp) : d->consumed;
}

HOOK void seekdir(DIR *dirp, long loc) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        REAL(seekdir)(dirp, loc);
        return;
    }
    int saved = errno;
    t_guard++;
    if (loc < d->consumed) {
        rdir_rewind(d);
    }
    while (d->consumed < loc && rdir_next(d) != NULL) {
    }
    t_guard--;
    errno = saved;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
HOOK int readdir_r(DIR *dirp, struct dirent *entry, struct dirent **result) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(readdir_r)(dirp, entry, result);
    }
    int saved = errno;
    errno = 0;
    t_guard++;
    struct dirent64 *e = rdir_next(d);
    t_guard--;
    int err = errno;
    errno = saved;
    if (e == NULL) {
        *result = NULL;
        return err;
    }
    memcpy(entry, e, sizeof *entry);
    *result = entry;
    return 0;
}

HOOK int readdir64_r(DIR *dirp, struct dirent64 *entry, struct dirent64 **result) {
    if (rdir_of(dirp) == NULL) {
        return REAL(readdir64_r)(dirp, entry, result);
    }
    return readdir_r(dirp, (struct dirent *)entry, (struct dirent **)result);
}
#pragma GCC diagnostic pop

/* scandir (libuv's fs.readdir, many C programs) opens the directory inside libc: for a
 * remote directory, list it through the hooked opendir/readdir instead. */
typedef int (*dirent_cmp)(const struct dirent **, const struct dirent **);
static LAYER_TLS dirent_cmp t_scandir_cmp;

static int scandir_qsort_cmp(const void *a, const void *b) {
    return t_scandir_cmp((const struct dirent **)a, (const struct dirent **)b);
}

static int scandir_remote(const char *dir, struct dirent ***namelist,
                          int (*filter)(const struct dirent *), dirent_cmp compar, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int saved = errno;
    int d = decide(AT_FDCWD, dir, 0, full, sizeof full);
    errno = saved;
    if (d == P_LOCAL && t_local_mapped != NULL) { /* local, under its mapped name */
        *ret = REAL(scandir)(local_name(dir, NULL, full), namelist, filter, compar);
        return R_DONE;
    }
    if (d == P_LOCAL) {
        return R_BYPASS;
    }
    *ret = -1;
    if (d == P_NOT_FOUND) {
        errno = ENOENT;
        return R_DONE;
    }
    DIR *dp = opendir(full);
    if (dp == NULL) {
        return R_DONE;
    }
    struct dirent **list = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(dp)) != NULL) {
        if (filter != NULL && !filter(e)) {
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            struct dirent **grown = realloc(list, cap * sizeof *list);
            if (grown == NULL) {
                break;
            }
            list = grown;
        }
        struct dirent *copy = malloc(sizeof *copy);
        if (copy == NULL) {
            break;
        }
        memcpy(copy, e, sizeof *copy);
        list[n++] = copy;
        errno = 0;
    }
    int err = errno;
    closedir(dp);
    if (err != 0) {
        for (size_t i = 0; i < n; i++) {
            free(list[i]);
        }
        free(list);
        errno = err;
        return R_DONE;
    }
    if (compar != NULL && n > 1) {
        dirent_cmp outer = t_scandir_cmp; /* a comparator may scandir too */
        t_scandir_cmp = compar;
        qsort(list, n, sizeof *list, scandir_qsort_cmp);
        t_scandir_cmp = outer;
    }
    *namelist = list;
    *ret = (int)n;
    errno = saved;
    return R_DONE;
}

HOOK int scandir(const char *dir, struct dirent ***namelist, int (*filter)(const struct dirent *),
                 int (*compar)(const struct dirent **, const struct dirent **)) {
    int ret;
    if (scandir_remote(dir, namelist, filter, compar, &ret) == R_DONE) {
        return ret;
    }
    return REAL(scandir)(dir, namelist, filter, compar);
}

/* struct dirent64 and struct dirent share their layout on 64-bit Linux */
HOOK int scandir64(const char *dir, struct dirent64 ***namelist,
                   int (*filter)(const struct dirent64 *),
                   int (*compar)(const struct dirent64 **, const struct dirent64 **)) {
    int ret;
    union {
        int (*f64)(const struct dirent64 *);
        int (*f)(const struct dirent *);
    } f = {.f64 = filter};
    union {
        int (*c64)(const struct dirent64 **, const struct dirent64 **);
        dirent_cmp c;
    } c = {.c64 = compar};
    if (scandir_remote(dir, (struct dirent ***)namelist, f.f, c.c, &ret) == R_DONE) {
        return ret;
    }
    return REAL(scandir64)(dir, namelist, filter, compar);
}

HOOK int dirfd(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(dirfd)(dirp);
    }
    return d->fd;
}

/* ---------------------------------------------------------------- stdio */

static int fopen_flags(const char *mode, int *flags) {
    int f;
    switch (mode[0]) {
    case 'r': f = O_RDONLY; break;
    case 'w': f = O_WRONLY | O_CREAT | O_TRUNC; break;
    case 'a': f = O_WRONLY | O_CREAT | O_APPEND; break;
    default: return -1;
    }
    for (const char *m = mode + 1; *m && *m != ','; m++) {
        if (*m == '+') {
            f = (f & ~O_ACCMODE) | O_RDWR;
        } else if (*m == 'e') {
            f |= O_CLOEXEC;
        } else if (*m == 'x') {
            f |= O_EXCL;
        }
    }
    *flags = f;
    return 0;
}

/* A stdio stream over a handle-backed fd: glibc's stdio calls its internal read/write,
 * which no hook sees, so the stream's I/O goes through these cookie functions. */
static ssize_t cookie_read(void *ck, char *buf, size_t n) { return read((int)(intptr_t)ck, buf, n); }
static ssize_t cookie_write(void *ck, const char *buf, size_t n) {
    return write((int)(intptr_t)ck, buf, n);
}
static int cookie_seek(void *ck, off64_t *pos, int whence) {
    off64_t r = lseek64((int)(intptr_t)ck, *pos, whence);
    if (r < 0) {
        return -1;
    }
    *pos = r;
    return 0;
}
static int cookie_close(void *ck) { return close((int)(intptr_t)ck); }

static FILE *stream_for(int fd, const char *mode) {
    struct ent *pe = fd_peek(fd);
    FILE *f;
    /* handle-backed and write-back files: stdio's internal read/write/close would miss the
     * hooks (and the write-back on close), so the stream calls them through a cookie */
    if (pe != NULL && (pe->kind == K_RFILE || (pe->kind == K_MFILE && pe->writeback))) {
        cookie_io_functions_t io = {cookie_read, cookie_write, cookie_seek, cookie_close};
        f = fopencookie((void *)(intptr_t)fd, mode, io);
    } else {
        f = REAL(fdopen)(fd, mode);
    }
    if (f == NULL) {
        int e = errno;
        close(fd);
        errno = e;
    }
    return f;
}

static int fopen_common(const char *path, const char *mode, FILE **ret) {
    if (!g_active || t_guard || path == NULL || mode == NULL) {
        return R_BYPASS;
    }
    int flags;
    if (fopen_flags(mode, &flags) < 0) {
        return R_BYPASS; /* the real call reports EINVAL */
    }
    int fd;
    int saved = errno;
    if (do_open(AT_FDCWD, path, flags, 0666, &fd) == R_BYPASS) {
        errno = saved;
        return R_BYPASS;
    }
    *ret = fd < 0 ? NULL : stream_for(fd, mode);
    return R_DONE;
}

HOOK FILE *fopen(const char *path, const char *mode) {
    FILE *f;
    return fopen_common(path, mode, &f) == R_DONE ? f : REAL(fopen)(path, mode);
}

HOOK FILE *fopen64(const char *path, const char *mode) {
    FILE *f;
    return fopen_common(path, mode, &f) == R_DONE ? f : REAL(fopen64)(path, mode);
}

static int freopen_common(const char *path, const char *mode, FILE *stream, FILE **ret,
                          int is64) {
    if (!g_active || t_guard || path == NULL || mode == NULL) {
        return R_BYPASS;
    }
    int flags;
    if (fopen_flags(mode, &flags) < 0) {
        return R_BYPASS;
    }
    int fd;
    int saved = errno;
    if (do_open_ex(AT_FDCWD, path, flags, 0666, &fd, 0) == R_BYPASS) {
        errno = saved;
        if (t_local_mapped != NULL) { /* local, under its mapped name */
            char name[PATH_CAP];
            const char *p = local_name(path, NULL, name);
            *ret = is64 ? REAL(freopen64)(p, mode, stream) : REAL(freopen)(p, mode, stream);
            return R_DONE;
        }
        return R_BYPASS;
    }
    if (fd < 0) {
        *ret = NULL;
        return R_DONE;
    }
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_MFILE) {
        /* a handle-backed stream cannot take over an existing FILE */
        close(fd);
        errno = ENOTSUP;
        *ret = NULL;
        return R_DONE;
    }
    /* reopen the fetched content under the same FILE through /proc/self/fd */
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    /* "w" would truncate the cache through the reopen: the remote open already did */
    const char *reopen_mode = mode[0] == 'w' ? "r+" : mode;
    t_guard++;
    *ret = is64 ? REAL(freopen64)(proc, reopen_mode, stream) : REAL(freopen)(proc, reopen_mode, stream);
    t_guard--;
    if (*ret != NULL) {
        int nfd = fileno(*ret);
        struct ent *e = ent_get(fd);
        if (e != NULL && nfd >= 0 && nfd != fd) {
            fd_set_ent(nfd, e);
        } else {
            ent_put(e);
        }
    }
    close(fd);
    return R_DONE;
}

HOOK FILE *freopen(const char *path, const char *mode, FILE *stream) {
    FILE *f;
    if (freopen_common(path, mode, stream, &f, 0) == R_DONE) {
        return f;
    }
    return REAL(freopen)(path, mode, stream);
}

HOOK FILE *freopen64(const char *path, const char *mode, FILE *stream) {
    FILE *f;
    if (freopen_common(path, mode, stream, &f, 1) == R_DONE) {
        return f;
    }
    return REAL(freopen64)(path, mode, stream);
}

/* ---------------------------------------------------------------- calls that bypassed the hooks
 *
 * Found by running real programs against a pod: libuv (node) issues close, statx and
 * copy_file_range through syscall(); glibc's realpath, mkstemp and mkdtemp reach the file
 * system through internal calls no hook sees; mmap of a handle-backed file mapped the empty
 * placeholder (SIGBUS on the first access). */

/* syscall(): the file calls libuv makes this way (close, statx, copy_file_range) go through
 * their hooks; every other number is passed on unchanged. Six arguments are read as the
 * kernel ABI has at most six (what glibc's own syscall() does too). */
HOOK long syscall(long n, ...) {
    va_list ap;
    va_start(ap, n);
    long a0 = va_arg(ap, long), a1 = va_arg(ap, long), a2 = va_arg(ap, long);
    long a3 = va_arg(ap, long), a4 = va_arg(ap, long), a5 = va_arg(ap, long);
    va_end(ap);
    if (g_active && !t_guard) {
        if (n == SYS_close) {
            return close((int)a0); /* a write-back file is written back at its close */
        }
        if (n == SYS_statx) {
            return statx((int)a0, (const char *)a1, (int)a2, (unsigned)a3, (struct statx *)a4);
        }
        if (n == SYS_copy_file_range) {
            return copy_file_range((int)a0, (off64_t *)a1, (int)a2, (off64_t *)a3, (size_t)a4,
                                   (unsigned)a5);
        }
    }
    return REAL(syscall)(n, a0, a1, a2, a3, a4, a5);
}

HOOK int fdatasync(int fd) {
    int ret;
    return handle_op(fd, M_FSYNC, 0, &ret) == R_DONE ? ret : REAL(fdatasync)(fd);
}

/* preadv/pwritev on a handle-backed file: the vectors in order at `off`, stopping at a short
 * transfer. Drops the caller's reference to e. */
static ssize_t rfile_piov(struct ent *e, const struct iovec *iov, int cnt, off_t off, int write) {
    ssize_t total = 0;
    t_guard++;
    if (off < 0 || cnt < 0) {
        errno = EINVAL;
        total = -1;
    }
    for (int i = 0; total >= 0 && i < cnt; i++) {
        size_t done = 0;
        while (done < iov[i].iov_len) {
            char *base = (char *)iov[i].iov_base + done;
            size_t want = iov[i].iov_len - done;
            ssize_t r = write ? rfile_write(e, base, want, off + total)
                              : rfile_read(e, base, want, off + total);
            if (r < 0) {
                total = total ? total : -1;
                goto out;
            }
            total += r;
            done += (size_t)r;
            if (r == 0) {
                goto out;
            }
        }
    }
out:
    t_guard--;
    ent_put(e);
    return total;
}

#define PREADV_HOOK(name, offtype)                                                   \
    HOOK ssize_t name(int fd, const struct iovec *iov, int cnt, offtype off) {       \
        RFILE_OR_BYPASS(fd, REAL(name)(fd, iov, cnt, off))                           \
        if (pe->kind == K_MFILE) {                                                   \
            return mfile_writeonly(fd, pe) ? -1 : REAL(name)(fd, iov, cnt, off);     \
        }                                                                            \
        struct ent *e = ent_get(fd);                                                 \
        if (e == NULL) {                                                             \
            return REAL(name)(fd, iov, cnt, off);                                    \
        }                                                                            \
        return rfile_piov(e, iov, cnt, (off_t)off, 0);                               \
    }
#define PWRITEV_HOOK(name, offtype)                                                  \
    HOOK ssize_t name(int fd, const struct iovec *iov, int cnt, offtype off) {       \
        RFILE_OR_BYPASS(fd, REAL(name)(fd, iov, cnt, off))                           \
        switch (mfile_readonly(fd, pe)) {                                            \
        case 1: return -1;                                                           \
        case 2: return REAL(name)(fd, iov, cnt, off);                                \
        }                                                                            \
        struct ent *e = ent_get(fd);                                                 \
        if (e == NULL) {                                                             \
            return REAL(name)(fd, iov, cnt, off);                                    \
        }                                                                            \
        return rfile_piov(e, iov, cnt, (off_t)off, 1);                               \
    }
PREADV_HOOK(preadv, off_t)
PREADV_HOOK(preadv64, off64_t)
PWRITEV_HOOK(pwritev, off_t)
PWRITEV_HOOK(pwritev64, off64_t)

/* mmap of a handle-backed file (bigger than fetch_limit): its placeholder memfd is filled
 * with the remote content first, so the mapping shows the file (once per open file: a filled
 * placeholder is not fetched again). Writes through a shared mapping stay in the memfd. */
static void rfile_fill_placeholder(int fd) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return;
    }
    struct stat rst, lst;
    t_guard++;
    if (e->kind == K_RFILE && e->has_handle && !e->is_dir && S_ISREG(e->st.st_mode) &&
        REAL(fstat)(fd, &lst) == 0 && lst.st_size == 0 &&
        rstat(NULL, 1, e->handle, 1, &rst) == 0 && rst.st_size > 0) {
        char *buf = malloc(MAX_DATA_CHUNK);
        off_t off = 0;
        while (buf != NULL && off < rst.st_size) {
            ssize_t n = rfile_read_chunk(e->handle, buf, MAX_DATA_CHUNK, off);
            if (n <= 0 || REAL(pwrite)(fd, buf, (size_t)n, off) != n) {
                break;
            }
            off += n;
        }
        free(buf);
        DBG("mmap of %s: %lld bytes fetched into its placeholder", e->path ? e->path : "?",
            (long long)off);
    }
    t_guard--;
    ent_put(e);
}

HOOK void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    struct ent *pe = fd_peek(fd);
    if (__builtin_expect(pe != NULL, 0) && !(flags & MAP_ANONYMOUS) && !t_guard &&
        pe->kind == K_RFILE) {
        rfile_fill_placeholder(fd);
    }
    return REAL(mmap)(addr, len, prot, flags, fd, off);
}

HOOK void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    struct ent *pe = fd_peek(fd);
    if (__builtin_expect(pe != NULL, 0) && !(flags & MAP_ANONYMOUS) && !t_guard &&
        pe->kind == K_RFILE) {
        rfile_fill_placeholder(fd);
    }
    return REAL(mmap64)(addr, len, prot, flags, fd, off);
}

/* mkstemp family and mkdtemp on a remote template: glibc creates the file with an internal
 * open no hook sees, so the layer picks the names itself and creates them through its own
 * open/mkdir hooks (O_EXCL: an existing name is tried again). */
static int tmpl_remote(const char *tmpl) {
    char full[PATH_CAP];
    t_local_mapped = NULL; /* no stale name when decide() is not reached */
    return g_active && !t_guard && tmpl != NULL && decide(AT_FDCWD, tmpl, 1, full, sizeof full) != P_LOCAL;
}

/* A local template that feature.fs.mapping rewrote is made under the mapped name (in `mapped`,
 * filled by the real call); the letters it chose are written back into the app's template. */
static void tmpl_copy_back(char *tmpl, const char *mapped, int suffixlen) {
    size_t k = 6 + (size_t)(suffixlen > 0 ? suffixlen : 0), n = strlen(tmpl), m = strlen(mapped);
    if (n >= k && m >= k) {
        memcpy(tmpl + n - k, mapped + m - k, 6);
    }
}

/* Fills the 6 X's before the suffix with random letters and digits; -1 (EINVAL) if the
 * template does not have them. */
static int tmpl_fill(char *tmpl, int suffixlen) {
    static const char chars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    size_t len = strlen(tmpl);
    if (suffixlen < 0 || len < 6 + (size_t)suffixlen) {
        errno = EINVAL;
        return -1;
    }
    char *x = tmpl + len - suffixlen - 6;
    unsigned char rnd[6];
    static LAYER_TLS uint64_t state;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    state ^= (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)&ts;
    for (int i = 0; i < 6; i++) {
        if (x[i] != 'X') {
            errno = EINVAL;
            return -1;
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        rnd[i] = (unsigned char)(state >> 24);
    }
    for (int i = 0; i < 6; i++) {
        x[i] = chars[rnd[i] % (sizeof chars - 1)];
    }
    return 0;
}

static int mkstemp_remote(char *tmpl, int suffixlen, int flags) {
    size_t len = strlen(tmpl);
    char *x = len >= 6 + (size_t)(suffixlen < 0 ? 0 : suffixlen) ? tmpl + len - suffixlen - 6 : NULL;
    for (int attempt = 0; attempt < 100; attempt++) {
        if (x != NULL) {
            memset(x, 'X', 6); /* a failed attempt's name: fill it afresh */
        }
        if (tmpl_fill(tmpl, suffixlen) < 0) {
            return -1;
        }
        int fd = open(tmpl, (flags & ~O_ACCMODE) | O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd >= 0 || errno != EEXIST) {
            return fd;
        }
    }
    errno = EEXIST;
    return -1;
}

#define MKSTEMP_HOOK(name, params, args, suffixlen, flags)                   \
    HOOK int name params {                                                   \
        if (tmpl_remote(tmpl)) {                                             \
            return mkstemp_remote(tmpl, suffixlen, flags);                   \
        }                                                                    \
        if (t_local_mapped != NULL) {                                        \
            char mapped[PATH_CAP];                                           \
            char *app_tmpl = tmpl;                                           \
            tmpl = (char *)local_name(tmpl, NULL, mapped);                   \
            int fd = REAL(name) args;                                        \
            tmpl = app_tmpl;                                                 \
            if (fd >= 0) {                                                   \
                tmpl_copy_back(tmpl, mapped, suffixlen);                     \
            }                                                                \
            return local_fd(fd);                                             \
        }                                                                    \
        return REAL(name) args;                                              \
    }
MKSTEMP_HOOK(mkstemp, (char *tmpl), (tmpl), 0, 0)
MKSTEMP_HOOK(mkstemp64, (char *tmpl), (tmpl), 0, 0)
MKSTEMP_HOOK(mkostemp, (char *tmpl, int flags), (tmpl, flags), 0, flags)
MKSTEMP_HOOK(mkostemp64, (char *tmpl, int flags), (tmpl, flags), 0, flags)
MKSTEMP_HOOK(mkstemps, (char *tmpl, int suffixlen), (tmpl, suffixlen), suffixlen, 0)
MKSTEMP_HOOK(mkstemps64, (char *tmpl, int suffixlen), (tmpl, suffixlen), suffixlen, 0)
MKSTEMP_HOOK(mkostemps, (char *tmpl, int suffixlen, int flags), (tmpl, suffixlen, flags), suffixlen, flags)
MKSTEMP_HOOK(mkostemps64, (char *tmpl, int suffixlen, int flags), (tmpl, suffixlen, flags), suffixlen, flags)

HOOK char *mkdtemp(char *tmpl) {
    if (!tmpl_remote(tmpl)) {
        if (t_local_mapped != NULL) { /* local, under its mapped name */
            char mapped[PATH_CAP];
            local_name(tmpl, NULL, mapped);
            if (REAL(mkdtemp)(mapped) == NULL) {
                return NULL;
            }
            tmpl_copy_back(tmpl, mapped, 0);
            return tmpl;
        }
        return REAL(mkdtemp)(tmpl);
    }
    size_t len = strlen(tmpl);
    for (int attempt = 0; attempt < 100; attempt++) {
        if (len >= 6) {
            memset(tmpl + len - 6, 'X', 6);
        }
        if (tmpl_fill(tmpl, 0) < 0) {
            return NULL;
        }
        if (mkdir(tmpl, 0700) == 0) {
            return tmpl;
        }
        if (errno != EEXIST) {
            return NULL;
        }
    }
    errno = EEXIST;
    return NULL;
}

/* realpath on a remote path: glibc resolves with internal lstat/readlink calls, so the layer
 * walks the components itself through its own lstat and readlink hooks (which decide per
 * prefix whether it is local or remote). Same results and errors as glibc: ENOENT,
 * ENOTDIR, ELOOP after 40 links, ENAMETOOLONG. */
static char *realpath_walk(const char *path, char *resolved) {
    char out[PATH_CAP], rest[PATH_CAP], link[PATH_CAP];
    if (path == NULL || path[0] == 0) {
        errno = path == NULL ? EINVAL : ENOENT;
        return NULL;
    }
    size_t n = 1;
    out[0] = '/';
    out[1] = 0;
    if (path[0] != '/') {
        if (getcwd(out, sizeof out) == NULL) {
            return NULL;
        }
        n = strlen(out);
    }
    if (strlen(path) >= sizeof rest) {
        errno = ENAMETOOLONG;
        return NULL;
    }
    strcpy(rest, path);
    char *p = rest;
    int links = 0;
    while (*p) {
        while (*p == '/') {
            p++;
        }
        char *seg = p;
        while (*p && *p != '/') {
            p++;
        }
        size_t k = (size_t)(p - seg);
        if (k == 0 || (k == 1 && seg[0] == '.')) {
            continue;
        }
        if (k == 2 && seg[0] == '.' && seg[1] == '.') {
            while (n > 1 && out[--n] != '/') {
            }
            out[n > 1 ? n : 1] = 0;
            n = n > 1 ? n : 1;
            continue;
        }
        if (n + 1 + k >= sizeof out) {
            errno = ENAMETOOLONG;
            return NULL;
        }
        size_t before = n;
        if (n > 1) {
            out[n++] = '/';
        }
        memcpy(out + n, seg, k);
        n += k;
        out[n] = 0;
        struct stat st;
        if (lstat(out, &st) < 0) {
            return NULL;
        }
        if (S_ISLNK(st.st_mode)) {
            if (++links > 40) {
                errno = ELOOP;
                return NULL;
            }
            ssize_t m = readlink(out, link, sizeof link - 1);
            if (m < 0) {
                return NULL;
            }
            link[m] = 0;
            if ((size_t)m + 1 + strlen(p) >= sizeof link) {
                errno = ENAMETOOLONG;
                return NULL;
            }
            strcat(link, p); /* the link's text, then what was left after it */
            strcpy(rest, link);
            p = rest;
            if (rest[0] == '/') {
                n = 1;
                out[1] = 0;
            } else {
                n = before > 1 ? before : 1;
                out[n] = 0;
            }
            continue;
        }
        if (!S_ISDIR(st.st_mode) && *p == '/') {
            errno = ENOTDIR; /* more components (or a trailing slash) after a non-directory */
            return NULL;
        }
    }
    size_t need = n + 1;
    if (resolved == NULL) {
        resolved = malloc(need);
        if (resolved == NULL) {
            errno = ENOMEM;
            return NULL;
        }
    } else if (need > PATH_MAX) {
        errno = ENAMETOOLONG;
        return NULL;
    }
    memcpy(resolved, out, need);
    return resolved;
}

/* 1 when remote; when local, *path becomes the name of the local call (mapped into buf). */
static int realpath_remote(const char **path, char *buf) {
    char full[PATH_CAP];
    if (!g_active || t_guard || *path == NULL || (*path)[0] == 0) {
        return 0;
    }
    if (decide(AT_FDCWD, *path, 0, full, sizeof full) != P_LOCAL) {
        return 1;
    }
    *path = local_name(*path, NULL, buf);
    return 0;
}

HOOK char *realpath(const char *path, char *resolved) {
    char buf[PATH_CAP];
    if (realpath_remote(&path, buf)) {
        return realpath_walk(path, resolved);
    }
    return REAL(realpath)(path, resolved);
}

HOOK char *canonicalize_file_name(const char *path) {
    char buf[PATH_CAP];
    if (realpath_remote(&path, buf)) {
        return realpath_walk(path, NULL);
    }
    return REAL(canonicalize_file_name)(path);
}

char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen);
HOOK char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen) {
    char buf[PATH_CAP];
    if (realpath_remote(&path, buf)) {
        if (resolved != NULL && resolvedlen < PATH_MAX) {
            abort(); /* what glibc's fortify check does (buffer overflow) */
        }
        return realpath_walk(path, resolved);
    }
    return REAL(realpath)(path, resolved);
}

/* ---------------------------------------------------------------- times and owners
 *
 * utimensat/futimens (and utimes, lutimes, futimes, utime through them) and
 * chown/lchown/fchown/fchownat send Utimens/Chown; fchmodat goes through chmod. Like
 * chmod, they modify: in read mode they stay local. `touch -d`, `cp -p`, `tar x`,
 * shutil.copy2/move and node's fs.utimes into a pod directory need them. */

#define NS_OMIT INT64_MIN

/* times[2] as nanoseconds: NULL or UTIME_NOW is this machine's clock, UTIME_OMIT is NS_OMIT. */
static void times_ns(const struct timespec *t, int64_t out[2]) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    for (int i = 0; i < 2; i++) {
        const struct timespec *s = t == NULL || t[i].tv_nsec == UTIME_NOW ? &now : &t[i];
        out[i] = t != NULL && t[i].tv_nsec == UTIME_OMIT
                     ? NS_OMIT
                     : (int64_t)s->tv_sec * 1000000000 + (int64_t)s->tv_nsec;
    }
}

/* Utimens (a, b = atime, mtime) or Chown (a, b = uid, gid) on a path or a handle. */
static int rattr(int kind, const char *path, uint64_t handle, int64_t a, int64_t b, int follow) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, kind, 5);
    if (path != NULL) {
        cw_bytes(w, path, strlen(path));
        cw_null(w);
    } else {
        cw_null(w);
        cw_uint(w, handle);
    }
    for (int i = 0; i < 2; i++) {
        int64_t v = i == 0 ? a : b;
        if (kind == M_UTIMENS && v == NS_OMIT) {
            cw_null(w);
        } else {
            cw_int(w, v);
        }
    }
    cw_bool(w, follow);
    cbor_r r;
    int rc = conn_call(c, M_OK, &r);
    conn_release(c);
    return rc;
}

/* On a remote fd: by handle, or by path for a fetched read-only file (no handle kept). A
 * write-back file is written back first (a later write-back would set its mtime again), and
 * its cache gets the same times so that it does not count as changed. */
static int attr_fd(int fd, int kind, int64_t a, int64_t b, const struct timespec *t, int *ret) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || (pe->kind != K_RFILE && pe->kind != K_MFILE)) {
        return R_BYPASS;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    t_guard++;
    int rc = 0;
    if (e->writeback) {
        rc = wfile_flush(e);
    }
    if (rc == 0) {
        if (e->has_handle) {
            rc = rattr(kind, NULL, e->handle, a, b, 1);
        } else if (e->path != NULL) {
            rc = rattr(kind, e->path, 0, a, b, 1);
        } else {
            errno = EBADF;
            rc = -1;
        }
    }
    if (rc == 0 && e->kind == K_MFILE && !e->writeback) {
        mfile_restat(e);
    }
    if (rc == 0 && e->writeback && kind == M_UTIMENS) {
        struct stat cst;
        REAL(futimens)(e->cache_fd, t);
        if (REAL(fstat)(e->cache_fd, &cst) == 0) {
            e->synced_mtim = cst.st_mtim;
        }
    }
    t_guard--;
    ent_put(e);
    *ret = rc;
    return R_DONE;
}

static int attr_path(int dirfd, const char *path, int kind, int64_t a, int64_t b, int flags,
                     const struct timespec *t, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    if (path == NULL || (path[0] == 0 && (flags & AT_EMPTY_PATH))) {
        return attr_fd(dirfd, kind, a, b, t, ret);
    }
    char full[PATH_CAP];
    int d = decide_hook(dirfd, path, 1, full, sizeof full, ret);
    if (d == R_BYPASS && t_local_mapped != NULL) { /* local, under its mapped name */
        const char *name = local_name(path, NULL, full);
        *ret = kind == M_UTIMENS ? REAL(utimensat)(AT_FDCWD, name, t, flags)
                                 : REAL(fchownat)(AT_FDCWD, name, (uid_t)a, (gid_t)b, flags);
        return R_DONE;
    }
    if (d != R_REMOTE) {
        return d;
    }
    t_guard++;
    *ret = rattr(kind, full, 0, a, b, !(flags & AT_SYMLINK_NOFOLLOW));
    t_guard--;
    return R_DONE;
}

HOOK int utimensat(int dirfd, const char *path, const struct timespec times[2], int flags) {
    int ret;
    int64_t ns[2];
    if (g_active && !t_guard) {
        times_ns(times, ns);
        if (attr_path(dirfd, path, M_UTIMENS, ns[0], ns[1], flags, times, &ret) == R_DONE) {
            return ret;
        }
    }
    return REAL(utimensat)(dirfd, path, times, flags);
}

HOOK int futimens(int fd, const struct timespec times[2]) {
    int ret;
    int64_t ns[2];
    if (fd_peek(fd) != NULL && g_active && !t_guard) {
        times_ns(times, ns);
        if (attr_fd(fd, M_UTIMENS, ns[0], ns[1], times, &ret) == R_DONE) {
            return ret;
        }
    }
    return REAL(futimens)(fd, times);
}

/* timeval[2] -> timespec[2]; NULL stays NULL (now). */
static const struct timespec *tv_to_ts(const struct timeval *tv, struct timespec ts[2]) {
    if (tv == NULL) {
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        ts[i].tv_sec = tv[i].tv_sec;
        ts[i].tv_nsec = tv[i].tv_usec * 1000;
    }
    return ts;
}

HOOK int utimes(const char *path, const struct timeval tv[2]) {
    struct timespec ts[2];
    return utimensat(AT_FDCWD, path, tv_to_ts(tv, ts), 0);
}

HOOK int lutimes(const char *path, const struct timeval tv[2]) {
    struct timespec ts[2];
    return utimensat(AT_FDCWD, path, tv_to_ts(tv, ts), AT_SYMLINK_NOFOLLOW);
}

HOOK int futimes(int fd, const struct timeval tv[2]) {
    struct timespec ts[2];
    return futimens(fd, tv_to_ts(tv, ts));
}

HOOK int utime(const char *path, const struct utimbuf *buf) {
    struct timespec ts[2];
    if (buf != NULL) {
        ts[0].tv_sec = buf->actime;
        ts[0].tv_nsec = 0;
        ts[1].tv_sec = buf->modtime;
        ts[1].tv_nsec = 0;
    }
    return utimensat(AT_FDCWD, path, buf != NULL ? ts : NULL, 0);
}

HOOK int fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags) {
    int ret;
    int64_t u = uid == (uid_t)-1 ? -1 : (int64_t)uid, g = gid == (gid_t)-1 ? -1 : (int64_t)gid;
    if (attr_path(dirfd, path, M_CHOWN, u, g, flags, NULL, &ret) == R_DONE) {
        return ret;
    }
    return REAL(fchownat)(dirfd, path, uid, gid, flags);
}

HOOK int chown(const char *path, uid_t uid, gid_t gid) {
    return fchownat(AT_FDCWD, path, uid, gid, 0);
}

HOOK int lchown(const char *path, uid_t uid, gid_t gid) {
    return fchownat(AT_FDCWD, path, uid, gid, AT_SYMLINK_NOFOLLOW);
}

HOOK int fchown(int fd, uid_t uid, gid_t gid) {
    int ret;
    int64_t u = uid == (uid_t)-1 ? -1 : (int64_t)uid, g = gid == (gid_t)-1 ? -1 : (int64_t)gid;
    if (attr_fd(fd, M_CHOWN, u, g, NULL, &ret) == R_DONE) {
        return ret;
    }
    return REAL(fchown)(fd, uid, gid);
}

/* fchmodat: the absolute remote path through chmod (which goes through a handle); a symlink
 * itself has no mode to change (EOPNOTSUPP, as Linux answers). */
HOOK int fchmodat(int dirfd, const char *path, mode_t mode, int flags) {
    if (g_active && !t_guard) {
        char full[PATH_CAP];
        int d = decide(dirfd, path, 1, full, sizeof full);
        if (d == P_NOT_FOUND) {
            errno = ENOENT;
            return -1;
        }
        if (d == P_REMOTE) {
            struct stat st;
            if ((flags & AT_SYMLINK_NOFOLLOW) && lstat(full, &st) == 0 && S_ISLNK(st.st_mode)) {
                errno = EOPNOTSUPP;
                return -1;
            }
            return chmod(full, mode);
        }
        if (t_local_mapped != NULL) { /* local, under its mapped name */
            return REAL(fchmodat)(AT_FDCWD, local_name(path, NULL, full), mode, flags);
        }
    }
    return REAL(fchmodat)(dirfd, path, mode, flags);
}

/* ---------------------------------------------------------------- links
 *
 * symlink/symlinkat send Symlink (the link's text as given) and link/linkat send Link; like
 * mkdir they modify, so in read mode they stay local. A link between this machine and the
 * target is EXDEV, as between two file systems. */


HOOK int symlinkat(const char *target, int dirfd, const char *path) {
    if (g_active && !t_guard) {
        char full[PATH_CAP];
        int saved = errno;
        int d = decide(dirfd, path, 1, full, sizeof full);
        if (d == P_NOT_FOUND) {
            errno = ENOENT;
            return -1;
        }
        if (d == P_REMOTE) {
            t_guard++;
            int rc = remote_two_paths(M_SYMLINK, target, full, -1);
            t_guard--;
            return rc;
        }
        errno = saved;
        if (t_local_mapped != NULL) { /* local, under its mapped name (the text stays as given) */
            return REAL(symlinkat)(target, AT_FDCWD, local_name(path, NULL, full));
        }
    }
    return REAL(symlinkat)(target, dirfd, path);
}

HOOK int symlink(const char *target, const char *path) {
    return symlinkat(target, AT_FDCWD, path);
}

HOOK int linkat(int olddir, const char *old, int newdir, const char *new, int flags) {
    if (g_active && !t_guard && !(flags & AT_EMPTY_PATH)) {
        char a[PATH_CAP], b[PATH_CAP];
        int saved = errno;
        int da = decide(olddir, old, 1, a, sizeof a);
        old = local_name(old, &olddir, a); /* a holds no remote path unless da is remote */
        int db = decide(newdir, new, 1, b, sizeof b);
        new = local_name(new, &newdir, b);
        if (da != P_LOCAL || db != P_LOCAL) {
            if (da == P_NOT_FOUND || db == P_NOT_FOUND) {
                errno = ENOENT;
                return -1;
            }
            if (da != db) {
                errno = EXDEV;
                return -1;
            }
            t_guard++;
            int rc = remote_two_paths(M_LINK, a, b, ((flags & AT_SYMLINK_FOLLOW) != 0));
            t_guard--;
            return rc;
        }
        errno = saved;
    }
    return REAL(linkat)(olddir, old, newdir, new, flags);
}

HOOK int link(const char *old, const char *new) {
    return linkat(AT_FDCWD, old, AT_FDCWD, new, 0);
}

/* ---------------------------------------------------------------- remote fds across exec
 *
 * `cmd > /app/out` (the shell opens the file, dup2s it to 1, execs cmd) and `cmd < big`: the
 * new image must know that its inherited fd is a remote file, or it writes into the
 * placeholder (lost) or reads an empty one. exec keeps the process's channel, so its handles
 * stay valid: each remote fd that survives exec is named in MIRRORD_LAYER_FILES as
 * `fd:kind:handle:oflags:hex(path)` (kind r: handle-backed, w: write-back cache, a: append
 * cache, both already written back before exec), or `fd:=:otherfd` for a dup of an earlier one. */

static void hex_put(char *out, const char *s) {
    static const char digits[] = "0123456789abcdef";
    for (; *s; s++) {
        *out++ = digits[(unsigned char)*s >> 4];
        *out++ = digits[(unsigned char)*s & 15];
    }
    *out = 0;
}

char *files_exec_env(void) {
    size_t cap = 256, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        return NULL;
    }
    len = (size_t)snprintf(buf, cap, "MIRRORD_LAYER_FILES=");
    size_t start = len;
    struct ent *seen[64];
    int seen_fd[64], nseen = 0;
    for (int fd = 0; fd < MAX_FDS; fd++) {
        struct ent *e = fd_peek(fd);
        if (e == NULL || !((e->kind == K_RFILE && e->has_handle) ||
                           (e->kind == K_MFILE && e->writeback && e->has_handle))) {
            continue;
        }
        int fl = REAL(fcntl)(fd, F_GETFD);
        if (fl < 0 || (fl & FD_CLOEXEC)) {
            continue;
        }
        size_t plen = e->path != NULL ? strlen(e->path) : 0;
        size_t need = len + 2 * plen + 96;
        if (need > cap) {
            char *nb = realloc(buf, need * 2);
            if (nb == NULL) {
                break;
            }
            buf = nb;
            cap = need * 2;
        }
        int alias = -1;
        for (int i = 0; i < nseen; i++) {
            if (seen[i] == e) {
                alias = seen_fd[i];
            }
        }
        const char *sep = len > start ? "," : "";
        if (alias >= 0) {
            len += (size_t)snprintf(buf + len, cap - len, "%s%d:=:%d", sep, fd, alias);
            continue;
        }
        if (nseen < 64) {
            seen[nseen] = e;
            seen_fd[nseen++] = fd;
        }
        len += (size_t)snprintf(buf + len, cap - len, "%s%d:%c:%llu:%d:", sep, fd,
                                e->kind == K_RFILE ? 'r' : e->append_only ? 'a' : 'w',
                                (unsigned long long)e->handle,
                                e->oflags);
        hex_put(buf + len, e->path != NULL ? e->path : "");
        len += 2 * plen;
    }
    if (len == start) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* An inherited file bigger than fetch_limit (`cmd < big`, `cmd >> big.log`): stdio reads and
 * writes with libc's internal read/write, which no hook sees, so the content goes into the
 * placeholder (up to 16 times fetch_limit) at the handle's position, and the fd becomes a
 * plain fetched file, or a write-back cache when it was opened for writing. */
static void exec_fetch_whole(int fd, struct ent *e) {
    struct stat lst;
    off_t pos = -1;
    if (REAL(fstat)(fd, &lst) == 0 && lst.st_size == e->st.st_size && lst.st_size > 0) {
        /* an earlier image (a sibling sharing this open file) fetched it: its offset counts */
        pos = REAL(lseek)(fd, 0, SEEK_CUR);
    } else {
        pos = rfile_seek(e, 0, SEEK_CUR);
        char *buf = pos >= 0 ? malloc(MAX_DATA_CHUNK) : NULL;
        off_t off = 0;
        while (buf != NULL && off < e->st.st_size) {
            ssize_t n = rfile_read_chunk(e->handle, buf, MAX_DATA_CHUNK, off);
            if (n <= 0 || REAL(pwrite)(fd, buf, (size_t)n, off) != n) {
                break;
            }
            off += n;
        }
        free(buf);
        if (buf == NULL || off != e->st.st_size || REAL(lseek)(fd, pos, SEEK_SET) != pos) {
            REAL(ftruncate)(fd, 0); /* stays handle-backed */
            return;
        }
    }
    e->kind = K_MFILE;
    if ((e->oflags & O_ACCMODE) == O_RDONLY) {
        rfile_close_handle(e->handle);
        e->has_handle = 0;
        __atomic_fetch_sub(&g_nhandles, 1, __ATOMIC_RELAXED);
        clock_gettime(CLOCK_MONOTONIC, &e->checked);
        return;
    }
    struct stat cst;
    e->writeback = 1; /* keeps the handle: written back when the last fd closes */
    e->cache_fd = layer_fd_protect(REAL(fcntl)(fd, F_DUPFD_CLOEXEC, 0));
    if (REAL(fstat)(e->cache_fd, &cst) == 0) {
        e->synced_mtim = cst.st_mtim;
        e->synced_size = cst.st_size;
    }
    if (e->oflags & O_APPEND) {
        REAL(fcntl)(fd, F_SETFL, O_APPEND);
    }
}

static int hex_val(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* In the new image (at start, connected): adopt what files_exec_env named. An fd whose
 * handle the daemon does not know any more (a new registration) is left alone. */
void files_restore_fds(const char *v) {
    while (v != NULL && *v) {
        int fd = -1, n = 0, other = -1;
        if (sscanf(v, "%d:=:%d%n", &fd, &other, &n) == 2 && n > 0) {
            struct ent *e = fd_peek(other) != NULL ? ent_get(other) : NULL;
            if (e != NULL && fd >= 0 && fd < MAX_FDS && REAL(fcntl)(fd, F_GETFD) >= 0) {
                fd_set_ent(fd, e); /* takes the reference */
            } else if (e != NULL) {
                ent_put(e);
            }
        } else {
            char kind = 0;
            unsigned long long handle = 0;
            int oflags = 0;
            n = 0;
            if (sscanf(v, "%d:%c:%llu:%d:%n", &fd, &kind, &handle, &oflags, &n) != 4 || n == 0) {
                return;
            }
            const char *h = v + n;
            size_t hl = strcspn(h, ",");
            char *path = malloc(hl / 2 + 1);
            size_t k = 0;
            for (size_t i = 0; path != NULL && i + 2 <= hl; i += 2) {
                int a = hex_val(h[i]), b = hex_val(h[i + 1]);
                if (a < 0 || b < 0) {
                    break;
                }
                path[k++] = (char)(a * 16 + b);
            }
            if (path != NULL) {
                path[k] = 0;
            }
            n += (int)hl;
            struct stat st;
            struct ent *e = NULL;
            if (path != NULL && fd >= 0 && fd < MAX_FDS && REAL(fcntl)(fd, F_GETFD) >= 0 &&
                (kind == 'r' || kind == 'w' || kind == 'a') && rstat(NULL, 1, handle, 1, &st) == 0) {
                e = ent_new(kind == 'r' ? K_RFILE : K_MFILE);
            }
            if (e != NULL) {
                e->has_handle = 1;
                e->handle = handle;
                e->oflags = oflags;
                e->path = path;
                path = NULL;
                e->st = st;
                e->is_dir = S_ISDIR(st.st_mode);
                if (kind == 'w' || kind == 'a') {
                    struct stat cst;
                    e->writeback = 1;
                    e->append_only = kind == 'a';
                    e->cache_fd = layer_fd_protect(REAL(fcntl)(fd, F_DUPFD_CLOEXEC, 0));
                    if (REAL(fstat)(e->cache_fd, &cst) == 0) {
                        e->synced_mtim = cst.st_mtim;
                        e->synced_size = cst.st_size;
                    }
                }
                __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
                if (kind == 'r' && S_ISREG(st.st_mode) && st.st_size / 16 <= g_set.fetch_limit) {
                    exec_fetch_whole(fd, e);
                }
                fd_set_ent(fd, e);
                DBG("fd %d is remote %s from before exec (%s)", fd, e->path,
                    kind == 'a' ? "append cache" : e->writeback ? "write-back" : e->kind == K_MFILE ? "fetched" : "handle");
            }
            free(path);
        }
        v += n;
        if (*v == ',') {
            v++;
        }
    }
}

/* ---------------------------------------------------------------- statvfs
 *
 * glibc's statvfs/fstatvfs call its internal statfs, which no hook sees (os.statvfs and
 * shutil.disk_usage of a pod path failed with ENOENT): on a remote path or fd they are the
 * statfs hooks' answer converted as glibc converts it. */

#ifndef ST_VALID
#define ST_VALID 0x0020 /* the kernel's: f_flags is valid */
#endif

static void statvfs_from(const struct statfs *f, struct statvfs *v) {
    memset(v, 0, sizeof *v);
    v->f_bsize = (unsigned long)f->f_bsize;
    v->f_frsize = (unsigned long)(f->f_frsize ? f->f_frsize : f->f_bsize);
    v->f_blocks = f->f_blocks;
    v->f_bfree = f->f_bfree;
    v->f_bavail = f->f_bavail;
    v->f_files = f->f_files;
    v->f_ffree = f->f_ffree;
    v->f_favail = f->f_ffree;
    v->f_namemax = (unsigned long)f->f_namelen;
    v->f_flag = (unsigned long)((f->f_flags & ST_VALID) ? (f->f_flags ^ ST_VALID) : 0);
}

HOOK int statvfs(const char *path, struct statvfs *buf) {
    int ret;
    struct statfs f;
    if (statfs_path(path, &f, &ret) == R_DONE) {
        if (ret == 0) {
            statvfs_from(&f, buf);
        }
        return ret;
    }
    return REAL(statvfs)(path, buf);
}

/* The 64 variants are the same calls on the 64-bit targets the layer is built for. */
_Static_assert(sizeof(struct statvfs) == sizeof(struct statvfs64), "statvfs64 differs");

HOOK int statvfs64(const char *path, struct statvfs64 *buf) {
    return statvfs(path, (struct statvfs *)(void *)buf);
}

HOOK int fstatvfs(int fd, struct statvfs *buf) {
    int ret;
    struct statfs f;
    if (fstatfs_fd(fd, &f, &ret) == R_DONE) {
        if (ret == 0) {
            statvfs_from(&f, buf);
        }
        return ret;
    }
    return REAL(fstatvfs)(fd, buf);
}

HOOK int fstatvfs64(int fd, struct statvfs64 *buf) {
    return fstatvfs(fd, (struct statvfs *)(void *)buf);
}

/* ---------------------------------------------------------------- fdopen, glob */

/* fdopen of a handle-backed or write-back fd: stdio's internal read/write/close would miss the
 * hooks (a >fetch_limit file read as empty; a write-back file written back only at exit), so,
 * as for fopen, the stream is a cookie over the hooked calls. */
HOOK FILE *fdopen(int fd, const char *mode) {
    struct ent *pe = fd_peek(fd);
    if (pe != NULL && g_active && !t_guard && mode != NULL &&
        (pe->kind == K_RFILE || (pe->kind == K_MFILE && pe->writeback))) {
        struct ent *e = ent_get(fd); /* still ours? */
        if (e != NULL) {
            ent_put(e);
            cookie_io_functions_t io = {cookie_read, cookie_write, cookie_seek, cookie_close};
            return fopencookie((void *)(intptr_t)fd, mode, io);
        }
    }
    return REAL(fdopen)(fd, mode);
}

/* glob(3) reads directories with glibc's internal opendir/readdir/lstat: a pattern that may
 * name remote paths is expanded with GLOB_ALTDIRFUNC and the hooked ones, which decide per
 * directory. */
static int glob_maybe_remote(const char *pattern, int flags) {
    if (!g_active || t_guard || pattern == NULL || (flags & GLOB_ALTDIRFUNC)) {
        return 0;
    }
    if (pattern[0] != '/') {
        return __atomic_load_n(&g_vcwd[0], __ATOMIC_RELAXED) != 0;
    }
    char full[PATH_CAP];
    return decide(AT_FDCWD, pattern, 0, full, sizeof full) != P_LOCAL;
}

static void *glob_opendir(const char *path) { return opendir(path); }
static struct dirent *glob_readdir(void *d) { return readdir(d); }
static struct dirent64 *glob_readdir64(void *d) { return readdir64(d); }
static void glob_closedir(void *d) { (void)closedir(d); }

HOOK int glob(const char *pattern, int flags, int (*errfunc)(const char *, int), glob_t *pglob) {
    if (!glob_maybe_remote(pattern, flags)) {
        return REAL(glob)(pattern, flags, errfunc, pglob);
    }
    pglob->gl_opendir = glob_opendir;
    pglob->gl_readdir = glob_readdir;
    pglob->gl_closedir = glob_closedir;
    pglob->gl_lstat = lstat;
    pglob->gl_stat = stat;
    return REAL(glob)(pattern, flags | GLOB_ALTDIRFUNC, errfunc, pglob);
}

HOOK int glob64(const char *pattern, int flags, int (*errfunc)(const char *, int), glob64_t *pglob) {
    if (!glob_maybe_remote(pattern, flags)) {
        return REAL(glob64)(pattern, flags, errfunc, pglob);
    }
    pglob->gl_opendir = glob_opendir;
    pglob->gl_readdir = glob_readdir64;
    pglob->gl_closedir = glob_closedir;
    pglob->gl_lstat = lstat64;
    pglob->gl_stat = stat64;
    return REAL(glob64)(pattern, flags | GLOB_ALTDIRFUNC, errfunc, pglob);
}

/* ---------------------------------------------------------------- system-call supervisor */

/* native/supervisor/supervisor.c runs with this library preloaded and asks it about the open
 * calls it trapped in another process (a static or Go program), so that both make the same
 * decision with the same code (it finds these two with dlsym).
 *
 * mirrord_supervisor_open: 0 = local (the call goes on as it is); 1 = *fd_out is the fd to
 * install as the call's result (a memfd with the target's file, or a local file opened under
 * its feature.fs.mapping name), for the supervisor to close() here afterwards (which forgets
 * it); -1 = fail the call with errno (the target's errno, ENOENT for `not_found`, EIO
 * for a lost daemon or agent, EOPNOTSUPP for what the supervisor cannot serve yet: opens that
 * may write, directories, files bigger than fetch_limit). */
HOOK int mirrord_supervisor_open(const char *path, int flags, unsigned mode, int *fd_out) {
    if (!g_active || path == NULL || path[0] != '/') {
        return 0;
    }
    char full[PATH_CAP];
    int ret = 0;
    int d = decide_hook(AT_FDCWD, path, open_is_write(flags), full, sizeof full, &ret);
    if (d == R_BYPASS && t_local_mapped != NULL) {
        /* local under the name feature.fs.mapping gave it: opened here, installed there */
        int fd = REAL(openat)(AT_FDCWD, t_local_mapped, flags & ~O_CLOEXEC, (mode_t)mode);
        if (fd < 0) {
            return -1;
        }
        if (fd_peek(fd) != NULL) {
            fd_forget(fd);
        }
        *fd_out = fd;
        return 1;
    }
    if (d == R_BYPASS) {
        return 0;
    }
    if (d != R_REMOTE) {
        return -1; /* not_found: errno is set */
    }
    if (open_is_write(flags) || (flags & (O_DIRECTORY | O_PATH))) {
        errno = EOPNOTSUPP;
        return -1;
    }
    t_guard++;
    int fd = open_remote(full, flags & ~O_CLOEXEC, (mode_t)mode);
    t_guard--;
    if (fd < 0) {
        return -1;
    }
    struct ent *e = fd_peek(fd);
    if (e == NULL || e->kind != K_MFILE || e->writeback || e->is_dir) {
        close(fd);
        errno = EOPNOTSUPP;
        return -1;
    }
    *fd_out = fd;
    return 1;
}

/* The decision alone, with no request (the supervisor's fallback after its death): P_LOCAL,
 * P_REMOTE or P_NOT_FOUND. */
HOOK int mirrord_supervisor_decide(const char *path, int flags) {
    if (!g_active || path == NULL || path[0] != '/') {
        return P_LOCAL;
    }
    char full[PATH_CAP];
    return decide(AT_FDCWD, path, open_is_write(flags), full, sizeof full);
}

/* access/faccessat/faccessat2 trapped by the supervisor: 0 = local (the call goes on), 1 = the
 * answer is 0 (accessible), -1 = fail the call with errno. */
HOOK int mirrord_supervisor_access(const char *path, int mode, int flags) {
    if (!g_active || path == NULL || path[0] != '/') {
        return 0;
    }
    char full[PATH_CAP];
    int ret = 0;
    int d = decide_hook(AT_FDCWD, path, 0, full, sizeof full, &ret);
    if (d == R_BYPASS && t_local_mapped != NULL) {
        return REAL(faccessat)(AT_FDCWD, t_local_mapped, mode, flags) == 0 ? 1 : -1;
    }
    if (d == R_BYPASS) {
        return 0;
    }
    if (d != R_REMOTE) {
        return -1; /* not_found: errno is set */
    }
    t_guard++;
    int r = raccess(full, mode);
    t_guard--;
    return r == 0 ? 1 : -1;
}

/* stat, lstat and newfstatat trapped by the supervisor: 0 = local (the call goes on), 1 = *st
 * holds the answer (the target's stat of a remote path, or a mapped local path's), -1 = fail
 * the call with errno. */
HOOK int mirrord_supervisor_stat(const char *path, int follow, struct stat *st) {
    if (!g_active || path == NULL || path[0] != '/') {
        return 0;
    }
    char full[PATH_CAP];
    int ret = 0;
    int d = decide_hook(AT_FDCWD, path, 0, full, sizeof full, &ret);
    if (d == R_BYPASS && t_local_mapped != NULL) {
        return REAL(fstatat)(AT_FDCWD, t_local_mapped, st, follow ? 0 : AT_SYMLINK_NOFOLLOW) == 0
                   ? 1
                   : -1;
    }
    if (d == R_BYPASS) {
        return 0;
    }
    if (d != R_REMOTE) {
        return -1; /* not_found: errno is set */
    }
    t_guard++;
    int r = remote_stat_path(full, follow, st);
    t_guard--;
    return r == 0 ? 1 : -1;
}
