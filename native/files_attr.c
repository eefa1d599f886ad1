/* Changes through an fd, and a file's times, owner and extended attributes.
 *
 * Owns: ftruncate/fchmod/fsync/fdatasync on a remote fd (handle_op); utimensat/futimens (and
 * utimes, lutimes, futimes, utime through them) and chown/lchown/fchown/fchownat, which send
 * Utimens/Chown (`touch -d`, `cp -p`, `tar x`, shutil.copy2/move and node's fs.utimes into a
 * pod directory need them; like chmod they modify, so in read mode they stay local); and the
 * xattr calls, which have no message: on a remote path or fd they are "not supported".
 * Does not own: the path-taking mutators (files_mutate.c).
 */
#include "files.h"

#include <sys/time.h>
#include <time.h>
#include <utime.h>

/* ---------------------------------------------------------------- through an fd */

/* A fetched read-only file has no handle: fchmod (allowed on a read-only fd, as Linux allows
 * it) goes by path, and the fd's stat follows; fsync has nothing to do. */
static int handle_op_fetched(int fd, int kind, int64_t arg) {
    struct ent *e = kind == M_FCHMOD ? ent_get(fd) : NULL;
    if (e != NULL) {
        char *path = e->path != NULL ? strdup(e->path) : NULL;
        int ret = path != NULL ? chmod(path, (mode_t)arg) : (errno = EBADF, -1);
        if (ret == 0) {
            mfile_restat(e);
        }
        free(path);
        ent_put(e);
        return ret;
    }
    if (kind == M_FSYNC) {
        return 0;
    }
    errno = kind == M_FTRUNCATE ? EINVAL : EPERM;
    return -1;
}

/* ftruncate / fchmod / fsync on a handle-backed file (a write-back cache is flushed first by
 * fsync; it is truncated natively, and written back later). */
static int handle_op(int fd, int kind, int64_t arg, int *ret) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || !is_file_kind(pe)) {
        return R_BYPASS;
    }
    if (pe->kind == K_MFILE && !pe->writeback) {
        *ret = handle_op_fetched(fd, kind, arg);
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
    } else if (e->fb != NULL && fbuf_flush(e) < 0) {
        *ret = -1; /* a failed write-behind is fsync's (ftruncate's, fchmod's) error */
    } else if (e->writeback && kind == M_FSYNC && wfile_flush(e) < 0) {
        *ret = -1;
    } else if (kind == M_FSYNC) {
        *ret = RREQ_OK(kind, WF_U(e->handle));
    } else {
        *ret = RREQ_OK(kind, WF_U(e->handle), WF_U(arg));
    }
    t_guard--;
    ent_put(e);
    return R_DONE;
}

#define FTRUNCATE_HOOK(name, offtype)                                                        \
    HOOK_OR_REAL(int, name, (int fd, offtype len),                                           \
                 len < 0 ? R_BYPASS : handle_op(fd, M_FTRUNCATE, len, &ret), (fd, len))
FTRUNCATE_HOOK(ftruncate, off_t)
FTRUNCATE_HOOK(ftruncate64, off64_t)
HOOK_OR_REAL(int, fchmod, (int fd, mode_t mode), handle_op(fd, M_FCHMOD, mode, &ret), (fd, mode))
HOOK_OR_REAL(int, fsync, (int fd), handle_op(fd, M_FSYNC, 0, &ret), (fd))
HOOK_OR_REAL(int, fdatasync, (int fd), handle_op(fd, M_FSYNC, 0, &ret), (fd))

/* ---------------------------------------------------------------- times and owners */

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

/* Utimens (a, b = atime, mtime; NS_OMIT is null) or Chown (a, b = uid, gid) on a path or a
 * handle. */
static int rattr(int kind, const char *path, uint64_t handle, int64_t a, int64_t b, int follow) {
    struct wf va = kind == M_UTIMENS && a == NS_OMIT ? WF_NIL : WF_I(a);
    struct wf vb = kind == M_UTIMENS && b == NS_OMIT ? WF_NIL : WF_I(b);
    return RREQ_OK(kind, WF_PATH(path), WF_U_UNLESS(path != NULL, handle), va, vb, WF_B(follow));
}

/* On a remote fd: by handle, or by path for a fetched read-only file (no handle kept). A
 * write-back file is written back first (a later write-back would set its mtime again), and
 * its cache gets the same times so that it does not count as changed. */
