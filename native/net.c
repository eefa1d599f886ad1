/* Socket and DNS hooks.
 *
 * Outgoing: a connect() the outgoing filter sends remote becomes LayerConnect; the daemon
 * connects in the target and passes back (SCM_RIGHTS) the layer's end of a private loopback
 * TCP/UDP pair, which replaces the app's socket under the same fd number (splice_relay): no
 * listener is left for another local user to reach. A non-blocking connect() still answers
 * EINPROGRESS and the socket turns writable. getpeername() then reports the address the app
 * asked for, getsockname() the target-side one. UDP: connect() the same way; sendto()/
 * sendmsg() to a remote address go through a per-destination daemon endpoint that takes
 * datagrams from this socket's address only, and recvfrom()/recvmsg() translate the relay
 * back into the remote address.
 * Incoming: bind() records the requested address (binding port 0 instead when the port is
 * busy on the user's machine), listen() subscribes with LayerListen, accept() and
 * getpeername() on its connections report the real remote peer (PeerLookup).
 * DNS: getaddrinfo()/gethostbyname() through DnsLookup, gethostname() through
 * HostnameRequest.
 */
#include "layer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

int sockaddr_to_text(const struct sockaddr *sa, char *host, size_t cap, int *port) {
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        *port = ntohs(in->sin_port);
        return inet_ntop(AF_INET, &in->sin_addr, host, (socklen_t)cap) ? 0 : -1;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        *port = ntohs(in6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            return inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], host, (socklen_t)cap) ? 0 : -1;
        }
        return inet_ntop(AF_INET6, &in6->sin6_addr, host, (socklen_t)cap) ? 0 : -1;
    }
    return -1;
}

/* `host` as a sockaddr of `family` (an IPv4 address on an AF_INET6 socket becomes
 * v4-mapped). */
int sockaddr_from_text(const char *host, int port, int family, struct sockaddr_storage *ss,
                       socklen_t *len) {
    memset(ss, 0, sizeof *ss);
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a4) == 1) {
        if (family == AF_INET6) {
            struct sockaddr_in6 *in6 = (void *)ss;
            in6->sin6_family = AF_INET6;
            in6->sin6_port = htons((uint16_t)port);
            in6->sin6_addr.s6_addr[10] = 0xff;
            in6->sin6_addr.s6_addr[11] = 0xff;
            memcpy(&in6->sin6_addr.s6_addr[12], &a4, 4);
            *len = sizeof *in6;
        } else {
            struct sockaddr_in *in = (void *)ss;
            in->sin_family = AF_INET;
            in->sin_port = htons((uint16_t)port);
            in->sin_addr = a4;
            *len = sizeof *in;
        }
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6) == 1 && family != AF_INET) {
        struct sockaddr_in6 *in6 = (void *)ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        in6->sin6_addr = a6;
        *len = sizeof *in6;
        return 0;
    }
    return -1;
}

static int sock_type(int fd) {
    int type = 0;
    socklen_t tl = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0) {
        return -1;
    }
    return type;
}

static int sock_family(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (REAL(getsockname)(fd, (struct sockaddr *)&ss, &len) < 0) {
        return -1;
    }
    return ss.ss_family;
}

static void copy_addr_out(const struct sockaddr_storage *ss, socklen_t len, struct sockaddr *out,
                          socklen_t *outlen) {
    if (out == NULL || outlen == NULL) {
        return;
    }
    memcpy(out, ss, len < *outlen ? len : *outlen);
    *outlen = len;
}

static struct ent *sock_ent(int fd) {
    struct ent *e = ent_get(fd);
    if (e != NULL) {
        if (e->kind == K_SOCK) {
            return e;
        }
        ent_put(e);
        return NULL;
    }
    e = ent_new(K_SOCK);
    if (e == NULL) {
        return NULL;
    }
    e->refs = 2; /* the table's reference and the caller's */
    fd_set_ent(fd, e);
    return e;
}

static void udp_forget_relays(int fd, struct ent *e);
static int splice_relay(int fd, int rfd, int type);
static int own_listener_port(int port);
/* Listening sockets of this process are at or below this fd (see own_listener_port). */
static int g_listen_fd_max = -1;
static void set_port(struct sockaddr_storage *ss, int port);
static int get_port(const struct sockaddr *sa);

/* LayerConnect. Without `src` (a connect()): *rfd gets the relay socket the daemon passed with
 * the reply, the layer's end of a private loopback pair (see splice_relay); with `src` (the
 * app's own UDP socket, bound: sendto()), the daemon answers with an endpoint that takes
 * datagrams from `src` only, and nothing is passed. `relay` is the daemon's end (in the
 * socket's family), `local` the target-side local address. 0, or -1 with errno
 * (ECONNREFUSED when the daemon is unreachable). */
static int layer_connect(const char *proto, const struct sockaddr *sa, int family,
                         const struct sockaddr *src, struct sockaddr_storage *relay,
                         socklen_t *relay_len, struct sockaddr_storage *local,
                         socklen_t *local_len, int *rfd) {
    char host[INET6_ADDRSTRLEN], shost[INET6_ADDRSTRLEN] = "";
    int port, sport = 0;
    *rfd = -1;
    if (sockaddr_to_text(sa, host, sizeof host, &port) < 0 ||
        (src != NULL && sockaddr_to_text(src, shost, sizeof shost, &sport) < 0)) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    return layer_connect_call(proto, host, port, family, shost, sport, src == NULL, relay,
                              relay_len, local, local_len, rfd);
}

/* The LayerConnect round trip of layer_connect (also for a unix path, with `relay` NULL; and
 * for the system-call supervisor, native/supervise.c). */
