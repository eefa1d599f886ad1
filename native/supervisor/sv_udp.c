/* mirrord-supervisor, datagrams sent with a destination: sendto (trapped only with an
 * address: the filter lets the others through) and sendmsg on an IPv4/IPv6 UDP socket that the
 * layer's outgoing policy sends to the target (mirrord_supervisor_outgoing_remote) are sent
 * here, by the layer's own sendmsg() on the supervisor's descriptor of the program's socket, which
 * relays them through the daemon as for a libc program (net_udp.c); the call's answer is what
 * that sendmsg() returned. The datagram is read from the program's memory (at most 64 KiB,
 * control data included). The supervisor keeps its descriptor of such a socket (the layer's
 * record of its relays is on it; the oldest goes when more than UDPS are in use: its relays
 * end). recvfrom asking for the source on such a socket is answered here too (sv_udp_recv).
 * Everything else continues. */
#include "sv.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define UDPS 256
#define DGRAM_CAP 65536
#define IOV_CAP 64

static struct {
    dev_t dev;
    ino_t ino;
    int mine;
} g_udp[UDPS];
static unsigned g_next_udp;
static pthread_mutex_t g_udp_lock = PTHREAD_MUTEX_INITIALIZER;

/* The supervisor's kept descriptor of the program's socket `fd` (thread `tid`), taken on
 * first use; -1 if it is not a socket of the program. */
static int udp_socket(pid_t tid, int fd) {
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)tid, fd);
    if (stat(path, &st) != 0 || !S_ISSOCK(st.st_mode)) {
        return -1;
    }
    pthread_mutex_lock(&g_udp_lock);
    int mine = -1;
    for (unsigned i = 0; i < UDPS && mine < 0; i++) {
        if (g_udp[i].ino == st.st_ino && g_udp[i].dev == st.st_dev) {
            mine = g_udp[i].mine;
        }
    }
    if (mine < 0 && (mine = sv_take_fd(tid, fd)) >= 0) {
        unsigned i = g_next_udp++ % UDPS;
        if (g_udp[i].ino != 0) {
            close(g_udp[i].mine); /* the layer ends its relays */
        }
        g_udp[i].dev = st.st_dev;
        g_udp[i].ino = st.st_ino;
        g_udp[i].mine = mine;
    }
    pthread_mutex_unlock(&g_udp_lock);
    return mine;
}

/* The datagram of sendto/sendmsg `req` read into `m` (its buffers in `data` and `ctl`): 0, or
 * -1 (unreadable: the kernel answers). */
static int read_dgram(const struct seccomp_notif *req, struct msghdr *m, char *data,
                      struct sockaddr_storage *to, char *ctl, size_t ctl_cap) {
    const __u64 *a = req->data.args;
    struct iovec *one = m->msg_iov;
    if (req->data.nr == __NR_sendto) {
        m->msg_namelen = (socklen_t)a[5];
        one->iov_len = a[2];
        return a[2] > DGRAM_CAP || m->msg_namelen > sizeof *to ||
                       sv_read_mem(req->pid, a[4], to, m->msg_namelen) != 0 ||
                       (a[2] > 0 && sv_read_mem(req->pid, a[1], data, a[2]) != 0)
                   ? -1
                   : 0;
    }
    struct msghdr pm;
    struct iovec iov[IOV_CAP];
    if (sv_read_mem(req->pid, a[1], &pm, sizeof pm) != 0 || pm.msg_name == NULL ||
        pm.msg_namelen > sizeof *to || pm.msg_iovlen > IOV_CAP || pm.msg_controllen > ctl_cap ||
        sv_read_mem(req->pid, (uint64_t)(uintptr_t)pm.msg_name, to, pm.msg_namelen) != 0 ||
        sv_read_mem(req->pid, (uint64_t)(uintptr_t)pm.msg_iov, iov,
                    pm.msg_iovlen * sizeof iov[0]) != 0 ||
        (pm.msg_controllen > 0 &&
         sv_read_mem(req->pid, (uint64_t)(uintptr_t)pm.msg_control, ctl, pm.msg_controllen))) {
        return -1;
    }
    size_t have = 0;
    for (size_t i = 0; i < pm.msg_iovlen; i++) {
        if (iov[i].iov_len > DGRAM_CAP - have ||
            (iov[i].iov_len > 0 && sv_read_mem(req->pid, (uint64_t)(uintptr_t)iov[i].iov_base,
                                               data + have, iov[i].iov_len) != 0)) {
            return -1;
        }
        have += iov[i].iov_len;
    }
    one->iov_len = have;
    m->msg_namelen = pm.msg_namelen;
    m->msg_control = pm.msg_controllen > 0 ? ctl : NULL;
    m->msg_controllen = pm.msg_controllen;
    return 0;
}

