/* Directory streams of remote directories.
 *
 * Owns: opendir/fdopendir/readdir/readdir64/readdir_r/closedir/rewinddir/telldir/seekdir/dirfd
 * on DIR pointers of our own, allocated in one arena so that the hooks recognise them with a
 * range check and no lock; scandir and glob, whose directory reads happen inside libc, listed
 * through these hooks instead.
 * Does not own: the directory's fd (a placeholder in the fd table, files_open.c's kind).
 */
#include "files.h"

#define DIR_SLOTS 512
#define DIR_MAGIC 0x6d6972726f726444ULL
#define DIR_BATCH 256

struct rdir {
    uint64_t magic;
    int used;
    int fd; /* placeholder fd for dirfd(); owned */
    uint64_t handle;
    int eof;
    int n, pos;
    long consumed; /* entries returned so far: telldir's position */
    char *path;    /* for rewinddir (a fresh DirOpen) */
    struct dirent64 *ents;
};

static struct rdir *g_dirs;
static pthread_mutex_t g_dirs_lock = PTHREAD_MUTEX_INITIALIZER;

void files_after_fork_child(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    g_dirs_lock = fresh;
    vcwd_after_fork_child();
    fbuf_after_fork_child();
}

static struct rdir *rdir_of(void *d) {
    struct rdir *base = __atomic_load_n(&g_dirs, __ATOMIC_ACQUIRE);
    if (base == NULL || (uintptr_t)d < (uintptr_t)base ||
        (uintptr_t)d >= (uintptr_t)(base + DIR_SLOTS)) {
        return NULL;
    }
    struct rdir *r = d;
    return r->magic == DIR_MAGIC && r->used ? r : NULL;
}

static struct rdir *rdir_alloc(void) {
    pthread_mutex_lock(&g_dirs_lock);
    if (g_dirs == NULL) {
        void *m = mmap(NULL, sizeof(struct rdir) * DIR_SLOTS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m != MAP_FAILED) {
            __atomic_store_n(&g_dirs, (struct rdir *)m, __ATOMIC_RELEASE);
        }
    }
    struct rdir *r = NULL;
    for (int i = 0; g_dirs != NULL && i < DIR_SLOTS; i++) {
        if (!g_dirs[i].used) {
            r = &g_dirs[i];
            memset(r, 0, sizeof *r);
            r->magic = DIR_MAGIC;
            r->used = 1;
            r->fd = -1;
            break;
        }
    }
    pthread_mutex_unlock(&g_dirs_lock);
    if (r == NULL) {
        errno = EMFILE;
    }
    return r;
}

static void rdir_free(struct rdir *r) {
    free(r->ents);
    free(r->path);
    pthread_mutex_lock(&g_dirs_lock);
    r->used = 0;
    r->magic = 0;
    pthread_mutex_unlock(&g_dirs_lock);
}

/* DirOpen by path (handle 0) or by the handle of an open file: 0 with *h, or -1. */
static int rdir_request(struct rreq *q, const char *path, uint64_t handle, uint64_t *h) {
    int rc = RREQ(q, M_DIR_OPEN, M_DIR_OPENED, WF_PATH(path), WF_U_UNLESS(path != NULL, handle));
    if (rc == 0 && cr_uint(&q->r, h) < 0) {
        errno = EIO;
        rc = -1;
    }
    return rc;
}

/* Our DIR for a remote directory (by path, or by the handle of fd); NULL on error. */
static DIR *rdir_open(const char *path, int has_handle, uint64_t handle, int fd) {
    struct rreq q = RREQ_INIT;
    uint64_t h = 0;
    int rc = rdir_request(&q, has_handle ? NULL : path, handle, &h);
    rreq_end(&q);
    struct rdir *d = rc == 0 ? rdir_alloc() : NULL;
    if (d == NULL) {
        return NULL;
    }
    d->handle = h;
    d->path = path ? strdup(path) : NULL;
    if (fd < 0) {
        /* a placeholder fd so dirfd()/fstat()/openat() work on the directory */
        fd = memfd_create("mirrord:dir", MFD_CLOEXEC);
        struct ent *e = fd >= 0 ? ent_new(K_RFILE) : NULL;
        if (e != NULL) {
            e->path = strdup(path);
            e->is_dir = 1;
            e->oflags = O_RDONLY | O_DIRECTORY;
            fd_set_ent(fd, e);
        }
    }
    d->fd = fd;
    DBG("opendir %s remotely", path ? path : "(fd)");
    return (DIR *)d;
}

