/* mirrord-supervisor: the system-call supervisor, for programs the layer cannot reach (static
 * binaries, Go). See docs/layer.md, "The system-call supervisor".
 *
 * Owns: installing the seccomp filter in the program before its exec, and answering the
 * trapped calls. Does not own any local/remote decision or any daemon request: it runs with
 * the layer preloaded (libmirrord_layer.so, as one more layer process of the session) and asks
 * the layer through two functions the layer exports for it (mirrord_supervisor_open and
 * mirrord_supervisor_decide, native/files.c), so there is one policy and one FileFetch path.
 *
 * Processes (the launcher is what `mirrord run --syscalls` starts, with MIRRORD_DONT_LOAD=1 so
 * that the layer stays inactive in it):
 *
 *   launcher  --fork--> helper --fork--> S  (helper exits at once: S is nobody's child that
 *      |                                 |   waits for it, so a program that waits for "any
 *      |                                 |   child" never meets it)
 *      | installs the filter             | takes the listener with pidfd_getfd (no sendmsg:
 *      | writes the listener's number    |   a trapped sendmsg would deadlock, notes pitfall 1)
 *      | waits for S's "ready" byte      | re-executes itself as `--serve` with the layer
 *      | execs the program (same pid)    |   preloaded, forks the fallback F, answers calls
 *
 * F holds the listener too and does nothing until S dies; then it answers every trapped call
 * as on a lost agent: local paths continue, remote ones fail with EIO (the layer's policy
 * decides which, without the daemon), and it says so once on stderr. Without F the kernel
 * would fail every trapped call, local files included, with ENOSYS.
 *
 * Trapped today: open, openat, openat2, access, faccessat, faccessat2, stat, lstat,
 * newfstatat. read/write are never trapped.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__x86_64__)
#define SV_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define SV_ARCH AUDIT_ARCH_AARCH64
#else
#error "mirrord-supervisor: unsupported architecture"
#endif

#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif
#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1)
#endif

#define WORKERS 4          /* concurrent answers (notes, pitfall 9) */
#define PATH_CAP 4096

static const char *g_self = "mirrord-supervisor";

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t)n >= sizeof buf) {
        n = sizeof buf - 1;
    }
    dprintf(2, "mirrord: %s\n", buf);
}

/* ---------------------------------------------------------------- the filter */

static int install_filter(int *listener, int *killable) {
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SV_ARCH, 1, 0),
        /* another architecture (int 0x80 on x86_64): denied, never let past the filter */
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
#if defined(__x86_64__)
        /* the x32 ABI shares the architecture value: its numbers have bit 30 set */
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_open, 9, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_access, 8, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_stat, 7, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_lstat, 6, 0),
#else
        /* no open, access, stat or lstat system calls here */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xffffffff, 9, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xffffffff, 8, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xffffffff, 7, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xffffffff, 6, 0),
#endif
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat, 5, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat2, 4, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_faccessat, 3, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_faccessat2, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_newfstatat, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
    };
    struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        return -1;
    }
    /* WAIT_KILLABLE_RECV (5.19): once the supervisor has the call, only a fatal signal
     * interrupts it, so Go's preemption signal cannot restart it forever (notes, pitfall 3) */
    unsigned long flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
    *killable = fd >= 0;
    if (fd < 0 && errno == EINVAL) {
        fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    }
    if (fd < 0) {
        return -1;
    }
    *listener = (int)fd;
    return 0;
}

/* ---------------------------------------------------------------- launcher */

/* auto: chosen because the executable is static, not asked for; where the kernel cannot
 * trap, the command runs as it would have without the supervisor (with a warning). */
