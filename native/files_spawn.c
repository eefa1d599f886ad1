/* posix_spawn when the child must see remote files.
 *
 * glibc's posix_spawn runs the file actions in a child of its own (clone with CLONE_VFORK)
 * through its internal dup2/open/chdir and execs with its internal execve: no hook sees them.
 * A remote file dup2'd into the child (Rust's `Command::stdin(File)` and
 * `stdout(File::create(..))` are posix_spawn_file_actions_adddup2) is the layer's
 * placeholder there (a handle-backed file reads empty; what the child writes into a write-back
 * cache is never written back), and an addopen or addchdir_np of a path in the target opens or
 * enters the local one. So the layer records each file-actions object's actions (the add*
 * hooks below: glibc keeps them private), and a spawn whose actions or inherited fds touch a
 * remote file runs as fork, the attributes and the actions through the layer's own hooks, and
 * exec: the fork hook registers the child naming its parent (the agent copies the parent's
 * handles before the parent goes on and closes its own), exec passes the remote fds on
 * (MIRRORD_LAYER_FILES). An exec failure comes back through a close-on-exec pipe as the error
 * posix_spawn returns, the child reaped. Every other spawn, and one whose file-actions object
 * the layer did not see built (or holds an action it cannot replay), is glibc's.
 *
 * Owns: the recorded file actions and files_spawn. Does not own: the spawn hooks themselves
 * and the child's environment (proc.c).
 */
#include "files.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>

extern char **environ;

enum { A_CLOSE = 1, A_DUP2, A_OPEN, A_CHDIR, A_FCHDIR, A_CLOSEFROM };

struct action {
    int tag;
    int fd;    /* close, dup2 (source), open (target), fchdir, closefrom (from) */
    int newfd; /* dup2 */
    int oflag; /* open */
    mode_t mode;
    char *path; /* open, chdir */
};

struct recorded {
    const posix_spawn_file_actions_t *fa; /* NULL: a free slot */
    struct action *a;
    int n, cap;
    int opaque; /* an action that cannot be replayed (addtcsetpgrp_np), or out of memory */
};

#define MAX_RECORDED 256 /* file-actions objects alive at once; more are left to glibc */
static struct recorded g_rec[MAX_RECORDED];
static pthread_mutex_t g_rec_lock = PTHREAD_MUTEX_INITIALIZER;

/* the real functions, resolved here: some exist only in newer glibc */
static int (*r_init)(posix_spawn_file_actions_t *);
static int (*r_destroy)(posix_spawn_file_actions_t *);
static int (*r_adddup2)(posix_spawn_file_actions_t *, int, int);
static int (*r_addclose)(posix_spawn_file_actions_t *, int);
static int (*r_addopen)(posix_spawn_file_actions_t *, int, const char *, int, mode_t);
static int (*r_addchdir)(posix_spawn_file_actions_t *, const char *);
static int (*r_addfchdir)(posix_spawn_file_actions_t *, int);
static int (*r_addclosefrom)(posix_spawn_file_actions_t *, int);
static int (*r_addtcsetpgrp)(posix_spawn_file_actions_t *, int);
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void resolve(void) {
    r_init = (int (*)(posix_spawn_file_actions_t *))dlsym(RTLD_NEXT, "posix_spawn_file_actions_init");
    r_destroy =
        (int (*)(posix_spawn_file_actions_t *))dlsym(RTLD_NEXT, "posix_spawn_file_actions_destroy");
    r_adddup2 = (int (*)(posix_spawn_file_actions_t *, int, int))dlsym(
        RTLD_NEXT, "posix_spawn_file_actions_adddup2");
    r_addclose = (int (*)(posix_spawn_file_actions_t *, int))dlsym(
        RTLD_NEXT, "posix_spawn_file_actions_addclose");
    r_addopen = (int (*)(posix_spawn_file_actions_t *, int, const char *, int, mode_t))dlsym(
        RTLD_NEXT, "posix_spawn_file_actions_addopen");
    r_addchdir = (int (*)(posix_spawn_file_actions_t *, const char *))dlsym(
        RTLD_NEXT, "posix_spawn_file_actions_addchdir_np");
    r_addfchdir = (int (*)(posix_spawn_file_actions_t *, int))dlsym(
        RTLD_NEXT, "posix_spawn_file_actions_addfchdir_np");
    r_addclosefrom = (int (*)(posix_spawn_file_actions_t *, int))dlsym(
        RTLD_NEXT, "posix_spawn_file_actions_addclosefrom_np");
    r_addtcsetpgrp = (int (*)(posix_spawn_file_actions_t *, int))dlsym(
        RTLD_NEXT, "posix_spawn_file_actions_addtcsetpgrp_np");
}

