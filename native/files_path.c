/* Where a path lives, and the virtual working directory.
 *
 * Owns: path_route (local / mapped / remote / not found, decided without a round trip, from
 * policy.c's rules and feature.fs.mapping), the remote working directory after chdir/fchdir
 * into a remote directory (chdir, fchdir, getcwd), and realpath on a remote path.
 * Does not own: the rules themselves (policy.c) or the requests (files_remote.c).
 */
#include "files.h"

#include <limits.h>

/* A remote working directory (after chdir/fchdir into a remote directory): relative paths
 * are then remote, below it. Empty when the working directory is local (the common case:
 * one load on the bypass path). The process's real working directory does not change. */
static char g_vcwd[PATH_CAP];
static pthread_mutex_t g_vcwd_lock = PTHREAD_MUTEX_INITIALIZER;

void vcwd_after_fork_child(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    g_vcwd_lock = fresh;
}

int vcwd_is_set(void) {
    return __atomic_load_n(&g_vcwd[0], __ATOMIC_RELAXED) != 0;
}

void normalize_path(char *p) {
    char *out = p;
    const char *in = p;
    while (*in) {
        while (*in == '/') {
            in++;
        }
        const char *seg = in;
        while (*in && *in != '/') {
            in++;
        }
        size_t n = (size_t)(in - seg);
        if (n == 0 || (n == 1 && seg[0] == '.')) {
            continue;
        }
        if (n == 2 && seg[0] == '.' && seg[1] == '.') {
            while (out > p && *--out != '/') {
            }
            continue;
        }
        *out++ = '/';
        memmove(out, seg, n);
        out += n;
    }
    if (out == p) {
        *out++ = '/';
    }
    *out = 0;
}

static int vcwd_join(const char *rel, char *out, size_t cap) {
    pthread_mutex_lock(&g_vcwd_lock);
    int ok = g_vcwd[0] != 0 && (size_t)snprintf(out, cap, "%s/%s", g_vcwd, rel) < cap;
    pthread_mutex_unlock(&g_vcwd_lock);
    if (ok) {
        normalize_path(out);
    }
    return ok;
}

void files_set_vcwd(const char *path) {
    pthread_mutex_lock(&g_vcwd_lock);
    snprintf(g_vcwd, sizeof g_vcwd, "%s", path ? path : "");
    pthread_mutex_unlock(&g_vcwd_lock);
}

int files_get_vcwd(char *out, size_t cap) {
    pthread_mutex_lock(&g_vcwd_lock);
    int set = g_vcwd[0] != 0 && strlen(g_vcwd) < cap;
    if (set) {
        strcpy(out, g_vcwd);
    }
    pthread_mutex_unlock(&g_vcwd_lock);
    return set;
}

/* ---------------------------------------------------------------- the decision */

/* An absolute path: feature.fs.mapping rewrites it first (a local call is then made under the
 * mapped name, as mirrord does), then the policy decides. */
static int route_absolute(const char *path, int write, char *out) {
    char mapped[PATH_CAP];
    int was_mapped = 0;
    if (g_nmap && policy_map_path(path, mapped, sizeof mapped)) {
        path = mapped;
        was_mapped = 1;
    }
    int d = policy_file(path, write);
    if (d == P_LOCAL && !was_mapped) {
        return R_BYPASS;
    }
    if (strlen(path) >= PATH_CAP) {
        return R_BYPASS; /* the real call reports ENAMETOOLONG */
    }
    strcpy(out, path);
    if (d == P_LOCAL) {
        return R_MAPPED;
    }
    if (d == P_NOT_FOUND) {
        errno = ENOENT;
        return R_DONE;
    }
    return R_REMOTE;
}

/* A path relative to an fd: remote when the fd is a remote directory (or file). */
static int route_at(int dirfd, const char *path, char *out) {
    struct ent *e = fd_peek(dirfd);
    if (e == NULL || !is_file_kind(e)) {
        return R_BYPASS;
    }
    e = ent_get(dirfd);
    if (e == NULL) {
        return R_BYPASS;
    }
    int d = R_BYPASS;
    if (e->path != NULL && (size_t)snprintf(out, PATH_CAP, "%s/%s", e->path, path) < PATH_CAP) {
        d = R_REMOTE; /* relative to a remote directory */
    }
    ent_put(e);
    return d;
}

