/* The exports the system-call supervisor calls.
 *
 * native/supervisor/supervisor.c runs with this library preloaded and asks it about the file
 * calls it trapped in another process (a static or Go program), so that both make the same
 * decision with the same code (it finds these with dlsym). Names and answers are an interface
 * with supervisor.c: keep them.
 *
 * Owns: mirrord_supervisor_open, mirrord_supervisor_decide, mirrord_supervisor_access,
 * mirrord_supervisor_stat. Does not own: the decision (files_path.c) or the remote open
 * (files_open.c).
 */
#include "files.h"

/* mirrord_supervisor_open: 0 = local (the call goes on as it is); 1 = *fd_out is the fd to
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
    int d = path_route(AT_FDCWD, path, open_is_write(flags), full);
    if (d == R_MAPPED) {
        /* local under the name feature.fs.mapping gave it: opened here, installed there */
        int fd = local_fd(REAL(openat)(AT_FDCWD, full, flags & ~O_CLOEXEC, (mode_t)mode));
        if (fd < 0) {
            return -1;
        }
        *fd_out = fd;
        return 1;
    }
    if (d != R_REMOTE) {
        return d == R_BYPASS ? 0 : -1; /* not_found: errno is set */
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
    return path_decision(path_route(AT_FDCWD, path, open_is_write(flags), full));
}

/* A path call's logic answered for the supervisor: 0 = local (the call goes on), 1 = answered
 * with success, -1 = fail the call with errno. */
static int supervisor_answer(int logic, int ret) {
    return logic == R_BYPASS ? 0 : ret == 0 ? 1 : -1;
}

static int supervisor_access(const char *path, int mode, int flags, int *ret) {
    ROUTE_PATH(AT_FDCWD, path, 0, ret, REAL(faccessat)(AT_FDCWD, full, mode, flags),
               raccess(full, mode));
}

static int supervisor_stat(const char *path, int follow, struct stat *st, int *ret) {
    ROUTE_PATH(AT_FDCWD, path, 0, ret,
               REAL(fstatat)(AT_FDCWD, full, st, follow ? 0 : AT_SYMLINK_NOFOLLOW),
               rstat(full, 0, follow, st));
}

/* access/faccessat/faccessat2 trapped by the supervisor: 1 = the answer is 0 (accessible). */
HOOK int mirrord_supervisor_access(const char *path, int mode, int flags) {
    if (!g_active || path == NULL || path[0] != '/') {
        return 0;
    }
    int ret = -1;
    int logic = supervisor_access(path, mode, flags, &ret);
    return supervisor_answer(logic, ret);
}

/* stat, lstat and newfstatat trapped by the supervisor: 1 = *st holds the answer (the
 * target's stat of a remote path, or a mapped local path's). */
HOOK int mirrord_supervisor_stat(const char *path, int follow, struct stat *st) {
    if (!g_active || path == NULL || path[0] != '/') {
        return 0;
    }
    int ret = -1;
    int logic = supervisor_stat(path, follow, st, &ret);
    return supervisor_answer(logic, ret);
}