#define RESOLVED(f) (pthread_once(&g_once, resolve), (f))

/* ---------------------------------------------------------------- recording */

static struct recorded *find(const posix_spawn_file_actions_t *fa) {
    for (int i = 0; i < MAX_RECORDED; i++) {
        if (g_rec[i].fa == fa) {
            return &g_rec[i];
        }
    }
    return NULL;
}

static void forget(struct recorded *r) {
    for (int i = 0; i < r->n; i++) {
        free(r->a[i].path);
    }
    free(r->a);
    memset(r, 0, sizeof *r);
}

static void start_recording(const posix_spawn_file_actions_t *fa) {
    pthread_mutex_lock(&g_rec_lock);
    struct recorded *r = find(fa);
    if (r != NULL) {
        forget(r); /* initialised again without a destroy */
    } else {
        r = find(NULL);
    }
    if (r != NULL) {
        r->fa = fa;
    }
    pthread_mutex_unlock(&g_rec_lock);
}

static void record(const posix_spawn_file_actions_t *fa, struct action a) {
    pthread_mutex_lock(&g_rec_lock);
    struct recorded *r = find(fa);
    if (r != NULL && !r->opaque) {
        if (r->n == r->cap) {
            int cap = r->cap ? r->cap * 2 : 4;
            struct action *na = realloc(r->a, (size_t)cap * sizeof *na);
            if (na == NULL) {
                r->opaque = 1;
            } else {
                r->a = na;
                r->cap = cap;
            }
        }
        if (a.path != NULL && (a.path = strdup(a.path)) == NULL) {
            r->opaque = 1;
        }
        if (r->opaque) {
            free(a.path);
        } else {
            r->a[r->n++] = a;
        }
    }
    pthread_mutex_unlock(&g_rec_lock);
}

HOOK int posix_spawn_file_actions_init(posix_spawn_file_actions_t *fa) {
    int rc = RESOLVED(r_init) ? r_init(fa) : ENOSYS;
    if (rc == 0) {
        start_recording(fa);
    }
    return rc;
}

HOOK int posix_spawn_file_actions_destroy(posix_spawn_file_actions_t *fa) {
    pthread_mutex_lock(&g_rec_lock);
    struct recorded *r = find(fa);
    if (r != NULL) {
        forget(r);
    }
    pthread_mutex_unlock(&g_rec_lock);
    return RESOLVED(r_destroy) ? r_destroy(fa) : ENOSYS;
}

HOOK int posix_spawn_file_actions_adddup2(posix_spawn_file_actions_t *fa, int fd, int newfd) {
    int rc = RESOLVED(r_adddup2) ? r_adddup2(fa, fd, newfd) : ENOSYS;
    if (rc == 0) {
        record(fa, (struct action){.tag = A_DUP2, .fd = fd, .newfd = newfd});
    }
    return rc;
}

HOOK int posix_spawn_file_actions_addclose(posix_spawn_file_actions_t *fa, int fd) {
    int rc = RESOLVED(r_addclose) ? r_addclose(fa, fd) : ENOSYS;
    if (rc == 0) {
        record(fa, (struct action){.tag = A_CLOSE, .fd = fd});
    }
    return rc;
}

HOOK int posix_spawn_file_actions_addopen(posix_spawn_file_actions_t *__restrict fa, int fd,
                                          const char *__restrict path, int oflag, mode_t mode) {
    int rc = RESOLVED(r_addopen) ? r_addopen(fa, fd, path, oflag, mode) : ENOSYS;
    if (rc == 0) {
        record(fa, (struct action){
                       .tag = A_OPEN, .fd = fd, .oflag = oflag, .mode = mode, .path = (char *)path});
    }
    return rc;
}

HOOK int posix_spawn_file_actions_addchdir_np(posix_spawn_file_actions_t *__restrict fa,
                                              const char *__restrict path) {
    int rc = RESOLVED(r_addchdir) ? r_addchdir(fa, path) : ENOSYS;
    if (rc == 0) {
        record(fa, (struct action){.tag = A_CHDIR, .path = (char *)path});
    }
    return rc;
}

HOOK int posix_spawn_file_actions_addfchdir_np(posix_spawn_file_actions_t *fa, int fd) {
    int rc = RESOLVED(r_addfchdir) ? r_addfchdir(fa, fd) : ENOSYS;
    if (rc == 0) {
        record(fa, (struct action){.tag = A_FCHDIR, .fd = fd});
    }
    return rc;
}

HOOK int posix_spawn_file_actions_addclosefrom_np(posix_spawn_file_actions_t *fa, int from) {
    int rc = RESOLVED(r_addclosefrom) ? r_addclosefrom(fa, from) : ENOSYS;
    if (rc == 0) {
        record(fa, (struct action){.tag = A_CLOSEFROM, .fd = from});
    }
    return rc;
}