HOOK DIR *opendir(const char *path) {
    if (!g_active || t_guard) {
        return REAL(opendir)(path);
    }
    char full[PATH_CAP];
    int d = path_route(AT_FDCWD, path, 0, full);
    if (route_is_local(d)) {
        return REAL(opendir)(local_path(d, path, full, NULL));
    }
    if (d == R_DONE) {
        return NULL;
    }
    t_guard++;
    DIR *r = rdir_open(full, 0, 0, -1);
    t_guard--;
    return r;
}

HOOK DIR *fdopendir(int fd) {
    struct ent *e = file_ent(fd);
    if (e == NULL) {
        return REAL(fdopendir)(fd);
    }
    DIR *r = NULL;
    t_guard++;
    if (!e->is_dir) {
        errno = ENOTDIR;
    } else {
        r = rdir_open(e->path, e->has_handle, e->handle, fd);
    }
    t_guard--;
    ent_put(e);
    return r;
}

/* DirEntries: [[name, ino, type], ...] into d->ents; the number read, or -1 (errno). */
static int rdir_entries(struct rdir *d, cbor_r *r) {
    uint64_t n;
    if (cr_array(r, &n) < 0 || n > 4096) {
        errno = EIO;
        return -1;
    }
    struct dirent64 *ents = n > 0 ? realloc(d->ents, sizeof *ents * n) : d->ents;
    if (ents == NULL && n > 0) {
        errno = ENOMEM;
        return -1;
    }
    d->ents = ents;
    d->n = 0;
    d->pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t k, ino, type;
        struct dirent64 *de = &ents[d->n];
        memset(de, 0, sizeof *de);
        if (cr_array(r, &k) < 0 || k != 3 || cr_strbuf(r, de->d_name, sizeof de->d_name) < 0 ||
            cr_uint(r, &ino) < 0 || cr_uint(r, &type) < 0) {
            errno = EIO;
            d->n = 0;
            return -1;
        }
        de->d_ino = ino;
        de->d_type = (unsigned char)type;
        de->d_reclen = sizeof *de;
        de->d_off = d->n + 1;
        d->n++;
    }
    return (int)n;
}

static struct dirent64 *rdir_next(struct rdir *d) {
    if (d->pos < d->n) {
        d->consumed++;
        return &d->ents[d->pos++];
    }
    if (d->eof) {
        return NULL;
    }
    struct rreq q = RREQ_INIT;
    struct dirent64 *out = NULL;
    if (RREQ(&q, M_DIR_READ, M_DIR_ENTRIES, WF_U(d->handle), WF_U(DIR_BATCH)) == 0) {
        int n = rdir_entries(d, &q.r);
        if (n == 0) {
            d->eof = 1;
        } else if (n > 0) {
            out = &d->ents[d->pos++];
            d->consumed++;
        }
    }
    rreq_end(&q); /* errno EIO when the daemon is lost: readdir's NULL with errno set */
    return out;
}

#define READDIR_HOOK(name, type)                     \
    HOOK struct type *name(DIR *dirp) {              \
        struct rdir *d = rdir_of(dirp);              \
        if (d == NULL) {                             \
            return REAL(name)(dirp);                 \
        }                                            \
        t_guard++;                                   \
        struct dirent64 *e = rdir_next(d);           \
        t_guard--;                                   \
        return (struct type *)e;                     \
    }
READDIR_HOOK(readdir, dirent)
READDIR_HOOK(readdir64, dirent64)

HOOK int closedir(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(closedir)(dirp);
    }
    t_guard++;
    (void)RREQ_OK(M_DIR_CLOSE, WF_U(d->handle));
    if (d->fd >= 0) {
        struct ent *e = fd_take(d->fd);
        REAL(close)(d->fd);
        ent_put(e);
    }
    t_guard--;
    rdir_free(d);
    return 0;
}

