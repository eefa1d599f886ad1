/* Declarations shared by the file subsystem's C files (files_*.c). Nothing here is exported.
 *
 * A remote file gets a real local fd so fd numbers, dup, select and close behave:
 * - K_MFILE: a file opened read-only whose content fits g_set.fetch_limit is fetched whole into a
 *   memfd (then read, mmap, sendfile, copy_file_range and stdio work natively); fstat
 *   reports the remote stat. Opened for writing, the memfd is a write-back cache.
 * - K_RFILE: other remote files (large, directories) get an empty memfd as a placeholder and
 *   every read/write/seek/stat on it is a request on the remote handle; a regular one is read
 *   ahead or written behind (files_buffer.c).
 *
 * Files, one responsibility each:
 *   files_path.c    where a path lives (path_route), the virtual working directory, realpath
 *   files_remote.c  one request to the agent and its reply (rreq_call), and the requests on
 *                   paths and handles built on it (rstat, rstatfs, rfile_read_chunk, ...)
 *   files_open.c    the open family: fetch into a memfd, placeholder fds, open_remote
 *   files_cache.c   memfd caches: write-back (wfile_flush), growth of a fetched file
 *                   (mfile_refresh), the placeholder filled for mmap
 *   files_buffer.c  read-ahead and write-behind of handle-backed regular files (fbuf_*)
 *   files_io.c      read/write/seek/vector I/O, sendfile, copy_file_range, mmap, syscall()
 *   files_fd.c      close, close_range, dup family, fcntl
 *   files_stat.c    the stat family, statx, statfs/statvfs, access, readlink
 *   files_mutate.c  the path-taking mutators: mkdir/rmdir/unlink, rename, link, symlink,
 *                   truncate/chmod by path, mkstemp/mkdtemp
 *   files_attr.c    changes through an fd (ftruncate, fchmod, fsync), times, owners, xattrs
 *   files_dir.c     directory streams (opendir ... closedir, scandir, glob)
 *   files_stdio.c   fopen/freopen/fdopen
 *   files_exec.c    remote fds across exec (MIRRORD_LAYER_FILES)
 *   files_spawn.c   posix_spawn whose child must see remote files (recorded file actions)
 *   files_walk.c    nftw/ftw from a remote directory (the layer's own walk through the hooks)
 *   files_supervisor.c  the exports the system-call supervisor calls
 */
#ifndef MIRRORD_FILES_H
#define MIRRORD_FILES_H

#include "layer.h"

#include <errno.h>
#include <string.h>

#pragma GCC visibility push(hidden)

#define PATH_CAP 4096

/* ---------------------------------------------------------------- deciding a path */

/* Beside R_BYPASS (local, under the app's own name) and R_DONE (layer.h): */
enum {
    R_REMOTE = 2, /* the target's absolute path is in the caller's buffer */
    R_MAPPED = 3, /* local, under the name feature.fs.mapping gave it (absolute, in the buffer) */
};

/* The one decision for a path a hook was given, made without a round trip: R_BYPASS,
 * R_MAPPED or R_REMOTE (out, PATH_CAP bytes, holds the name to use), or R_DONE: a `not_found`
 * path, the call fails with ENOENT (errno set). `write`: the call may modify the file. errno
 * is kept otherwise. */
int path_route(int dirfd, const char *path, int write, char *out);
/* The logic of a hook on one path, in one shape: `path` is routed; a mapped local one makes
 * `local_call` and a remote one `remote_call` (under t_guard), both naming it `full`; the
 * result goes to *ret and the logic returns R_DONE. An unmapped local path returns R_BYPASS
 * (the hook makes the real call), a `not_found` one R_DONE with -1 (ENOENT). */
#define ROUTE_PATH(dirfd, path, write, ret, local_call, remote_call) \
    do {                                                             \
        char full[PATH_CAP];                                         \
        int route_ = path_route(dirfd, path, write, full);           \
        if (route_ == R_MAPPED) {                                    \
            *(ret) = (local_call);                                   \
            return R_DONE;                                           \
        }                                                            \
        if (route_ != R_REMOTE) {                                    \
            *(ret) = -1;                                             \
            return route_;                                           \
        }                                                            \
        t_guard++;                                                   \
        *(ret) = (remote_call);                                      \
        t_guard--;                                                   \
        return R_DONE;                                               \
    } while (0)

/* path_route as the supervisor sees it: P_LOCAL (R_BYPASS, R_MAPPED), P_REMOTE, P_NOT_FOUND. */
int path_decision(int route);

