/* stdio streams on remote files: fopen, fopen64, freopen, freopen64, fdopen.
 *
 * Owns: the FILE an app gets for a remote file. A fetched file is a plain stream over its
 * memfd; a handle-backed or write-back file gets a cookie stream whose I/O goes through the
 * hooked read/write/lseek/close (glibc's stdio calls its internal ones, which no hook sees: a
 * large file would read as empty, a write-back file be written back only at exit).
 * Does not own: the open itself (files_open.c).
 */
#include "files.h"

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

FILE *cookie_stream(int fd, const char *mode) {
    cookie_io_functions_t io = {cookie_read, cookie_write, cookie_seek, cookie_close};
    return fopencookie((void *)(intptr_t)fd, mode, io);
}

/* Handle-backed and write-back files: stdio's internal read/write/close would miss the hooks
 * (and the write-back on close). */
static int needs_cookie(const struct ent *pe) {
    return pe != NULL && (pe->kind == K_RFILE || (pe->kind == K_MFILE && pe->writeback));
}

static FILE *stream_for(int fd, const char *mode) {
    FILE *f = needs_cookie(fd_peek(fd)) ? cookie_stream(fd, mode) : REAL(fdopen)(fd, mode);
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
    if (do_open(AT_FDCWD, path, flags, 0666, &fd) == R_BYPASS) {
        return R_BYPASS;
    }
    *ret = fd < 0 ? NULL : stream_for(fd, mode);
    return R_DONE;
}

HOOK_OR_REAL(FILE *, fopen, (const char *path, const char *mode), fopen_common(path, mode, &ret),
             (path, mode))
HOOK_OR_REAL(FILE *, fopen64, (const char *path, const char *mode), fopen_common(path, mode, &ret),
             (path, mode))

/* A fetched file reopened under the app's FILE: through /proc/self/fd, and the fd the FILE
 * ends up with takes over the remote entry. */
static FILE *freopen_fetched(int fd, const char *mode, FILE *stream, int is64) {
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    /* "w" would truncate the cache through the reopen: the remote open already did */
    const char *reopen_mode = mode[0] == 'w' ? "r+" : mode;
    t_guard++;
    FILE *f = is64 ? REAL(freopen64)(proc, reopen_mode, stream) : REAL(freopen)(proc, reopen_mode, stream);
    t_guard--;
    if (f != NULL) {
        int nfd = fileno(f);
        struct ent *e = ent_get(fd);
        if (e != NULL && nfd >= 0 && nfd != fd) {
            fd_set_ent(nfd, e);
        } else {
            ent_put(e);
        }
    }
    close(fd);
    return f;
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
    char full[PATH_CAP];
    int d = path_route(AT_FDCWD, path, open_is_write(flags), full);
    if (d == R_MAPPED) { /* local, under its mapped name */
        *ret = is64 ? REAL(freopen64)(full, mode, stream) : REAL(freopen)(full, mode, stream);
        return R_DONE;
    }
    if (d != R_REMOTE) {
        *ret = NULL;
        return d;
    }
    t_guard++;
    int fd = open_remote(full, flags, 0666);
    t_guard--;
    struct ent *pe = fd_peek(fd);
    if (fd >= 0 && (pe == NULL || pe->kind != K_MFILE)) {
        /* a handle-backed stream cannot take over an existing FILE */
        close(fd);
        errno = ENOTSUP;
        fd = -1;
    }
    *ret = fd < 0 ? NULL : freopen_fetched(fd, mode, stream, is64);
    return R_DONE;
}

HOOK_OR_REAL(FILE *, freopen, (const char *path, const char *mode, FILE *stream),
             freopen_common(path, mode, stream, &ret, 0), (path, mode, stream))
HOOK_OR_REAL(FILE *, freopen64, (const char *path, const char *mode, FILE *stream),
             freopen_common(path, mode, stream, &ret, 1), (path, mode, stream))

/* fdopen of a handle-backed or write-back fd: as for fopen, the stream is a cookie over the
 * hooked calls. */
HOOK FILE *fdopen(int fd, const char *mode) {
    struct ent *pe = fd_peek(fd);
    if (g_active && !t_guard && mode != NULL && needs_cookie(pe)) {
        struct ent *e = ent_get(fd); /* still ours? */
        if (e != NULL) {
            ent_put(e);
            return cookie_stream(fd, mode);
        }
    }
    return REAL(fdopen)(fd, mode);
}
