/* mirrord-supervisor, the other path-taking calls: statx, readlink/readlinkat and the
 * mutators (mkdir, mkdirat, rmdir, unlink, unlinkat, rename, renameat, renameat2). Local
 * paths (the layer's decision, for a write where the call modifies) continue; remote ones are
 * done here by the layer's own libc hooks (readlink, mkdirat, unlinkat, renameat2: the same
 * requests as for a libc program, in the same fs mode: in `read` mode the mutators stay
 * local) and their result is the call's answer. chdir is not trapped: the program's working
 * directory must be a real directory of this machine (docs/layer.md). */
#include "sv.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "../stat_conv.h" /* shared with the layer (files_stat.c) */

/* The call's paths (at most two) and where they are in the arguments. */
struct pcall {
    int npaths;
    int path_arg[2];
    int dirfd_arg[2]; /* -1: no dirfd (AT_FDCWD) */
    int write;        /* it modifies */
};

static int describe(int nr, struct pcall *c) {
    static const struct {
        int nr, npaths, p0, d0, p1, d1, write;
    } table[] = {
#ifdef __NR_readlink
        {__NR_readlink, 1, 0, -1, 0, 0, 0},   {__NR_mkdir, 1, 0, -1, 0, 0, 1},
        {__NR_rmdir, 1, 0, -1, 0, 0, 1},      {__NR_unlink, 1, 0, -1, 0, 0, 1},
        {__NR_rename, 2, 0, -1, 1, -1, 1},
#endif
        {__NR_readlinkat, 1, 1, 0, 0, 0, 0},  {__NR_statx, 1, 1, 0, 0, 0, 0},
        {__NR_mkdirat, 1, 1, 0, 0, 0, 1},     {__NR_unlinkat, 1, 1, 0, 0, 0, 1},
        {__NR_renameat, 2, 1, 0, 3, 2, 1},    {__NR_renameat2, 2, 1, 0, 3, 2, 1},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (table[i].nr == nr) {
            *c = (struct pcall){table[i].npaths, {table[i].p0, table[i].p1},
                                {table[i].d0, table[i].d1}, table[i].write};
            return 0;
        }
    }
    return -1;
}

/* statx of a path the layer says is remote: the target's stat, as statx reports it. */
static void do_statx(const struct seccomp_notif *req, const char *path) {
    const __u64 *a = req->data.args;
    struct stat st;
    int r = g_layer.stat != NULL && g_killable
                ? g_layer.stat(path, !((int)a[2] & AT_SYMLINK_NOFOLLOW), &st)
                : 0;
    if (r == 0) {
        sv_continue(req->id);
    } else if (r < 0) {
        sv_reply(req->id, errno != 0 ? errno : EIO, 0);
    } else {
        struct statx sx;
        statx_from_stat(&st, &sx);
        sv_reply(req->id, sv_write_mem(req->pid, a[4], &sx, sizeof sx) == 0 ? 0 : EFAULT, 0);
    }
}

static void do_readlink(const struct seccomp_notif *req, const char *path, int at) {
    const __u64 *a = req->data.args;
    char buf[SV_PATH_CAP];
    size_t size = a[at + 1] < sizeof buf ? (size_t)a[at + 1] : sizeof buf;
    if (!g_killable) {
        sv_continue(req->id);
        return;
    }
    ssize_t n = readlink(path, buf, size); /* the layer's hook: FileReadlink in the target */
    if (n < 0) {
        sv_reply(req->id, errno, 0);
    } else if (sv_write_mem(req->pid, a[at], buf, (size_t)n) != 0) {
        sv_reply(req->id, EFAULT, 0);
    } else {
        sv_reply_val(req->id, n);
    }
}

/* A remote path's call, done by the layer's hook; the answer is its result. */
static void do_remote(const struct seccomp_notif *req, char paths[2][SV_PATH_CAP]) {
    const __u64 *a = req->data.args;
    int nr = req->data.nr, r;
    if (nr == __NR_statx) {
        do_statx(req, paths[0]);
        return;
    }
    if (nr == __NR_readlinkat) {
        do_readlink(req, paths[0], 2);
        return;
    }
#ifdef __NR_readlink
    if (nr == __NR_readlink) {
        do_readlink(req, paths[0], 1);
        return;
    }
    r = nr == __NR_mkdir    ? mkdirat(AT_FDCWD, paths[0], (mode_t)a[1])
        : nr == __NR_rmdir  ? unlinkat(AT_FDCWD, paths[0], AT_REMOVEDIR)
        : nr == __NR_unlink ? unlinkat(AT_FDCWD, paths[0], 0)
        : nr == __NR_rename ? renameat2(AT_FDCWD, paths[0], AT_FDCWD, paths[1], 0)
                            : 1;
    if (r != 1) {
        sv_reply(req->id, r == 0 ? 0 : errno, 0);
        return;
    }
#endif
    r = nr == __NR_mkdirat    ? mkdirat(AT_FDCWD, paths[0], (mode_t)a[2])
        : nr == __NR_unlinkat ? unlinkat(AT_FDCWD, paths[0], (int)a[2])
        : nr == __NR_renameat ? renameat2(AT_FDCWD, paths[0], AT_FDCWD, paths[1], 0)
                              : renameat2(AT_FDCWD, paths[0], AT_FDCWD, paths[1], (unsigned)a[4]);
    sv_reply(req->id, r == 0 ? 0 : errno, 0);
}

int sv_paths(const struct seccomp_notif *req, int fallback) {
    struct pcall c;
    char paths[2][SV_PATH_CAP];
    if (describe(req->data.nr, &c) != 0) {
        return 0;
    }
    int remote = 0, failed = 0;
    for (int i = 0; i < c.npaths; i++) {
        if (sv_read_string(req->pid, req->data.args[c.path_arg[i]], paths[i], SV_PATH_CAP) != 0) {
            sv_continue(req->id); /* unreadable: the kernel's own answer (EFAULT...) */
            return 1;
        }
        /* relative paths (below the working directory or a directory fd) are local */
        int p = paths[i][0] == '/' && g_layer.decide != NULL
                    ? g_layer.decide(paths[i], c.write ? O_WRONLY : O_RDONLY)
                    : 0;
        remote |= p != 0;
        failed |= p == 2;
    }
    if (sv_still_pending(req->id) != 0) {
        return 1;
    }
    if (!remote) {
        sv_continue(req->id);
    } else if (fallback || failed) {
        sv_reply(req->id, failed ? ENOENT : EIO, 0);
    } else {
        do_remote(req, paths);
    }
    return 1;
}