/* The route keeps the call on this machine (under the app's name or a mapped one). */
static inline int route_is_local(int route) {
    return route == R_BYPASS || route == R_MAPPED;
}

/* After path_route kept a path local: the name of the local call, `buf` for a mapped one
 * (absolute, so *dirfd becomes AT_FDCWD when given). */
static inline const char *local_path(int route, const char *path, const char *buf, int *dirfd) {
    if (route != R_MAPPED) {
        return path;
    }
    if (dirfd != NULL) {
        *dirfd = AT_FDCWD;
    }
    return buf;
}

static inline int open_is_write(int flags) {
    return (flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC | O_APPEND)) != 0;
}

/* Lexically removes ".", "..", and repeated or trailing slashes from an absolute path. */
void normalize_path(char *p);
/* The remote working directory is set: relative paths are remote (one relaxed load). */
int vcwd_is_set(void);

void vcwd_after_fork_child(void);

/* ---------------------------------------------------------------- fds */

static inline int is_file_kind(const struct ent *pe) {
    return pe->kind == K_RFILE || pe->kind == K_MFILE;
}

/* The remote file behind fd, with a reference (ent_put it), or NULL: not a remote file, or
 * the layer's own call (t_guard). */
static inline struct ent *file_ent(int fd) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || t_guard || !is_file_kind(pe)) {
        return NULL;
    }
    return ent_get(fd);
}

static inline int local_fd(int fd) {
    /* a new local fd reusing a number the layer still tracked (closed behind our back) */
    if (__builtin_expect(fd_peek(fd) != NULL, 0)) {
        fd_forget(fd);
    }
    return fd;
}

/* The common hook shape, one line a hook: `logic` (which writes `ret`) answers R_DONE with the
 * result in ret, or R_BYPASS for the real call with the hook's own arguments. */
#define HOOK_OR_REAL(rtype, name, params, logic, realargs) \
    HOOK rtype name params {                               \
        rtype ret;                                         \
        if ((logic) == R_DONE) {                           \
            return ret;                                    \
        }                                                  \
        return REAL(name) realargs;                        \
    }

/* A hook on a 64-bit variant whose struct has the layout of the plain one (x86_64, aarch64):
 * `logic` fills `tmp` (a `type`) and `ret`. */
#define HOOK_OR_REAL_COPY(name, params, type, logic, out, realargs) \
    HOOK int name params {                                          \
        int ret;                                                    \
        type tmp;                                                   \
        if ((logic) == R_DONE) {                                    \
            if (ret == 0) {                                         \
                memcpy(out, &tmp, sizeof *(out));                   \
            }                                                       \
            return ret;                                             \
        }                                                           \
        return REAL(name) realargs;                                 \
    }

/* ---------------------------------------------------------------- requests (files_remote.c) */

/* One field of a request, typed when built: WF_U(handle), WF_PATH(path) (null for NULL). */
struct wf {
    int type;
    uint64_t u;
    const void *p;
    size_t n;
};
enum { WF_NULL, WF_UINT, WF_INT, WF_BYTES, WF_BOOL };
#define WF_NIL ((struct wf){.type = WF_NULL})
#define WF_U(v) ((struct wf){.type = WF_UINT, .u = (uint64_t)(v)})
#define WF_I(v) ((struct wf){.type = WF_INT, .u = (uint64_t)(int64_t)(v)})
#define WF_B(v) ((struct wf){.type = WF_BOOL, .u = (v) != 0})
#define WF_BUF(ptr, len) ((struct wf){.type = WF_BYTES, .p = (ptr), .n = (len)})
#define WF_PATH(s) ((s) != NULL ? WF_BUF((s), strlen(s)) : WF_NIL)
#define WF_U_UNLESS(nil, v) ((nil) ? WF_NIL : WF_U(v))

/* One request and its reply, on this thread's daemon connection. */
struct rreq {
    struct lconn *c;
    cbor_r r; /* after rreq_call returned 0: the reply, after its request id */
};
#define RREQ_INIT {.c = NULL}

/* Sends [kind, request id, fields...] and waits for the reply of kind `expect`: 0 (read the
 * reply in q->r), or -1 with errno (the agent's, or EIO for a lost daemon). The connection
 * stays q's until rreq_end, so several calls may follow on it. */
int rreq_call(struct rreq *q, int kind, int expect, size_t n, const struct wf *f);
void rreq_end(struct rreq *q);
#define WF_COUNT(...) ((int)(sizeof((struct wf[]){__VA_ARGS__}) / sizeof(struct wf)))
/* As conn_begin (layer.h): a field count the message catalogue does not allow for a constant
 * kind is a build error. */
