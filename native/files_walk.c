/* nftw, ftw (and their 64 variants) from a remote directory.
 *
 * glibc's walk reads directories and stats their entries with its internal opendir, readdir,
 * stat and lstat, which no hook sees: from a directory only the pod has, nftw failed (ENOENT);
 * from one both have, it walked the local one. A walk whose start the layer routes remote is
 * done here, through the layer's own hooks (so each directory and entry is decided as any call
 * is), with glibc's semantics: FTW_F, FTW_D, FTW_DNR, FTW_DP (FTW_DEPTH), FTW_NS, FTW_SL
 * (FTW_PHYS), FTW_SLN; FTW_MOUNT, FTW_CHDIR and FTW_ACTIONRETVAL; `struct FTW`'s base and
 * level; a callback's nonzero return ends the walk and is its result. Entries come in the order
 * readdir gives them; `nopenfd` is not needed (one directory stream per level). A walk from a
 * local start is glibc's.
 *
 * Owns: the hooks above. Does not own: the calls the walk makes (files_dir.c, files_stat.c).
 */
#include "files.h"

#include <dirent.h>
#include <dlfcn.h>
#include <ftw.h>
#include <pthread.h>
#include <stdlib.h>

typedef int (*nftw_fn)(const char *, const struct stat *, int, struct FTW *);
typedef int (*ftw_fn)(const char *, const struct stat *, int);

struct walk {
    int flags;
    nftw_fn nfn; /* nftw's callback, or */
    ftw_fn fn;   /* ftw's */
    char path[PATH_CAP]; /* the entry as the app named the start (what the callback gets) */
    char abs[PATH_CAP];  /* the same entry, absolute (what the walk's own calls use) */
    char parent[PATH_CAP]; /* scratch: a directory's parent (FTW_CHDIR), off the stack */
    size_t skew;         /* abs is path with this many more bytes in front */
    dev_t dev;           /* the start's device (FTW_MOUNT) */
    int result;          /* the callback's return that ended the walk, or -1 on an error */
};

enum { GO, SKIP_SIBLINGS, STOP };

/* What a callback's return means for the walk (`subtree`: it was a directory's FTW_D). */
static int verdict(struct walk *w, int r, int *skip_subtree) {
    if (r == 0) {
        return GO;
    }
    if (w->flags & FTW_ACTIONRETVAL) {
        if (r == FTW_SKIP_SUBTREE || r == FTW_SKIP_SIBLINGS) {
            *skip_subtree = 1;
            return r == FTW_SKIP_SIBLINGS ? SKIP_SIBLINGS : GO;
        }
    }
    w->result = r;
    return STOP;
}

static int report(struct walk *w, const struct stat *st, int flag, int base, int level) {
    if (w->nfn != NULL) {
        struct FTW f = {.base = base, .level = level};
        return w->nfn(w->path, st, flag, &f);
    }
    return w->fn(w->path, st, flag);
}

/* Appends "/name" to both paths: the new length of path, or 0 when it would not fit. */
static size_t push(struct walk *w, size_t len, const char *name) {
    size_t n = strlen(name);
    int slash = len > 0 && w->path[len - 1] != '/';
    if (len + slash + n + w->skew >= PATH_CAP) {
        return 0;
    }
    if (slash) {
        w->path[len++] = '/';
    }
    memcpy(w->path + len, name, n + 1);
    memcpy(w->abs + w->skew, w->path, len + n + 1);
    return len + n;
}

static void pop(struct walk *w, size_t len) {
    w->path[len] = 0;
    w->abs[w->skew + len] = 0;
}

/* The directory holding absolute `path` (a trailing slash aside), into out (PATH_CAP). */
static void parent_of(const char *path, char *out) {
    size_t n = strlen(path);
    memcpy(out, path, n + 1);
    while (n > 1 && out[n - 1] == '/') {
        out[--n] = 0;
    }
    char *slash = strrchr(out, '/');
    if (slash == out) {
        slash[1] = 0;
    } else if (slash != NULL) {
        *slash = 0;
    }
}

