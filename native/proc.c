/* Process hooks: fork, vfork, exec*, posix_spawn*.
 *
 * Children keep the layer through the environment: every exec/spawn hook passes an env that
 * has LD_PRELOAD with this library and the MIRRORD_* settings even when the app built its own
 * env, plus MIRRORD_LAYER_PARENT (who registers the child) and, for exec in the same process,
 * MIRRORD_LAYER_FD (the process's daemon connection, kept open across exec so the daemon
 * keeps its subscriptions), MIRRORD_LAYER_LISTENERS (subscribed listening sockets, which
 * survive exec) and MIRRORD_LAYER_FILES (remote files open on fds that survive exec).
 * fork: the child registers at once naming its parent, so the agent copies the parent's
 * remote handles; when there are any, the parent waits (bounded) until the child has
 * registered, so that the parent closing a handle cannot race the copy.
 */
#include "layer.h"

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

static char *g_lib_path;
/* MIRRORD_*_DEBUGGER_*: a debugger's helpers are often started with an env of their own
 * (js-debug's watchdog gets only NODE_INSPECTOR_INFO) and still talk to the debuggee's port;
 * saved after debugger_init, so they carry the port it detected. */
static const char *const SAVED_NAMES[] = {
    "MIRRORD_LAYER_SOCKET", "MIRRORD_SESSION", "MIRRORD_LAYER_CONFIG", "MIRRORD_LAYER_DEBUG",
    "UV_USE_IO_URING", "MIRRORD_IGNORE_DEBUGGER_PORTS", "MIRRORD_DETECT_DEBUGGER_PORT", NULL,
};
static char *g_saved[sizeof SAVED_NAMES / sizeof SAVED_NAMES[0]];
static char *g_parent_digits; /* inside environ's MIRRORD_LAYER_PARENT=..., fixed width */
static pid_t g_layer_pid; /* this process, as of init or the fork hook (see _exit) */
#define PARENT_WIDTH 10

static void write_digits(char *p, long v) {
    for (int i = PARENT_WIDTH - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
}

void proc_init_env(void) {
    g_layer_pid = getpid();
    Dl_info info;
    if (dladdr((void *)proc_init_env, &info) != 0 && info.dli_fname != NULL) {
        g_lib_path = strdup(info.dli_fname);
    }
    for (int i = 0; SAVED_NAMES[i]; i++) {
        const char *v = getenv(SAVED_NAMES[i]);
        if (v != NULL) {
            size_t n = strlen(SAVED_NAMES[i]) + strlen(v) + 2;
            g_saved[i] = malloc(n);
            if (g_saved[i] != NULL) {
                snprintf(g_saved[i], n, "%s=%s", SAVED_NAMES[i], v);
            }
        }
    }
    /* consumed by this image; stale for any child */
    unsetenv("MIRRORD_LAYER_FD");
    unsetenv("MIRRORD_LAYER_LISTENERS");
    files_restore_fds(getenv("MIRRORD_LAYER_FILES")); /* remote fds from before exec */
    unsetenv("MIRRORD_LAYER_FILES");
    const char *vcwd = getenv("MIRRORD_LAYER_CWD");
    if (vcwd != NULL && vcwd[0] == '/') {
        files_set_vcwd(vcwd); /* a remote working directory from before exec */
    }
    unsetenv("MIRRORD_LAYER_CWD");
    /* children spawned through paths no hook sees (system, popen) still name their parent */
    char digits[PARENT_WIDTH + 1];
    write_digits(digits, (long)getpid());
    digits[PARENT_WIDTH] = 0;
    if (setenv("MIRRORD_LAYER_PARENT", digits, 1) == 0) {
        g_parent_digits = getenv("MIRRORD_LAYER_PARENT");
    }
}

/* In a fork child: environ's MIRRORD_LAYER_PARENT now names this process (no allocation). */
void proc_fork_child(void) {
    g_layer_pid = getpid();
    if (g_parent_digits != NULL && getenv("MIRRORD_LAYER_PARENT") == g_parent_digits &&
        strlen(g_parent_digits) == PARENT_WIDTH) {
        write_digits(g_parent_digits, (long)getpid());
    }
}

static int env_has(char *const envp[], const char *name, size_t n) {
    for (int i = 0; envp && envp[i]; i++) {
        if (strncmp(envp[i], name, n) == 0 && envp[i][n] == '=') {
            return i;
        }
    }
    return -1;
}

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...) {
    va_list ap;
    va_start(ap, f);
    char *s = NULL;
    if (vasprintf(&s, f, ap) < 0) {
        s = NULL;
    }
    va_end(ap);
    return s;
}

