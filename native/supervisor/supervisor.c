/* mirrord-supervisor: the system-call supervisor, for programs the layer cannot reach (static
 * binaries, Go). See docs/layer.md, "The system-call supervisor".
 *
 * Owns: installing the seccomp filter in the program before its exec, and answering the
 * trapped calls. Does not own any local/remote decision or any daemon request: it runs with
 * the layer preloaded (libmirrord_layer.so, as one more layer process of the session) and asks
 * the layer through functions the layer exports for it (mirrord_supervisor_* in
 * native/files_supervisor.c and native/supervise.c, and its libc hooks), so there is one policy
 * and one request path.
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
 * Files: this one (main, the launcher, the filter), serve.c, sv_files.c, sv_paths.c, sv_net.c
 * (sv.h).
 */
#include "sv.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
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

int sv_serve(int lfd, int ready_fd);

static const char *g_self = "mirrord-supervisor";

void sv_say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    dprintf(2, "mirrord: %s\n", buf);
}

/* ---------------------------------------------------------------- the filter */

/* The calls sent to the supervisor; every other one runs natively (read/write never come). */
static const int g_trapped[] = {
#ifdef __NR_open
    __NR_open, __NR_access, __NR_stat, __NR_lstat, __NR_readlink, __NR_mkdir, __NR_rmdir,
    __NR_unlink, __NR_rename,
#endif
    __NR_openat, __NR_openat2, __NR_faccessat, __NR_faccessat2, __NR_newfstatat, __NR_statx,
    __NR_readlinkat, __NR_mkdirat, __NR_unlinkat, __NR_renameat, __NR_renameat2,
    __NR_connect, __NR_getpeername, __NR_getsockname, __NR_bind, __NR_listen, __NR_accept,
    __NR_accept4, __NR_uname,
};
#define NTRAPPED (sizeof g_trapped / sizeof g_trapped[0])

static int install_filter(int *listener, int *killable) {
    struct sock_filter code[6 + NTRAPPED + 2] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SV_ARCH, 1, 0),
        /* another architecture (int 0x80 on x86_64): denied, never let past the filter */
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        /* the x32 ABI shares x86_64's architecture value: its numbers have bit 30 set */
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
    };
    size_t n = 6;
    for (size_t i = 0; i < NTRAPPED; i++) { /* a match jumps to the last instruction */
        code[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
                                                 (unsigned)g_trapped[i], NTRAPPED - i, 0);
    }
    code[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    code[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF);
    struct sock_fprog prog = {.len = (unsigned short)n, .filter = code};
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

struct launch {
    char **cmd;
    int keep_dont_load; /* MIRRORD_DONT_LOAD stays set (it was the user's own) */
    int to_s[2], from_s[2]; /* launcher -> S: the listener's number; S -> launcher: ready */
    pid_t launcher;
};

/* execvp of the program, with the layer active again; returns (127, 126) only on failure. */
static int exec_program(const struct launch *l) {
    if (!l->keep_dont_load) {
        unsetenv("MIRRORD_DONT_LOAD");
    }
    execvp(l->cmd[0], l->cmd);
    int e = errno;
    sv_say("cannot run %s: %s", l->cmd[0], strerror(e));
    return e == ENOENT ? 127 : 126;
}

/* S, before it serves: takes the listener from the launcher and re-executes itself as
 * `--serve` with the layer active. Never returns. */
static void become_supervisor(const struct launch *l) {
    int n, killable;
    if (read(l->to_s[0], &n, sizeof n) != (ssize_t)sizeof n ||
        read(l->to_s[0], &killable, sizeof killable) != (ssize_t)sizeof killable) {
        _exit(1); /* the launcher failed to install the filter and said why */
    }
    int pidfd = (int)syscall(SYS_pidfd_open, l->launcher, 0);
    int lfd = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, n, 0);
    if (lfd < 0) {
        sv_say("system-call supervisor: cannot take the seccomp listener from pid %d: %s "
               "(needs Linux 5.6 and ptrace rights over the program)",
               (int)l->launcher, strerror(errno));
        _exit(1);
    }
    close(pidfd);
    char lfd_s[16], ready_s[16], killable_s[4];
    snprintf(lfd_s, sizeof lfd_s, "%d", lfd);
    snprintf(killable_s, sizeof killable_s, "%d", killable != 0);
    snprintf(ready_s, sizeof ready_s, "%d", l->from_s[1]);
    fcntl(lfd, F_SETFD, 0); /* pidfd_getfd sets close-on-exec */
    fcntl(l->from_s[1], F_SETFD, 0);
    if (!l->keep_dont_load) {
        unsetenv("MIRRORD_DONT_LOAD"); /* the layer is active in the supervisor */
    }
    char *argv[] = {(char *)g_self, "--serve", lfd_s, ready_s, killable_s, NULL};
    execv("/proc/self/exe", argv);
    sv_say("system-call supervisor: exec: %s", strerror(errno));
    _exit(1);
}

