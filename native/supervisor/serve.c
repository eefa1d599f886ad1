/* mirrord-supervisor, serving: the workers that receive the trapped calls, the fallback that
 * answers after the supervisor's death, and the helpers every answer uses. */
#include "sv.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif
#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1)
#endif

struct sv_layer g_layer;
int g_lfd;
int g_killable;
static int g_addfd_send = 1; /* ADDFD_FLAG_SEND (5.14); cleared if the kernel refuses it */

/* ---------------------------------------------------------------- the program's memory */

int sv_read_string(pid_t pid, uint64_t addr, char *out, size_t cap) {
    size_t have = 0;
    while (have < cap) {
        size_t room = 4096 - ((addr + have) & 4095);
        if (room > cap - have) {
            room = cap - have;
        }
        struct iovec local = {out + have, room};
        struct iovec remote = {(void *)(uintptr_t)(addr + have), room};
        ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (n <= 0) {
            return -1;
        }
        if (memchr(out + have, 0, (size_t)n) != NULL) {
            return 0;
        }
        have += (size_t)n;
    }
    return -1;
}

int sv_read_mem(pid_t pid, uint64_t addr, void *out, size_t len) {
    struct iovec local = {out, len};
    struct iovec remote = {(void *)(uintptr_t)addr, len};
    return process_vm_readv(pid, &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

int sv_write_mem(pid_t pid, uint64_t addr, const void *in, size_t len) {
    if (!g_killable) {
        return -1;
    }
    struct iovec local = {(void *)in, len};
    struct iovec remote = {(void *)(uintptr_t)addr, len};
    return process_vm_writev(pid, &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

int sv_take_fd(pid_t tid, int fd) {
    /* pidfd_open wants the thread group's leader (before Linux 6.9): the tgid */
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
    FILE *f = fopen(path, "re");
    int tgid = -1;
    while (f != NULL && tgid < 0 && fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "Tgid:", 5) == 0) {
            tgid = atoi(line + 5);
        }
    }
    if (f != NULL) {
        fclose(f);
    }
    int pidfd = tgid > 0 ? (int)syscall(SYS_pidfd_open, tgid, 0) : -1;
    if (pidfd < 0) {
        return -1;
    }
    int mine = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    int saved = errno;
    close(pidfd);
    errno = saved;
    return mine;
}

/* ---------------------------------------------------------------- answers */

int sv_still_pending(uint64_t id) {
    return ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id);
}

static void send_resp(uint64_t id, int64_t val, int error, uint32_t flags) {
    struct seccomp_notif_resp resp = {.id = id, .val = val, .error = error, .flags = flags};
    /* ENOENT: the call went away meanwhile (a signal, the program died): nothing to answer */
    ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
}

void sv_reply(uint64_t id, int error, int cont) {
    send_resp(id, 0, error ? -error : 0, cont ? SECCOMP_USER_NOTIF_FLAG_CONTINUE : 0);
}

void sv_reply_val(uint64_t id, int64_t val) {
    send_resp(id, val, 0, 0);
}

void sv_continue(uint64_t id) {
    send_resp(id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
}

void sv_reply_fd(uint64_t id, int fd, int cloexec) {
    struct seccomp_notif_addfd add = {.id = id, .srcfd = (uint32_t)fd, .newfd = 0,
                                      .newfd_flags = cloexec ? O_CLOEXEC : 0};
    if (__atomic_load_n(&g_addfd_send, __ATOMIC_RELAXED)) {
        add.flags = SECCOMP_ADDFD_FLAG_SEND;
        if (ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add) >= 0) {
            return; /* installed and answered at once */
        }
        if (errno != EINVAL) {
            sv_reply(id, errno, 0); /* EMFILE in the program...; ENOENT: it went away */
            return;
        }
        __atomic_store_n(&g_addfd_send, 0, __ATOMIC_RELAXED); /* 5.9 - 5.13 */
        add.flags = 0;
    }
    int newfd = ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
    if (newfd < 0) {
        sv_reply(id, errno == ENOENT ? EIO : errno, 0);
        return;
    }
    sv_reply_val(id, newfd);
}

void sv_handle(const struct seccomp_notif *req, int fallback) {
    sv_wback_sync();
    if (!sv_files(req, fallback) && !sv_paths(req, fallback) && !sv_net(req, fallback)) {
        sv_continue(req->id);
    }
}

/* ---------------------------------------------------------------- workers and fallback */

/* Each worker receives into its own slot of a mapping shared with the fallback F: a call the
 * supervisor received but did not answer when it died (the kernel wrote the notification
 * there before the thread could die) is still pending, and only its id lets F answer it;
 * without this the program would wait for it forever. */
struct slot {
    struct seccomp_notif req;
    char room[256 - sizeof(struct seccomp_notif)]; /* a kernel with a bigger seccomp_notif */
};
static struct slot *g_slots;

static void *worker(void *arg) {
    struct seccomp_notif *req = &g_slots[(intptr_t)arg].req;
    for (;;) {
        memset(req, 0, sizeof(struct slot));
        if (ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_RECV, req) != 0) {
            if (errno == EINTR || errno == ENOENT) {
                continue;
            }
            return NULL;
        }
        sv_handle(req, 0);
    }
}