int path_route(int dirfd, const char *path, int write, char *out) {
    if (path == NULL || path_fast_local(path)) {
        return R_BYPASS;
    }
    int saved = errno;
    int d;
    if (path[0] == '/') {
        d = route_absolute(path, write, out);
    } else if (dirfd == AT_FDCWD) {
        /* relative to the working directory: local unless it is a remote one */
        d = __builtin_expect(!vcwd_is_set(), 1) || !vcwd_join(path, out, PATH_CAP) ? R_BYPASS
                                                                                   : R_REMOTE;
    } else {
        d = route_at(dirfd, path, out);
    }
    if (d != R_DONE) {
        errno = saved;
    }
    return d;
}

int path_decision(int route) {
    return route == R_REMOTE ? P_REMOTE : route == R_DONE ? P_NOT_FOUND : P_LOCAL;
}

/* ---------------------------------------------------------------- working directory */

HOOK int chdir(const char *path) {
    if (!g_active || t_guard) {
        return REAL(chdir)(path);
    }
    char full[PATH_CAP];
    int d = path_route(AT_FDCWD, path, 0, full);
    if (d == R_BYPASS || d == R_MAPPED) {
        int r = REAL(chdir)(d == R_MAPPED ? full : path);
        if (r == 0) {
            files_set_vcwd(NULL);
        }
        return r;
    }
    if (d == R_DONE) {
        return -1;
    }
    normalize_path(full);
    struct stat st;
    t_guard++;
    int r = rstat(full, 0, 1, &st);
    t_guard--;
    if (r == 0 && !S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        r = -1;
    }
    if (r == 0) {
        files_set_vcwd(full);
        DBG("working directory %s is remote", full);
    }
    return r;
}

HOOK int fchdir(int fd) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || !is_file_kind(pe)) {
        int r = REAL(fchdir)(fd);
        if (r == 0 && g_active && !t_guard) {
            files_set_vcwd(NULL);
        }
        return r;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(fchdir)(fd);
    }
    int r = 0;
    if (!e->is_dir || e->path == NULL) {
        errno = ENOTDIR;
        r = -1;
    } else {
        files_set_vcwd(e->path);
    }
    ent_put(e);
    return r;
}

HOOK char *getcwd(char *buf, size_t size) {
    char v[PATH_CAP];
    if (!g_active || t_guard || !files_get_vcwd(v, sizeof v)) {
        return REAL(getcwd)(buf, size);
    }
    size_t need = strlen(v) + 1;
    if (buf == NULL) {
        buf = malloc(size > need ? size : need);
        if (buf == NULL) {
            errno = ENOMEM;
            return NULL;
        }
    } else if (size < need) {
        errno = size == 0 ? EINVAL : ERANGE;
        return NULL;
    }
    memcpy(buf, v, need);
    return buf;
}

/* The fortified getcwd (_FORTIFY_SOURCE): glibc's calls its internal one, which no hook sees. */
char *__getcwd_chk(char *buf, size_t size, size_t buflen);
HOOK char *__getcwd_chk(char *buf, size_t size, size_t buflen) {
    if (size > buflen) {
        __chk_fail();
    }
    return getcwd(buf, size);
}

/* ---------------------------------------------------------------- realpath
 *
 * realpath on a remote path: glibc resolves with internal lstat/readlink calls, so the layer
 * walks the components itself through its own lstat and readlink hooks (which decide per
 * prefix whether it is local or remote). Same results and errors as glibc: ENOENT,
 * ENOTDIR, ELOOP after 40 links, ENAMETOOLONG. */

struct walk {
    char out[PATH_CAP];  /* resolved so far */
    size_t n;            /* its length */
    char rest[PATH_CAP]; /* what is left to resolve */
    char *p;             /* where in rest */
    int links;           /* symbolic links followed */
};

static int walk_start(struct walk *w, const char *path) {
    if (path == NULL || path[0] == 0) {
        errno = path == NULL ? EINVAL : ENOENT;
        return -1;
    }
    w->n = 1;
    w->out[0] = '/';
    w->out[1] = 0;
    if (path[0] != '/') {
        if (getcwd(w->out, sizeof w->out) == NULL) {
            return -1;
        }
        w->n = strlen(w->out);
    }
    if (strlen(path) >= sizeof w->rest) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(w->rest, path);
    w->p = w->rest;
    w->links = 0;
    return 0;
}