int layer_connect_call(const char *proto, const char *host, int port, int family,
                       const char *shost, int sport, int want_fd, struct sockaddr_storage *relay,
                       socklen_t *relay_len, struct sockaddr_storage *local, socklen_t *local_len,
                       int *rfd) {
    *rfd = -1;
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        errno = ECONNREFUSED;
        return -1;
    }
    cbor_w *w = conn_begin(c, M_LAYER_CONNECT, 6);
    cw_str(w, proto);
    cw_str(w, host);
    cw_uint(w, (uint64_t)port);
    cw_uint(w, (uint64_t)(family == AF_INET6 ? 10 : family == AF_INET ? 2 : 0));
    cw_str(w, shost);
    cw_uint(w, (uint64_t)sport);
    cbor_r r;
    int rc = conn_call(c, M_LAYER_CONNECTED, &r);
    if (rc < 0 && errno == EIO) {
        errno = ECONNREFUSED; /* the daemon broke: as if nobody listened */
    }
    int passed = rc == 0 ? conn_take_fd(c) : -1;
    if (rc == 0 && relay == NULL) {
        if (passed < 0) {
            errno = ECONNREFUSED;
            rc = -1;
        }
    } else if (rc == 0) {
        char raddr[64], laddr[64];
        uint64_t rport, lport;
        if (cr_strbuf(&r, raddr, sizeof raddr) < 0 || cr_uint(&r, &rport) < 0 ||
            cr_strbuf(&r, laddr, sizeof laddr) < 0 || cr_uint(&r, &lport) < 0 || rport > 65535 ||
            lport > 65535 || sockaddr_from_text(raddr, (int)rport, family, relay, relay_len) < 0 ||
            (want_fd && passed < 0)) {
            errno = ECONNREFUSED;
            rc = -1;
        } else if (sockaddr_from_text(laddr, (int)lport, family, local, local_len) < 0) {
            *local_len = 0;
        }
    }
    conn_release(c);
    if (rc == 0 && want_fd) {
        *rfd = passed;
    } else if (passed >= 0) {
        REAL(close)(passed);
    }
    return rc;
}

/* Socket options an app may set before connect() that must hold on the relay socket too. */
static const struct {
    int level, name, stream_only;
} g_carried_opts[] = {
    {SOL_SOCKET, SO_RCVTIMEO, 0},       {SOL_SOCKET, SO_SNDTIMEO, 0},
    {SOL_SOCKET, SO_KEEPALIVE, 1},      {SOL_SOCKET, SO_LINGER, 1},
    {SOL_SOCKET, SO_OOBINLINE, 1},      {SOL_SOCKET, SO_BROADCAST, 0},
    {SOL_SOCKET, SO_PRIORITY, 0},       {IPPROTO_TCP, TCP_NODELAY, 1},
    {IPPROTO_TCP, TCP_KEEPIDLE, 1},     {IPPROTO_TCP, TCP_KEEPINTVL, 1},
    {IPPROTO_TCP, TCP_KEEPCNT, 1},      {IPPROTO_TCP, TCP_USER_TIMEOUT, 1},
};

/* Puts the daemon's relay socket `rfd` in the place of the app's socket `fd`: the same fd
 * number, the same O_NONBLOCK/O_ASYNC and close-on-exec, the options above carried over. The
 * relay socket is a real TCP/UDP socket of the app's family connected to the daemon over
 * loopback, so everything else the app does with it (poll, setsockopt, SO_ERROR, shutdown,
 * a reset by SO_LINGER 0, fork, exec) behaves as on any connected socket; getpeername and
 * getsockname show the target's view. Consumes rfd. 0, or -1 with errno. */