/* Start over: a fresh remote listing (a directory handle only reads forward). */
static void rdir_rewind(struct rdir *d) {
    if (d->path == NULL) {
        return; /* from fdopendir on a handle: cannot reopen, stays where it is */
    }
    struct rreq q = RREQ_INIT;
    uint64_t h;
    (void)RREQ(&q, M_DIR_CLOSE, M_OK, WF_U(d->handle));
    if (q.c != NULL && rdir_request(&q, d->path, 0, &h) == 0) {
        d->handle = h;
        d->n = d->pos = 0;
        d->eof = 0;
        d->consumed = 0;
    }
    rreq_end(&q);
}

HOOK void rewinddir(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        REAL(rewinddir)(dirp);
        return;
    }
    int saved = errno;
    t_guard++;
    rdir_rewind(d);
    t_guard--;
    errno = saved;
}

HOOK long telldir(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    return d == NULL ? REAL(telldir)(dirp) : d->consumed;
}

HOOK void seekdir(DIR *dirp, long loc) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        REAL(seekdir)(dirp, loc);
        return;
    }
    int saved = errno;
    t_guard++;
    if (loc < d->consumed) {
        rdir_rewind(d);
    }
    while (d->consumed < loc && rdir_next(d) != NULL) {
    }
    t_guard--;
    errno = saved;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
HOOK int readdir_r(DIR *dirp, struct dirent *entry, struct dirent **result) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(readdir_r)(dirp, entry, result);
    }
    int saved = errno;
    errno = 0;
    t_guard++;
    struct dirent64 *e = rdir_next(d);
    t_guard--;
    int err = errno;
    errno = saved;
    if (e == NULL) {
        *result = NULL;
        return err;
    }
    memcpy(entry, e, sizeof *entry);
    *result = entry;
    return 0;
}

HOOK int readdir64_r(DIR *dirp, struct dirent64 *entry, struct dirent64 **result) {
    if (rdir_of(dirp) == NULL) {
        return REAL(readdir64_r)(dirp, entry, result);
    }
    return readdir_r(dirp, (struct dirent *)entry, (struct dirent **)result);
}
#pragma GCC diagnostic pop

HOOK int dirfd(DIR *dirp) {
    struct rdir *d = rdir_of(dirp);
    if (d == NULL) {
        return REAL(dirfd)(dirp);
    }
    return d->fd;
}

/* ---------------------------------------------------------------- scandir, glob */

/* scandir (libuv's fs.readdir, many C programs) opens the directory inside libc: for a
 * remote directory, list it through the hooked opendir/readdir instead. */
typedef int (*dirent_cmp)(const struct dirent **, const struct dirent **);
static LAYER_TLS dirent_cmp t_scandir_cmp;

static int scandir_qsort_cmp(const void *a, const void *b) {
    return t_scandir_cmp((const struct dirent **)a, (const struct dirent **)b);
}

/* The entries of an open directory that pass `filter`, copied: their number (-1, errno). */
static int scandir_list(DIR *dp, int (*filter)(const struct dirent *), struct dirent ***out) {
    struct dirent **list = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(dp)) != NULL) {
        if (filter != NULL && !filter(e)) {
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            struct dirent **grown = realloc(list, cap * sizeof *list);
            if (grown == NULL) {
                break;
            }
            list = grown;
        }
        struct dirent *copy = malloc(sizeof *copy);
        if (copy == NULL) {
            break;
        }
        memcpy(copy, e, sizeof *copy);
        list[n++] = copy;
        errno = 0;
    }
    int err = errno;
    if (err != 0) {
        for (size_t i = 0; i < n; i++) {
            free(list[i]);
        }
        free(list);
        errno = err;
        return -1;
    }
    *out = list;
    return (int)n;
}

