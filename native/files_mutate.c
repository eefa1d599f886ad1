/* The path-taking mutators: mkdir, rmdir, unlink, rename, link, symlink, truncate and chmod by
 * path, and the mkstemp family and mkdtemp on a remote template.
 *
 * Owns: their hooks, in two shapes: one path (path_op, path_via_handle) and two paths
 * (rename_common, linkat: ENOENT for a `not_found` side, EXDEV between this machine and the
 * target). They modify, so in read mode they stay local (policy_file with write=1).
 * Does not own: changes through an fd, times, owners and xattrs (files_attr.c).
 */
#include "files.h"

#include <time.h>

/* ---------------------------------------------------------------- one path */

/* mkdir/rmdir/unlink. */
static int path_op(int kind, int dirfd, const char *path, int mode, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    ROUTE_PATH(dirfd, path, 1, ret,
               kind == M_MKDIR   ? REAL(mkdir)(full, (mode_t)mode)
               : kind == M_RMDIR ? REAL(rmdir)(full)
                                 : REAL(unlink)(full),
               kind == M_MKDIR ? RREQ_OK(kind, WF_PATH(full), WF_U(mode)) : RREQ_OK(kind, WF_PATH(full)));
}

HOOK_OR_REAL(int, mkdir, (const char *path, mode_t mode),
             path_op(M_MKDIR, AT_FDCWD, path, (int)mode, &ret), (path, mode))
HOOK_OR_REAL(int, mkdirat, (int dirfd, const char *path, mode_t mode),
             path_op(M_MKDIR, dirfd, path, (int)mode, &ret), (dirfd, path, mode))
HOOK_OR_REAL(int, rmdir, (const char *path), path_op(M_RMDIR, AT_FDCWD, path, 0, &ret), (path))
HOOK_OR_REAL(int, unlink, (const char *path), path_op(M_UNLINK, AT_FDCWD, path, 0, &ret), (path))
HOOK_OR_REAL(int, unlinkat, (int dirfd, const char *path, int flags),
             path_op((flags & AT_REMOVEDIR) ? M_RMDIR : M_UNLINK, dirfd, path, 0, &ret),
             (dirfd, path, flags))

/* truncate/chmod by path: no message of their own; open the remote file, change it through
 * the handle, close it. */
static int via_handle_remote(const char *full, int oflags, int kind, uint64_t arg) {
    uint64_t handle;
    if (rfile_open(full, oflags, 0, &handle) < 0) {
        return -1;
    }
    int rc = RREQ_OK(kind, WF_U(handle), WF_U(arg));
    int saved = errno;
    (void)rfile_close_handle(handle);
    errno = saved;
    return rc;
}

static int path_via_handle(const char *path, int oflags, int kind, uint64_t arg, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    ROUTE_PATH(AT_FDCWD, path, 1, ret,
               kind == M_FTRUNCATE ? REAL(truncate)(full, (off_t)arg) : REAL(chmod)(full, (mode_t)arg),
               via_handle_remote(full, oflags, kind, arg));
}

#define TRUNCATE_HOOK(name, offtype)                                                 \
    HOOK_OR_REAL(int, name, (const char *path, offtype len),                         \
                 len < 0 ? R_BYPASS                                                  \
                         : path_via_handle(path, O_WRONLY, M_FTRUNCATE, (uint64_t)len, &ret), \
                 (path, len))
TRUNCATE_HOOK(truncate, off_t)
TRUNCATE_HOOK(truncate64, off64_t)
HOOK_OR_REAL(int, chmod, (const char *path, mode_t mode),
             path_via_handle(path, O_RDONLY, M_FCHMOD, mode, &ret), (path, mode))

/* fchmodat: the absolute remote path through chmod (which goes through a handle); a symlink
 * itself has no mode to change (EOPNOTSUPP, as Linux answers). */
HOOK int fchmodat(int dirfd, const char *path, mode_t mode, int flags) {
    if (g_active && !t_guard) {
        char full[PATH_CAP];
        int d = path_route(dirfd, path, 1, full);
        if (d == R_DONE) {
            return -1;
        }
        if (d == R_REMOTE) {
            struct stat st;
            if ((flags & AT_SYMLINK_NOFOLLOW) && lstat(full, &st) == 0 && S_ISLNK(st.st_mode)) {
                errno = EOPNOTSUPP;
                return -1;
            }
            return chmod(full, mode);
        }
        path = local_path(d, path, full, &dirfd);
    }
    return REAL(fchmodat)(dirfd, path, mode, flags);
}