/* same_process: exec (keep the connection and listeners) vs spawn (a new child). */
static char **exec_env(char *const envp[], int keep_fd, int same_process) {
    size_t n = 0;
    while (envp && envp[n]) {
        n++;
    }
    char **out = calloc(n + 16, sizeof *out);
    if (out == NULL) {
        return NULL;
    }
    size_t k = 0;
    int have_preload = 0;
    for (size_t i = 0; i < n; i++) {
        const char *e = envp[i];
        if (strncmp(e, "MIRRORD_LAYER_FD=", 17) == 0 || strncmp(e, "MIRRORD_LAYER_PARENT=", 21) == 0 ||
            strncmp(e, "MIRRORD_LAYER_LISTENERS=", 24) == 0 || strncmp(e, "MIRRORD_LAYER_CWD=", 18) == 0 ||
            strncmp(e, "MIRRORD_LAYER_FILES=", 20) == 0) {
            continue;
        }
        if (strncmp(e, "LD_PRELOAD=", 11) == 0 && g_lib_path != NULL) {
            have_preload = 1;
            if (strstr(e + 11, g_lib_path) == NULL) {
                out[k++] = fmt("%s%s%s", e, e[11] ? ":" : "", g_lib_path);
                continue;
            }
        }
        out[k++] = strdup(e);
    }
    if (!have_preload && g_lib_path != NULL) {
        out[k++] = fmt("LD_PRELOAD=%s", g_lib_path);
    }
    for (int i = 0; SAVED_NAMES[i]; i++) {
        if (g_saved[i] != NULL && env_has(envp, SAVED_NAMES[i], strlen(SAVED_NAMES[i])) < 0) {
            out[k++] = strdup(g_saved[i]);
        }
    }
    char vcwd[4096];
    if (files_get_vcwd(vcwd, sizeof vcwd)) {
        out[k++] = fmt("MIRRORD_LAYER_CWD=%s", vcwd);
    }
    pid_t parent = same_process ? conn_parent() : getpid();
    if (parent > 0) {
        out[k++] = fmt("MIRRORD_LAYER_PARENT=%0*d", PARENT_WIDTH, (int)parent);
    }
    if (same_process && keep_fd >= 0) {
        out[k++] = fmt("MIRRORD_LAYER_FD=%d:%d", keep_fd, (int)getpid());
    }
    if (same_process) {
        char buf[1024];
        size_t len = 0;
        buf[0] = 0;
        for (int fd = 0; fd < 4096 && len < sizeof buf - 32; fd++) {
            struct ent *e = fd_peek(fd);
            if (e != NULL && e->kind == K_SOCK && e->subscribed &&
                !(REAL(fcntl)(fd, F_GETFD) & FD_CLOEXEC)) {
                len += (size_t)snprintf(buf + len, sizeof buf - len, "%s%d:%d", len ? "," : "", fd,
                                        e->sub_port);
            }
        }
        if (len > 0) {
            out[k++] = fmt("MIRRORD_LAYER_LISTENERS=%s", buf);
        }
        char *files = files_exec_env();
        if (files != NULL) {
            out[k++] = files;
        }
    }
    for (size_t i = 0; i < k; i++) {
        if (out[i] == NULL) { /* out of memory: give up on our additions */
            proc_free_env(out);
            return NULL;
        }
    }
    out[k] = NULL;
    return out;
}

char **proc_exec_env(char *const envp[], int keep_fd) { return exec_env(envp, keep_fd, 1); }

void proc_free_env(char **env) {
    if (env == NULL) {
        return;
    }
    for (size_t i = 0; env[i]; i++) {
        free(env[i]);
    }
    free(env);
}

/* Before an exec: write back what the new image will not know, keep the daemon connection
 * for it, and build its environment (NULL: use envp as it is). */
static char **exec_prepare(char *const envp[]) {
    t_guard++;
    wfile_flush_all();
    fbuf_before_exec();
    int fd;
    pid_t pid;
    conn_prepare_exec(&fd, &pid);
    char **env = exec_env(envp, fd, 1);
    t_guard--;
    return env;
}

/* The exec returned, so it failed: undo exec_prepare, keeping the exec's errno. */
static void exec_failed(char **env) {
    int e = errno;
    conn_exec_failed();
    proc_free_env(env);
    errno = e;
}

HOOK int execve(const char *path, char *const argv[], char *const envp[]) {
    if (!g_active || t_guard) {
        return REAL(execve)(path, argv, envp);
    }
    char **env = exec_prepare(envp);
    int r = REAL(execve)(path, argv, env ? env : envp);
    exec_failed(env);
    return r;
}

HOOK int execv(const char *path, char *const argv[]) { return execve(path, argv, environ); }

HOOK int execvpe(const char *file, char *const argv[], char *const envp[]) {
    if (!g_active || t_guard) {
        return REAL(execvpe)(file, argv, envp);
    }
    char **env = exec_prepare(envp);
    int r = REAL(execvpe)(file, argv, env ? env : envp);
    exec_failed(env);
    return r;
}

HOOK int execvp(const char *file, char *const argv[]) { return execvpe(file, argv, environ); }

/* execl, execlp, execle: glibc builds the argv and calls its internal execve, which no hook
 * sees; collect the arguments here and go through the hooked variants instead. */
