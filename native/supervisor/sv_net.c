/* mirrord-supervisor, the socket calls and uname: connect done on the program's own socket
 * (taken with pidfd_getfd, so its epoll registration stays valid; notes pitfall 5), its
 * getpeername/getsockname answered with the target's view, bind, listen and accept done by
 * the layer's own hooks (a subscription, the real peer), and uname's node name the target's
 * hostname. The decisions are the
 * layer's (native/supervise.c, and its gethostname hook). */
#include "sv.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

/* The program's sockets the supervisor answers for, by inode: connected through the daemon
 * (getpeername and getsockname show the target's view), or bound by the layer to an address
 * other than the one asked for (getsockname shows the one asked for), and then `mine`, the
 * supervisor's descriptor of it that the layer's record (and, once listening, its
 * subscription) belongs to. A ring: the oldest entry goes first (a program with more than
 * this many such sockets open at once sees the relay's loopback addresses for its oldest
 * ones; listeners are never overwritten). */
#define SOCKS 1024
struct sock_rec {
    dev_t dev;
    ino_t ino;
    int mine;
    struct sockaddr_storage peer, local;
    socklen_t peer_len, local_len;
};
static struct sock_rec g_socks[SOCKS];
static unsigned g_next_sock;
static pthread_mutex_t g_socks_lock = PTHREAD_MUTEX_INITIALIZER;

/* Records `rec` (dev and ino filled from `mine`): a new entry, or the socket's own. */
static void remember(int mine, struct sock_rec rec) {
    struct stat st;
    if (fstat(mine, &st) != 0) {
        return;
    }
    rec.dev = st.st_dev;
    rec.ino = st.st_ino;
    pthread_mutex_lock(&g_socks_lock);
    struct sock_rec *r = NULL;
    for (unsigned i = 0; i < SOCKS && r == NULL; i++) {
        if (g_socks[i].ino == st.st_ino && g_socks[i].dev == st.st_dev) {
            r = &g_socks[i]; /* connected again (UDP), or listening after its bind */
        }
    }
    for (unsigned k = 0; k < SOCKS && r == NULL; k++) {
        struct sock_rec *c = &g_socks[g_next_sock++ % SOCKS];
        if (c->ino == 0 || c->mine < 0) {
            r = c; /* never a listener's: that would end its subscription */
        }
    }
    if (r != NULL && r->ino != 0 && r->mine >= 0 && r->mine != rec.mine) {
        close(r->mine);
    }
    if (r != NULL) {
        *r = rec;
    }
    pthread_mutex_unlock(&g_socks_lock);
}

/* The program's socket `fd` (thread `tid`) as remembered: 1 with *out filled, or 0. */
static int recall(pid_t tid, int fd, struct sock_rec *out) {
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)tid, fd);
    if (stat(path, &st) != 0 || !S_ISSOCK(st.st_mode)) {
        return 0;
    }
    int found = 0;
    pthread_mutex_lock(&g_socks_lock);
    for (unsigned i = 0; i < SOCKS && !found; i++) {
        if (g_socks[i].ino == st.st_ino && g_socks[i].dev == st.st_dev) {
            *out = g_socks[i];
            found = 1;
        }
    }
    pthread_mutex_unlock(&g_socks_lock);
    return found;
}

/* Processes with the layer loaded (dynamic programs under --syscalls, cgo builds): a socket
 * call from their libc was decided by the layer's hook already (its own local connects
 * included: a refused non-blocking connect's loopback stand-in, the program's own listener),
 * so it continues; Go's own calls come from the program's text. Per thread (the maps are
 * read once), checked against its start time (a reused thread id is another process). */
#define PROCS 256
struct proc_libc {
    pid_t tid;
    unsigned long long start;
    uint64_t lo, hi; /* libc's executable text; 0, 0 without the layer */
};
static struct proc_libc g_procs[PROCS];
static unsigned g_next_proc;
static pthread_mutex_t g_procs_lock = PTHREAD_MUTEX_INITIALIZER;