/* The helper: a new session (the terminal's Ctrl-C is for the program), stdin and stdout the
 * program's alone (a reader of its output sees the end when the program ends), then S. */
static void helper(const struct launch *l) {
    close(l->to_s[1]);
    close(l->from_s[0]);
    setsid();
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
    become_supervisor(l);
}

/* The launcher, with the filter installed: hands the listener over, waits for S to be ready
 * and puts its pid in the environment. 0, or 1 (said why). */
static int hand_over(const struct launch *l, int lfd, int killable) {
    /* From here the launcher's own open calls are trapped: it only writes, reads and execs. */
    int msg[2] = {lfd, killable};
    if (write(l->to_s[1], msg, sizeof msg) != (ssize_t)sizeof msg) {
        sv_say("system-call supervisor: %s", strerror(errno));
        return 1;
    }
    char ready[16];
    ssize_t got;
    do {
        got = read(l->from_s[0], ready, sizeof ready - 1);
    } while (got < 0 && errno == EINTR);
    if (got < 1 || ready[0] != 'R') {
        sv_say("the system-call supervisor did not start (see above); %s was not run", l->cmd[0]);
        return 1;
    }
    ready[got] = 0;
    close(lfd);
    close(l->to_s[1]);
    close(l->from_s[0]);
    setenv("MIRRORD_SUPERVISOR_PID", ready + 1, 1);
    return 0;
}

/* auto: chosen because the executable is static or Go, not asked for; where the kernel cannot
 * trap, the command runs as it would have without the supervisor (with a warning). */
static int launch(char **cmd, int keep_dont_load, int auto_mode) {
    struct launch l = {.cmd = cmd, .keep_dont_load = keep_dont_load, .launcher = getpid()};
    if (auto_mode &&
        syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &(struct seccomp_notif_sizes){0}) != 0) {
        sv_say("warning: %s needs the system-call supervisor and this kernel has no seccomp "
               "user notification (Linux 5.14 or newer): it runs without the target's files",
               cmd[0]);
        return exec_program(&l);
    }
    if (pipe2(l.to_s, O_CLOEXEC) != 0 || pipe2(l.from_s, O_CLOEXEC) != 0) {
        sv_say("system-call supervisor: pipe: %s", strerror(errno));
        return 1;
    }
    pid_t h = fork();
    if (h < 0) {
        sv_say("system-call supervisor: fork: %s", strerror(errno));
        return 1;
    }
    if (h == 0) {
        helper(&l);
    }
    close(l.to_s[0]);
    close(l.from_s[1]);
    int status;
    while (waitpid(h, &status, 0) < 0 && errno == EINTR) {
    }
    int lfd, killable = 0;
    if (install_filter(&lfd, &killable) != 0) {
        sv_say("the system-call supervisor needs seccomp user notification (Linux 5.14 or newer, "
               "seccomp enabled): %s",
               strerror(errno));
        return 1;
    }
    if (hand_over(&l, lfd, killable) != 0) {
        return 1;
    }
    return exec_program(&l);
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "--serve") == 0) {
        g_killable = atoi(argv[4]) == 1;
        return sv_serve(atoi(argv[2]), atoi(argv[3]));
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
        sv_say("usage: mirrord-supervisor [--keep-dont-load] [--auto] -- CMD [ARGS]  "
            "(started by `mirrord run --syscalls`)");
        return 2;
    }
    return launch(argv + i, keep, auto_mode);
}