/* Polls `fd` for `events` until they come (1), or the listener says no process uses the
 * filter any more (0), or poll fails (-1). */
static int wait_for(int fd, short events) {
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = g_lfd, .events = 0}};
    int n = fd == g_lfd ? 1 : 2;
    for (;;) {
        if (poll(p, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (p[n - 1].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            return 0; /* every supervised process is gone */
        }
        if (p[0].revents & events) {
            return 1;
        }
    }
}

/* The fallback answerer: waits for the supervisor's death (or for the program's end). */
static int fallback(pid_t supervisor) {
    int pidfd = (int)syscall(SYS_pidfd_open, supervisor, 0);
    if (pidfd < 0) {
        return 0;
    }
    int w = wait_for(pidfd, POLLIN);
    if (w <= 0) {
        return w < 0;
    }
    sv_say("the system-call supervisor (pid %d) died: from now on the program's calls that go "
           "to the target fail as on a lost agent (files with EIO, connections and datagrams "
           "with ECONNREFUSED); local ones go on",
           (int)supervisor);
    for (int i = 0; i < SV_WORKERS; i++) {
        struct seccomp_notif req = g_slots[i].req;
        /* still pending: received by the supervisor, never answered */
        if (req.id != 0 && sv_still_pending(req.id) == 0) {
            sv_handle(&req, 1);
        }
    }
    while ((w = wait_for(g_lfd, POLLIN)) > 0) {
        struct seccomp_notif req;
        memset(&req, 0, sizeof req);
        if (ioctl(g_lfd, SECCOMP_IOCTL_NOTIF_RECV, &req) == 0) {
            sv_handle(&req, 1);
        }
    }
    if (g_layer.finish != NULL) {
        g_layer.finish(supervisor); /* the directory listings it left */
    }
    return w < 0;
}

static void find_layer(void) {
    g_layer.open = dlsym(RTLD_DEFAULT, "mirrord_supervisor_open");
    g_layer.decide = dlsym(RTLD_DEFAULT, "mirrord_supervisor_decide");
    g_layer.access = dlsym(RTLD_DEFAULT, "mirrord_supervisor_access");
    g_layer.stat = dlsym(RTLD_DEFAULT, "mirrord_supervisor_stat");
    g_layer.connect = dlsym(RTLD_DEFAULT, "mirrord_supervisor_connect");
    g_layer.bind = dlsym(RTLD_DEFAULT, "mirrord_supervisor_bind");
    g_layer.listen = dlsym(RTLD_DEFAULT, "mirrord_supervisor_listen");
    g_layer.finish = dlsym(RTLD_DEFAULT, "mirrord_supervisor_finish");
    g_layer.outgoing_remote = dlsym(RTLD_DEFAULT, "mirrord_supervisor_outgoing_remote");
    g_layer.mapped = dlsym(RTLD_DEFAULT, "mirrord_supervisor_mapped");
    if (g_layer.open == NULL || g_layer.decide == NULL || g_layer.access == NULL) {
        sv_say("system-call supervisor: the layer is not loaded (LD_PRELOAD): every call stays "
               "local");
    }
}

static int start_workers(void) {
    signal(SIGPIPE, SIG_IGN);
    pthread_t t;
    for (int i = 0; i < SV_WORKERS; i++) {
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)i) != 0) {
            sv_say("system-call supervisor: cannot start its threads");
            return -1;
        }
        pthread_detach(t);
    }
    return 0;
}

int sv_serve(int lfd, int ready_fd) {
    g_lfd = lfd;
    fcntl(lfd, F_SETFD, FD_CLOEXEC);
    fcntl(ready_fd, F_SETFD, FD_CLOEXEC);
    find_layer();
    struct seccomp_notif_sizes sizes;
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) != 0 ||
        sizes.seccomp_notif > sizeof(struct slot)) {
        sv_say("system-call supervisor: this kernel's seccomp notifications are not supported");
        return 1;
    }
    g_slots = mmap(NULL, sizeof(struct slot) * SV_WORKERS, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (g_slots == MAP_FAILED) {
        sv_say("system-call supervisor: mmap: %s", strerror(errno));
        return 1;
    }
    /* SYNC_WAKE_UP (6.6): the answering thread wakes the program on its own core, which
     * halves a trapped call's cost on a busy machine (notes); older kernels do without */
    ioctl(lfd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, (unsigned long)SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP);
    pid_t me = getpid();
    pid_t f = fork();
    if (f == 0) {
        close(ready_fd);
        _exit(fallback(me));
    }
    if (start_workers() != 0) {
        return 1;
    }
    char ready[16];
    int n = snprintf(ready, sizeof ready, "R%d", (int)me);
    if (write(ready_fd, ready, (size_t)n) != n) {
        return 1;
    }
    close(ready_fd);
    /* Ends when no process uses the filter any more (the program and its children exited). */
    wait_for(lfd, 0);
    sv_wback_finish();
    if (g_layer.finish != NULL) {
        g_layer.finish(me);
    }
    _exit(0);
}