static int launch(char **cmd, int keep_dont_load, int auto_mode) {
    int to_s[2], from_s[2];
    if (pipe2(to_s, O_CLOEXEC) != 0 || pipe2(from_s, O_CLOEXEC) != 0) {
        say("system-call supervisor: pipe: %s", strerror(errno));
        return 1;
    }
    pid_t launcher = getpid();
    if (auto_mode && syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &(struct seccomp_notif_sizes){0}) != 0) {
        say("warning: %s is statically linked and this kernel has no seccomp user notification "
            "(Linux 5.14 or newer): it runs without the target's files",
            cmd[0]);
        if (!keep_dont_load) {
            unsetenv("MIRRORD_DONT_LOAD");
        }
        execvp(cmd[0], cmd);
        say("cannot run %s: %s", cmd[0], strerror(errno));
        return errno == ENOENT ? 127 : 126;
    }
    pid_t helper = fork();
    if (helper < 0) {
        say("system-call supervisor: fork: %s", strerror(errno));
        return 1;
    }
    if (helper == 0) {
        close(to_s[1]);
        close(from_s[0]);
        setsid(); /* the terminal's Ctrl-C is for the program, not for its supervisor */
        /* stdin and stdout are the program's: the supervisor keeps only stderr (its messages),
         * so a reader of the program's output sees its end when the program ends */
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
            close(null);
        }
        pid_t s = fork();
        if (s != 0) {
            _exit(s < 0 ? 1 : 0);
        }
        int n, killable;
        if (read(to_s[0], &n, sizeof n) != (ssize_t)sizeof n ||
            read(to_s[0], &killable, sizeof killable) != (ssize_t)sizeof killable) {
            _exit(1); /* the launcher failed to install the filter and said why */
        }
        int pidfd = (int)syscall(SYS_pidfd_open, launcher, 0);
        int lfd = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, n, 0);
        if (lfd < 0) {
            say("system-call supervisor: cannot take the seccomp listener from pid %d: %s "
                "(needs Linux 5.6 and ptrace rights over the program)",
                (int)launcher, strerror(errno));
            _exit(1);
        }
        close(pidfd);
        char lfd_s[16], ready_s[16], killable_s[4];
        snprintf(lfd_s, sizeof lfd_s, "%d", lfd);
        snprintf(killable_s, sizeof killable_s, "%d", killable != 0);
        snprintf(ready_s, sizeof ready_s, "%d", from_s[1]);
        fcntl(lfd, F_SETFD, 0); /* pidfd_getfd sets close-on-exec */
        fcntl(from_s[1], F_SETFD, 0);
        if (!keep_dont_load) {
            unsetenv("MIRRORD_DONT_LOAD"); /* the layer is active in the supervisor */
        }
        char *argv[] = {(char *)g_self, "--serve", lfd_s, ready_s, killable_s, NULL};
        execv("/proc/self/exe", argv);
        say("system-call supervisor: exec: %s", strerror(errno));
        _exit(1);
    }
    close(to_s[0]);
    close(from_s[1]);
    int status;
    while (waitpid(helper, &status, 0) < 0 && errno == EINTR) {
    }
    int lfd, killable = 0;
    if (install_filter(&lfd, &killable) != 0) {
        say("the system-call supervisor needs seccomp user notification (Linux 5.14 or newer, "
            "seccomp enabled): %s",
            strerror(errno));
        return 1;
    }
    /* From here the launcher's own open calls are trapped: it only writes, reads and execs. */
    int msg[2] = {lfd, killable};
    if (write(to_s[1], msg, sizeof msg) != (ssize_t)sizeof msg) {
        say("system-call supervisor: %s", strerror(errno));
        return 1;
    }
    char ready[16];
    ssize_t got;
    do {
        got = read(from_s[0], ready, sizeof ready);
    } while (got < 0 && errno == EINTR);
    if (got < 1 || ready[0] != 'R') {
        say("the system-call supervisor did not start (see above); %s was not run", cmd[0]);
        return 1;
    }
    char pid_s[16];
    memcpy(pid_s, ready + 1, (size_t)got - 1 < sizeof pid_s - 1 ? (size_t)got - 1 : sizeof pid_s - 1);
    pid_s[(size_t)got - 1 < sizeof pid_s - 1 ? (size_t)got - 1 : sizeof pid_s - 1] = 0;
    close(lfd);
    close(to_s[1]);
    close(from_s[0]);
    setenv("MIRRORD_SUPERVISOR_PID", pid_s, 1);
    if (!keep_dont_load) {
        unsetenv("MIRRORD_DONT_LOAD");
    }
    execvp(cmd[0], cmd);
    int e = errno;
    say("cannot run %s: %s", cmd[0], strerror(e));
    return e == ENOENT ? 127 : 126;
}

/* ---------------------------------------------------------------- serving */

/* From the layer (native/files.c), found at run time: the supervisor runs with it preloaded. */
typedef int (*sv_open_fn)(const char *path, int flags, unsigned mode, int *fd_out);
typedef int (*sv_decide_fn)(const char *path, int flags);
typedef int (*sv_access_fn)(const char *path, int mode, int flags);
typedef int (*sv_stat_fn)(const char *path, int follow, struct stat *st);
static sv_access_fn g_access;
static sv_stat_fn g_stat;
/* The program's call waits killably (WAIT_KILLABLE_RECV): once received it cannot be
 * abandoned but by the program's death, so an answer may be written into its buffer (stat)
 * without racing a signal handler that reuses that memory. Without it, stat calls continue. */