static int sock_type(int fd) {
    int type = 0;
    socklen_t tl = sizeof type;
    return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 ? type : -1;
}

void sv_udp_send(const struct seccomp_notif *req, int fallback) {
    struct sockaddr_storage to;
    char ctl[1024];
    char *data = g_layer.outgoing_remote != NULL ? malloc(DGRAM_CAP) : NULL;
    struct iovec one = {data, 0};
    struct msghdr m = {.msg_name = &to, .msg_iov = &one, .msg_iovlen = 1};
    memset(&to, 0, sizeof to);
    int flags = (int)req->data.args[req->data.nr == __NR_sendto ? 3 : 2];
    int fd = (int)req->data.args[0];
    /* after the supervisor's death: no descriptor kept (nothing is sent through the target) */
    int mine = -1;
    if (data == NULL || read_dgram(req, &m, data, &to, ctl, sizeof ctl) != 0 ||
        (to.ss_family != AF_INET && to.ss_family != AF_INET6) ||
        sv_still_pending(req->id) != 0 ||
        (mine = fallback ? sv_take_fd(req->pid, fd) : udp_socket(req->pid, fd)) < 0 ||
        sock_type(mine) != SOCK_DGRAM ||
        !g_layer.outgoing_remote(mine, (struct sockaddr *)&to, m.msg_namelen)) {
        free(data);
        if (fallback && mine >= 0) {
            close(mine);
        }
        sv_continue(req->id); /* local, or not ours to read: as it is */
        return;
    }
    ssize_t n = fallback ? -1 : sendmsg(mine, &m, flags); /* the layer's hook: its relay */
    int err = fallback ? ECONNREFUSED : errno; /* as the layer's send on a lost agent */
    free(data);
    if (fallback) {
        close(mine);
    }
    if (n < 0) {
        sv_reply(req->id, err != 0 ? err : EIO, 0);
    } else {
        sv_reply_val(req->id, n);
    }
}

/* recvfrom asking for the source, on a socket that sent datagrams through the target: done
 * here by the layer's recvfrom on the kept descriptor (a datagram from a relay shows the
 * target's address it stands for), without waiting: when nothing is queued yet on a blocking
 * socket, the call goes on natively (its source is then the relay's loopback address). */
void sv_udp_recv(const struct seccomp_notif *req) {
    const __u64 *a = req->data.args;
    int flags = (int)a[3], mine = -1;
    socklen_t have = 0;
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)req->pid, (int)a[0]);
    if (g_killable && stat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        pthread_mutex_lock(&g_udp_lock);
        for (unsigned i = 0; i < UDPS && mine < 0; i++) {
            if (g_udp[i].ino == st.st_ino && g_udp[i].dev == st.st_dev) {
                mine = g_udp[i].mine;
            }
        }
        pthread_mutex_unlock(&g_udp_lock);
    }
    size_t cap = a[2] < DGRAM_CAP ? (size_t)a[2] : DGRAM_CAP;
    char *data = mine >= 0 ? malloc(cap > 0 ? cap : 1) : NULL;
    if (data == NULL || sv_read_mem(req->pid, a[5], &have, sizeof have) != 0 ||
        sv_still_pending(req->id) != 0) {
        free(data);
        sv_continue(req->id); /* not a relayed socket: the kernel's */
        return;
    }
    struct sockaddr_storage from;
    socklen_t fl = sizeof from;
    ssize_t n = recvfrom(mine, data, cap, flags | MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
    int err = errno;
    if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK) && !(flags & MSG_DONTWAIT) &&
        !(fcntl(mine, F_GETFL) & O_NONBLOCK)) {
        sv_continue(req->id); /* a blocking wait: the kernel's */
    } else if (n < 0) {
        sv_reply(req->id, err, 0);
    } else if ((n > 0 && sv_write_mem(req->pid, a[1], data, (size_t)n < cap ? (size_t)n : cap) != 0) ||
               sv_write_mem(req->pid, a[4], &from, have < fl ? have : fl) != 0 ||
               sv_write_mem(req->pid, a[5], &fl, sizeof fl) != 0) {
        sv_reply(req->id, EFAULT, 0);
    } else {
        sv_reply_val(req->id, n);
    }
    free(data);
}