static unsigned long long start_time(pid_t tid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)tid);
    FILE *f = fopen(path, "re");
    size_t n = f != NULL ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f != NULL) {
        fclose(f);
    }
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    unsigned long long start = 0;
    for (int field = 2; p != NULL && field < 22; field++) {
        p = strchr(p + 1, ' ');
    }
    if (p != NULL) {
        start = strtoull(p + 1, NULL, 10);
    }
    return start;
}

static void find_libc(pid_t tid, struct proc_libc *out) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)tid);
    FILE *f = fopen(path, "re");
    int layer = 0;
    uint64_t lo = UINT64_MAX, hi = 0;
    while (f != NULL && fgets(line, sizeof line, f) != NULL) {
        unsigned long long a, b;
        char perms[8];
        const char *name = strrchr(line, '/');
        if (name == NULL || sscanf(line, "%llx-%llx %7s", &a, &b, perms) != 3) {
            continue;
        }
        layer |= strstr(name, "libmirrord_layer") != NULL;
        if (perms[2] == 'x' && (strncmp(name, "/libc.so", 8) == 0 || strncmp(name, "/libc-", 6) == 0)) {
            lo = a < lo ? a : lo;
            hi = b > hi ? b : hi;
        }
    }
    if (f != NULL) {
        fclose(f);
    }
    out->lo = layer && hi > 0 ? lo : 0;
    out->hi = layer && hi > 0 ? hi : 0;
}

static int decided_by_layer(const struct seccomp_notif *req) {
    unsigned long long start = start_time(req->pid);
    struct proc_libc e = {0};
    int found = 0;
    pthread_mutex_lock(&g_procs_lock);
    for (unsigned i = 0; i < PROCS && !found; i++) {
        if (g_procs[i].tid == (pid_t)req->pid && g_procs[i].start == start) {
            e = g_procs[i];
            found = 1;
        }
    }
    pthread_mutex_unlock(&g_procs_lock);
    if (!found) {
        e.tid = req->pid;
        e.start = start;
        find_libc(req->pid, &e);
        pthread_mutex_lock(&g_procs_lock);
        g_procs[g_next_proc++ % PROCS] = e;
        pthread_mutex_unlock(&g_procs_lock);
    }
    uint64_t ip = req->data.instruction_pointer;
    return ip >= e.lo && ip < e.hi;
}

static int port_of(const struct sockaddr_storage *ss) {
    return ntohs(ss->ss_family == AF_INET ? ((const struct sockaddr_in *)ss)->sin_port
                                          : ((const struct sockaddr_in6 *)ss)->sin6_port);
}