static int scandir_remote(const char *dir, struct dirent ***namelist,
                          int (*filter)(const struct dirent *), dirent_cmp compar, int *ret) {
    if (!g_active || t_guard) {
        return R_BYPASS;
    }
    char full[PATH_CAP];
    int saved = errno;
    int d = path_route(AT_FDCWD, dir, 0, full);
    if (d == R_MAPPED) { /* local, under its mapped name */
        *ret = REAL(scandir)(full, namelist, filter, compar);
        return R_DONE;
    }
    if (d == R_BYPASS) {
        return R_BYPASS;
    }
    *ret = -1;
    DIR *dp = d == R_REMOTE ? opendir(full) : NULL;
    if (dp == NULL) {
        return R_DONE;
    }
    struct dirent **list = NULL;
    int n = scandir_list(dp, filter, &list);
    int err = errno;
    closedir(dp);
    if (n < 0) {
        errno = err;
        return R_DONE;
    }
    if (compar != NULL && n > 1) {
        dirent_cmp outer = t_scandir_cmp; /* a comparator may scandir too */
        t_scandir_cmp = compar;
        qsort(list, (size_t)n, sizeof *list, scandir_qsort_cmp);
        t_scandir_cmp = outer;
    }
    *namelist = list;
    *ret = n;
    errno = saved;
    return R_DONE;
}

HOOK_OR_REAL(int, scandir,
             (const char *dir, struct dirent ***namelist, int (*filter)(const struct dirent *),
              int (*compar)(const struct dirent **, const struct dirent **)),
             scandir_remote(dir, namelist, filter, compar, &ret), (dir, namelist, filter, compar))

/* struct dirent64 and struct dirent share their layout on 64-bit Linux */
HOOK int scandir64(const char *dir, struct dirent64 ***namelist,
                   int (*filter)(const struct dirent64 *),
                   int (*compar)(const struct dirent64 **, const struct dirent64 **)) {
    int ret;
    union {
        int (*f64)(const struct dirent64 *);
        int (*f)(const struct dirent *);
    } f = {.f64 = filter};
    union {
        int (*c64)(const struct dirent64 **, const struct dirent64 **);
        dirent_cmp c;
    } c = {.c64 = compar};
    if (scandir_remote(dir, (struct dirent ***)namelist, f.f, c.c, &ret) == R_DONE) {
        return ret;
    }
    return REAL(scandir64)(dir, namelist, filter, compar);
}

/* glob(3) reads directories with glibc's internal opendir/readdir/lstat: a pattern that may
 * name remote paths is expanded with GLOB_ALTDIRFUNC and the hooked ones, which decide per
 * directory. */
static int glob_maybe_remote(const char *pattern, int flags) {
    if (!g_active || t_guard || pattern == NULL || (flags & GLOB_ALTDIRFUNC)) {
        return 0;
    }
    if (pattern[0] != '/') {
        return vcwd_is_set();
    }
    char full[PATH_CAP];
    return !route_is_local(path_route(AT_FDCWD, pattern, 0, full));
}

static void *glob_opendir(const char *path) { return opendir(path); }
static struct dirent *glob_readdir(void *d) { return readdir(d); }
static struct dirent64 *glob_readdir64(void *d) { return readdir64(d); }
static void glob_closedir(void *d) { (void)closedir(d); }

#define GLOB_HOOK(name, type, readfn, lstatfn, statfn)                                  \
    HOOK int name(const char *pattern, int flags, int (*errfunc)(const char *, int),    \
                  type *pglob) {                                                        \
        if (!glob_maybe_remote(pattern, flags)) {                                       \
            return REAL(name)(pattern, flags, errfunc, pglob);                          \
        }                                                                               \
        pglob->gl_opendir = glob_opendir;                                               \
        pglob->gl_readdir = readfn;                                                     \
        pglob->gl_closedir = glob_closedir;                                             \
        pglob->gl_lstat = lstatfn;                                                      \
        pglob->gl_stat = statfn;                                                        \
        return REAL(name)(pattern, flags | GLOB_ALTDIRFUNC, errfunc, pglob);            \
    }
GLOB_HOOK(glob, glob_t, glob_readdir, lstat, stat)
GLOB_HOOK(glob64, glob64_t, glob_readdir64, lstat64, stat64)
