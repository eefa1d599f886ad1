/* mirrord layer: LD_PRELOAD library that makes a real process use the target's files, DNS
 * and network.
 *
 * This file owns: initialisation (reading MIRRORD_* from the environment, skipping
 * processes), resolving every real_* once, the fd table (which fds are remote files,
 * memfd-backed remote files, sockets the layer redirected, or the layer's own daemon
 * connections), and debug output. The hooks live in files_*.c, net_*.c and proc.c.
 *
 * Rules (style.md §18-§19): hooks bail out to the real call early; nothing printed unless
 * MIRRORD_LAYER_DEBUG is set; a __thread guard keeps the layer off its own calls; the
 * layer's fds sit at high numbers and the app cannot close or dup2 over them.
 */
#include "layer.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

/* Scanned for by mirrord.layer.build_id(): both ends of the layer protocol must match. */
__attribute__((used)) static const char build_id_marker[] = "MIRRORD_BUILD_ID=" MIRRORD_BUILD_ID ";";

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#define MIRRORD_DEFINE_REAL(name) __typeof__(name) *real_##name;
MIRRORD_REALS(MIRRORD_DEFINE_REAL)
#undef MIRRORD_DEFINE_REAL
#pragma GCC diagnostic pop

int g_active;
int g_debug;
LAYER_TLS int t_guard;

struct ent *g_fd[MAX_FDS];
pthread_mutex_t g_fd_lock = PTHREAD_MUTEX_INITIALIZER;
int g_nhandles;

static pthread_once_t g_resolve_once = PTHREAD_ONCE_INIT;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
static void resolve_all(void) {
#define MIRRORD_RESOLVE(name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name);
    MIRRORD_REALS(MIRRORD_RESOLVE)
#undef MIRRORD_RESOLVE
}
#pragma GCC diagnostic pop

void layer_resolve(void) { pthread_once(&g_resolve_once, resolve_all); }

void layer_debug(const char *fmt, ...) {
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "mirrord-layer[%d]: ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof buf - 2) {
        len = sizeof buf - 2;
    }
    buf[len++] = '\n';
    int saved = errno;
    ssize_t UNUSED w = REAL(write)(2, buf, len);
    errno = saved;
}

/* ---------------------------------------------------------------- fd table */

static struct ent g_layer_ent = {.kind = K_LAYER, .refs = 1};

struct ent *ent_new(int kind) {
    struct ent *e = calloc(1, sizeof *e);
    if (e != NULL) {
        e->kind = kind;
        e->refs = 1;
    }
    return e;
}

static struct ent *ent_get_raw(int fd) {
    if ((unsigned)fd >= MAX_FDS) {
        return NULL;
    }
    pthread_mutex_lock(&g_fd_lock);
    struct ent *e = g_fd[fd];
    if (e != NULL && e->kind != K_LAYER) {
        e->refs++;
    } else {
        e = NULL;
    }
    pthread_mutex_unlock(&g_fd_lock);
    return e;
}

struct ent *ent_get(int fd) {
    struct ent *e = ent_get_raw(fd);
    if (e == NULL) {
        return NULL;
    }
    struct stat st;
    if (REAL(fstat)(fd, &st) < 0 || st.st_ino != e->fd_ino || st.st_dev != e->fd_dev) {
        /* closed or reused behind our back: this entry no longer describes the fd */
        ent_put(e);
        if (__atomic_load_n(&g_fd[fd], __ATOMIC_ACQUIRE) == e) {
            ent_put(fd_take(fd));
        }
        return NULL;
    }
    return e;
}

/* Last reference of a remote file: tell the daemon so the agent frees the handle. */
static void ent_free_remote(struct ent *e) {
    if (e->kind == K_MFILE && e->writeback) {
        (void)wfile_flush(e);
        layer_fd_release(e->cache_fd);
    }
    fbuf_free(e);
    if ((e->kind == K_RFILE || e->kind == K_MFILE) && e->has_handle) {
        struct lconn *c = conn_acquire();
        if (c != NULL) {
            cbor_w *w = conn_begin(c, M_FILE_CLOSE, 1);
            cw_uint(w, e->handle);
            cbor_r r;
            int saved = errno;
            (void)conn_call(c, M_OK, &r);
            errno = saved;
            conn_release(c);
        }
        __atomic_fetch_sub(&g_nhandles, 1, __ATOMIC_RELAXED);
    }
    if (e->kind == K_SOCK && e->subscribed && e->sub_owner == getpid()) {
        struct lconn *c = conn_acquire();
        if (c != NULL) {
            cbor_w *w = conn_begin(c, M_LAYER_UNLISTEN, 1);
            cw_uint(w, (uint64_t)e->sub_port);
            cbor_r r;
            int saved = errno;
            (void)conn_call(c, M_OK, &r);
            errno = saved;
            conn_release(c);
        }
    }
    if (e->kind == K_SOCK && e->subscribed) {
        __atomic_fetch_sub(&g_nhandles, 1, __ATOMIC_RELAXED);
    }
    if (e->kind == K_SOCK && e->socktype == SOCK_DGRAM) {
        net_sock_freed(e);
    }
    free(e->path);
    free(e);
}

void ent_put(struct ent *e) {
    if (e == NULL || e->kind == K_LAYER) {
        return;
    }
    pthread_mutex_lock(&g_fd_lock);
    int last = --e->refs == 0;
    pthread_mutex_unlock(&g_fd_lock);
    if (last) {
        t_guard++;
        ent_free_remote(e);
        t_guard--;
    }
}