#define MAX_EXECL_ARGS 4096
#define COLLECT_ARGS(first, ap, argv, n)                    \
    do {                                                    \
        argv[0] = (char *)(first);                          \
        n = 1;                                              \
        while (argv[n - 1] != NULL && n < MAX_EXECL_ARGS) { \
            argv[n++] = va_arg(ap, char *);                 \
        }                                                   \
    } while (0)

HOOK int execl(const char *path, const char *arg, ...) {
    char *argv[MAX_EXECL_ARGS];
    size_t n;
    va_list ap;
    va_start(ap, arg);
    COLLECT_ARGS(arg, ap, argv, n);
    va_end(ap);
    if (argv[n - 1] != NULL) {
        errno = E2BIG;
        return -1;
    }
    return execve(path, argv, environ);
}

HOOK int execlp(const char *file, const char *arg, ...) {
    char *argv[MAX_EXECL_ARGS];
    size_t n;
    va_list ap;
    va_start(ap, arg);
    COLLECT_ARGS(arg, ap, argv, n);
    va_end(ap);
    if (argv[n - 1] != NULL) {
        errno = E2BIG;
        return -1;
    }
    return execvpe(file, argv, environ);
}

HOOK int execle(const char *path, const char *arg, ...) {
    char *argv[MAX_EXECL_ARGS];
    size_t n;
    va_list ap;
    va_start(ap, arg);
    COLLECT_ARGS(arg, ap, argv, n);
    char *const *envp = argv[n - 1] == NULL ? va_arg(ap, char *const *) : NULL;
    va_end(ap);
    if (argv[n - 1] != NULL) {
        errno = E2BIG;
        return -1;
    }
    return execve(path, argv, envp);
}

static int spawn_common(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                        const posix_spawnattr_t *attr, char *const argv[], char *const envp[],
                        int p) {
    char **env = NULL;
    if (g_active && !t_guard) {
        /* a child that must see remote files: fork, its actions through the hooks, exec */
        int r = files_spawn(pid, path, fa, attr, argv, envp, p);
        if (r >= 0) {
            return r;
        }
        t_guard++;
        fbuf_before_fork(); /* its file actions may dup2 any fd, close-on-exec or not */
        env = exec_env(envp ? envp : environ, -1, 0);
        t_guard--;
    }
    char *const *use = env ? env : envp;
    int r = p ? REAL(posix_spawnp)(pid, path, fa, attr, argv, use)
              : REAL(posix_spawn)(pid, path, fa, attr, argv, use);
    proc_free_env(env);
    return r;
}

HOOK int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                     const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    return spawn_common(pid, path, fa, attr, argv, envp, 0);
}

HOOK int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                      const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    return spawn_common(pid, file, fa, attr, argv, envp, 1);
}

HOOK pid_t fork(void) {
    if (!g_active || t_guard) {
        return REAL(fork)();
    }
    int sync[2] = {-1, -1};
    int need_sync = conn_registered() && __atomic_load_n(&g_nhandles, __ATOMIC_RELAXED) > 0;
    if (need_sync && pipe2(sync, O_CLOEXEC) < 0) {
        need_sync = 0;
    }
    if (need_sync) {
        t_guard++;
        fbuf_before_fork(); /* the child shares the open files, not the layer's buffers */
        t_guard--;
    }
    pid_t pid = REAL(fork)();
    if (pid == 0) {
        /* the atfork child handler has already dropped the parent's connections */
        t_guard++;
        int saved = errno;
        if (conn_register_now() < 0) {
            DBG("fork child could not register with the daemon");
        }
        if (need_sync) {
            ssize_t UNUSED w = REAL(write)(sync[1], "r", 1);
            REAL(close)(sync[0]);
            REAL(close)(sync[1]);
        }
        errno = saved;
        t_guard--;
    } else if (need_sync) {
        int saved = errno;
        REAL(close)(sync[1]);
        if (pid > 0) {
            struct pollfd pfd = {.fd = sync[0], .events = POLLIN};
            (void)poll(&pfd, 1, g_set.timeout_ms);
        }
        REAL(close)(sync[0]);
        errno = saved;
    }
    return pid;
}

/* vfork's child shares the parent's memory: the layer's registration would corrupt it, so
 * vfork is a fork (its callers only exec or _exit, which fork allows too). */
HOOK pid_t vfork(void) { return fork(); }

/* _exit skips atexit and destructors, so the layer's write-back at exit too: a shell's
 * subshell (`(echo a; cmd; echo c) >> /app/log`) ends with _exit and its last writes were lost.
 * The write-back is idempotent for every holder of a file (see wfile_flush), so a fork child
 * that _exits after a failed exec writing back its parent's pending data is harmless. */
HOOK void _exit(int status) {
    /* not in a child made by a raw clone(CLONE_VM) (no fork hook ran): it shares the parent's
     * memory and connections, and must touch neither */
    if (g_active && !t_guard && getpid() == g_layer_pid) {
        t_guard++;
        wfile_flush_all();
    }
    REAL(_exit)(status);
    __builtin_unreachable();
}

HOOK void _Exit(int status) { _exit(status); }