HOOK int posix_spawn_file_actions_addtcsetpgrp_np(posix_spawn_file_actions_t *fa, int fd) {
    int rc = RESOLVED(r_addtcsetpgrp) ? r_addtcsetpgrp(fa, fd) : ENOSYS;
    if (rc == 0) {
        pthread_mutex_lock(&g_rec_lock);
        struct recorded *r = find(fa);
        if (r != NULL) {
            r->opaque = 1; /* glibc's spawn only */
        }
        pthread_mutex_unlock(&g_rec_lock);
    }
    return rc;
}

/* ---------------------------------------------------------------- the decision */

/* fd is a remote file whose placeholder would be all the child sees. */
static int remote_behind(int fd) {
    struct ent *e = fd_peek(fd);
    return e != NULL && is_file_kind(e) && e->has_handle;
}

/* A copy of fa's actions (*n of them; NULL with *n 0 for none), or -1 in *n: not known. */
static struct action *copy_actions(const posix_spawn_file_actions_t *fa, int *n) {
    *n = 0;
    if (fa == NULL) {
        return NULL;
    }
    pthread_mutex_lock(&g_rec_lock);
    struct recorded *r = find(fa);
    struct action *a = NULL;
    if (r == NULL || r->opaque) {
        *n = -1;
    } else if (r->n > 0 && (a = calloc((size_t)r->n, sizeof *a)) == NULL) {
        *n = -1;
    } else {
        for (int i = 0; i < r->n; i++) {
            a[i] = r->a[i];
            if (a[i].path != NULL) {
                a[i].path = strdup(a[i].path);
            }
        }
        *n = r->n;
    }
    pthread_mutex_unlock(&g_rec_lock);
    return a;
}

static void free_actions(struct action *a, int n) {
    for (int i = 0; i < n; i++) {
        free(a[i].path);
    }
    free(a);
}

/* The child would see a remote file only through the layer: an action on one, a path in the
 * target, or a remote fd it inherits. */
