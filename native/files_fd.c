/* fd bookkeeping hooks: close, close_range, dup/dup2/dup3, fcntl.
 *
 * Owns: keeping the fd table true when the app closes or duplicates an fd (a remote file's
 * last close frees its handle and writes its cache back, through ent_put), and hiding the
 * layer's own fds (K_LAYER) from the app.
 * Does not own: the table itself (preload.c).
 */
#include "files.h"

#include <linux/close_range.h>
#include <stdarg.h>

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
    /* a write-behind file: its pending bytes go out first, and their failure is close's */
    int flushed = pe->fb != NULL ? fbuf_close(fd) : 0;
    int flush_err = errno;
    struct ent *e = fd_take(fd);
    int r = REAL(close)(fd);
    int saved = flushed < 0 ? flush_err : errno;
    ent_put(e);
    errno = saved;
    return flushed < 0 ? -1 : r;
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
    if (cmd == F_GETFL && pe != NULL && !t_guard && is_file_kind(pe)) {
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
    r = is64 ? REAL(fcntl64)(fd, cmd, arg) : REAL(fcntl)(fd, cmd, arg);
    return dup_track(fd, r);
}

#define FCNTL_HOOK(name, is64)                   \
    HOOK int name(int fd, int cmd, ...) {        \
        va_list ap;                              \
        va_start(ap, cmd);                       \
        void *arg = va_arg(ap, void *);          \
        va_end(ap);                              \
        return fcntl_common(fd, cmd, arg, is64); \
    }
FCNTL_HOOK(fcntl, 0)
FCNTL_HOOK(fcntl64, 1)
