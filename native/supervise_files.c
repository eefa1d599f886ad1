/* The layer's side of the system-call supervisor's remote files (native/supervisor/, see
 * docs/layer.md): what a remote open the supervisor trapped becomes in the program.
 * files_supervisor.c's mirrord_supervisor_open decides (the layer's policy) and opens the file with the layer's own
 * open_remote; supervise_remote_fd turns that descriptor into one the supervisor can install
 * in the program with SECCOMP_IOCTL_NOTIF_ADDFD, where read/write/getdents64 run natively:
 *
 * - a file handed over by a local target's agent (feature.fs.handover): the target's open
 *   file itself, as it is;
 * - a file fetched whole (read-only, up to fetch_limit): its memfd, as it is;
 * - a file bigger than fetch_limit (read-only): read whole through its remote handle into a
 *   new memfd (the layer's read hook, FileRead by FileRead);
 * - a file opened to write (fs mode `write`): the layer's write-back cache (a memfd), which the
 *   supervisor installs as a new open of it and keeps until the program's last descriptor of
 *   that open is closed; closing the layer's descriptor then writes it back (wfile_flush);
 * - a directory: a local copy of its listing (entries as empty files, directories and
 *   symlinks with the target's link text) in a directory of the supervisor's own, below
 *   $TMPDIR/mirrord-sv-<supervisor pid>, removed when the supervisor ends
 *   (mirrord_supervisor_finish).
 */
#define _XOPEN_SOURCE 700
#include "files.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define SV_COPY_CHUNK (1 << 20)

/* $TMPDIR/mirrord-sv-<pid of the supervisor>: where directory listings are laid out. */
static void dirs_root(pid_t sv, char *out, size_t cap) {
    const char *tmp = getenv("TMPDIR");
    snprintf(out, cap, "%s/mirrord-sv-%d", tmp != NULL && tmp[0] == '/' ? tmp : "/tmp", (int)sv);
}

/* The remote file `fd` (a handle, K_RFILE) read whole into a new memfd. */
static int copy_to_memfd(int fd, const char *path) {
    const char *b = strrchr(path, '/');
    char name[64];
    snprintf(name, sizeof name, "mirrord:%.48s", b != NULL ? b + 1 : path);
    int m = memfd_create(name, MFD_CLOEXEC);
    char *buf = m >= 0 ? malloc(SV_COPY_CHUNK) : NULL;
    ssize_t n = buf != NULL ? 1 : -1;
    while (n > 0) {
        n = read(fd, buf, SV_COPY_CHUNK); /* the layer's hook: FileRead on the handle */
        for (ssize_t done = 0; n > 0 && done < n;) {
            ssize_t w = REAL(write)(m, buf + done, (size_t)(n - done));
            if (w <= 0) {
                n = -1;
            } else {
                done += w;
            }
        }
    }
    int saved = errno;
    free(buf);
    if (n < 0 || REAL(lseek)(m, 0, SEEK_SET) != 0) {
        if (m >= 0) {
            REAL(close)(m);
        }
        errno = saved != 0 ? saved : EIO;
        return -1;
    }
    return m;
}

/* One entry of a remote directory `path`, made in the local directory `dfd`. */
static void lay_entry(int dfd, const char *path, const struct dirent64 *de) {
    char target[PATH_MAX], full[PATH_MAX];
    ssize_t tl = -1;
    if (de->d_type == DT_LNK) {
        if (snprintf(full, sizeof full, "%s/%s", path, de->d_name) < (int)sizeof full) {
            tl = readlink(full, target, sizeof target - 1); /* the layer's hook: the target's */
        }
    }
    t_guard++;
    if (de->d_type == DT_DIR) {
        mkdirat(dfd, de->d_name, 0755);
    } else if (tl > 0) {
        target[tl] = 0;
        symlinkat(target, dfd, de->d_name);
    } else {
        int f = REAL(openat)(dfd, de->d_name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (f >= 0) {
            REAL(close)(f);
        }
    }
    t_guard--;
}

/* The remote directory `fd` (taken: closed here) laid out locally; its local descriptor. */
static int mirror_dir(int fd, const char *path) {
    static unsigned next;
    char root[PATH_MAX], dir[PATH_MAX];
    struct stat st;
    dirs_root(getpid(), root, sizeof root);
    int ok = snprintf(dir, sizeof dir, "%s/%u", root,
                      __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED)) < (int)sizeof dir;
    t_guard++;
    ok = ok && (mkdir(root, 0700) == 0 || errno == EEXIST) && lstat(root, &st) == 0 &&
             S_ISDIR(st.st_mode) && st.st_uid == geteuid() && (st.st_mode & 077) == 0 &&
             mkdir(dir, 0700) == 0;
    int dfd = ok ? REAL(openat)(AT_FDCWD, dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    t_guard--;
    DIR *d = dfd >= 0 ? fdopendir(fd) : NULL; /* the layer's: the target's listing */
    if (d == NULL) {
        int saved = dfd >= 0 ? errno : EIO;
        if (dfd >= 0) {
            REAL(close)(dfd);
        }
        close(fd);
        errno = saved;
        return -1;
    }
    struct dirent64 *de;
    while ((de = readdir64(d)) != NULL) {
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) {
            lay_entry(dfd, path, de);
        }
    }
    closedir(d);
    return dfd;
}

/* Called by mirrord_supervisor_open with the layer's descriptor `fd` of the remote file (as
 * open_remote made it for `flags`): 1 = *fd_out is what to install (the supervisor closes it
 * afterwards); 2 = *fd_out is the layer's write-back cache: install a new open of it and close
 * *fd_out once the program's copy is closed (that writes it back); -1 = fail with errno. */
int supervise_remote_fd(int fd, int flags, int *fd_out) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        /* no entry: the target's file itself, handed over by a local target's agent (already
         * opened with the program's flags): installed as it is */
        *fd_out = fd;
        return 1;
    }
    int kind = e->kind, writeback = e->writeback, is_dir = e->is_dir;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", e->path != NULL ? e->path : "");
    ent_put(e);
    *fd_out = fd;
    if (is_dir && !open_is_write(flags)) {
        *fd_out = mirror_dir(fd, path);
        return *fd_out >= 0 ? 1 : -1;
    }
    if (kind == K_MFILE) {
        return writeback ? 2 : 1;
    }
    if (kind == K_RFILE && !open_is_write(flags)) { /* bigger than fetch_limit */
        *fd_out = copy_to_memfd(fd, path);
        int saved = errno;
        close(fd);
        errno = saved;
        return *fd_out >= 0 ? 1 : -1;
    }
    close(fd);
    errno = EOPNOTSUPP; /* writing a file bigger than fetch_limit */
    return -1;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

/* The supervisor `sv` (or its fallback) ends: its directory listings are removed. */
HOOK void mirrord_supervisor_finish(pid_t sv) {
    char root[PATH_MAX];
    dirs_root(sv, root, sizeof root);
    t_guard++;
    nftw(root, remove_one, 16, FTW_DEPTH | FTW_PHYS);
    t_guard--;
}