static int visit(struct walk *w, size_t len, int base, int level);

/* The entries of the directory open as d (at w->path, len bytes), each visited: GO or STOP. */
static int entries(struct walk *w, DIR *d, size_t len, int level) {
    struct dirent *de;
    while ((errno = 0, de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) {
            continue;
        }
        size_t n = push(w, len, de->d_name);
        if (n == 0) {
            errno = ENAMETOOLONG;
            w->result = -1;
            return STOP;
        }
        int sub = visit(w, n, (int)(n - strlen(de->d_name)), level + 1);
        pop(w, len);
        if (sub == STOP) {
            return STOP;
        }
        if (sub == SKIP_SIBLINGS) {
            return GO;
        }
    }
    if (errno != 0) {
        w->result = -1; /* readdir failed */
        return STOP;
    }
    return GO;
}

/* The entry at w->path (len bytes; its name at `base`): reported, and walked if a directory.
 * GO, SKIP_SIBLINGS or STOP (w->result set). */
static int visit(struct walk *w, size_t len, int base, int level) {
    struct stat st;
    int flag;
    int follow = !(w->flags & FTW_PHYS);
    if ((follow ? stat(w->abs, &st) : lstat(w->abs, &st)) < 0) {
        if (level == 0) {
            w->result = -1; /* the start itself: nftw fails with stat's errno */
            return STOP;
        }
        int e = errno;
        /* nftw tells a dangling symlink apart; ftw says FTW_NS, as glibc's */
        flag = w->nfn != NULL && follow && e == ENOENT && lstat(w->abs, &st) == 0 &&
                       S_ISLNK(st.st_mode)
                   ? FTW_SLN
                   : FTW_NS;
        if (flag == FTW_NS) {
            memset(&st, 0, sizeof st);
        }
    } else if (S_ISDIR(st.st_mode)) {
        flag = FTW_D;
    } else {
        flag = S_ISLNK(st.st_mode) ? FTW_SL : FTW_F;
    }
    if (level == 0) {
        w->dev = st.st_dev;
    }
    int skip = 0;
    if (flag != FTW_D) {
        return verdict(w, report(w, &st, flag, base, level), &skip);
    }
    if ((w->flags & FTW_MOUNT) && st.st_dev != w->dev) {
        return GO; /* another file system: not entered, not reported */
    }
    DIR *d = opendir(w->abs);
    if (d == NULL) {
        return verdict(w, report(w, &st, FTW_DNR, base, level), &skip);
    }
    int v = GO;
    if (!(w->flags & FTW_DEPTH)) {
        v = verdict(w, report(w, &st, FTW_D, base, level), &skip);
    }
    if (v == GO && !skip && (w->flags & FTW_CHDIR) && chdir(w->abs) < 0) {
        w->result = -1;
        v = STOP;
    }
    int entered = v == GO && !skip && (w->flags & FTW_CHDIR);
    if (v == GO && !skip) {
        v = entries(w, d, len, level);
    }
    int saved = errno;
    closedir(d);
    errno = saved;
    if (entered) { /* back to the directory's parent, as glibc does before FTW_DP */
        parent_of(w->abs, w->parent);
        if (chdir(w->parent) < 0 && v != STOP) {
            w->result = -1;
            v = STOP;
        }
    }
    if (v == GO && (w->flags & FTW_DEPTH)) {
        v = verdict(w, report(w, &st, FTW_DP, base, level), &skip);
    }
    return v == SKIP_SIBLINGS ? SKIP_SIBLINGS : v;
}