static int splice_relay(int fd, int rfd, int type) {
    int fl = REAL(fcntl)(fd, F_GETFL);
    int fdfl = REAL(fcntl)(fd, F_GETFD);
    for (size_t i = 0; i < sizeof g_carried_opts / sizeof g_carried_opts[0]; i++) {
        if (g_carried_opts[i].stream_only && type != SOCK_STREAM) {
            continue;
        }
        char have[32], want[32];
        socklen_t hl = sizeof have, wl = sizeof want;
        if (getsockopt(fd, g_carried_opts[i].level, g_carried_opts[i].name, want, &wl) == 0 &&
            getsockopt(rfd, g_carried_opts[i].level, g_carried_opts[i].name, have, &hl) == 0 &&
            (hl != wl || memcmp(have, want, wl) != 0)) {
            (void)setsockopt(rfd, g_carried_opts[i].level, g_carried_opts[i].name, want, wl);
        }
    }
    int rc = REAL(dup3)(rfd, fd, fdfl >= 0 && (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0);
    int saved = errno;
    REAL(close)(rfd);
    if (rc < 0) {
        errno = saved;
        return -1;
    }
    if (fl >= 0) {
        REAL(fcntl)(fd, F_SETFL, fl);
    }
    return 0;
}

HOOK int socket(int domain, int type, int protocol) {
    int fd = REAL(socket)(domain, type, protocol);
    if (fd >= 0 && fd_peek(fd) != NULL) {
        fd_forget(fd); /* a number closed behind our back (close_range, syscall) */
    }
    return fd;
}

/* A non-blocking connect that the target refused: fail it the way the kernel does, with
 * EINPROGRESS and then ECONNREFUSED in SO_ERROR (event loops and libraries that check only one
 * of the two paths see what they would see in the pod), by connecting to a loopback port we
 * hold bound and not listening. The fd is left as a refused local connect leaves it. */
static int refuse_in_progress(int fd, int family) {
    struct sockaddr_storage ss;
    socklen_t sl;
    int tmp = REAL(socket)(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (tmp < 0 || sockaddr_from_text(family == AF_INET6 ? "::1" : "127.0.0.1", 0, family, &ss,
                                      &sl) < 0 ||
        REAL(bind)(tmp, (struct sockaddr *)&ss, sl) < 0 ||
        REAL(getsockname)(tmp, (struct sockaddr *)&ss, &sl) < 0) {
        if (tmp >= 0) {
            REAL(close)(tmp);
        }
        errno = ECONNREFUSED;
        return -1;
    }
    int rc = REAL(connect)(fd, (struct sockaddr *)&ss, sl);
    int saved = errno;
    REAL(close)(tmp);
    errno = saved;
    return rc;
}

/* outgoing.unix_streams: a unix stream socket connected to a matching path gets the layer's
 * end of a socketpair whose daemon end is relayed to a connection the agent made to that path
 * in the target. R_BYPASS when the path does not match. */
static int connect_unix_remote(int fd, const struct sockaddr *sa, socklen_t len, int *ret) {
    const struct sockaddr_un *un = (const void *)sa;
    size_t plen = len > offsetof(struct sockaddr_un, sun_path)
                      ? len - offsetof(struct sockaddr_un, sun_path)
                      : 0;
    char path[sizeof un->sun_path + 1];
    if (plen == 0 || un->sun_path[0] == 0 || plen > sizeof un->sun_path) {
        return R_BYPASS; /* unnamed or abstract: nothing in the target's file system */
    }
    memcpy(path, un->sun_path, plen);
    path[plen] = 0;
    if (!policy_unix_stream(path) || sock_type(fd) != SOCK_STREAM) {
        return R_BYPASS;
    }
    t_guard++;
    int rfd;
    *ret = layer_connect_call("unix", path, 0, AF_UNIX, "", 0, 1, NULL, NULL, NULL, NULL, &rfd);
    if (*ret == 0) {
        struct ent *e = sock_ent(fd);
        *ret = splice_relay(fd, rfd, SOCK_STREAM);
        int saved = errno;
        if (*ret == 0 && e != NULL) {
            struct stat st;
            if (REAL(fstat)(fd, &st) == 0) {
                e->fd_dev = st.st_dev;
                e->fd_ino = st.st_ino;
            }
            e->remote = 1;
            e->spliced = 1;
            e->family = AF_UNIX;
            e->socktype = SOCK_STREAM;
            memcpy(&e->peer, sa, len < sizeof e->peer ? len : sizeof e->peer);
            e->peer_len = len;
            e->local_len = 0;
        }
        ent_put(e);
        DBG("connect fd %d to unix socket %s in the target: %d", fd, path, *ret);
        errno = saved;
    }
    t_guard--;
    return R_DONE;
}

HOOK int connect(int fd, const struct sockaddr *sa, socklen_t len) {
    if (g_active && !t_guard && sa != NULL && len > sizeof(sa_family_t) &&
        sa->sa_family == AF_UNIX) {
        int ret;
        if (connect_unix_remote(fd, sa, len, &ret) == R_DONE) {
            return ret;
        }
        return REAL(connect)(fd, sa, len);
    }
    if (!g_active || t_guard || sa == NULL || len < sizeof(sa_family_t) ||
        (sa->sa_family != AF_INET && sa->sa_family != AF_INET6)) {
        return REAL(connect)(fd, sa, len);
    }
    int type = sock_type(fd);
    if (type == SOCK_STREAM && is_loopback(sa)) {
        /* the app's own listener (as in the pod: a loopback connect to a port the app listens
         * on reaches the app); where the port was busy here, at the port really bound */
        int want = get_port(sa), have = own_listener_port(want);
        if (have > 0) {
            struct sockaddr_storage to;
            socklen_t tl = len < sizeof to ? len : sizeof to;
            memcpy(&to, sa, tl);
            set_port(&to, have);
            DBG("connect fd %d to the app's own listener on port %d (bound at %d)", fd, want,
                have);
            int rc = REAL(connect)(fd, (struct sockaddr *)&to, tl);
            int saved = errno;
            if (have != want && (rc == 0 || errno == EINPROGRESS)) {
                t_guard++;
                struct ent *e = sock_ent(fd); /* getpeername shows the port asked for */
                if (e != NULL) {
                    e->remote = 1;
                    e->socktype = type;
                    memcpy(&e->peer, sa, tl);
                    e->peer_len = tl;
                    e->local_len = 0;
                    ent_put(e);
                }
                t_guard--;
            }
            errno = saved;
            return rc;
        }
    }
    if (debugger_port(sa, len, 0) || policy_connect(sa, len, type) == P_LOCAL) {
        int rc = REAL(connect)(fd, sa, len);
        struct ent *le = rc == 0 && type == SOCK_DGRAM ? fd_peek(fd) : NULL;
        if (le != NULL && le->kind == K_SOCK) {
            /* a UDP socket connected again, now to a local address: no longer relayed */
            struct ent *e = ent_get(fd);
            t_guard++;
            udp_forget_relays(fd, e);
            t_guard--;
            ent_put(e);
        }
        return rc;
    }
    struct ent *pe = fd_peek(fd);
    if (pe != NULL && pe->kind == K_SOCK) {
        struct ent *e = ent_get(fd);
        if (e != NULL && e->remote && e->spliced && type == SOCK_STREAM) {
            /* connect() again on a stream already relayed (polling a non-blocking connect, as
             * some programs do): the kernel's answers for a connection that completed (0
             * once, then EISCONN), and no second connection is opened in the target */
            int was = e->connecting;
            e->connecting = 0;
            ent_put(e);
            if (was) {
                return 0;
            }
            errno = EISCONN;
            return -1;
        }
        ent_put(e);
    }
    t_guard++;
    struct sockaddr_storage relay, local;
    socklen_t relay_len, local_len;
    int family = sock_family(fd);
    int rfd;
    int rc = layer_connect(type == SOCK_STREAM ? "tcp" : "udp", sa, family, NULL, &relay,
                           &relay_len, &local, &local_len, &rfd);
    if (rc == 0) {
        int nonblocking = (REAL(fcntl)(fd, F_GETFL) & O_NONBLOCK) != 0;
        struct ent *e = sock_ent(fd);
        udp_forget_relays(fd, e);
        rc = splice_relay(fd, rfd, type);
        int saved = errno;
        if (rc == 0 && e != NULL) {
            struct stat st;
            if (REAL(fstat)(fd, &st) == 0) { /* the entry now describes the relay socket */
                e->fd_dev = st.st_dev;
                e->fd_ino = st.st_ino;
            }
            e->remote = 1;
            e->spliced = 1;
            e->family = family;
            e->socktype = type;
            memcpy(&e->peer, sa, len < sizeof e->peer ? len : sizeof e->peer);
            e->peer_len = len;
            e->local = local;
            e->local_len = local_len;
            e->nmaps = 0;
            e->maps[0].relay = relay;
            e->maps[0].relay_len = relay_len;
            e->connecting = type == SOCK_STREAM && nonblocking;
            DBG("connect fd %d remotely through the daemon", fd);
        }
        ent_put(e);
        if (rc == 0 && type == SOCK_STREAM && nonblocking) {
            /* the connection exists already, but a non-blocking connect() answers "in
             * progress" and the app waits for writability, as it does with any socket */
            rc = -1;
            saved = EINPROGRESS;
        }
        errno = saved;
    } else if (errno == ECONNREFUSED && type == SOCK_STREAM &&
               (family == AF_INET || family == AF_INET6) &&
               (REAL(fcntl)(fd, F_GETFL) & O_NONBLOCK)) {
        rc = refuse_in_progress(fd, family);
    }
    t_guard--;
    return rc;
}

HOOK int getpeername(int fd, struct sockaddr *sa, socklen_t *len) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_SOCK || t_guard) {
        return REAL(getpeername)(fd, sa, len);
    }
    struct ent *e = ent_get(fd);
    if (e == NULL || !e->remote) {
        ent_put(e);
        return REAL(getpeername)(fd, sa, len);
    }
    /* still check the socket is connected, for the errno */
    struct sockaddr_storage tmp;
    socklen_t tl = sizeof tmp;
    int rc = REAL(getpeername)(fd, (struct sockaddr *)&tmp, &tl);
    if (rc == 0) {
        copy_addr_out(&e->peer, e->peer_len, sa, len);
    }
    ent_put(e);
    return rc;
}