#ifdef __OPTIMIZE__
#define RREQ_CHECK(kind, n) \
    ((__builtin_constant_p(kind) && !M_FIELDS_FIT(kind, n)) ? conn_begin_field_count_mismatch() : (void)0)
#else
#define RREQ_CHECK(kind, n) ((void)0)
#endif
#define RREQ(q, kind, expect, ...)                  \
    (RREQ_CHECK(kind, WF_COUNT(__VA_ARGS__)),       \
     rreq_call(q, kind, expect, (size_t)WF_COUNT(__VA_ARGS__), (struct wf[]){__VA_ARGS__}))
/* A request answered by Ok: 0, or -1 with errno. */
int rreq_ok(int kind, size_t n, const struct wf *f);
#define RREQ_OK(kind, ...)                    \
    (RREQ_CHECK(kind, WF_COUNT(__VA_ARGS__)), \
     rreq_ok(kind, (size_t)WF_COUNT(__VA_ARGS__), (struct wf[]){__VA_ARGS__}))

/* The requests on paths and handles (a NULL path means "by handle"). */
int rstat(const char *path, uint64_t handle, int follow, struct stat *st);
int rstatfs(const char *path, uint64_t handle, struct statfs *sf);
int raccess(const char *path, int mode);
ssize_t rreadlink(const char *path, char *buf, size_t size);
int rfile_open(const char *path, int rflags, mode_t mode, uint64_t *handle);
int rfile_close_handle(uint64_t handle);
ssize_t rfile_read_chunk(uint64_t handle, void *buf, size_t n, off_t off);  /* off -1: position */
ssize_t rfile_write_chunk(uint64_t handle, const void *buf, size_t n, off_t off);
off_t rfile_seek(struct ent *e, off_t off, int whence);        /* the fd's offset (buffered too) */
off_t rfile_seek_handle(struct ent *e, off_t off, int whence); /* the handle's own offset */
ssize_t rfile_read(struct ent *e, void *buf, size_t n, off_t off);
ssize_t rfile_write(struct ent *e, const void *buf, size_t n, off_t off);
/* Up to `len` bytes of the handle's file from offset 0 into fd (pwrite): the bytes copied. */
off_t rfile_copy_into(uint64_t handle, int fd, off_t from, off_t len);

/* ---------------------------------------------------------------- shared between files */

/* files_open.c */
/* The open hooks past the bypass path: R_BYPASS, or R_DONE with the fd (or -1) in *ret. */
int do_open(int dirfd, const char *path, int flags, mode_t mode, int *ret);
int placeholder_fd(int flags, const char *path);
int open_remote(const char *path, int flags, mode_t mode);
/* Read-your-writes: this process's pending write-backs to `path` are written first. */
void flush_pending_for(const char *path);
/* The layer's own fd on a memfd cache, and its state as last written back. */
void cache_adopt(struct ent *e, int fd);

/* files_cache.c */
void mfile_refresh(int fd, struct ent *e);
void mfile_restat(struct ent *e);
void rfile_fill_placeholder(int fd);

/* files_io.c: the memfd of a file opened write-only (1: refused with EBADF). */
int mfile_writeonly(int fd, struct ent *pe);

/* files_stat.c */
int statfs_path(const char *path, struct statfs *sf, int *ret);
int fstatfs_fd(int fd, struct statfs *sf, int *ret);

/* files_buffer.c: read-ahead and write-behind of a handle-backed regular file. The fbuf_*
 * calls on one file answer 1 (done, result in *ret) or 0 (not buffered: the handle's way). */
void fbuf_attach(struct ent *e, int flags); /* a fresh open (offset 0), before fd_set_ent */
int fbuf_read(struct ent *e, void *buf, size_t n, off_t off, ssize_t *ret);
int fbuf_write(struct ent *e, const void *buf, size_t n, off_t off, ssize_t *ret);
int fbuf_seek(struct ent *e, off_t off, int whence, off_t *ret);
int fbuf_flush(struct ent *e);      /* pending writes out: 0, or -1 with errno */
int fbuf_close(int fd);             /* the app closes fd: fbuf_flush's result */
void fbuf_flush_all(void);          /* exit */
void fbuf_flush_path(const char *path); /* read-your-writes before a remote open/stat */

/* files_stdio.c: a FILE over an fd the layer serves (its I/O through the hooks). */
FILE *cookie_stream(int fd, const char *mode);

#pragma GCC visibility pop

#endif