static int g_killable;
static sv_open_fn g_open;
static sv_decide_fn g_decide;
static int g_lfd;
static int g_addfd_send = 1; /* ADDFD_FLAG_SEND (5.14); cleared if the kernel refuses it */

/* A NUL-terminated string of the target, read page by page (a string ending just before an
 * unmapped page must not fail). 0, or -1 (unreadable, too long). */
static int read_string(pid_t pid, uint64_t addr, char *out, size_t cap) {
    size_t have = 0;
    while (have < cap) {
        size_t room = 4096 - ((addr + have) & 4095);
        if (room > cap - have) {
            room = cap - have;
        }
        struct iovec local = {out + have, room};
        struct iovec remote = {(void *)(uintptr_t)(addr + have), room};
        ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (n <= 0) {
            return -1;
        }
        void *nul = memchr(out + have, 0, (size_t)n);
        if (nul != NULL) {
            return 0;
        }
        have += (size_t)n;
    }
    return -1;
}

static int read_mem(pid_t pid, uint64_t addr, void *out, size_t len) {
    struct iovec local = {out, len};
    struct iovec remote = {(void *)(uintptr_t)addr, len};
    return process_vm_readv(pid, &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

struct call {
    int dirfd;
    uint64_t path_addr;
    int flags;
    unsigned mode;
    int resolve; /* openat2's RESOLVE_* flags */
    int access;  /* the access family: `mode` is its mode, `flags` its AT_* flags */
    int stat;    /* the stat family: `buf_addr` is where the answer goes */
    int follow;
    int empty;   /* AT_EMPTY_PATH: an fstat of dirfd */
    uint64_t buf_addr;
};

static int decode(const struct seccomp_notif *req, struct call *c) {
    const __u64 *a = req->data.args;
    memset(c, 0, sizeof *c);
    c->dirfd = AT_FDCWD;
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
#ifdef __NR_access
    if (req->data.nr == __NR_access) {
        c->path_addr = a[0];
        c->mode = (unsigned)a[1];
        c->access = 1;
        return 0;
    }
#endif
#ifdef __NR_stat
    if (req->data.nr == __NR_stat || req->data.nr == __NR_lstat) {
        c->path_addr = a[0];
        c->buf_addr = a[1];
        c->follow = req->data.nr == __NR_stat;
        c->stat = 1;
        return 0;
    }
#endif
    if (req->data.nr == __NR_newfstatat) {
        c->dirfd = (int)a[0];
        c->path_addr = a[1];
        c->buf_addr = a[2];
        c->follow = !((int)a[3] & AT_SYMLINK_NOFOLLOW);
        c->empty = ((int)a[3] & AT_EMPTY_PATH) != 0;
        c->stat = 1;
        return 0;
    }
    if (req->data.nr == __NR_faccessat || req->data.nr == __NR_faccessat2) {
        c->dirfd = (int)a[0];
        c->path_addr = a[1];
        c->mode = (unsigned)a[2];
        c->flags = req->data.nr == __NR_faccessat2 ? (int)a[3] : 0;
        c->access = 1;
        return 0;
    }
    if (req->data.nr == __NR_openat2) {
        struct open_how how;
        if (a[3] < sizeof how || read_mem(req->pid, a[2], &how, sizeof how) != 0) {
            return -1;
        }
        c->dirfd = (int)a[0];
        c->path_addr = a[1];
        c->flags = (int)how.flags;
        c->mode = (unsigned)how.mode;
        c->resolve = how.resolve != 0;
        return 0;
    }
    return -1;
}

static void reply(uint64_t id, int error, int cont) {
    struct seccomp_notif_resp resp = {.id = id, .val = 0, .error = error ? -error : 0,
                                      .flags = cont ? SECCOMP_USER_NOTIF_FLAG_CONTINUE : 0};
    /* ENOENT: the call went away meanwhile (a signal, the program died): nothing to answer */
    ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
}

/* Installs `fd` in the target as the result of its open. */
static void reply_fd(uint64_t id, int fd, int flags) {
    struct seccomp_notif_addfd add = {.id = id, .srcfd = (uint32_t)fd, .newfd = 0,
                                      .newfd_flags = (uint32_t)(flags & O_CLOEXEC)};
    if (__atomic_load_n(&g_addfd_send, __ATOMIC_RELAXED)) {
        add.flags = SECCOMP_ADDFD_FLAG_SEND;
        int r = ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
        if (r >= 0) {
            return; /* installed and answered at once */
        }
        if (errno != EINVAL) {
            reply(id, errno, 0); /* EMFILE in the program...; ENOENT: it went away */
            return;
        }
        __atomic_store_n(&g_addfd_send, 0, __ATOMIC_RELAXED); /* 5.9 - 5.13 */
        add.flags = 0;
    }
    int newfd = ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
    if (newfd < 0) {
        reply(id, errno == ENOENT ? EIO : errno, 0);
        return;
    }
    struct seccomp_notif_resp resp = {.id = id, .val = newfd, .error = 0, .flags = 0};
    ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
}

/* One trapped call. `fallback`: the supervisor died; answer as on a lost agent. */
static void handle(const struct seccomp_notif *req, int fallback) {
    struct call c;
    char path[PATH_CAP];
    if (decode(req, &c) != 0 || read_string(req->pid, c.path_addr, path, sizeof path) != 0) {
        reply(req->id, 0, 1); /* unreadable: let the kernel give its own answer (EFAULT...) */
        return;
    }
    /* What was read belongs to this call only if the call is still pending (the thread may
     * have been interrupted and its memory reused). */
    if (ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id) != 0) {
        return;
    }
    /* Relative paths are local (the layer's rule 1); so is anything below a directory fd of
     * the program (the supervisor never installs a remote directory), and openat2 with
     * RESOLVE_* flags (their semantics cannot be kept on the target's side yet). */
    if (path[0] != '/' || c.resolve || (c.stat && (c.empty && path[0] == 0))) {
        reply(req->id, 0, 1);
        return;
    }
    if (fallback) {
        int d = g_decide != NULL ? g_decide(path, c.access ? O_RDONLY : c.flags) : 0;
        reply(req->id, d == 0 ? 0 : d == 2 ? ENOENT : EIO, d == 0);
        return;
    }
    if (c.stat) {
        struct stat st;
        int r = g_stat != NULL && g_killable ? g_stat(path, c.follow, &st) : 0;
        if (r == 0) {
            reply(req->id, 0, 1);
        } else if (r < 0) {
            reply(req->id, errno != 0 ? errno : EIO, 0);
        } else {
            struct iovec local = {&st, sizeof st};
            struct iovec remote = {(void *)(uintptr_t)c.buf_addr, sizeof st};
            ssize_t n = process_vm_writev(req->pid, &local, 1, &remote, 1, 0);
            reply(req->id, n == (ssize_t)sizeof st ? 0 : EFAULT, 0);
        }
        return;
    }
    if (c.access) {
        int r = g_access != NULL ? g_access(path, (int)c.mode, c.flags) : 0;
        if (r == 0) {
            reply(req->id, 0, 1);
        } else {
            reply(req->id, r > 0 ? 0 : errno != 0 ? errno : EIO, 0);
        }
        return;
    }
    int fd = -1;
    int r = g_open != NULL ? g_open(path, c.flags, c.mode, &fd) : 0;
    if (r == 0) {
        reply(req->id, 0, 1);
    } else if (r < 0) {
        reply(req->id, errno != 0 ? errno : EIO, 0);
    } else {
        reply_fd(req->id, fd, c.flags);
        close(fd); /* through the layer: it forgets the file */
    }
}

/* Each worker receives into its own slot of a mapping shared with the fallback F: a call the
 * supervisor received but did not answer when it died (the kernel wrote the notification
 * there before the thread could die) is still pending, and only its id lets F answer it;
 * without this the program would wait for it forever. */
struct slot {
    struct seccomp_notif req;
    char room[256 - sizeof(struct seccomp_notif)]; /* a kernel with a bigger seccomp_notif */
};
static struct slot *g_slots;

static void *worker(void *arg) {
    struct seccomp_notif *req = &g_slots[(intptr_t)arg].req;
    for (;;) {
        memset(req, 0, sizeof(struct slot));
        if (ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_RECV, req) != 0) {
            if (errno == EINTR || errno == ENOENT) {
                continue;
            }
            return NULL;
        }
        handle(req, 0);
    }
}