void fd_set_ent(int fd, struct ent *e) {
    if ((unsigned)fd >= MAX_FDS) {
        ent_put(e);
        return;
    }
    if (e->fd_ino == 0 && e->fd_dev == 0) {
        struct stat st;
        if (REAL(fstat)(fd, &st) == 0) {
            e->fd_dev = st.st_dev;
            e->fd_ino = st.st_ino;
        }
    }
    pthread_mutex_lock(&g_fd_lock);
    struct ent *old = g_fd[fd];
    __atomic_store_n(&g_fd[fd], e, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_fd_lock);
    if (old != NULL && old != &g_layer_ent) {
        ent_put(old);
    }
}

struct ent *fd_take(int fd) {
    if ((unsigned)fd >= MAX_FDS) {
        return NULL;
    }
    pthread_mutex_lock(&g_fd_lock);
    struct ent *e = g_fd[fd];
    if (e == &g_layer_ent) {
        e = NULL;
    } else {
        __atomic_store_n(&g_fd[fd], NULL, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&g_fd_lock);
    return e;
}

void fd_forget(int fd) {
    if (fd_peek(fd) != NULL) {
        ent_put(fd_take(fd));
    }
}

/* The layer's fds live at or above this number, so the app's lowest-free allocations never
 * see them; below 1024 when possible so select() users are unaffected... and the kernel fd
 * table stays small. */
static int layer_fd_base(void) {
    struct rlimit rl;
    int base = 900;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)base + 64 > rl.rlim_cur) {
        base = rl.rlim_cur > 128 ? (int)rl.rlim_cur - 64 : 3;
    }
    return base;
}

int layer_fd_protect(int fd) {
    int high = REAL(fcntl)(fd, F_DUPFD_CLOEXEC, layer_fd_base());
    if (high >= 0) {
        REAL(close)(fd);
        fd = high;
    }
    if ((unsigned)fd < MAX_FDS) {
        pthread_mutex_lock(&g_fd_lock);
        struct ent *old = g_fd[fd];
        __atomic_store_n(&g_fd[fd], &g_layer_ent, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&g_fd_lock);
        if (old != NULL && old != &g_layer_ent) {
            ent_put(old);
        }
    }
    return fd;
}

void layer_fd_release(int fd) {
    if ((unsigned)fd < MAX_FDS) {
        pthread_mutex_lock(&g_fd_lock);
        if (g_fd[fd] == &g_layer_ent) {
            __atomic_store_n(&g_fd[fd], NULL, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&g_fd_lock);
    }
    REAL(close)(fd);
}

/* ---------------------------------------------------------------- init */

static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v != NULL && *v != 0 && strcmp(v, "0") != 0 && strcasecmp(v, "false") != 0;
}

/* A process that will not use the layer (skipped, told not to load) must not keep the daemon
 * connection its pre-exec image handed over: the daemon would think it still alive. */
static void drop_handed_over_connection(void) {
    const char *v = getenv("MIRRORD_LAYER_FD");
    int fd = -1, pid = 0;
    struct stat st;
    if (v != NULL && sscanf(v, "%d:%d", &fd, &pid) == 2 && pid == getpid() && fd > 2 &&
        REAL(fstat)(fd, &st) == 0 && S_ISSOCK(st.st_mode)) {
        REAL(close)(fd);
    }
}

/* MIRRORD_SKIP_PROCESSES ("a;b;c") in this process's own environment: IDEs set it in the
 * debuggee's environment only, after the session's config was resolved. Names match the
 * executable's file name or the process's own name (argv[0]'s), as skip_processes does. */
static int skipped_by_env(const char *exe, const char *name) {
    const char *v = getenv("MIRRORD_SKIP_PROCESSES");
    const char *slash = strrchr(exe, '/');
    const char *b = slash ? slash + 1 : exe;
    while (v != NULL && *v) {
        size_t n = strcspn(v, ";");
        if (n > 0 && ((strlen(b) == n && strncmp(b, v, n) == 0) ||
                      (name != NULL && strlen(name) == n && strncmp(name, v, n) == 0))) {
            return 1;
        }
        v += n;
        v += *v == ';';
    }
    return 0;
}

__attribute__((constructor)) static void mirrord_layer_init(void) {
    layer_resolve();
    g_debug = env_flag("MIRRORD_LAYER_DEBUG");
    if (getenv("MIRRORD_DONT_LOAD") != NULL) {
        drop_handed_over_connection();
        return; /* asked not to load: do nothing else */
    }
    const char *sock = getenv("MIRRORD_LAYER_SOCKET");
    const char *session = getenv("MIRRORD_SESSION");
    const char *config = getenv("MIRRORD_LAYER_CONFIG");
    if (sock == NULL || session == NULL) {
        return; /* not configured: do nothing */
    }
    t_guard++;
    if (policy_load(config != NULL ? config : "") < 0) {
        DBG("MIRRORD_LAYER_CONFIG is malformed: the layer stays inactive");
        drop_handed_over_connection();
        t_guard--;
        return;
    }
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    if (policy_skip_process(exe, program_invocation_short_name) ||
        skipped_by_env(exe, program_invocation_short_name)) {
        DBG("skipping %s: loaded without hooks", program_invocation_short_name);
        drop_handed_over_connection();
        t_guard--;
        return;
    }
    debugger_init();
    conn_init();
    net_restore_listeners();
    proc_init_env();
    g_active = 1;
    DBG("active in %s (session %s, daemon %s)", exe, session, sock);
    t_guard--;
}

/* exit(): write back files the app wrote but did not close. (_exit and signals skip it.) */
__attribute__((destructor)) static void mirrord_layer_fini(void) {
    if (g_active) {
        t_guard++;
        wfile_flush_all();
        t_guard--;
    }
}
