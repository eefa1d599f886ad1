/* Internal declarations shared by the layer's C files. Nothing here is exported: the library
 * is built with -fvisibility=hidden and only functions marked HOOK are visible to the app.
 *
 * Files: preload.c (init, real_* resolution, fd table, debug), conn.c (daemon connections and
 * requests), policy.c (the compact config and every local/remote decision), files_*.c (file and
 * directory hooks, see files.h), net_*.c (socket and DNS hooks, see net.h), proc.c
 * (fork/exec/spawn hooks), supervise.c (what the system-call supervisor, native/supervisor/, asks
 * about sockets).
 */
#ifndef MIRRORD_LAYER_H
#define MIRRORD_LAYER_H

#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <sys/sendfile.h>
#include <netdb.h>
#include <pthread.h>
#include <regex.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <glob.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "cbor.h"

#define HOOK __attribute__((visibility("default")))
#define UNUSED __attribute__((unused))

#ifndef MIRRORD_BUILD_ID
#define MIRRORD_BUILD_ID "dev"
#endif

/* ---------------------------------------------------------------- real functions */

/* glibc >= 2.33 no longer declares these, but older binaries still call them. */
int __xstat(int ver, const char *path, struct stat *buf);
int __lxstat(int ver, const char *path, struct stat *buf);
int __fxstat(int ver, int fd, struct stat *buf);
int __fxstatat(int ver, int dirfd, const char *path, struct stat *buf, int flags);
int __xstat64(int ver, const char *path, struct stat64 *buf);
int __lxstat64(int ver, const char *path, struct stat64 *buf);
int __fxstat64(int ver, int fd, struct stat64 *buf);
int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *buf, int flags);
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int dirfd, const char *path, int flags);
int __openat64_2(int dirfd, const char *path, int flags);
int fcntl64(int fd, int cmd, ...);

/* Everything declared from here on is the layer's own: hidden, so that its globals are read
 * directly and not through the GOT (g_active and the real_* pointers are on every hook's path). */
#pragma GCC visibility push(hidden)

#define MIRRORD_REALS(X)                                                                  \
    X(open) X(open64) X(openat) X(openat64) X(close) X(read) X(write) X(pread) X(pread64)  \
    X(pwrite) X(pwrite64) X(readv) X(writev) X(lseek) X(lseek64) X(dup) X(dup2) X(dup3)    \
    X(fcntl) X(fcntl64) X(fstat) X(fstat64) X(stat) X(stat64) X(lstat) X(lstat64)          \
    X(fstatat) X(fstatat64) X(statx) X(statfs) X(statfs64) X(fstatfs) X(fstatfs64)         \
    X(access) X(faccessat) X(readlink) X(readlinkat) X(opendir) X(fdopendir) X(readdir)    \
    X(readdir64) X(closedir) X(dirfd) X(mkdir) X(mkdirat) X(rmdir) X(unlink) X(unlinkat)   \
    X(rename) X(renameat) X(ftruncate) X(ftruncate64) X(fchmod) X(fsync) X(fopen)          \
    X(fopen64) X(freopen) X(freopen64) X(socket) X(bind) X(listen) X(accept) X(accept4)    \
    X(connect) X(getpeername) X(getsockname) X(sendto) X(recvfrom) X(sendmsg) X(recvmsg)   \
    X(getaddrinfo) X(freeaddrinfo) X(gethostbyname) X(gethostname) X(fork) X(execve)       \
    X(execvpe) X(posix_spawn) X(posix_spawnp) X(creat) X(creat64) X(copy_file_range)       \
    X(sendfile) X(sendfile64) X(close_range) X(rewinddir) X(telldir) X(seekdir)   \
    X(readdir_r) X(readdir64_r) X(truncate) X(truncate64) X(chmod)          \
    X(gethostbyname2) X(gethostbyname_r) X(gethostbyname2_r) X(euidaccess) X(eaccess)   \
    X(scandir) X(scandir64) X(renameat2) X(getxattr) X(lgetxattr) X(fgetxattr)  \
    X(listxattr) X(llistxattr) X(flistxattr) X(chdir) X(fchdir) X(getcwd)                 \
    X(syscall) X(fdatasync) X(preadv) X(preadv64) X(pwritev) X(pwritev64) X(mmap) X(mmap64) \
    X(mkstemp) X(mkstemp64) X(mkostemp) X(mkostemp64) X(mkstemps) X(mkstemps64)           \
    X(mkostemps) X(mkostemps64) X(mkdtemp) X(realpath) X(canonicalize_file_name)         \
    X(utimensat) X(futimens) X(fchownat) X(fchown) X(fchmodat) X(setxattr) X(lsetxattr) X(fsetxattr) \
    X(symlinkat) X(linkat) X(statvfs) X(fstatvfs) \
    X(fdopen) X(glob) X(glob64) X(_exit)