/* ---------------------------------------------------------------- two paths */

/* A request naming two paths (rename, symlink; link with its follow flag when follow >= 0). */
static int remote_two_paths(int kind, const char *a, const char *b, int follow) {
    t_guard++;
    int rc = follow >= 0 ? RREQ_OK(kind, WF_PATH(a), WF_PATH(b), WF_B(follow))
                         : RREQ_OK(kind, WF_PATH(a), WF_PATH(b));
    t_guard--;
    return rc;
}

/* Two routes of which at least one is not local: ENOENT for a `not_found` side, EXDEV between
 * this machine and the target (as between two file systems), else the request. */
static int two_routes_remote(int kind, int da, const char *a, int db, const char *b, int follow) {
    if (da == R_DONE || db == R_DONE) {
        errno = ENOENT;
        return -1;
    }
    if (da != db) {
        errno = EXDEV;
        return -1;
    }
    return remote_two_paths(kind, a, b, follow);
}

/* rename, renameat and renameat2 (its flags kept for the local call under mapped names). */
static int rename_common(int olddir, const char *old, int newdir, const char *new, unsigned flags,
                         int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char a[PATH_CAP], b[PATH_CAP];
    int da = path_route(olddir, old, 1, a);
    int db = path_route(newdir, new, 1, b);
    if (!route_is_local(da) || !route_is_local(db)) {
        *ret = two_routes_remote(M_RENAME, da, a, db, b, -1);
        return R_DONE;
    }
    if (da == R_BYPASS && db == R_BYPASS) {
        return R_BYPASS;
    }
    /* local, under the mapped name(s); an unmapped relative side keeps its directory */
    old = local_path(da, old, a, &olddir);
    new = local_path(db, new, b, &newdir);
    *ret = REAL(renameat2)(olddir, old, newdir, new, flags);
    return R_DONE;
}

HOOK_OR_REAL(int, rename, (const char *old, const char *new),
             rename_common(AT_FDCWD, old, AT_FDCWD, new, 0, &ret), (old, new))
HOOK_OR_REAL(int, renameat, (int olddir, const char *old, int newdir, const char *new),
             rename_common(olddir, old, newdir, new, 0, &ret), (olddir, old, newdir, new))

/* renameat2 flags other than RENAME_NOREPLACE (RENAME_EXCHANGE and co.): local paths only,
 * under their mapped names; EINVAL for a remote one, on which callers (mv) fall back to
 * rename. */
static int renameat2_local_only(int olddir, const char *old, int newdir, const char *new,
                                unsigned flags) {
    char a[PATH_CAP], b[PATH_CAP];
    int da = path_route(olddir, old, 1, a);
    int db = path_route(newdir, new, 1, b);
    if (!route_is_local(da) || !route_is_local(db)) {
        errno = EINVAL;
        return -1;
    }
    old = local_path(da, old, a, &olddir);
    new = local_path(db, new, b, &newdir);
    return REAL(renameat2)(olddir, old, newdir, new, flags);
}

/* renameat2 (mv): flags 0 is renameat; RENAME_NOREPLACE is checked with a FileStat first (not
 * atomic on the target). */
HOOK int renameat2(int olddir, const char *old, int newdir, const char *new, unsigned flags) {
    if (!g_active || t_guard) {
        return REAL(renameat2)(olddir, old, newdir, new, flags);
    }
    if ((flags & ~RENAME_NOREPLACE) != 0) {
        return renameat2_local_only(olddir, old, newdir, new, flags);
    }
    char b[PATH_CAP];
    if ((flags & RENAME_NOREPLACE) && path_route(newdir, new, 1, b) == R_REMOTE) {
        struct stat st;
        t_guard++;
        int saved = errno;
        int exists = rstat(b, 0, 0, &st) == 0;
        errno = saved;
        t_guard--;
        if (exists) {
            errno = EEXIST;
            return -1;
        }
    }
    int ret;
    if (rename_common(olddir, old, newdir, new, flags, &ret) == R_DONE) {
        return ret;
    }
    return REAL(renameat2)(olddir, old, newdir, new, flags);
}

/* symlink/symlinkat send Symlink (the link's text as given, a local one too) and link/linkat
 * send Link. */
static int symlink_logic(const char *target, int dirfd, const char *path, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    ROUTE_PATH(dirfd, path, 1, ret, REAL(symlinkat)(target, AT_FDCWD, full),
               remote_two_paths(M_SYMLINK, target, full, -1));
}