/* A walk from `dir`, remote: the walk's result; or -2 when dir is local (glibc's walk). */
static int walk(const char *dir, nftw_fn nfn, ftw_fn fn, int flags) {
    char full[PATH_CAP];
    if (!g_active || t_guard || dir == NULL || route_is_local(path_route(AT_FDCWD, dir, 0, full))) {
        return -2;
    }
    struct walk *w = calloc(1, sizeof *w);
    if (w == NULL) {
        errno = ENOMEM;
        return -1;
    }
    w->flags = flags;
    w->nfn = nfn;
    w->fn = fn;
    size_t len = strlen(dir);
    char cwd[PATH_CAP];
    cwd[0] = 0;
    if (dir[0] != '/' && getcwd(cwd, sizeof cwd) == NULL) {
        free(w);
        return -1;
    }
    size_t clen = strlen(cwd);
    w->skew = dir[0] == '/' ? 0 : clen + (clen > 0 && cwd[clen - 1] != '/');
    if (len == 0 || len + w->skew >= PATH_CAP) {
        free(w);
        errno = len == 0 ? ENOENT : ENAMETOOLONG;
        return -1;
    }
    memcpy(w->path, dir, len + 1);
    if (w->skew > 0) {
        memcpy(w->abs, cwd, clen);
        w->abs[w->skew - 1] = '/';
    }
    memcpy(w->abs + w->skew, dir, len + 1);
    /* the start's name begins after its last slash (a trailing one aside) */
    size_t end = len;
    while (end > 1 && dir[end - 1] == '/') {
        end--;
    }
    int base = (int)end;
    while (base > 0 && dir[base - 1] != '/') {
        base--;
    }
    char start[PATH_CAP];
    if (flags & FTW_CHDIR) { /* as glibc: the start is reported from the directory holding it */
        parent_of(w->abs, w->parent);
        if (getcwd(start, sizeof start) == NULL || chdir(w->parent) < 0) {
            free(w);
            return -1;
        }
    }
    int v = visit(w, len, base, 0);
    int result = v == STOP ? w->result : 0;
    int saved = errno;
    if (flags & FTW_CHDIR) {
        (void)chdir(start);
    }
    free(w);
    errno = saved;
    return result;
}

static int (*r_nftw)(const char *, nftw_fn, int, int);
static int (*r_nftw64)(const char *, nftw_fn, int, int);
static int (*r_ftw)(const char *, ftw_fn, int);
static int (*r_ftw64)(const char *, ftw_fn, int);
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void resolve(void) {
    r_nftw = (int (*)(const char *, nftw_fn, int, int))dlsym(RTLD_NEXT, "nftw");
    r_nftw64 = (int (*)(const char *, nftw_fn, int, int))dlsym(RTLD_NEXT, "nftw64");
    r_ftw = (int (*)(const char *, ftw_fn, int))dlsym(RTLD_NEXT, "ftw");
    r_ftw64 = (int (*)(const char *, ftw_fn, int))dlsym(RTLD_NEXT, "ftw64");
}

#define REAL_WALK(f, args) (pthread_once(&g_once, resolve), (f) != NULL ? (f)args : (errno = ENOSYS, -1))

/* struct stat64 is struct stat on x86_64 and aarch64 (as the __xstat hooks assume) */
HOOK int nftw(const char *dir, nftw_fn fn, int nopenfd, int flags) {
    int r = walk(dir, fn, NULL, flags);
    return r != -2 ? r : REAL_WALK(r_nftw, (dir, fn, nopenfd, flags));
}

HOOK int nftw64(const char *dir, int (*fn)(const char *, const struct stat64 *, int, struct FTW *),
                int nopenfd, int flags) {
    int r = walk(dir, (nftw_fn)fn, NULL, flags);
    return r != -2 ? r : REAL_WALK(r_nftw64, (dir, (nftw_fn)fn, nopenfd, flags));
}

HOOK int ftw(const char *dir, ftw_fn fn, int nopenfd) {
    int r = walk(dir, NULL, fn, 0);
    return r != -2 ? r : REAL_WALK(r_ftw, (dir, fn, nopenfd));
}

HOOK int ftw64(const char *dir, int (*fn)(const char *, const struct stat64 *, int), int nopenfd) {
    int r = walk(dir, NULL, (ftw_fn)fn, 0);
    return r != -2 ? r : REAL_WALK(r_ftw64, (dir, (ftw_fn)fn, nopenfd));
}