/* readdir_r is deprecated, but programs still call it on our DIRs */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#define MIRRORD_DECLARE_REAL(name) extern __typeof__(name) *real_##name;
MIRRORD_REALS(MIRRORD_DECLARE_REAL)
#undef MIRRORD_DECLARE_REAL
#pragma GCC diagnostic pop

/* Resolves every real_* once (pthread_once); hooks call it before using a real_*, because a
 * library constructor may call a hooked function before ours has run. */
void layer_resolve(void);
#define REAL(name) (__builtin_expect(real_##name != NULL, 1) ? real_##name : (layer_resolve(), real_##name))

/* ---------------------------------------------------------------- state */

extern int g_active;           /* hooks do their work (configured, not skipped) */
/* The layer is loaded at start (LD_PRELOAD), so its thread-locals can use the initial-exec
 * model: a plain %fs-relative load instead of a __tls_get_addr call on every hook. */
#define LAYER_TLS __thread __attribute__((tls_model("initial-exec")))

extern LAYER_TLS int t_guard; /* >0 while the layer runs its own code on this thread */
extern int g_debug;

void layer_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define DBG(...)                     \
    do {                             \
        if (g_debug) {               \
            layer_debug(__VA_ARGS__); \
        }                            \
    } while (0)

/* A hook's decision: do the real call, the layer did it (result in *ret), or fail with
 * errno. */
enum { R_BYPASS = 0, R_DONE = 1 };

/* ---------------------------------------------------------------- fd table */

enum ent_kind { K_LAYER = 1, K_RFILE, K_MFILE, K_SOCK };

#define MAX_UDP_MAPS 8

struct udp_map {
    struct sockaddr_storage remote; /* what the app addressed */
    socklen_t remote_len;
    struct sockaddr_storage relay; /* where the daemon relays it */
    socklen_t relay_len;
};

struct ent {
    int kind;
    int refs; /* fds pointing here plus callers holding it; under g_fd_lock */
    /* identity of the open file behind the fd(s): an fd closed where no hook sees it (inside
     * libc, close_range(2)) and reused for another file is recognised and forgotten */
    dev_t fd_dev;
    ino_t fd_ino;
    /* files: a remote handle (K_RFILE) or a memfd with the remote stat (K_MFILE) */
    int has_handle;
    uint64_t handle;
    int oflags;
    int is_dir;
    char *path;
    struct stat st;
    /* K_MFILE opened for writing: the memfd is a write-back cache of the remote file, flushed
     * through `handle` when the last fd closes, on fsync, before exec and at exit */
    int writeback;
    int cache_fd; /* the layer's own fd to the memfd, for flushing after the app's are gone */
    /* K_MFILE opened read-only: when its size on the target was last checked (mfile_refresh),
     * and a flag so that one thread at a time appends what the file grew by */
    struct timespec checked;
    int refreshing;
    struct timespec synced_mtim;
    off_t synced_size;
    int append_only; /* O_WRONLY|O_APPEND: only what was appended is written back, at the end */
    /* K_RFILE regular file: its read-ahead or write-behind buffer and the fd's offset while
     * the layer keeps it (files_buffer.c); NULL: every call goes through the handle */
    struct fbuf *fb;
    /* a write-back cache made of an fd inherited through exec: the open file (and its offset)
     * is shared with other processes that use the handle, so a write-back sets the handle's
     * offset to the cache's */
    int share_offset;
    /* sockets */
    int family, socktype;
    int bound; /* bind() recorded the requested address */
    struct sockaddr_storage req;
    socklen_t req_len;
    int subscribed;
    int sub_port;
    pid_t sub_owner; /* the process that subscribed: a fork child closing its copy must not
                      * end the parent's subscription */
    int remote; /* connected through the daemon: peer / local are the target's view */
    int spliced; /* the fd is now the layer's end of a daemon relay pair (see net_connect.c) */
    int connecting; /* spliced by a non-blocking connect(): the next connect() returns 0 */
    int handed;     /* spliced is the agent's own socket, in the target's netns (hand-over) */
    int listening; /* listen() was called: a loopback connect() to its port stays local */
    struct sockaddr_storage peer;
    socklen_t peer_len;
    struct sockaddr_storage local;
    socklen_t local_len;
    int nmaps;
    struct udp_map maps[MAX_UDP_MAPS];
};