HOOK int getsockname(int fd, struct sockaddr *sa, socklen_t *len) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_SOCK || t_guard) {
        return REAL(getsockname)(fd, sa, len);
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(getsockname)(fd, sa, len);
    }
    int rc = 0;
    if (e->remote && e->local_len > 0) {
        copy_addr_out(&e->local, e->local_len, sa, len);
    } else if (e->bound && !e->remote) {
        copy_addr_out(&e->req, e->req_len, sa, len); /* the address the app asked for */
    } else {
        rc = REAL(getsockname)(fd, sa, len);
    }
    ent_put(e);
    return rc;
}

static void set_port(struct sockaddr_storage *ss, int port) {
    if (ss->ss_family == AF_INET) {
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    } else {
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    }
}

static int get_port(const struct sockaddr *sa) {
    return sa->sa_family == AF_INET ? ntohs(((const struct sockaddr_in *)(const void *)sa)->sin_port)
                                    : ntohs(((const struct sockaddr_in6 *)(const void *)sa)->sin6_port);
}

/* The port really bound by a socket of this process listening on `port` (as the app asked
 * for it), or 0. */
static int own_listener_port(int port) {
    int top = __atomic_load_n(&g_listen_fd_max, __ATOMIC_RELAXED);
    for (int fd = 0; fd <= top && fd < MAX_FDS; fd++) {
        struct ent *pe = fd_peek(fd);
        if (pe == NULL || pe->kind != K_SOCK || !pe->listening || !pe->bound ||
            get_port((struct sockaddr *)&pe->req) != port) {
            continue;
        }
        struct ent *e = ent_get(fd); /* still this socket (not closed behind our back) */
        struct sockaddr_storage real;
        socklen_t rl = sizeof real;
        int acc = 0;
        socklen_t al = sizeof acc;
        int found = e != NULL && e->listening &&
                            REAL(getsockname)(fd, (struct sockaddr *)&real, &rl) == 0 &&
                            getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) == 0 && acc
                        ? get_port((struct sockaddr *)&real)
                        : 0;
        ent_put(e);
        if (found > 0) {
            return found;
        }
    }
    return 0;
}

HOOK int bind(int fd, const struct sockaddr *sa, socklen_t len) {
    if (!g_active || t_guard || sa == NULL || len < sizeof(sa_family_t) ||
        (sa->sa_family != AF_INET && sa->sa_family != AF_INET6) || g_set.incoming == IN_OFF ||
        (sa->sa_family == AF_INET && len < sizeof(struct sockaddr_in)) ||
        (sa->sa_family == AF_INET6 && len < sizeof(struct sockaddr_in6))) {
        return REAL(bind)(fd, sa, len);
    }
    int port = get_port(sa);
    if (port == 0 || debugger_port(sa, len, 1) || sock_type(fd) != SOCK_STREAM ||
        policy_listen_port(port) < 0) {
        return REAL(bind)(fd, sa, len); /* not recorded: its listen() subscribes nothing */
    }
    struct sockaddr_storage use;
    memcpy(&use, sa, len);
    set_port(&use, policy_bind_port(port));
    int rc = REAL(bind)(fd, (struct sockaddr *)&use, len);
    if (rc < 0 && errno == EADDRINUSE) {
        /* busy on the user's machine (the target's port is what matters): any port will do */
        set_port(&use, 0);
        rc = REAL(bind)(fd, (struct sockaddr *)&use, len);
    }
    if (rc == 0) {
        t_guard++;
        struct ent *e = sock_ent(fd);
        if (e != NULL) {
            e->bound = 1;
            memcpy(&e->req, sa, len);
            e->req_len = len;
            e->socktype = SOCK_STREAM;
            ent_put(e);
        }
        t_guard--;
    }
    return rc;
}

/* the least accept queue of a subscribed listener (see listen) */
#define SUBSCRIBED_BACKLOG 1024

HOOK int listen(int fd, int backlog) {
    int rc = REAL(listen)(fd, backlog);
    struct ent *pe = fd_peek(fd);
    if (rc < 0 || !g_active || t_guard || (pe != NULL && pe->kind != K_SOCK)) {
        return rc;
    }
    if (pe == NULL) {
        /* not bound through our bind() (a port nobody subscribes): remembered all the same,
         * so that a connect() of the app to its own port stays local */
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        if (REAL(getsockname)(fd, (struct sockaddr *)&ss, &sl) < 0 ||
            (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
            return rc;
        }
        t_guard++;
        struct ent *ne = sock_ent(fd);
        if (ne != NULL) {
            ne->bound = 1;
            ne->req = ss;
            ne->req_len = sl;
            ne->socktype = SOCK_STREAM;
            ne->listening = 1;
            ent_put(ne);
        }
        t_guard--;
        if (fd > g_listen_fd_max) {
            g_listen_fd_max = fd;
        }
        return rc;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return rc;
    }
    e->listening = 1;
    if (fd > g_listen_fd_max) {
        g_listen_fd_max = fd;
    }
    int rport = e->bound && !e->subscribed &&
                        !debugger_port((struct sockaddr *)&e->req, e->req_len, 1)
                    ? policy_listen_port(get_port((struct sockaddr *)&e->req))
                    : -1;
    if (rport >= 0 && !(g_set.incoming_ignore_localhost && is_loopback((struct sockaddr *)&e->req))) {
        t_guard++;
        struct sockaddr_storage real;
        socklen_t rl = sizeof real;
        char host[INET6_ADDRSTRLEN];
        int bport;
        if (REAL(getsockname)(fd, (struct sockaddr *)&real, &rl) == 0 &&
            sockaddr_to_text((struct sockaddr *)&real, host, sizeof host, &bport) == 0) {
            if (strcmp(host, "0.0.0.0") == 0) {
                strcpy(host, "127.0.0.1");
            } else if (strcmp(host, "::") == 0) {
                strcpy(host, "::1");
            }
            struct lconn *c = conn_acquire();
            if (c != NULL) {
                cbor_w *w = conn_begin(c, M_LAYER_LISTEN, 3);
                cw_uint(w, (uint64_t)rport);
                cw_str(w, host);
                cw_uint(w, (uint64_t)bport);
                cbor_r r;
                int saved = errno;
                if (conn_call(c, M_OK, &r) == 0) {
                    /* The daemon opens the connections of a burst of flows at once and each
                     * accept() here costs a PeerLookup round trip: with Python's default
                     * backlog of 5 the accept queue overflows, the kernel answers with SYN
                     * cookies and then resets the daemon's connections once they carry data
                     * (mirrored requests were lost that way). Listening again only deepens
                     * the queue (the kernel caps it at net.core.somaxconn). */
                    if (backlog < SUBSCRIBED_BACKLOG) {
                        REAL(listen)(fd, SUBSCRIBED_BACKLOG);
                    }
                    e->subscribed = 1;
                    e->sub_port = rport;
                    e->sub_owner = getpid();
                    __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
                    DBG("listening on port %d: subscribed (bound %s:%d)", rport, host, bport);
                } else {
                    /* the app still serves locally; the session reports the failure */
                    DBG("subscribing port %d failed: %s", rport, strerror(errno));
                }
                errno = saved;
                conn_release(c);
            }
        }
        t_guard--;
    }
    ent_put(e);
    return rc;
}

/* The real peer of a connection the daemon made to a subscribed listener. */
static int peer_lookup(const struct sockaddr_storage *from, int family, struct sockaddr_storage *out,
                       socklen_t *outlen) {
    if (!is_loopback((const struct sockaddr *)from)) {
        return -1; /* the daemon connects from loopback; others are real local clients */
    }
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return -1;
    }
    cbor_w *w = conn_begin(c, M_PEER_LOOKUP, 1);
    cw_uint(w, (uint64_t)get_port((const struct sockaddr *)from));
    cbor_r r;
    int rc = -1;
    int saved = errno;
    if (conn_call(c, M_PEER_REPLY, &r) == 0) {
        char host[64];
        uint64_t port;
        if (cr_strbuf(&r, host, sizeof host) == 0 && cr_uint(&r, &port) == 0 && port <= 65535 &&
            sockaddr_from_text(host, (int)port, family, out, outlen) == 0) {
            rc = 0;
        }
    }
    errno = saved;
    conn_release(c);
    return rc;
}

