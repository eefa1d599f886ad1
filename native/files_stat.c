/* The stat family, and the other calls that look at a path without changing it.
 *
 * Owns: stat/lstat/fstatat/fstat (and their 64-bit and __xstat variants), statx, statfs,
 * fstatfs, statvfs, fstatvfs, access/euidaccess/eaccess/faccessat, readlink/readlinkat.
 * A remote fd answers with the target's stat (a fetched file: the stat taken at open, with
 * the memfd's size); a remote path with a request.
 * Does not own: the requests (files_remote.c) or the decision (files_path.c).
 */
#include "files.h"

#include <sys/sysmacros.h>

#include "stat_conv.h"

/* ---------------------------------------------------------------- stat */

static void fstat_cached(int fd, struct ent *e, struct stat *st) {
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
}

static int fstat_remote(int fd, struct stat *st, int *ret) {
    struct ent *e = file_ent(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    t_guard++;
    if (e->kind == K_MFILE) {
        fstat_cached(fd, e, st);
        *ret = 0;
    } else if (e->fb != NULL && fbuf_flush(e) < 0) {
        *ret = -1; /* the size would leave out what is still buffered */
    } else {
        *ret = e->has_handle ? rstat(NULL, e->handle, 1, st) : rstat(e->path, 0, 1, st);
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
    ROUTE_PATH(dirfd, path, 0, ret, REAL(fstatat)(AT_FDCWD, full, st, flags & AT_SYMLINK_NOFOLLOW),
               (flush_pending_for(full), rstat(full, 0, !(flags & AT_SYMLINK_NOFOLLOW), st)));
}

/* The stat table: name, parameters, which (dirfd, path, flags) it means, the real call's
 * arguments. */
#define STAT_HOOK(name, params, at, realargs) \
    HOOK_OR_REAL_COPY(name, params, struct stat, stat_path AT_ARGS_##at, buf, realargs)
#define AT_ARGS_CWD (AT_FDCWD, path, &tmp, 0, &ret)
#define AT_ARGS_CWD_NOFOLLOW (AT_FDCWD, path, &tmp, AT_SYMLINK_NOFOLLOW, &ret)
#define AT_ARGS_DIRFD (dirfd, path, &tmp, flags, &ret)
STAT_HOOK(stat, (const char *path, struct stat *buf), CWD, (path, buf))
STAT_HOOK(stat64, (const char *path, struct stat64 *buf), CWD, (path, buf))
STAT_HOOK(lstat, (const char *path, struct stat *buf), CWD_NOFOLLOW, (path, buf))
STAT_HOOK(lstat64, (const char *path, struct stat64 *buf), CWD_NOFOLLOW, (path, buf))
STAT_HOOK(fstatat, (int dirfd, const char *path, struct stat *buf, int flags), DIRFD,
          (dirfd, path, buf, flags))
STAT_HOOK(fstatat64, (int dirfd, const char *path, struct stat64 *buf, int flags), DIRFD,
          (dirfd, path, buf, flags))
HOOK_OR_REAL_COPY(fstat, (int fd, struct stat *buf), struct stat, fstat_remote(fd, &tmp, &ret),
                  buf, (fd, buf))
HOOK_OR_REAL_COPY(fstat64, (int fd, struct stat64 *buf), struct stat,
                  fstat_remote(fd, &tmp, &ret), buf, (fd, buf))

/* The __xstat family (old binaries): same layout as struct stat on x86_64/aarch64; each is
 * the hook named last. */
#define XSTAT_HOOK(name, params, call) \
    HOOK int name params {             \
        (void)ver;                     \
        return call;                   \
    }
XSTAT_HOOK(__xstat, (int ver, const char *path, struct stat *buf), fstatat(AT_FDCWD, path, buf, 0))
XSTAT_HOOK(__lxstat, (int ver, const char *path, struct stat *buf),
           fstatat(AT_FDCWD, path, buf, AT_SYMLINK_NOFOLLOW))
XSTAT_HOOK(__fxstat, (int ver, int fd, struct stat *buf), fstat(fd, buf))
XSTAT_HOOK(__fxstatat, (int ver, int dirfd, const char *path, struct stat *buf, int flags),
           fstatat(dirfd, path, buf, flags))
XSTAT_HOOK(__xstat64, (int ver, const char *path, struct stat64 *buf),
           fstatat64(AT_FDCWD, path, buf, 0))
XSTAT_HOOK(__lxstat64, (int ver, const char *path, struct stat64 *buf),
           fstatat64(AT_FDCWD, path, buf, AT_SYMLINK_NOFOLLOW))
XSTAT_HOOK(__fxstat64, (int ver, int fd, struct stat64 *buf), fstat64(fd, buf))
XSTAT_HOOK(__fxstatat64, (int ver, int dirfd, const char *path, struct stat64 *buf, int flags),
           fstatat64(dirfd, path, buf, flags))

HOOK int statx(int dirfd, const char *path, int flags, unsigned mask, struct statx *sx) {
    int ret;
    struct stat st;
    if (stat_path(dirfd, path, &st, flags, &ret) != R_DONE) {
        return REAL(statx)(dirfd, path, flags, mask, sx);
    }
    if (ret == 0) {
        statx_from_stat(&st, sx);
    }
    return ret;
}

/* ---------------------------------------------------------------- statfs, statvfs */

int statfs_path(const char *path, struct statfs *sf, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    ROUTE_PATH(AT_FDCWD, path, 0, ret, REAL(statfs)(full, sf), rstatfs(full, 0, sf));
}

int fstatfs_fd(int fd, struct statfs *sf, int *ret) {
    struct ent *e = file_ent(fd);
    if (e == NULL) {
        return R_BYPASS;
    }
    t_guard++;
    *ret = e->has_handle ? rstatfs(NULL, e->handle, sf) : rstatfs(e->path, 0, sf);
    t_guard--;
    ent_put(e);
    return R_DONE;
}

HOOK_OR_REAL(int, statfs, (const char *path, struct statfs *buf), statfs_path(path, buf, &ret),
             (path, buf))
HOOK_OR_REAL(int, fstatfs, (int fd, struct statfs *buf), fstatfs_fd(fd, buf, &ret), (fd, buf))
HOOK_OR_REAL_COPY(statfs64, (const char *path, struct statfs64 *buf), struct statfs,
                  statfs_path(path, &tmp, &ret), buf, (path, buf))
HOOK_OR_REAL_COPY(fstatfs64, (int fd, struct statfs64 *buf), struct statfs,
                  fstatfs_fd(fd, &tmp, &ret), buf, (fd, buf))

/* glibc's statvfs/fstatvfs call its internal statfs, which no hook sees (os.statvfs and
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

#define STATVFS_HOOK(name, params, logic, realargs) \
    HOOK int name params {                          \
        int ret;                                    \
        struct statfs f;                            \
        if ((logic) == R_DONE) {                    \
            if (ret == 0) {                         \
                statvfs_from(&f, buf);              \
            }                                       \
            return ret;                             \
        }                                           \
        return REAL(name) realargs;                 \
    }
STATVFS_HOOK(statvfs, (const char *path, struct statvfs *buf), statfs_path(path, &f, &ret),
             (path, buf))
STATVFS_HOOK(fstatvfs, (int fd, struct statvfs *buf), fstatfs_fd(fd, &f, &ret), (fd, buf))

/* The 64 variants are the same calls on the 64-bit targets the layer is built for. */
_Static_assert(sizeof(struct statvfs) == sizeof(struct statvfs64), "statvfs64 differs");

HOOK int statvfs64(const char *path, struct statvfs64 *buf) {
    return statvfs(path, (struct statvfs *)(void *)buf);
}

HOOK int fstatvfs64(int fd, struct statvfs64 *buf) {
    return fstatvfs(fd, (struct statvfs *)(void *)buf);
}

/* ---------------------------------------------------------------- access, readlink */

/* access, euidaccess/eaccess (flags AT_EACCESS) and faccessat: a mapped local path is checked
 * by faccessat with the caller's own flags, so each keeps its semantics. */
static int access_common(int dirfd, const char *path, int mode, int flags, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    ROUTE_PATH(dirfd, path, 0, ret, REAL(faccessat)(AT_FDCWD, full, mode, flags),
               raccess(full, mode));
}

HOOK_OR_REAL(int, access, (const char *path, int mode),
             access_common(AT_FDCWD, path, mode, 0, &ret), (path, mode))
/* euidaccess/eaccess (sort, test): glibc stats internally, out of the hooks' reach */
HOOK_OR_REAL(int, euidaccess, (const char *path, int mode),
             access_common(AT_FDCWD, path, mode, AT_EACCESS, &ret), (path, mode))
HOOK_OR_REAL(int, eaccess, (const char *path, int mode),
             access_common(AT_FDCWD, path, mode, AT_EACCESS, &ret), (path, mode))
HOOK_OR_REAL(int, faccessat, (int dirfd, const char *path, int mode, int flags),
             access_common(dirfd, path, mode, flags, &ret), (dirfd, path, mode, flags))

static int readlink_common(int dirfd, const char *path, char *buf, size_t size, ssize_t *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    ROUTE_PATH(dirfd, path, 0, ret, REAL(readlink)(full, buf, size), rreadlink(full, buf, size));
}

HOOK_OR_REAL(ssize_t, readlink, (const char *path, char *buf, size_t size),
             readlink_common(AT_FDCWD, path, buf, size, &ret), (path, buf, size))
HOOK_OR_REAL(ssize_t, readlinkat, (int dirfd, const char *path, char *buf, size_t size),
             readlink_common(dirfd, path, buf, size, &ret), (dirfd, path, buf, size))

/* The fortified readlink (_FORTIFY_SOURCE): glibc's calls its internal one, which no hook sees. */
ssize_t __readlink_chk(const char *path, char *buf, size_t size, size_t buflen);
HOOK ssize_t __readlink_chk(const char *path, char *buf, size_t size, size_t buflen) {
    if (size > buflen) {
        __chk_fail();
    }
    return readlink(path, buf, size);
}
ssize_t __readlinkat_chk(int dirfd, const char *path, char *buf, size_t size, size_t buflen);
HOOK ssize_t __readlinkat_chk(int dirfd, const char *path, char *buf, size_t size,
                              size_t buflen) {
    if (size > buflen) {
        __chk_fail();
    }
    return readlinkat(dirfd, path, buf, size);
}
