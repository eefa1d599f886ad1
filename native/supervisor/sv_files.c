/* mirrord-supervisor, the file calls: open, openat, openat2, the access family and the stat
 * family, answered with the layer's decision (native/files_supervisor.c's mirrord_supervisor_*). */
#include "sv.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct call {
    int dirfd;
    uint64_t path_addr;
    int flags;
    unsigned mode;
    int resolve; /* openat2's RESOLVE_* flags */
    int access;  /* the access family: `mode` is its mode, `flags` its AT_* flags */
    int stat;    /* the stat family: `buf_addr` is where the answer goes */
    int follow;
    int empty; /* AT_EMPTY_PATH: an fstat of dirfd */
    uint64_t buf_addr;
};

static int decode_open(const struct seccomp_notif *req, struct call *c) {
    const __u64 *a = req->data.args;
#ifdef __NR_open
    if (req->data.nr == __NR_open) {
        c->path_addr = a[0];
        c->flags = (int)a[1];
        c->mode = (unsigned)a[2];
        return 0;
    }
#endif
    if (req->data.nr == __NR_openat) {
        c->dirfd = (int)a[0];
        c->path_addr = a[1];
        c->flags = (int)a[2];
        c->mode = (unsigned)a[3];
        return 0;
    }
    if (req->data.nr == __NR_openat2) {
        struct open_how how;
        if (a[3] < sizeof how || sv_read_mem(req->pid, a[2], &how, sizeof how) != 0) {
            return -1;
        }
        c->dirfd = (int)a[0];
        c->path_addr = a[1];
        c->flags = (int)how.flags;
        c->mode = (unsigned)how.mode;
        c->resolve = how.resolve != 0;
        return 0;
    }
    return 1;
}

static int decode_check(const struct seccomp_notif *req, struct call *c) {
    const __u64 *a = req->data.args;
    c->access = 1;
#ifdef __NR_access
    if (req->data.nr == __NR_access) {
        c->path_addr = a[0];
        c->mode = (unsigned)a[1];
        return 0;
    }
#endif
    if (req->data.nr == __NR_faccessat || req->data.nr == __NR_faccessat2) {
        c->dirfd = (int)a[0];
        c->path_addr = a[1];
        c->mode = (unsigned)a[2];
        c->flags = req->data.nr == __NR_faccessat2 ? (int)a[3] : 0;
        return 0;
    }
    c->access = 0;
    c->stat = 1;
#ifdef __NR_stat
    if (req->data.nr == __NR_stat || req->data.nr == __NR_lstat) {
        c->path_addr = a[0];
        c->buf_addr = a[1];
        c->follow = req->data.nr == __NR_stat;
        return 0;
    }
#endif
    if (req->data.nr == __NR_newfstatat) {
        c->dirfd = (int)a[0];
        c->path_addr = a[1];
        c->buf_addr = a[2];
        c->follow = !((int)a[3] & AT_SYMLINK_NOFOLLOW);
        c->empty = ((int)a[3] & AT_EMPTY_PATH) != 0;
        return 0;
    }
    c->stat = 0;
    return 1;
}

/* 0: decoded; 1: not a file call of ours; -1: its arguments are unreadable. */
static int decode(const struct seccomp_notif *req, struct call *c) {
    memset(c, 0, sizeof *c);
    c->dirfd = AT_FDCWD;
    int r = decode_open(req, c);
    return r != 1 ? r : decode_check(req, c);
}

static void answer_stat(const struct seccomp_notif *req, const struct call *c, const char *path) {
    struct stat st;
    int r = g_layer.stat != NULL && g_killable ? g_layer.stat(path, c->follow, &st) : 0;
    if (r == 0) {
        sv_continue(req->id);
    } else if (r < 0) {
        sv_reply(req->id, errno != 0 ? errno : EIO, 0);
    } else {
        sv_reply(req->id, sv_write_mem(req->pid, c->buf_addr, &st, sizeof st) == 0 ? 0 : EFAULT,
                 0);
    }
}

static void answer_access(const struct seccomp_notif *req, const struct call *c,
                          const char *path) {
    int r = g_layer.access != NULL ? g_layer.access(path, (int)c->mode, c->flags) : 0;
    if (r == 0) {
        sv_continue(req->id);
    } else {
        sv_reply(req->id, r > 0 ? 0 : errno != 0 ? errno : EIO, 0);
    }
}

static void answer_open(const struct seccomp_notif *req, const struct call *c, const char *path) {
    int fd = -1;
    int r = g_layer.open != NULL ? g_layer.open(path, c->flags, c->mode, &fd) : 0;
    if (r == 0) {
        sv_continue(req->id);
    } else if (r < 0) {
        sv_reply(req->id, errno != 0 ? errno : EIO, 0);
    } else {
        sv_reply_fd(req->id, fd, (c->flags & O_CLOEXEC) != 0);
        close(fd); /* through the layer: it forgets the file */
    }
}

int sv_files(const struct seccomp_notif *req, int fallback) {
    struct call c;
    char path[SV_PATH_CAP];
    int d = decode(req, &c);
    if (d == 1) {
        return 0;
    }
    if (d != 0 || sv_read_string(req->pid, c.path_addr, path, sizeof path) != 0) {
        sv_continue(req->id); /* unreadable: let the kernel give its own answer (EFAULT...) */
        return 1;
    }
    /* What was read belongs to this call only if the call is still pending (the thread may
     * have been interrupted and its memory reused). */
    if (sv_still_pending(req->id) != 0) {
        return 1;
    }
    /* Relative paths are local (the layer's rule 1); so is anything below a directory fd of
     * the program (the supervisor never installs a remote directory), and openat2 with
     * RESOLVE_* flags (their semantics cannot be kept on the target's side yet). */
    if (path[0] != '/' || c.resolve) {
        sv_continue(req->id);
    } else if (fallback) {
        int p = g_layer.decide != NULL ? g_layer.decide(path, c.access ? O_RDONLY : c.flags) : 0;
        sv_reply(req->id, p == 0 ? 0 : p == 2 ? ENOENT : EIO, p == 0);
    } else if (c.stat) {
        answer_stat(req, &c, path);
    } else if (c.access) {
        answer_access(req, &c, path);
    } else {
        answer_open(req, &c, path);
    }
    return 1;
}
