/* Remote fds across exec.
 *
 * `cmd > /app/out` (the shell opens the file, dup2s it to 1, execs cmd) and `cmd < big`: the
 * new image must know that its inherited fd is a remote file, or it writes into the
 * placeholder (lost) or reads an empty one. exec keeps the process's channel, so its handles
 * stay valid: each remote fd that survives exec is named in MIRRORD_LAYER_FILES as
 * `fd:kind:handle:oflags:hex(path)` (kind r: handle-backed, w: write-back cache, a: append
 * cache, both already written back before exec), or `fd:=:otherfd` for a dup of an earlier one.
 *
 * Owns: files_exec_env (before exec) and files_restore_fds (in the new image).
 */
#include "files.h"

#include <time.h>

static void hex_put(char *out, const char *s) {
    static const char digits[] = "0123456789abcdef";
    for (; *s; s++) {
        *out++ = digits[(unsigned char)*s >> 4];
        *out++ = digits[(unsigned char)*s & 15];
    }
    *out = 0;
}

/* A remote fd that the new image inherits and must know about. */
static int survives_exec(int fd, const struct ent *e) {
    if (e == NULL || !((e->kind == K_RFILE && e->has_handle) ||
                       (e->kind == K_MFILE && e->writeback && e->has_handle))) {
        return 0;
    }
    int fl = REAL(fcntl)(fd, F_GETFD);
    return fl >= 0 && !(fl & FD_CLOEXEC);
}

/* Room for `need` bytes in *buf (cap *cap): 0, or -1 (the list stops there). */
static int grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) {
        return 0;
    }
    char *nb = realloc(*buf, need * 2);
    if (nb == NULL) {
        return -1;
    }
    *buf = nb;
    *cap = need * 2;
    return 0;
}

char *files_exec_env(void) {
    size_t cap = 256, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        return NULL;
    }
    len = (size_t)snprintf(buf, cap, "MIRRORD_LAYER_FILES=");
    size_t start = len;
    struct ent *seen[64];
    int seen_fd[64], nseen = 0;
    for (int fd = 0; fd < MAX_FDS; fd++) {
        struct ent *e = fd_peek(fd);
        if (!survives_exec(fd, e)) {
            continue;
        }
        size_t plen = e->path != NULL ? strlen(e->path) : 0;
        if (grow(&buf, &cap, len + 2 * plen + 96) < 0) {
            break;
        }
        int alias = -1;
        for (int i = 0; i < nseen; i++) {
            alias = seen[i] == e ? seen_fd[i] : alias;
        }
        const char *sep = len > start ? "," : "";
        if (alias >= 0) {
            len += (size_t)snprintf(buf + len, cap - len, "%s%d:=:%d", sep, fd, alias);
            continue;
        }
        if (nseen < 64) {
            seen[nseen] = e;
            seen_fd[nseen++] = fd;
        }
        len += (size_t)snprintf(buf + len, cap - len, "%s%d:%c:%llu:%d:", sep, fd,
                                e->kind == K_RFILE ? 'r' : e->append_only ? 'a' : 'w',
                                (unsigned long long)e->handle, e->oflags);
        hex_put(buf + len, e->path != NULL ? e->path : "");
        len += 2 * plen;
    }
    if (len == start) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* ---------------------------------------------------------------- in the new image */

/* An inherited file bigger than fetch_limit (`cmd < big`, `cmd >> big.log`): stdio reads and
 * writes with libc's internal read/write, which no hook sees, so the content goes into the
 * placeholder (up to 16 times fetch_limit) at the handle's position, and the fd becomes a
 * plain fetched file, or a write-back cache when it was opened for writing. */