/* The fallback answerer: waits for the supervisor's death (or for the program's end). */
static int fallback(pid_t supervisor) {
    int pidfd = (int)syscall(SYS_pidfd_open, supervisor, 0);
    if (pidfd < 0) {
        return 0;
    }
    struct pollfd p[2] = {{.fd = pidfd, .events = POLLIN}, {.fd = g_lfd, .events = 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            return 1;
        }
        if (p[1].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            return 0; /* every supervised process is gone */
        }
        if (p[0].revents & POLLIN) {
            break;
        }
    }
    say("the system-call supervisor (pid %d) died: from now on the program's calls that go to "
        "the target fail with EIO (as on a lost agent); local ones go on",
        (int)supervisor);
    for (int i = 0; i < WORKERS; i++) {
        struct seccomp_notif req = g_slots[i].req;
        /* still pending: received by the supervisor, never answered */
        if (req.id != 0 && ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &req.id) == 0) {
            handle(&req, 1);
        }
    }
    struct pollfd l = {.fd = g_lfd, .events = POLLIN};
    for (;;) {
        if (poll(&l, 1, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            return 1;
        }
        if (l.revents & (POLLHUP | POLLERR | POLLNVAL)) {
            return 0;
        }
        struct seccomp_notif req;
        memset(&req, 0, sizeof req);
        if (ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_RECV, &req) == 0) {
            handle(&req, 1);
        }
    }
}