static int loopback(const struct sockaddr_storage *ss) {
    if (ss->ss_family == AF_INET) {
        return (ntohl(((const struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24) == 127;
    }
    const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
}

/* The port really bound by a subscribed listener of the program that asked for `port`, or 0:
 * a loopback connect to it reaches the program itself (the layer's rule: as in the pod). */
static int own_listener_port(int port) {
    int real = 0;
    pthread_mutex_lock(&g_socks_lock);
    for (unsigned i = 0; i < SOCKS && real == 0; i++) {
        struct sockaddr_storage bound;
        socklen_t bl = sizeof bound;
        if (g_socks[i].ino != 0 && g_socks[i].mine >= 0 && g_socks[i].local_len > 0 &&
            port_of(&g_socks[i].local) == port &&
            syscall(SYS_getsockname, g_socks[i].mine, &bound, &bl) == 0) {
            real = port_of(&bound);
        }
    }
    pthread_mutex_unlock(&g_socks_lock);
    return real;
}

/* A loopback connect to the program's own listener, bound at `real`: done here (not through
 * the layer, which would send it to the target), getpeername showing the port asked for. */
static void connect_own(const struct seccomp_notif *req, int mine, struct sockaddr_storage *sa,
                        socklen_t len, int real) {
    struct sockaddr_storage to = *sa;
    if (to.ss_family == AF_INET) {
        ((struct sockaddr_in *)&to)->sin_port = htons((uint16_t)real);
    } else {
        ((struct sockaddr_in6 *)&to)->sin6_port = htons((uint16_t)real);
    }
    int r = (int)syscall(SYS_connect, mine, &to, len);
    int e = r == 0 ? 0 : errno;
    if (r == 0 || e == EINPROGRESS) {
        struct sock_rec rec = {.mine = -1, .peer = *sa, .peer_len = len};
        remember(mine, rec);
    }
    sv_reply(req->id, e, 0);
}

static void on_connect(const struct seccomp_notif *req) {
    const __u64 *a = req->data.args;
    struct sockaddr_storage sa;
    socklen_t len = (socklen_t)a[2];
    if (g_layer.connect == NULL || len < sizeof(sa_family_t) || len > sizeof sa ||
        sv_read_mem(req->pid, a[1], &sa, len) != 0 ||
        (sa.ss_family != AF_INET && sa.ss_family != AF_INET6)) {
        sv_continue(req->id); /* unix sockets, bad arguments: the kernel answers */
        return;
    }
    if (sv_still_pending(req->id) != 0) {
        return;
    }
    int mine = sv_take_fd(req->pid, (int)a[0]);
    if (mine < 0) {
        sv_continue(req->id); /* not a descriptor of the program: the kernel says EBADF */
        return;
    }
    int type = 0;
    socklen_t tl = sizeof type;
    int real = loopback(&sa) && getsockopt(mine, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 &&
                       type == SOCK_STREAM
                   ? own_listener_port(port_of(&sa))
                   : 0;
    if (real > 0) {
        if (real == port_of(&sa)) {
            sv_continue(req->id);
        } else {
            connect_own(req, mine, &sa, len, real);
        }
        close(mine);
        return;
    }
    struct sockaddr_storage local;
    socklen_t local_len = 0;
    int r = g_layer.connect(mine, (struct sockaddr *)&sa, len, &local, &local_len);
    if (r == 0) {
        sv_continue(req->id);
    } else if (r < 0) {
        sv_reply(req->id, errno != 0 ? errno : ECONNREFUSED, 0);
    } else {
        struct sock_rec rec = {.mine = -1, .peer = sa, .peer_len = len, .local = local,
                               .local_len = local_len};
        remember(mine, rec);
        sv_reply(req->id, 0, 0);
    }
    close(mine);
}

/* connect after the supervisor's death: one the layer would send through the target fails
 * with ECONNREFUSED, as the layer's connect on a lost agent (never local instead); a loopback
 * connect to the program's own listener and every local one go on. */
static void on_connect_fallback(const struct seccomp_notif *req) {
    const __u64 *a = req->data.args;
    struct sockaddr_storage sa;
    socklen_t len = (socklen_t)a[2];
    int mine = -1;
    if (g_layer.outgoing_remote == NULL || len < sizeof(sa_family_t) || len > sizeof sa ||
        sv_read_mem(req->pid, a[1], &sa, len) != 0 ||
        (sa.ss_family != AF_INET && sa.ss_family != AF_INET6) ||
        sv_still_pending(req->id) != 0 || (mine = sv_take_fd(req->pid, (int)a[0])) < 0 ||
        (loopback(&sa) && own_listener_port(port_of(&sa)) > 0)) {
        if (mine >= 0) {
            close(mine);
        }
        sv_continue(req->id);
        return;
    }
    int remote = g_layer.outgoing_remote(mine, (struct sockaddr *)&sa, len);
    close(mine);
    sv_reply(req->id, remote ? ECONNREFUSED : 0, !remote);
}

/* bind of an IPv4/IPv6 socket: done by the layer's bind() on the program's socket. */
static void on_bind(const struct seccomp_notif *req) {
    const __u64 *a = req->data.args;
    struct sockaddr_storage sa;
    socklen_t len = (socklen_t)a[2];
    if (g_layer.bind == NULL || len < sizeof(sa_family_t) || len > sizeof sa ||
        sv_read_mem(req->pid, a[1], &sa, len) != 0 ||
        (sa.ss_family != AF_INET && sa.ss_family != AF_INET6) || sv_still_pending(req->id) != 0) {
        sv_continue(req->id);
        return;
    }
    int mine = sv_take_fd(req->pid, (int)a[0]);
    if (mine < 0) {
        sv_continue(req->id);
        return;
    }
    int r = g_layer.bind(mine, (struct sockaddr *)&sa, len);
    int err = r < 0 ? (errno != 0 ? errno : EIO) : 0;
    if (r == 1) {
        /* getsockname shows the address asked for (the layer may have bound another port),
         * and listen subscribes it. Recorded before the answer: the program's next call
         * (listen, getsockname) may reach another worker as soon as bind returns */
        struct sock_rec rec = {.mine = -1, .local = sa, .local_len = len};
        remember(mine, rec);
    }
    sv_reply(req->id, err, 0);
    close(mine);
}

/* getpeername/getsockname of a socket connected through the daemon: the address the program
 * asked for, and the target-side address; anything else is the kernel's. */
static void on_name(const struct seccomp_notif *req, int peer) {
    const __u64 *a = req->data.args;
    struct sock_rec rec;
    socklen_t have;
    if (!g_killable || !recall(req->pid, (int)a[0], &rec) || (peer && rec.peer_len == 0) ||
        (!peer && rec.local_len == 0) || sv_read_mem(req->pid, a[2], &have, sizeof have) != 0) {
        sv_continue(req->id);
        return;
    }
    const struct sockaddr_storage *ss = peer ? &rec.peer : &rec.local;
    socklen_t len = peer ? rec.peer_len : rec.local_len;
    if (sv_still_pending(req->id) != 0) {
        return;
    }
    int bad = sv_write_mem(req->pid, a[1], ss, have < len ? have : len) != 0 ||
              sv_write_mem(req->pid, a[2], &len, sizeof len) != 0;
    sv_reply(req->id, bad ? EFAULT : 0, 0);
}

static void on_listen(const struct seccomp_notif *req) {
    struct sock_rec rec;
    int known = recall(req->pid, (int)req->data.args[0], &rec);
    if (known && rec.mine >= 0) {
        sv_reply(req->id, 0, 0); /* listening and subscribed already: a new backlog only */
        return;
    }
    int mine = g_layer.listen != NULL ? sv_take_fd(req->pid, (int)req->data.args[0]) : -1;
    if (mine < 0) {
        sv_continue(req->id);
        return;
    }
    int asked = known && rec.local_len > 0;
    int r = g_layer.listen(mine, (int)req->data.args[1],
                           asked ? (struct sockaddr *)&rec.local : NULL, asked ? rec.local_len : 0);
    int err = r < 0 ? (errno != 0 ? errno : EIO) : 0;
    if (r == 1) {
        /* subscribed: `mine` stays open, the layer's record of it holds the subscription while
         * the program runs (it ends with the supervisor, when the program is gone). Recorded
         * before the answer, as for bind: the program's accept may come at once */
        struct sock_rec held = known ? rec : (struct sock_rec){0};
        held.mine = mine;
        if (held.local_len == 0) { /* bound by the program itself: that address */
            held.local_len = sizeof held.local;
            if (syscall(SYS_getsockname, mine, &held.local, &held.local_len) != 0) {
                held.local_len = 0;
            }
        }
        remember(mine, held);
    }
    if (r == 0) {
        sv_continue(req->id);
    } else {
        sv_reply(req->id, err, 0);
    }
    if (r != 1) {
        close(mine);
    }
}

/* accept/accept4 on a subscribed listener the supervisor holds, non-blocking (Go's): done by
 * the layer's accept4 on the supervisor's descriptor, which asks the daemon for the connection's
 * real peer (PeerLookup); the new socket is installed in the program and the peer written to
 * its address buffer. A blocking listener is left to the kernel (the supervisor would wait in
 * it): its peer is the daemon's loopback address. */
static void on_accept(const struct seccomp_notif *req) {
    const __u64 *a = req->data.args;
    int flags = req->data.nr == __NR_accept4 ? (int)a[3] : 0;
    struct sock_rec rec;
    socklen_t have = 0;
    if (!g_killable || !recall(req->pid, (int)a[0], &rec) || rec.mine < 0 ||
        !(fcntl(rec.mine, F_GETFL) & O_NONBLOCK) ||
        (a[1] != 0 && sv_read_mem(req->pid, a[2], &have, sizeof have) != 0)) {
        sv_continue(req->id);
        return;
    }
    if (sv_still_pending(req->id) != 0) {
        return;
    }
    struct sockaddr_storage peer;
    socklen_t pl = sizeof peer;
    int nfd = accept4(rec.mine, (struct sockaddr *)&peer, &pl, flags | SOCK_CLOEXEC);
    if (nfd < 0) {
        sv_reply(req->id, errno, 0); /* EAGAIN: nothing queued, the program polls */
        return;
    }
    if (a[1] != 0 && (sv_write_mem(req->pid, a[1], &peer, have < pl ? have : pl) != 0 ||
                      sv_write_mem(req->pid, a[2], &pl, sizeof pl) != 0)) {
        close(nfd);
        sv_reply(req->id, EFAULT, 0);
        return;
    }
    struct sock_rec accepted = {.mine = -1, .peer = peer, .peer_len = pl};
    remember(nfd, accepted); /* getpeername: the same peer */
    sv_reply_fd(req->id, nfd, (flags & SOCK_CLOEXEC) != 0);
    close(nfd);
}

static void on_uname(const struct seccomp_notif *req) {
    struct utsname u;
    char host[sizeof u.nodename];
    /* gethostname is the layer's hook here: the target's hostname, as the layer decides */
    if (!g_killable || uname(&u) != 0 || gethostname(host, sizeof host) != 0) {
        sv_continue(req->id);
        return;
    }
    snprintf(u.nodename, sizeof u.nodename, "%s", host);
    if (sv_still_pending(req->id) != 0) {
        return;
    }
    sv_reply(req->id, sv_write_mem(req->pid, req->data.args[0], &u, sizeof u) == 0 ? 0 : EFAULT,
             0);
}

int sv_net(const struct seccomp_notif *req, int fallback) {
    int nr = req->data.nr;
    if (nr != __NR_connect && nr != __NR_getpeername && nr != __NR_getsockname &&
        nr != __NR_bind && nr != __NR_listen && nr != __NR_accept && nr != __NR_accept4 &&
        nr != __NR_uname && nr != __NR_sendto && nr != __NR_sendmsg && nr != __NR_recvfrom) {
        return 0;
    }
    if (nr != __NR_uname && decided_by_layer(req)) {
        sv_continue(req->id); /* the layer decided: as it is */
    } else if (fallback && (nr == __NR_sendto || nr == __NR_sendmsg)) {
        sv_udp_send(req, 1);
    } else if (fallback && nr == __NR_connect) {
        on_connect_fallback(req);
    } else if (fallback) {
        sv_continue(req->id); /* no daemon to ask: local (bind, listen, names, recvfrom) */
    } else if (nr == __NR_connect) {
        on_connect(req);
    } else if (nr == __NR_getpeername || nr == __NR_getsockname) {
        on_name(req, nr == __NR_getpeername);
    } else if (nr == __NR_bind) {
        on_bind(req);
    } else if (nr == __NR_listen) {
        on_listen(req);
    } else if (nr == __NR_accept || nr == __NR_accept4) {
        on_accept(req);
    } else if (nr == __NR_sendto || nr == __NR_sendmsg) {
        sv_udp_send(req, 0);
    } else if (nr == __NR_recvfrom) {
        sv_udp_recv(req);
    } else {
        on_uname(req);
    }
    return 1;
}