/* "..": one component back, never above "/". */
static void walk_up(struct walk *w) {
    while (w->n > 1 && w->out[--w->n] != '/') {
    }
    w->out[w->n > 1 ? w->n : 1] = 0;
    w->n = w->n > 1 ? w->n : 1;
}

/* w->out is a symbolic link: its text, then what was left after it, is walked next (from "/"
 * or from `before`, the length of out without the link's name). */
static int walk_link(struct walk *w, size_t before) {
    char link[PATH_CAP];
    if (++w->links > 40) {
        errno = ELOOP;
        return -1;
    }
    ssize_t m = readlink(w->out, link, sizeof link - 1);
    if (m < 0) {
        return -1;
    }
    link[m] = 0;
    if ((size_t)m + 1 + strlen(w->p) >= sizeof link) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcat(link, w->p);
    strcpy(w->rest, link);
    w->p = w->rest;
    w->n = w->rest[0] == '/' ? 1 : before > 1 ? before : 1;
    w->out[w->n] = 0;
    return 0;
}

/* One component (k bytes at seg): appended to out and looked at with lstat. */
static int walk_component(struct walk *w, const char *seg, size_t k) {
    if (w->n + 1 + k >= sizeof w->out) {
        errno = ENAMETOOLONG;
        return -1;
    }
    size_t before = w->n;
    if (w->n > 1) {
        w->out[w->n++] = '/';
    }
    memcpy(w->out + w->n, seg, k);
    w->n += k;
    w->out[w->n] = 0;
    struct stat st;
    if (lstat(w->out, &st) < 0) {
        return -1;
    }
    if (S_ISLNK(st.st_mode)) {
        return walk_link(w, before);
    }
    if (!S_ISDIR(st.st_mode) && *w->p == '/') {
        errno = ENOTDIR; /* more components (or a trailing slash) after a non-directory */
        return -1;
    }
    return 0;
}

static char *walk_result(const struct walk *w, char *resolved) {
    size_t need = w->n + 1;
    if (resolved == NULL) {
        resolved = malloc(need);
        if (resolved == NULL) {
            errno = ENOMEM;
            return NULL;
        }
    } else if (need > PATH_MAX) {
        errno = ENAMETOOLONG;
        return NULL;
    }
    memcpy(resolved, w->out, need);
    return resolved;
}

static char *realpath_walk(const char *path, char *resolved) {
    struct walk w;
    if (walk_start(&w, path) < 0) {
        return NULL;
    }
    while (*w.p) {
        while (*w.p == '/') {
            w.p++;
        }
        char *seg = w.p;
        while (*w.p && *w.p != '/') {
            w.p++;
        }
        size_t k = (size_t)(w.p - seg);
        if (k == 0 || (k == 1 && seg[0] == '.')) {
            continue;
        }
        if (k == 2 && seg[0] == '.' && seg[1] == '.') {
            walk_up(&w);
            continue;
        }
        if (walk_component(&w, seg, k) < 0) {
            return NULL;
        }
    }
    return walk_result(&w, resolved);
}

/* 1 when remote; when local, *path becomes the name of the local call (mapped into buf). */
static int realpath_remote(const char **path, char *buf) {
    if (!g_active || t_guard || *path == NULL || (*path)[0] == 0) {
        return 0;
    }
    int d = path_route(AT_FDCWD, *path, 0, buf);
    if (d == R_MAPPED) {
        *path = buf;
    }
    return d == R_REMOTE || d == R_DONE;
}

HOOK char *realpath(const char *path, char *resolved) {
    char buf[PATH_CAP];
    if (realpath_remote(&path, buf)) {
        return realpath_walk(path, resolved);
    }
    return REAL(realpath)(path, resolved);
}

HOOK char *canonicalize_file_name(const char *path) {
    char buf[PATH_CAP];
    if (realpath_remote(&path, buf)) {
        return realpath_walk(path, NULL);
    }
    return REAL(canonicalize_file_name)(path);
}

char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen);
HOOK char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen) {
    char buf[PATH_CAP];
    if (realpath_remote(&path, buf)) {
        if (resolved != NULL && resolvedlen < PATH_MAX) {
            abort(); /* what glibc's fortify check does (buffer overflow) */
        }
        return realpath_walk(path, resolved);
    }
    return REAL(realpath)(path, resolved);
}