static int accept_common(int fd, struct sockaddr *sa, socklen_t *len, int flags, int four) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_SOCK || t_guard || !g_active) {
        int nfd = four ? REAL(accept4)(fd, sa, len, flags) : REAL(accept)(fd, sa, len);
        if (nfd >= 0 && fd_peek(nfd) != NULL) {
            fd_forget(nfd);
        }
        return nfd;
    }
    struct sockaddr_storage from;
    socklen_t fl = sizeof from;
    int nfd = four ? REAL(accept4)(fd, (struct sockaddr *)&from, &fl, flags)
                   : REAL(accept)(fd, (struct sockaddr *)&from, &fl);
    if (nfd < 0) {
        return nfd;
    }
    fd_forget(nfd);
    struct ent *e = ent_get(fd);
    int subscribed = e != NULL && e->subscribed;
    ent_put(e);
    if (subscribed) {
        t_guard++;
        struct sockaddr_storage peer;
        socklen_t pl;
        if (peer_lookup(&from, from.ss_family, &peer, &pl) == 0) {
            struct ent *ne = sock_ent(nfd);
            if (ne != NULL) {
                ne->remote = 1;
                ne->socktype = SOCK_STREAM;
                ne->peer = peer;
                ne->peer_len = pl;
                ent_put(ne);
            }
            from = peer;
            fl = pl;
        }
        t_guard--;
    }
    copy_addr_out(&from, fl, sa, len);
    return nfd;
}

HOOK int accept(int fd, struct sockaddr *sa, socklen_t *len) {
    return accept_common(fd, sa, len, 0, 0);
}

HOOK int accept4(int fd, struct sockaddr *sa, socklen_t *len, int flags) {
    return accept_common(fd, sa, len, flags, 1);
}

/* ---------------------------------------------------------------- UDP */

static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
    if (a->ss_family != b->ss_family) {
        return 0;
    }
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
}

/* The relay for datagrams to `sa` from this socket (created on first use). */
static int udp_relay_for(int fd, const struct sockaddr *sa, socklen_t len,
                         struct sockaddr_storage *relay, socklen_t *relay_len) {
    struct ent *e = sock_ent(fd);
    if (e == NULL) {
        errno = ENOMEM;
        return -1;
    }
    struct sockaddr_storage want;
    memset(&want, 0, sizeof want);
    memcpy(&want, sa, len < sizeof want ? len : sizeof want);
    if (e->remote && e->spliced && same_addr(&e->peer, &want)) {
        *relay_len = 0; /* connected to it through the daemon already: send without address */
        ent_put(e);
        return 0;
    }
    for (int i = 0; i < e->nmaps; i++) {
        if (same_addr(&e->maps[i].remote, &want)) {
            *relay = e->maps[i].relay;
            *relay_len = e->maps[i].relay_len;
            ent_put(e);
            return 0;
        }
    }
    /* The daemon's endpoint takes datagrams from this socket's address only: bind it now if
     * the app has not (what the kernel's first sendto() would do: any address, a free port). */
    struct sockaddr_storage me, local;
    socklen_t me_len = sizeof me, local_len;
    if (REAL(getsockname)(fd, (struct sockaddr *)&me, &me_len) < 0 ||
        (me.ss_family != AF_INET && me.ss_family != AF_INET6)) {
        ent_put(e);
        errno = EAFNOSUPPORT;
        return -1;
    }
    if (get_port((struct sockaddr *)&me) == 0) {
        struct sockaddr_storage any;
        socklen_t any_len;
        sockaddr_from_text(me.ss_family == AF_INET6 ? "::" : "0.0.0.0", 0, me.ss_family, &any,
                           &any_len);
        me_len = sizeof me;
        if (REAL(bind)(fd, (struct sockaddr *)&any, any_len) < 0 ||
            REAL(getsockname)(fd, (struct sockaddr *)&me, &me_len) < 0) {
            ent_put(e);
            return -1;
        }
    }
    int rfd;
    int rc = layer_connect("udp", sa, me.ss_family, (struct sockaddr *)&me, relay, relay_len,
                           &local, &local_len, &rfd);
    if (rc == 0) {
        int i = e->nmaps < MAX_UDP_MAPS ? e->nmaps++ : MAX_UDP_MAPS - 1;
        e->maps[i].remote = want;
        e->maps[i].remote_len = len;
        e->maps[i].relay = *relay;
        e->maps[i].relay_len = *relay_len;
        e->socktype = SOCK_DGRAM;
    }
    ent_put(e);
    return rc;
}

static int relay_port_of(const struct sockaddr_storage *ss) {
    return get_port((const struct sockaddr *)ss);
}

/* Tells the daemon to end each relay of a UDP socket (and its socket in the target): a UDP
 * relay never ends by itself. The daemon first forwards what the app sent before. */