#define MAX_FDS 65536
extern struct ent *g_fd[MAX_FDS];
extern pthread_mutex_t g_fd_lock;
extern int g_nhandles; /* remote handles and subscriptions alive: fork waits for the child */

/* Lock-free peek for the bypass path: NULL for every fd the layer does not track. */
static inline struct ent *fd_peek(int fd) {
    if ((unsigned)fd >= MAX_FDS) {
        return NULL;
    }
    return __atomic_load_n(&g_fd[fd], __ATOMIC_ACQUIRE);
}

struct ent *ent_new(int kind);
struct ent *ent_get(int fd);              /* takes a reference, NULL if untracked or stale */
void ent_put(struct ent *e);              /* drops a reference; the last one frees remotely */
void fd_set_ent(int fd, struct ent *e);   /* takes over one reference of e */
struct ent *fd_take(int fd);              /* removes fd's entry and returns its reference */
void fd_forget(int fd);                   /* drops a stale entry (a new fd reuses the number) */
int layer_fd_protect(int fd);             /* moves a layer fd high, marks it; returns new fd */
void layer_fd_release(int fd);            /* unmarks and really closes a layer fd */
int layer_fd_relocate(int fd);            /* the app wants this number: move ours away */

/* ---------------------------------------------------------------- daemon connections */

/* Message kinds (M_*), field counts and order: generated from src/mirrord/protocol/messages.py
 * into the build directory by native/layer_build.py (setup.py). */
#include "kinds.h"

#define MAX_FRAME (2 * 1024 * 1024)
#define MAX_DATA_CHUNK (1024 * 1024)

struct lconn;
/* A connection for one request on this thread; NULL with errno EIO when the daemon is
 * unreachable (after a bounded wait). */
struct lconn *conn_acquire(void);
void conn_release(struct lconn *c);
/* A connection of the caller's own (replies read when it likes), and its end: conn.c. */
struct lconn *conn_open_own(void);
void conn_close_own(struct lconn *c, int inherited);
int conn_pending(struct lconn *c); /* a reply (or the end) waits: 1, else 0 */
/* Starts a request: writes [kind, request_id, ... nfields more]. */
cbor_w *conn_begin(struct lconn *c, int kind, size_t nfields);
#ifdef __OPTIMIZE__
/* A field count the message catalogue does not allow for the kind is a build error wherever
 * the optimiser knows both (as glibc's _FORTIFY_SOURCE checks buffer sizes). */
void conn_begin_field_count_mismatch(void) __attribute__((error(
    "conn_begin: this field count does not fit the message in src/mirrord/protocol/messages.py")));
#define conn_begin(c, kind, nfields)                                                          \
    ((__builtin_constant_p(kind) && __builtin_constant_p(nfields) &&                          \
      !M_FIELDS_FIT(kind, nfields))                                                           \
         ? (conn_begin_field_count_mismatch(), (conn_begin)(c, kind, nfields))                \
         : (conn_begin)(c, kind, nfields))
#endif
/* A byte string field whose n bytes are sent from p itself (the frame is written with one
 * sendmsg, p not copied: a FileWrite's 1 MiB chunk); p must stay valid until conn_send or
 * conn_call returns. At most one per request. */
void conn_bytes_ref(struct lconn *c, const void *p, size_t n);
/* Sends the request and reads its reply. 0: reply of kind `expect`, r is after its
 * request_id. -1: errno from ErrorReply, or EIO if the daemon broke (connection dropped). */
int conn_call(struct lconn *c, int expect, cbor_r *r);
/* Pipelined requests (several in flight on one connection, replies in any order): conn_send
 * sends the request conn_begin built and returns its request id (0: the connection broke,
 * errno EIO); conn_reply reads the next reply: 0 (kind `expect`, *rid says which request, r
 * after it), 1 (an ErrorReply to *rid, errno set) or -1 (broken: every request in flight is
 * lost, errno EIO). Each request sent must have its reply read before the connection is
 * released. */
uint64_t conn_send(struct lconn *c);
int conn_reply(struct lconn *c, int expect, uint64_t *rid, cbor_r *r);
/* conn_reply for FileData replies whose bytes may be received where they belong: for a large
 * one, dst(ctx, request id, length) names the buffer (or NULL: the ordinary way); then got is
 * its length and r is after the request id with the bytes already consumed, else got is -1. */
struct conn_into {
    char *(*dst)(void *ctx, uint64_t rid, size_t n);
    void *ctx;
    ssize_t got;
};
int conn_reply_into(struct lconn *c, uint64_t *rid, cbor_r *r, struct conn_into *into);
/* The stream of replies is out of step (a reply to no request in flight): c is dropped, its
 * next use reconnects; errno EIO. */