static void exec_fetch_whole(int fd, struct ent *e) {
    struct stat lst;
    off_t pos = -1;
    if (REAL(fstat)(fd, &lst) == 0 && lst.st_size == e->st.st_size && lst.st_size > 0) {
        /* an earlier image (a sibling sharing this open file) fetched it: its offset counts */
        pos = REAL(lseek)(fd, 0, SEEK_CUR);
    } else {
        pos = rfile_seek(e, 0, SEEK_CUR);
        off_t off = pos >= 0 ? rfile_copy_into(e->handle, fd, 0, e->st.st_size) : -1;
        if (off != e->st.st_size || REAL(lseek)(fd, pos, SEEK_SET) != pos) {
            REAL(ftruncate)(fd, 0); /* stays handle-backed */
            return;
        }
    }
    e->kind = K_MFILE;
    if ((e->oflags & O_ACCMODE) == O_RDONLY) {
        rfile_close_handle(e->handle);
        e->has_handle = 0;
        __atomic_fetch_sub(&g_nhandles, 1, __ATOMIC_RELAXED);
        clock_gettime(CLOCK_MONOTONIC, &e->checked);
        return;
    }
    cache_adopt(e, fd); /* keeps the handle: written back when the last fd closes */
    e->share_offset = 1;
    if (e->oflags & O_APPEND) {
        REAL(fcntl)(fd, F_SETFL, O_APPEND);
    }
}

static int hex_val(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* The hex path of an entry (hl bytes at h), malloc'd; NULL without memory. */
static char *hex_path(const char *h, size_t hl) {
    char *path = malloc(hl / 2 + 1);
    size_t k = 0;
    for (size_t i = 0; path != NULL && i + 2 <= hl; i += 2) {
        int a = hex_val(h[i]), b = hex_val(h[i + 1]);
        if (a < 0 || b < 0) {
            break;
        }
        path[k++] = (char)(a * 16 + b);
    }
    if (path != NULL) {
        path[k] = 0;
    }
    return path;
}

/* Adopts fd as the remote file `handle` (kind r, w or a); takes `path`. */
static void adopt_fd(int fd, char kind, uint64_t handle, int oflags, char *path) {
    struct stat st;
    struct ent *e = NULL;
    if (path != NULL && fd >= 0 && fd < MAX_FDS && REAL(fcntl)(fd, F_GETFD) >= 0 &&
        (kind == 'r' || kind == 'w' || kind == 'a') && rstat(NULL, handle, 1, &st) == 0) {
        e = ent_new(kind == 'r' ? K_RFILE : K_MFILE);
    }
    if (e == NULL) {
        free(path);
        return;
    }
    e->has_handle = 1;
    e->handle = handle;
    e->oflags = oflags;
    e->path = path;
    e->st = st;
    e->is_dir = S_ISDIR(st.st_mode);
    if (kind == 'w' || kind == 'a') {
        e->append_only = kind == 'a';
        cache_adopt(e, fd);
    }
    __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
    if (kind == 'r' && S_ISREG(st.st_mode) && st.st_size / 16 <= g_set.fetch_limit) {
        exec_fetch_whole(fd, e);
    }
    fd_set_ent(fd, e);
    DBG("fd %d is remote %s from before exec (%s)", fd, e->path,
        kind == 'a' ? "append cache" : e->writeback ? "write-back" : e->kind == K_MFILE ? "fetched" : "handle");
}

/* One entry at v: its length, or -1 (malformed: the rest is ignored). */
static int restore_one(const char *v) {
    int fd = -1, n = 0, other = -1;
    if (sscanf(v, "%d:=:%d%n", &fd, &other, &n) == 2 && n > 0) {
        struct ent *e = fd_peek(other) != NULL ? ent_get(other) : NULL;
        if (e != NULL && fd >= 0 && fd < MAX_FDS && REAL(fcntl)(fd, F_GETFD) >= 0) {
            fd_set_ent(fd, e); /* takes the reference */
        } else if (e != NULL) {
            ent_put(e);
        }
        return n;
    }
    char kind = 0;
    unsigned long long handle = 0;
    int oflags = 0;
    n = 0;
    if (sscanf(v, "%d:%c:%llu:%d:%n", &fd, &kind, &handle, &oflags, &n) != 4 || n == 0) {
        return -1;
    }
    size_t hl = strcspn(v + n, ",");
    adopt_fd(fd, kind, handle, oflags, hex_path(v + n, hl));
    return n + (int)hl;
}

/* In the new image (at start, connected): adopt what files_exec_env named. An fd whose
 * handle the daemon does not know any more (a new registration) is left alone. */
void files_restore_fds(const char *v) {
    while (v != NULL && *v) {
        int n = restore_one(v);
        if (n < 0) {
            return;
        }
        v += n;
        if (*v == ',') {
            v++;
        }
    }
}