static int attr_fd(int fd, int kind, int64_t a, int64_t b, const struct timespec *t, int *ret) {
    struct ent *e = file_ent(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    t_guard++;
    int rc = e->writeback ? wfile_flush(e) : e->fb != NULL ? fbuf_flush(e) : 0;
    if (rc == 0 && (e->has_handle || e->path != NULL)) {
        rc = rattr(kind, e->has_handle ? NULL : e->path, e->handle, a, b, 1);
    } else if (rc == 0) {
        errno = EBADF;
        rc = -1;
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
    ROUTE_PATH(dirfd, path, 1, ret,
               kind == M_UTIMENS ? REAL(utimensat)(AT_FDCWD, full, t, flags)
                                 : REAL(fchownat)(AT_FDCWD, full, (uid_t)a, (gid_t)b, flags),
               rattr(kind, full, 0, a, b, !(flags & AT_SYMLINK_NOFOLLOW)));
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

/* -1 (unchanged) stays -1 on the wire. */
#define OWNER(id, type) ((id) == (type)-1 ? -1 : (int64_t)(id))

HOOK_OR_REAL(int, fchownat, (int dirfd, const char *path, uid_t uid, gid_t gid, int flags),
             attr_path(dirfd, path, M_CHOWN, OWNER(uid, uid_t), OWNER(gid, gid_t), flags, NULL, &ret),
             (dirfd, path, uid, gid, flags))
HOOK_OR_REAL(int, fchown, (int fd, uid_t uid, gid_t gid),
             attr_fd(fd, M_CHOWN, OWNER(uid, uid_t), OWNER(gid, gid_t), NULL, &ret), (fd, uid, gid))

HOOK int chown(const char *path, uid_t uid, gid_t gid) {
    return fchownat(AT_FDCWD, path, uid, gid, 0);
}

HOOK int lchown(const char *path, uid_t uid, gid_t gid) {
    return fchownat(AT_FDCWD, path, uid, gid, AT_SYMLINK_NOFOLLOW);
}

/* ---------------------------------------------------------------- extended attributes
 *
 * No message in the protocol: on a remote path or fd they are "not supported", which copy
 * tools (shutil, cp --preserve) treat as nothing to copy. Setting one is refused too: libacl's
 * acl_set_fd (cp -p's mode) would otherwise succeed on the local placeholder and never fall
 * back to fchmod. */

/* R_BYPASS sets *path to the name of the local call (mapped into buf, PATH_CAP); R_DONE: the
 * call fails (errno set). */
static int xattr_path(const char **path, char *buf) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    int d = path_route(AT_FDCWD, *path, 0, buf);
    if (route_is_local(d)) {
        *path = local_path(d, *path, buf, NULL);
        return R_BYPASS;
    }
    if (d == R_REMOTE) {
        errno = ENOTSUP;
    }
    return R_DONE;
}

static int xattr_fd(int fd) {
    struct ent *e = file_ent(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    ent_put(e);
    errno = ENOTSUP;
    return R_DONE;
}

/* The xattr table: the path hooks and the fd hooks, each failing -1 where remote. */
#define XATTR_PATH_HOOK(rtype, name, params, args)                       \
    HOOK rtype name params {                                             \
        char buf[PATH_CAP];                                              \
        return xattr_path(&path, buf) == R_DONE ? -1 : REAL(name) args;  \
    }
#define XATTR_FD_HOOK(rtype, name, params, args)                         \
    HOOK rtype name params {                                             \
        return xattr_fd(fd) == R_DONE ? -1 : REAL(name) args;            \
    }
XATTR_PATH_HOOK(ssize_t, getxattr, (const char *path, const char *name, void *value, size_t size),
                (path, name, value, size))
XATTR_PATH_HOOK(ssize_t, lgetxattr, (const char *path, const char *name, void *value, size_t size),
                (path, name, value, size))
XATTR_FD_HOOK(ssize_t, fgetxattr, (int fd, const char *name, void *value, size_t size),
              (fd, name, value, size))
XATTR_PATH_HOOK(int, setxattr,
                (const char *path, const char *name, const void *value, size_t size, int flags),
                (path, name, value, size, flags))
XATTR_PATH_HOOK(int, lsetxattr,
                (const char *path, const char *name, const void *value, size_t size, int flags),
                (path, name, value, size, flags))
XATTR_FD_HOOK(int, fsetxattr, (int fd, const char *name, const void *value, size_t size, int flags),
              (fd, name, value, size, flags))
XATTR_PATH_HOOK(ssize_t, listxattr, (const char *path, char *list, size_t size), (path, list, size))
XATTR_PATH_HOOK(ssize_t, llistxattr, (const char *path, char *list, size_t size), (path, list, size))
XATTR_FD_HOOK(ssize_t, flistxattr, (int fd, char *list, size_t size), (fd, list, size))