void conn_fail(struct lconn *c, const char *why);
/* The socket the daemon passed with the reply conn_call just read (the caller owns it), or
 * -1. A socket nobody takes is closed by the next call on the connection. */
int conn_take_fd(struct lconn *c);
int conn_reply_kind(const struct lconn *c); /* the kind of the reply conn_call accepted */
int conn_register_now(void); /* registers this process (fork child), 0 or -1 */
void conn_after_fork_child(pid_t parent);
void conn_prepare_exec(int *fd, pid_t *pid); /* the process connection to keep across exec */
void conn_exec_failed(void);
void conn_init(void);
int conn_registered(void);

/* ---------------------------------------------------------------- policy */

enum { FS_LOCAL, FS_LOCAL_WITH_OVERRIDES, FS_READ, FS_WRITE };
enum { P_LOCAL = 0, P_REMOTE = 1, P_NOT_FOUND = 2 };
enum { IN_OFF, IN_MIRROR, IN_STEAL };

struct settings {
    int fs_mode;
    int out_tcp, out_udp;
    int dns;
    int incoming;
    int ignore_localhost;          /* outgoing */
    int incoming_ignore_localhost;
    int hostname;
    int skip_build_tools;
    int timeout_ms;
    long long fetch_limit; /* remote files up to this size are fetched into a memfd */
    long long read_ahead;  /* feature.fs.readonly_file_buffer: the first read-ahead; 0: none */
    int fs_handover;       /* feature.fs.handover: a local target's agent may hand the file over */
    int ipv6;              /* feature.network.ipv6: 0, socket(AF_INET6) fails (EAFNOSUPPORT) */
};
extern struct settings g_set;

int policy_load(const char *text);   /* parses MIRRORD_LAYER_CONFIG; -1 if malformed */
int policy_skip_process(const char *exe, const char *name);
/* File decision for an absolute or relative path; `write` for opens that may modify. */
int policy_file(const char *path, int write);
extern int g_nmap; /* feature.fs.mapping entries */
/* `path` rewritten by the first feature.fs.mapping pattern that matches it, into out: 1, or
 * 0 (nothing matched, or the result would not fit). */
int policy_map_path(const char *path, char *out, size_t cap);

/* The bypass path's file decision, inline so that a hook deciding "local" here makes no call
 * before the real one. Paths are absolute (path[0] == '/') wherever these are used. */

/* `path` is the literal `dir` (n bytes, dir[0] == '/' == path[0]) or below it: one
 * compare-and-branch per byte, stopping at the first difference (so never past the path's
 * end: dir has no NUL in its first n bytes). */
static inline __attribute__((always_inline)) int path_under_lit(const char *path, const char *dir, size_t n) {
#pragma GCC unroll 16
    for (size_t i = 1; i < n; i++) {
        if (path[i] != dir[i]) {
            return 0;
        }
    }
    return path[n] == 0 || path[n] == '/';
}

/* `s` is exactly the literal (n includes its NUL). */
static inline __attribute__((always_inline)) int path_is_lit(const char *s, const char *lit, size_t n) {
#pragma GCC unroll 16
    for (size_t i = 0; i < n; i++) {
        if (s[i] != lit[i]) {
            return 0;
        }
    }
    return 1;
}

#define PATH_UNDER(path, lit) path_under_lit(path, lit, sizeof(lit) - 1)
#define PATH_IS(s, lit) path_is_lit(s, lit, sizeof(lit))

/* System and runtime directories, dispatched on the second byte. */
static inline __attribute__((always_inline)) int path_system_dir(const char *p) {
    switch (p[1]) {
    case 'b': return PATH_UNDER(p, "/bin");
    case 'd': return PATH_UNDER(p, "/dev");
    case 'e': return PATH_UNDER(p, "/etc");
    case 'h': return PATH_UNDER(p, "/home");
    case 'l': return PATH_UNDER(p, "/lib") || PATH_UNDER(p, "/lib64") || PATH_UNDER(p, "/lib32") || PATH_UNDER(p, "/libx32");
    case 'n': return PATH_UNDER(p, "/nix");
    case 'o': return PATH_UNDER(p, "/opt");
    case 'p': return PATH_UNDER(p, "/proc");
    case 'r': return PATH_UNDER(p, "/run");
    case 's': return PATH_UNDER(p, "/sys") || PATH_UNDER(p, "/sbin") || PATH_UNDER(p, "/snap") || PATH_UNDER(p, "/selinux");
    case 't': return PATH_UNDER(p, "/tmp");
    case 'u': return PATH_UNDER(p, "/usr");
    case 'v': return PATH_UNDER(p, "/var/tmp");
    case 0: return 1; /* "/" */
    }
    return 0;
}