static void udp_end_relays(const struct ent *e) {
    int ports[MAX_UDP_MAPS + 1], n = 0;
    if (e->remote && e->maps[0].relay_len > 0) {
        ports[n++] = relay_port_of(&e->maps[0].relay);
    }
    for (int i = 0; i < e->nmaps && i < MAX_UDP_MAPS; i++) {
        if (e->maps[i].relay_len > 0) {
            ports[n++] = relay_port_of(&e->maps[i].relay);
        }
    }
    if (n == 0) {
        return;
    }
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return;
    }
    int saved = errno;
    for (int i = 0; i < n; i++) {
        int seen = 0;
        for (int j = 0; j < i; j++) {
            seen |= ports[j] == ports[i];
        }
        if (seen || ports[i] <= 0) {
            continue;
        }
        cbor_w *w = conn_begin(c, M_LAYER_DISCONNECT, 1);
        cw_uint(w, (uint64_t)ports[i]);
        cbor_r r;
        (void)conn_call(c, M_OK, &r);
    }
    conn_release(c);
    errno = saved;
}

/* The app closed a UDP socket we relayed: end its relays now instead of keeping them until
 * the process exits. */
void net_sock_freed(const struct ent *e) { udp_end_relays(e); }

/* A UDP socket connected anew (elsewhere, or to a new relay): its old relays end. */
static void udp_forget_relays(int fd, struct ent *e) {
    (void)fd;
    if (e == NULL || e->socktype != SOCK_DGRAM) {
        return;
    }
    udp_end_relays(e);
    e->remote = 0;
    e->nmaps = 0;
    memset(e->maps, 0, sizeof e->maps);
}

/* Source address of a datagram: a relay of ours is shown as the remote it stands for. */
static void udp_translate_from(int fd, struct sockaddr_storage *from, socklen_t *fl) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return;
    }
    for (int i = 0; i < e->nmaps; i++) {
        if (same_addr(&e->maps[i].relay, from)) {
            *from = e->maps[i].remote;
            *fl = e->maps[i].remote_len;
            break;
        }
    }
    if (e->remote && e->socktype == SOCK_DGRAM && same_addr(&e->maps[0].relay, from)) {
        *from = e->peer;
        *fl = e->peer_len;
    }
    ent_put(e);
}

static int udp_remote_dest(int fd, const struct sockaddr *sa, socklen_t len) {
    return g_active && !t_guard && sa != NULL && len >= sizeof(sa_family_t) &&
           (sa->sa_family == AF_INET || sa->sa_family == AF_INET6) && sock_type(fd) == SOCK_DGRAM &&
           policy_connect(sa, len, SOCK_DGRAM) == P_REMOTE;
}

HOOK ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa,
                    socklen_t len) {
    if (!udp_remote_dest(fd, sa, len)) {
        return REAL(sendto)(fd, buf, n, flags, sa, len);
    }
    t_guard++;
    struct sockaddr_storage relay;
    socklen_t rl;
    ssize_t rc = udp_relay_for(fd, sa, len, &relay, &rl);
    if (rc == 0) {
        rc = REAL(sendto)(fd, buf, n, flags, rl ? (struct sockaddr *)&relay : NULL, rl);
    }
    t_guard--;
    return rc;
}

HOOK ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    if (msg == NULL || !udp_remote_dest(fd, msg->msg_name, msg->msg_namelen)) {
        return REAL(sendmsg)(fd, msg, flags);
    }
    t_guard++;
    struct sockaddr_storage relay;
    socklen_t rl;
    ssize_t rc = udp_relay_for(fd, msg->msg_name, msg->msg_namelen, &relay, &rl);
    if (rc == 0) {
        struct msghdr m = *msg;
        m.msg_name = rl ? &relay : NULL;
        m.msg_namelen = rl;
        rc = REAL(sendmsg)(fd, &m, flags);
    }
    t_guard--;
    return rc;
}

HOOK ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *sa, socklen_t *len) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_SOCK || t_guard || sa == NULL || len == NULL) {
        return REAL(recvfrom)(fd, buf, n, flags, sa, len);
    }
    struct sockaddr_storage from;
    socklen_t fl = sizeof from;
    ssize_t rc = REAL(recvfrom)(fd, buf, n, flags, (struct sockaddr *)&from, &fl);
    if (rc >= 0) {
        if (fl > 0) {
            udp_translate_from(fd, &from, &fl);
        }
        copy_addr_out(&from, fl, sa, len);
    }
    return rc;
}

HOOK ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_SOCK || t_guard || msg == NULL || msg->msg_name == NULL) {
        return REAL(recvmsg)(fd, msg, flags);
    }
    ssize_t rc = REAL(recvmsg)(fd, msg, flags);
    if (rc >= 0 && msg->msg_namelen > 0) {
        struct sockaddr_storage from;
        socklen_t fl = msg->msg_namelen < sizeof from ? msg->msg_namelen : sizeof from;
        memset(&from, 0, sizeof from);
        memcpy(&from, msg->msg_name, fl);
        udp_translate_from(fd, &from, &fl);
        socklen_t cap = msg->msg_namelen;
        memcpy(msg->msg_name, &from, fl < cap ? fl : cap);
        msg->msg_namelen = fl;
    }
    return rc;
}

/* ---------------------------------------------------------------- DNS */

struct ai_node {
    struct addrinfo ai;
    struct sockaddr_storage ss;
};

struct ai_owned {
    struct addrinfo *head;
    struct ai_owned *next;
};

static struct ai_owned *g_owned;
static pthread_mutex_t g_owned_lock = PTHREAD_MUTEX_INITIALIZER;

void net_after_fork_child(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    g_owned_lock = fresh;
}

static void free_chain(struct addrinfo *ai) {
    while (ai != NULL) {
        struct addrinfo *next = ai->ai_next;
        free(ai->ai_canonname);
        free(ai);
        ai = next;
    }
}

static int dns_errno_to_eai(int e) {
    if (e < 0) {
        return e; /* the agent's own getaddrinfo code (EAI_NONAME, EAI_NODATA, ...) */
    }
    switch (e) {
    case ENOENT:
    case ENXIO:
    case EHOSTUNREACH:
    case ENODATA: return EAI_NONAME;
    case EAGAIN:
    case ETIMEDOUT:
    case EIO: return EAI_AGAIN;
    case EAFNOSUPPORT: return EAI_FAMILY;
    case ENOMEM: return EAI_MEMORY;
    default: return EAI_FAIL;
    }
}

/* socket types a named service exists for (glibc answers only those); 0: any */
#define ST_STREAM 1
#define ST_DGRAM 2