static int needs_layer(const struct action *a, int n) {
    char full[PATH_CAP];
    for (int i = 0; i < n; i++) {
        struct ent *e = a[i].tag == A_DUP2 || a[i].tag == A_FCHDIR ? fd_peek(a[i].fd) : NULL;
        switch (a[i].tag) {
        case A_DUP2:
            if (remote_behind(a[i].fd)) {
                return 1;
            }
            break;
        case A_FCHDIR: /* a remote directory is the layer's alone */
            if (e != NULL && is_file_kind(e)) {
                return 1;
            }
            break;
        case A_OPEN:
        case A_CHDIR:
            if (path_route(AT_FDCWD, a[i].path,
                           a[i].tag == A_OPEN && open_is_write(a[i].oflag), full) != R_BYPASS) {
                return 1;
            }
            break;
        default:
            break;
        }
    }
    if (__atomic_load_n(&g_nhandles, __ATOMIC_RELAXED) == 0) {
        return 0; /* no remote file has a handle: no placeholder to inherit */
    }
    for (int fd = 0; fd < MAX_FDS; fd++) {
        struct ent *e = fd_peek(fd);
        if (e != NULL && is_file_kind(e) && e->has_handle) {
            int fl = REAL(fcntl)(fd, F_GETFD);
            if (fl >= 0 && !(fl & FD_CLOEXEC)) {
                return 1;
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- the child */

/* The attributes, as glibc's child applies them: 0, or an errno. */
static int apply_attr(const posix_spawnattr_t *attr) {
    short flags = 0;
    if (attr == NULL || posix_spawnattr_getflags(attr, &flags) != 0) {
        return 0;
    }
    if (flags & POSIX_SPAWN_SETSIGDEF) {
        sigset_t def;
        posix_spawnattr_getsigdefault(attr, &def);
        struct sigaction sa = {.sa_handler = SIG_DFL};
        for (int s = 1; s < NSIG; s++) {
            if (sigismember(&def, s) == 1) {
                sigaction(s, &sa, NULL);
            }
        }
    }
#ifdef POSIX_SPAWN_SETSID
    if ((flags & POSIX_SPAWN_SETSID) && setsid() < 0) {
        return errno;
    }
#endif
    if (flags & POSIX_SPAWN_SETPGROUP) {
        pid_t pg = 0;
        posix_spawnattr_getpgroup(attr, &pg);
        if (setpgid(0, pg) < 0) {
            return errno;
        }
    }
    if (flags & (POSIX_SPAWN_SETSCHEDULER | POSIX_SPAWN_SETSCHEDPARAM)) {
        struct sched_param sp;
        posix_spawnattr_getschedparam(attr, &sp);
        int policy = 0;
        if (flags & POSIX_SPAWN_SETSCHEDULER) {
            posix_spawnattr_getschedpolicy(attr, &policy);
            if (sched_setscheduler(0, policy, &sp) < 0) {
                return errno;
            }
        } else if (sched_setparam(0, &sp) < 0) {
            return errno;
        }
    }
    if ((flags & POSIX_SPAWN_RESETIDS) && (setgid(getgid()) < 0 || setuid(getuid()) < 0)) {
        return errno;
    }
    return 0;
}

/* The file actions, in order, through the layer's hooks: 0, or an errno. */
static int apply_actions(const struct action *a, int n) {
    for (int i = 0; i < n; i++) {
        int rc = 0;
        switch (a[i].tag) {
        case A_CLOSE:
            rc = close(a[i].fd) < 0 && errno != EBADF ? -1 : 0; /* as glibc: a closed fd is fine */
            break;
        case A_DUP2:
            if (a[i].fd == a[i].newfd) { /* the fd is inherited: close-on-exec cleared */
                int fl = fcntl(a[i].fd, F_GETFD);
                rc = fl < 0 ? -1 : fcntl(a[i].fd, F_SETFD, fl & ~FD_CLOEXEC);
            } else {
                rc = dup2(a[i].fd, a[i].newfd) < 0 ? -1 : 0;
            }
            break;
        case A_OPEN: {
            int fd = open(a[i].path, a[i].oflag, a[i].mode);
            if (fd >= 0 && fd != a[i].fd) {
                rc = dup2(fd, a[i].fd) < 0 ? -1 : 0;
                close(fd);
            } else if (fd < 0) {
                rc = -1;
            }
            break;
        }
        case A_CHDIR:
            rc = chdir(a[i].path);
            break;
        case A_FCHDIR:
            rc = fchdir(a[i].fd);
            break;
        case A_CLOSEFROM:
            rc = close_range((unsigned)a[i].fd, ~0U, 0) < 0 && errno != EBADF ? -1 : 0;
            break;
        default:
            break;
        }
        if (rc < 0) {
            return errno ? errno : EIO;
        }
    }
    return 0;
}

static __attribute__((noreturn)) void child(int report, const struct action *a, int n, const posix_spawnattr_t *attr,
                  const char *path, char *const argv[], char *const envp[], int search) {
    report = layer_fd_protect(report); /* out of the actions' way (close, dup2, closefrom) */
    sigset_t mask;
    int err = 0;
    if (attr != NULL) {
        short flags = 0;
        posix_spawnattr_getflags(attr, &flags);
        if (flags & POSIX_SPAWN_SETSIGMASK) {
            posix_spawnattr_getsigmask(attr, &mask);
            sigprocmask(SIG_SETMASK, &mask, NULL);
        }
    }
    err = apply_attr(attr);
    if (err == 0) {
        err = apply_actions(a, n);
    }
    if (err == 0) {
        if (search) {
            execvpe(path, argv, envp);
        } else {
            execve(path, argv, envp);
        }
        err = errno;
    }
    t_guard++;
    ssize_t UNUSED w = REAL(write)(report, &err, sizeof err);
    REAL(_exit)(127);
    __builtin_unreachable();
}

/* ---------------------------------------------------------------- the spawn */

int files_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                const posix_spawnattr_t *attr, char *const argv[], char *const envp[], int search) {
    int saved = errno;
    int n;
    struct action *a = copy_actions(fa, &n);
    if (n < 0 || !needs_layer(a, n)) {
        free_actions(a, n < 0 ? 0 : n);
        errno = saved;
        return -1;
    }
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0) {
        int e = errno;
        free_actions(a, n);
        errno = saved;
        return e;
    }
    DBG("posix_spawn of %s: through fork, the layer's hooks and exec (remote files)", path);
    pid_t c = fork(); /* the layer's fork: the child registers, naming this process */
    if (c == 0) {
        REAL(close)(report[0]);
        child(report[1], a, n, attr, path, argv, envp ? envp : environ, search);
    }
    int e = errno;
    REAL(close)(report[1]);
    free_actions(a, n);
    if (c < 0) {
        REAL(close)(report[0]);
        errno = saved;
        return e;
    }
    int err = 0;
    ssize_t got;
    do {
        got = REAL(read)(report[0], &err, sizeof err);
    } while (got < 0 && errno == EINTR);
    REAL(close)(report[0]);
    if (got == (ssize_t)sizeof err && err != 0) {
        while (waitpid(c, NULL, 0) < 0 && errno == EINTR) {
        }
        errno = saved;
        return err;
    }
    if (pid != NULL) {
        *pid = c;
    }
    errno = saved;
    return 0;
}