/* Remote by default although under /etc: the target's name resolution files. */
static inline int etc_remote_default(const char *p) {
    return p[1] == 'e' && p[2] == 't' && p[3] == 'c' && p[4] == '/' &&
           (PATH_IS(p + 5, "resolv.conf") || PATH_IS(p + 5, "hosts") || PATH_IS(p + 5, "hostname"));
}

extern unsigned char g_fast_dir[256]; /* set by policy_load: see policy.c */

/* 1: the path is local by the system-directory set alone; 0: ask policy_file. */
static inline __attribute__((always_inline)) int path_fast_local(const char *p) {
    return p != NULL && p[0] == '/' && g_fast_dir[(unsigned char)p[1]] && !etc_remote_default(p) &&
           path_system_dir(p);
}
int policy_connect(const struct sockaddr *sa, socklen_t len, int socktype);
int policy_unix_stream(const char *path); /* outgoing.unix_streams: connect it in the target */
int policy_dns(const char *host, int port);
int policy_listen_port(int port);           /* remote port to subscribe, or -1 */
int policy_bind_port(int port);             /* local port to really bind (listen_ports) */
void policy_remember_name(const struct sockaddr *sa, const char *name);

/* ---------------------------------------------------------------- helpers */

int stat_from_wire(cbor_r *r, struct stat *st);
int remote_stat_path(const char *path, int follow, struct stat *st);
int sockaddr_to_text(const struct sockaddr *sa, char *host, size_t cap, int *port);
int sockaddr_from_text(const char *host, int port, int family, struct sockaddr_storage *ss,
                       socklen_t *len);
int is_loopback(const struct sockaddr *sa);

/* debugger.c: a debugger's own ports (MIRRORD_IGNORE_DEBUGGER_PORTS, ..._DETECT_...) */
void debugger_init(void);
/* 1 if `sa` is a debugger's port on loopback (or, with any_addr, on the unspecified address):
 * the call stays local and subscribes nothing. */
int debugger_port(const struct sockaddr *sa, socklen_t len, int any_addr);

/* Exec environment: the env that keeps the layer in the new image (malloc'd, NULL-ended). */
char **proc_exec_env(char *const envp[], int keep_fd);
/* glibc's fortify failure (buffer overflow detected): what a fortified hook calls when the
 * length a call was given exceeds its buffer, as glibc's own __*_chk do. */
extern void __chk_fail(void) __attribute__((noreturn, visibility("default")));
void proc_free_env(char **env);
/* files_spawn.c: a posix_spawn whose file actions or inherited fds reach remote files, run as
 * fork + the actions through the hooks + exec; posix_spawn's result, or -1: glibc's will do. */
int files_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                const posix_spawnattr_t *attr, char *const argv[], char *const envp[], int search);
void proc_init_env(void);
int wfile_flush(struct ent *e);
void wfile_flush_all(void); /* write-back caches and write-behind buffers (exit, exec) */
/* files_buffer.c (see files.h): a buffer's last reference; fork and posix_spawn (every fd)
 * and exec (the fds it keeps) share the open files with another process, which sees the
 * handle's offset only. */
void fbuf_free(struct ent *e);
void fbuf_before_fork(void);
void fbuf_before_exec(void);
void fbuf_after_fork_child(void);
/* supervise_files.c: a remote file open_remote opened for the system-call supervisor, made
 * installable in the supervised program (files_supervisor.c's mirrord_supervisor_open). */
int supervise_remote_fd(int fd, int flags, int *fd_out);
void proc_fork_child(void);
/* In a fork child, locks another thread of the parent may have held are fresh again. */
void files_after_fork_child(void);
void net_after_fork_child(void);
void policy_after_fork_child(void);
/* The remote working directory (empty: local); exec passes it in MIRRORD_LAYER_CWD. */
/* Remote fds that survive exec: MIRRORD_LAYER_FILES=... for the new image (malloc'd, NULL if
 * none), and its adoption at start. */
char *files_exec_env(void);
void files_restore_fds(const char *v);
void files_set_vcwd(const char *path);
int files_get_vcwd(char *out, size_t cap);
pid_t conn_parent(void);
void net_restore_listeners(void);
void net_sock_freed(const struct ent *e); /* last reference of a socket's entry */

#pragma GCC visibility pop

#endif