/* DnsLookup; builds an addrinfo chain that freeaddrinfo recognises as ours. */
static int dns_lookup(const char *host, int port, int family, int socktype, int protocol,
                      int flags, int stmask, struct addrinfo **res) {
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return EAI_AGAIN;
    }
    cbor_w *w = conn_begin(c, M_DNS_LOOKUP, 6);
    cw_str(w, host);
    cw_uint(w, (uint64_t)port);
    cw_uint(w, (uint64_t)family);
    cw_uint(w, (uint64_t)socktype);
    cw_uint(w, (uint64_t)protocol);
    cw_uint(w, (uint64_t)flags);
    cbor_r r;
    if (conn_call(c, M_DNS_REPLY, &r) < 0) {
        int rc = dns_errno_to_eai(errno);
        conn_release(c);
        return rc;
    }
    uint64_t n;
    struct addrinfo *head = NULL, **tail = &head;
    int rc = 0;
    if (cr_array(&r, &n) < 0) {
        rc = EAI_FAIL;
    }
    for (uint64_t i = 0; rc == 0 && i < n; i++) {
        uint64_t k, fam, st, pr, p;
        char addr[64];
        if (cr_array(&r, &k) < 0 || k != 5 || cr_uint(&r, &fam) < 0 || cr_uint(&r, &st) < 0 ||
            cr_uint(&r, &pr) < 0 || cr_strbuf(&r, addr, sizeof addr) < 0 || cr_uint(&r, &p) < 0 ||
            p > 65535) {
            rc = EAI_FAIL;
            break;
        }
        if ((family != AF_UNSPEC && (int)fam != family) || (socktype && st && (int)st != socktype)) {
            continue;
        }
        if (stmask && !((st == SOCK_STREAM && (stmask & ST_STREAM)) ||
                        (st == SOCK_DGRAM && (stmask & ST_DGRAM)))) {
            continue;
        }
        struct ai_node *node = calloc(1, sizeof *node);
        socklen_t alen;
        if (node == NULL) {
            rc = EAI_MEMORY;
            break;
        }
        if (sockaddr_from_text(addr, (int)p, (int)fam, &node->ss, &alen) < 0) {
            free(node);
            continue;
        }
        node->ai.ai_family = node->ss.ss_family;
        node->ai.ai_socktype = st ? (int)st : socktype;
        node->ai.ai_protocol = pr ? (int)pr : protocol;
        node->ai.ai_addr = (struct sockaddr *)&node->ss;
        node->ai.ai_addrlen = alen;
        node->ai.ai_flags = flags;
        *tail = &node->ai;
        tail = &node->ai.ai_next;
        policy_remember_name(node->ai.ai_addr, host);
    }
    if (rc == 0 && head != NULL && (flags & AI_CANONNAME)) {
        const char *cn;
        size_t cl;
        if (cr_peek(&r) == CBOR_TEXT && cr_text(&r, &cn, &cl) == 0 && cl > 0) {
            head->ai_canonname = strndup(cn, cl);
        } else {
            head->ai_canonname = strdup(host);
        }
    }
    conn_release(c);
    if (rc == 0 && head == NULL) {
        rc = EAI_NONAME;
    }
    if (rc != 0) {
        free_chain(head);
        return rc;
    }
    struct ai_owned *o = malloc(sizeof *o);
    if (o == NULL) {
        free_chain(head);
        return EAI_MEMORY;
    }
    pthread_mutex_lock(&g_owned_lock);
    o->head = head;
    o->next = g_owned;
    g_owned = o;
    pthread_mutex_unlock(&g_owned_lock);
    *res = head;
    return 0;
}

/* The port of `service`; *stmask gets the socket types a named service exists for when the
 * hints leave the type open (getaddrinfo then answers only those, and no SOCK_RAW). */
static int service_port(const char *service, const struct addrinfo *hints, int *port,
                        int *stmask) {
    *stmask = 0;
    if (service == NULL) {
        *port = 0;
        return 0;
    }
    char *end;
    long p = strtol(service, &end, 10);
    if (*service && *end == 0 && p >= 0 && p <= 65535) {
        *port = (int)p;
        return 0;
    }
    if (hints && (hints->ai_flags & AI_NUMERICSERV)) {
        return -1;
    }
    int socktype = hints ? hints->ai_socktype : 0;
    *port = -1;
    for (int i = 0; i < 2; i++) {
        int st = i == 0 ? SOCK_STREAM : SOCK_DGRAM;
        if (socktype && socktype != st) {
            continue;
        }
        struct servent se, *res = NULL;
        char buf[1024];
        if (getservbyname_r(service, i == 0 ? "tcp" : "udp", &se, buf, sizeof buf, &res) == 0 &&
            res != NULL) {
            if (*port < 0) {
                *port = ntohs((uint16_t)res->s_port);
            }
            *stmask |= i == 0 ? ST_STREAM : ST_DGRAM;
        }
    }
    if (socktype) {
        *stmask = 0; /* one type asked for: the agent answers only that one */
    }
    return *port < 0 ? -1 : 0;
}

HOOK int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                     struct addrinfo **res) {
    if (!g_active || t_guard || node == NULL || (hints && (hints->ai_flags & AI_NUMERICHOST))) {
        return REAL(getaddrinfo)(node, service, hints, res);
    }
    int port, stmask;
    if (service_port(service, hints, &port, &stmask) < 0 || policy_dns(node, port) == P_LOCAL) {
        int rc = REAL(getaddrinfo)(node, service, hints, res);
        if (rc == 0) {
            /* an outgoing filter naming this host must match what it resolved to here too */
            for (const struct addrinfo *ai = *res; ai != NULL; ai = ai->ai_next) {
                policy_remember_name(ai->ai_addr, node);
            }
        }
        return rc;
    }
    t_guard++;
    int rc = dns_lookup(node, port, hints ? hints->ai_family : 0, hints ? hints->ai_socktype : 0,
                        hints ? hints->ai_protocol : 0, hints ? hints->ai_flags : 0, stmask, res);
    t_guard--;
    DBG("getaddrinfo %s remotely: %d", node, rc);
    return rc;
}

HOOK void freeaddrinfo(struct addrinfo *ai) {
    if (ai == NULL) {
        return;
    }
    struct ai_owned *found = NULL;
    pthread_mutex_lock(&g_owned_lock);
    for (struct ai_owned **p = &g_owned; *p; p = &(*p)->next) {
        if ((*p)->head == ai) {
            found = *p;
            *p = found->next;
            break;
        }
    }
    pthread_mutex_unlock(&g_owned_lock);
    if (found != NULL) {
        free(found);
        free_chain(ai);
        return;
    }
    REAL(freeaddrinfo)(ai);
}

#define HOST_ADDRS 16

/* Fills a hostent in `buf` (name, empty aliases, addresses of `family`) from a DnsLookup.
 * 0, ERANGE (buffer too small), or -1 with *herr set. */
