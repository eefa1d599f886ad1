/* mirrord-supervisor's internal declarations (see supervisor.c for the whole picture).
 *
 * Files: supervisor.c (main, the launcher, the filter), serve.c (the listener's workers, the
 * fallback after the supervisor's death, answering calls, the program's memory), sv_files.c
 * (open, access, stat), sv_paths.c (statx, readlink, the mutators), sv_net.c (the socket
 * calls and uname), sv_wback.c (remote files opened to write),
 * sv_udp.c (datagrams sent with a destination).
 */
#ifndef MIRRORD_SV_H
#define MIRRORD_SV_H

#define _GNU_SOURCE
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>

#define SV_WORKERS 4 /* concurrent answers (notes, pitfall 9) */
#define SV_PATH_CAP 4096

void sv_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---------------------------------------------------------------- the layer's functions */

/* From the layer (native/files_supervisor.c, native/supervise.c, native/supervise_files.c, and
 * its libc hooks), found at run time with dlsym: the supervisor runs with it preloaded. NULL
 * when it is not loaded. */
struct sv_layer {
    int (*open)(const char *path, int flags, unsigned mode, int *fd_out);
    int (*decide)(const char *path, int flags);
    int (*access)(const char *path, int mode, int flags);
    int (*stat)(const char *path, int follow, struct stat *st);
    int (*connect)(int fd, const struct sockaddr *sa, socklen_t len,
                   struct sockaddr_storage *local, socklen_t *local_len);
    int (*bind)(int fd, const struct sockaddr *sa, socklen_t len);
    int (*listen)(int fd, int backlog, const struct sockaddr *req, socklen_t req_len);
    void (*finish)(pid_t supervisor);
    int (*outgoing_remote)(int fd, const struct sockaddr *sa, socklen_t len);
    int (*mapped)(const char *path, int write, char *out, size_t cap);
};
extern struct sv_layer g_layer;

/* ---------------------------------------------------------------- serving */

extern int g_lfd;      /* the seccomp listener */
extern int g_killable; /* WAIT_KILLABLE_RECV: the program's memory may be written (below) */

/* One trapped call. `fallback`: the supervisor died; answer as on a lost agent. */
void sv_handle(const struct seccomp_notif *req, int fallback);
/* The file calls (sv_files.c), the other path calls (sv_paths.c) and the socket calls and
 * uname (sv_net.c): 1 if `req` was theirs (answered). */
int sv_files(const struct seccomp_notif *req, int fallback);
int sv_paths(const struct seccomp_notif *req, int fallback);
int sv_net(const struct seccomp_notif *req, int fallback);

/* Answers: an errno (0: success with result `val`), or "continue" (the kernel does the call). */
void sv_reply(uint64_t id, int error, int cont);
void sv_reply_val(uint64_t id, int64_t val);
void sv_continue(uint64_t id);
/* Installs `fd` (the supervisor's) in the program as the call's result; `cloexec` kept. */
void sv_reply_fd(uint64_t id, int fd, int cloexec);
/* 0 while the call `id` is still pending (what was read of the program belongs to it). */
int sv_still_pending(uint64_t id);

/* The program's memory, through process_vm_readv/writev. 0, or -1. A string is read page by
 * page (one ending just before an unmapped page must not fail). Writes only where g_killable
 * (then the call cannot be abandoned while its buffer is written, but by the program's death). */
int sv_read_string(pid_t pid, uint64_t addr, char *out, size_t cap);
int sv_read_mem(pid_t pid, uint64_t addr, void *out, size_t len);
int sv_write_mem(pid_t pid, uint64_t addr, const void *in, size_t len);

/* A remote file opened to write: the layer's write-back cache `layer_fd` (taken) installed
 * in the program as a new open of it, written back once the program closed it (sv_wback.c);
 * sv_wback_finish writes back what is still open (the program is gone). */
void sv_reply_wback(const struct seccomp_notif *req, int layer_fd, int flags);
void sv_wback_finish(void);
/* Write back the files whose last close the program made before this call (their events are
 * queued): called first by every trapped call, so a reopen reads what was written. */
void sv_wback_sync(void);

/* sendto (with an address) and sendmsg: a datagram the layer sends through the target is sent
 * by the supervisor (sv_udp.c), or fails with ECONNREFUSED after its death (`fallback`);
 * anything else continues. */
void sv_udp_send(const struct seccomp_notif *req, int fallback);
/* recvfrom with an address on a socket sv_udp_send relayed: the target's address as source. */
void sv_udp_recv(const struct seccomp_notif *req);

/* The supervisor's own descriptor of the program's descriptor `fd` (thread `tid`), with
 * pidfd_getfd: the same open file. -1 with errno. */
int sv_take_fd(pid_t tid, int fd);

#endif