static int serve(int lfd, int ready_fd) {
    g_lfd = lfd;
    fcntl(lfd, F_SETFD, FD_CLOEXEC);
    fcntl(ready_fd, F_SETFD, FD_CLOEXEC);
    g_open = (sv_open_fn)dlsym(RTLD_DEFAULT, "mirrord_supervisor_open");
    g_decide = (sv_decide_fn)dlsym(RTLD_DEFAULT, "mirrord_supervisor_decide");
    g_access = (sv_access_fn)dlsym(RTLD_DEFAULT, "mirrord_supervisor_access");
    g_stat = (sv_stat_fn)dlsym(RTLD_DEFAULT, "mirrord_supervisor_stat");
    if (g_open == NULL || g_decide == NULL || g_access == NULL) {
        say("system-call supervisor: the layer is not loaded (LD_PRELOAD): every call stays local");
    }
    struct seccomp_notif_sizes sizes;
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) != 0 ||
        sizes.seccomp_notif > sizeof(struct slot)) {
        say("system-call supervisor: this kernel's seccomp notifications are not supported");
        return 1;
    }
    g_slots = mmap(NULL, sizeof(struct slot) * WORKERS, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (g_slots == MAP_FAILED) {
        say("system-call supervisor: mmap: %s", strerror(errno));
        return 1;
    }
    /* SYNC_WAKE_UP (6.6): the answering thread wakes the program on its own core, which
     * halves a trapped call's cost on a busy machine (notes); older kernels do without */
    ioctl(lfd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, (unsigned long)SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP);
    pid_t me = getpid();
    pid_t f = fork();
    if (f == 0) {
        close(ready_fd);
        _exit(fallback(me));
    }
    signal(SIGPIPE, SIG_IGN);
    pthread_t t;
    for (int i = 0; i < WORKERS; i++) {
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)i) != 0) {
            say("system-call supervisor: cannot start its threads");
            return 1;
        }
        pthread_detach(t);
    }
    char ready[16];
    int n = snprintf(ready, sizeof ready, "R%d", (int)me);
    if (write(ready_fd, ready, (size_t)n) != n) {
        return 1;
    }
    close(ready_fd);
    /* Ends when no process uses the filter any more (the program and its children exited). */
    struct pollfd p = {.fd = lfd, .events = 0};
    for (;;) {
        if (poll(&p, 1, -1) < 0 && errno != EINTR) {
            break;
        }
        if (p.revents & (POLLHUP | POLLERR | POLLNVAL)) {
            break;
        }
    }
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "--serve") == 0) {
        g_killable = atoi(argv[4]) == 1;
        return serve(atoi(argv[2]), atoi(argv[3]));
    }
    int keep = 0, auto_mode = 0;
    int i = 1;
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--keep-dont-load") == 0) {
            keep = 1;
        } else if (strcmp(argv[i], "--auto") == 0) {
            auto_mode = 1;
        } else {
            break;
        }
    }
    if (i < argc && strcmp(argv[i], "--") == 0) {
        i++;
    }
    if (i >= argc) {
        say("usage: mirrord-supervisor [--keep-dont-load] [--auto] -- CMD [ARGS]  "
            "(started by `mirrord run --syscalls`)");
        return 2;
    }
    return launch(argv + i, keep, auto_mode);
}