static int host_lookup(const char *name, int family, struct hostent *he, char *buf, size_t buflen,
                       int *herr) {
    struct addrinfo *res = NULL;
    int rc = dns_lookup(name, 0, family, SOCK_STREAM, 0, AI_CANONNAME, 0, &res);
    if (rc != 0) {
        *herr = rc == EAI_AGAIN     ? TRY_AGAIN
                : rc == EAI_NODATA  ? NO_DATA
                : rc == EAI_NONAME  ? HOST_NOT_FOUND
                                    : NO_RECOVERY;
        return -1;
    }
    /* h_name is the canonical name (the hosts line's first name, the end of a CNAME chain) */
    if (res->ai_canonname != NULL && *res->ai_canonname) {
        name = res->ai_canonname;
    }
    size_t alen = family == AF_INET6 ? 16 : 4;
    size_t n = 0;
    for (struct addrinfo *ai = res; ai && n < HOST_ADDRS; ai = ai->ai_next) {
        n++;
    }
    size_t nlen = strlen(name) + 1;
    size_t need = sizeof(char *) * (n + 2) + alen * n + nlen + sizeof(void *);
    if (buflen < need) {
        freeaddrinfo(res);
        return ERANGE;
    }
    /* pointers first (aligned), then the addresses, then the name */
    char *p = (char *)(((uintptr_t)buf + sizeof(void *) - 1) & ~(uintptr_t)(sizeof(void *) - 1));
    char **aliases = (char **)p;
    char **addrs = aliases + 1;
    char *data = (char *)(addrs + n + 1);
    aliases[0] = NULL;
    size_t i = 0;
    for (struct addrinfo *ai = res; ai && i < n; ai = ai->ai_next, i++) {
        const void *src = family == AF_INET6
                              ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
                              : (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
        memcpy(data + i * alen, src, alen);
        addrs[i] = data + i * alen;
    }
    addrs[n] = NULL;
    char *hname = data + n * alen;
    memcpy(hname, name, nlen);
    he->h_name = hname;
    he->h_aliases = aliases;
    he->h_addrtype = family;
    he->h_length = (int)alen;
    he->h_addr_list = addrs;
    freeaddrinfo(res);
    return 0;
}

static LAYER_TLS struct {
    struct hostent he;
    char buf[sizeof(char *) * (HOST_ADDRS + 3) + 16 * HOST_ADDRS + 256 + 16];
} t_host;

static struct hostent *host_static(const char *name, int family) {
    t_guard++;
    int herr = 0;
    int rc = host_lookup(name, family, &t_host.he, t_host.buf, sizeof t_host.buf, &herr);
    t_guard--;
    if (rc != 0) {
        h_errno = rc == ERANGE ? NO_RECOVERY : herr;
        return NULL;
    }
    return &t_host.he;
}

static int host_r(const char *name, int family, struct hostent *ret, char *buf, size_t buflen,
                  struct hostent **result, int *h_errnop) {
    t_guard++;
    int herr = 0;
    int rc = host_lookup(name, family, ret, buf, buflen, &herr);
    t_guard--;
    *result = rc == 0 ? ret : NULL;
    if (rc == ERANGE) {
        *h_errnop = NETDB_INTERNAL;
        return ERANGE;
    }
    if (rc != 0) {
        *h_errnop = herr;
        return 0; /* not found: success with a NULL result, as glibc does */
    }
    return 0;
}

static int host_remote(const char *name, int family) {
    return g_active && !t_guard && name != NULL && (family == AF_INET || family == AF_INET6) &&
           policy_dns(name, 0) == P_REMOTE;
}

HOOK struct hostent *gethostbyname(const char *name) {
    if (!host_remote(name, AF_INET)) {
        return REAL(gethostbyname)(name);
    }
    return host_static(name, AF_INET);
}

HOOK struct hostent *gethostbyname2(const char *name, int family) {
    if (!host_remote(name, family)) {
        return REAL(gethostbyname2)(name, family);
    }
    return host_static(name, family);
}

HOOK int gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen,
                         struct hostent **result, int *h_errnop) {
    if (!host_remote(name, AF_INET)) {
        return REAL(gethostbyname_r)(name, ret, buf, buflen, result, h_errnop);
    }
    return host_r(name, AF_INET, ret, buf, buflen, result, h_errnop);
}

HOOK int gethostbyname2_r(const char *name, int family, struct hostent *ret, char *buf,
                          size_t buflen, struct hostent **result, int *h_errnop) {
    if (!host_remote(name, family)) {
        return REAL(gethostbyname2_r)(name, family, ret, buf, buflen, result, h_errnop);
    }
    return host_r(name, family, ret, buf, buflen, result, h_errnop);
}

HOOK int gethostname(char *name, size_t len) {
    if (!g_active || t_guard || !g_set.hostname) {
        return REAL(gethostname)(name, len);
    }
    t_guard++;
    struct lconn *c = conn_acquire();
    int rc = -1;
    if (c != NULL) {
        conn_begin(c, M_HOSTNAME_REQUEST, 0);
        cbor_r r;
        if (conn_call(c, M_HOSTNAME_REPLY, &r) == 0) {
            char host[256];
            if (cr_strbuf(&r, host, sizeof host) < 0) {
                errno = EIO;
            } else if (strlen(host) + 1 > len) {
                errno = ENAMETOOLONG;
            } else {
                strcpy(name, host);
                rc = 0;
            }
        }
        conn_release(c);
    }
    t_guard--;
    if (rc < 0 && errno == EIO) {
        /* no daemon: the user's own hostname beats failing every program that logs it */
        return REAL(gethostname)(name, len);
    }
    return rc;
}

/* Listening sockets survive exec: the new image learns them from MIRRORD_LAYER_LISTENERS. */
void net_restore_listeners(void) {
    const char *v = getenv("MIRRORD_LAYER_LISTENERS");
    if (v == NULL) {
        return;
    }
    while (*v) {
        int fd, port, n = 0;
        if (sscanf(v, "%d:%d%n", &fd, &port, &n) != 2 || n == 0) {
            break;
        }
        v += n;
        if (*v == ',') {
            v++;
        }
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int acc = 0;
        socklen_t al = sizeof acc;
        if (fd < 0 || fd >= MAX_FDS || REAL(getsockname)(fd, (struct sockaddr *)&ss, &len) < 0 ||
            getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) < 0 || !acc) {
            continue;
        }
        struct ent *e = ent_new(K_SOCK);
        if (e == NULL) {
            break;
        }
        e->bound = 1;
        e->req = ss;
        e->req_len = len;
        set_port(&e->req, port);
        e->subscribed = 1;
        e->sub_port = port;
        e->sub_owner = getpid(); /* exec keeps the pid: still this process's subscription */
        e->socktype = SOCK_STREAM;
        __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
        fd_set_ent(fd, e);
    }
}