HOOK_OR_REAL(int, symlinkat, (const char *target, int dirfd, const char *path),
             symlink_logic(target, dirfd, path, &ret), (target, dirfd, path))

HOOK int symlink(const char *target, const char *path) {
    return symlinkat(target, AT_FDCWD, path);
}

HOOK int linkat(int olddir, const char *old, int newdir, const char *new, int flags) {
    if (g_active && !t_guard && !(flags & AT_EMPTY_PATH)) {
        char a[PATH_CAP], b[PATH_CAP];
        int da = path_route(olddir, old, 1, a);
        int db = path_route(newdir, new, 1, b);
        if (!route_is_local(da) || !route_is_local(db)) {
            return two_routes_remote(M_LINK, da, a, db, b, (flags & AT_SYMLINK_FOLLOW) != 0);
        }
        old = local_path(da, old, a, &olddir);
        new = local_path(db, new, b, &newdir);
    }
    return REAL(linkat)(olddir, old, newdir, new, flags);
}

HOOK int link(const char *old, const char *new) {
    return linkat(AT_FDCWD, old, AT_FDCWD, new, 0);
}

/* ---------------------------------------------------------------- temporary names
 *
 * mkstemp family and mkdtemp on a remote template: glibc creates the file with an internal
 * open no hook sees, so the layer picks the names itself and creates them through its own
 * open/mkdir hooks (O_EXCL: an existing name is tried again). */

/* R_BYPASS, R_MAPPED (the mapped template in `mapped`, PATH_CAP), or remote (R_REMOTE, or
 * R_DONE for a `not_found` one: the hooked open says so). */
static int tmpl_route(const char *tmpl, char *mapped) {
    if (!g_active || t_guard || tmpl == NULL) {
        return R_BYPASS;
    }
    return path_route(AT_FDCWD, tmpl, 1, mapped);
}

/* A local template that feature.fs.mapping rewrote is made under the mapped name (in `mapped`,
 * filled by the real call); the letters it chose are written back into the app's template. */
static void tmpl_copy_back(char *tmpl, const char *mapped, int suffixlen) {
    size_t k = 6 + (size_t)(suffixlen > 0 ? suffixlen : 0), n = strlen(tmpl), m = strlen(mapped);
    if (n >= k && m >= k) {
        memcpy(tmpl + n - k, mapped + m - k, 6);
    }
}

/* Fills the 6 X's before the suffix (set afresh to X's first: a failed attempt's name) with
 * random letters and digits; -1 (EINVAL) if the template does not have them. */
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

/* A template whose X's were filled by an earlier attempt gets its X's back. */
static void tmpl_reset(char *tmpl, int suffixlen) {
    size_t len = strlen(tmpl), k = 6 + (size_t)(suffixlen < 0 ? 0 : suffixlen);
    if (len >= k) {
        memset(tmpl + len - k, 'X', 6);
    }
}

static int mkstemp_remote(char *tmpl, int suffixlen, int flags) {
    for (int attempt = 0; attempt < 100; attempt++) {
        tmpl_reset(tmpl, suffixlen);
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
        char mapped[PATH_CAP];                                               \
        int d = tmpl_route(tmpl, mapped);                                    \
        if (d == R_BYPASS) {                                                 \
            return REAL(name) args;                                          \
        }                                                                    \
        if (d != R_MAPPED) {                                                 \
            return mkstemp_remote(tmpl, suffixlen, flags);                   \
        }                                                                    \
        char *app_tmpl = tmpl;                                               \
        tmpl = mapped;                                                       \
        int fd = REAL(name) args;                                            \
        tmpl = app_tmpl;                                                     \
        if (fd >= 0) {                                                       \
            tmpl_copy_back(tmpl, mapped, suffixlen);                         \
        }                                                                    \
        return local_fd(fd);                                                 \
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
    char mapped[PATH_CAP];
    int d = tmpl_route(tmpl, mapped);
    if (d == R_BYPASS) {
        return REAL(mkdtemp)(tmpl);
    }
    if (d == R_MAPPED) { /* local, under its mapped name */
        if (REAL(mkdtemp)(mapped) == NULL) {
            return NULL;
        }
        tmpl_copy_back(tmpl, mapped, 0);
        return tmpl;
    }
    for (int attempt = 0; attempt < 100; attempt++) {
        tmpl_reset(tmpl, 0);
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
