/* Outgoing connections: connect() hook.
 *
 * A connect() the outgoing filter sends remote becomes LayerConnect; the daemon connects in
 * the target and passes back (SCM_RIGHTS) the layer's end of a private loopback TCP/UDP pair,
 * which replaces the app's socket under the same fd number (splice_relay): no listener is left
 * for another local user to reach. For a local target with hand-over on, the passed socket is
 * the agent's own, connected in the target's network namespace (LayerConnected.handed): it is
 * spliced in the same way and nothing relays its bytes. A non-blocking connect() still answers EINPROGRESS and the
 * socket turns writable. getpeername() then reports the address the app asked for,
 * getsockname() the target-side one (net_sock.c). UDP: connect() the same way. A unix stream
 * socket connected to a path outgoing.unix_streams names gets a relay the same way.
 *
 * Owns: LayerConnect, splicing the relay in, the entry of a relayed socket, a loopback connect()
 * to the app's own listener. Does not own: sendto() without connect() (net_udp.c), listeners
 * (net_listen.c).
 */
#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <string.h>
#include <sys/un.h>

/* The LayerConnect round trip of layer_connect (also for a unix path, with `relay` NULL). */
static int layer_connect_call(const char *proto, const char *host, int port, int family,
                              const char *shost, int sport, int want_fd,
                              struct sockaddr_storage *relay, socklen_t *relay_len,
                              struct sockaddr_storage *local, socklen_t *local_len, int *rfd) {
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
        int handed = 0; /* the agent's own socket (hand-over): no relay to name */
        if (cr_strbuf(&r, raddr, sizeof raddr) < 0 || cr_uint(&r, &rport) < 0 ||
            cr_strbuf(&r, laddr, sizeof laddr) < 0 || cr_uint(&r, &lport) < 0 || rport > 65535 ||
            lport > 65535 || cr_bool(&r, &handed) < 0 || (handed && !want_fd) ||
            (handed ? (memset(relay, 0, sizeof *relay), *relay_len = 0, 0)
                    : sockaddr_from_text(raddr, (int)rport, family, relay, relay_len)) < 0 ||
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

/* See net.h. */
int layer_connect(const char *proto, const struct sockaddr *sa, int family,
                  const struct sockaddr *src, struct sockaddr_storage *relay,
                  socklen_t *relay_len, struct sockaddr_storage *local, socklen_t *local_len,
                  int *rfd) {
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

/* The addresses a relayed socket shows: getpeername() the one the app asked for,
 * getsockname() the target-side one (none when local_len is 0). */
struct relayed_view {
    int family, type;
    const struct sockaddr *peer;
    socklen_t peer_len;
    const struct sockaddr_storage *local;
    socklen_t local_len;
};

/* Splices the relay socket `rfd` in place of `fd` (consuming rfd) and marks fd's entry `e`
 * (may be NULL) as relayed: the entry now describes the relay socket (its identity, so that
 * the fd is still recognised as this entry) and shows `view`. 0, or -1 with errno. */
static int splice_and_mark(int fd, struct ent *e, int rfd, const struct relayed_view *view) {
    if (splice_relay(fd, rfd, view->type) < 0) {
        return -1;
    }
    if (e == NULL) {
        return 0;
    }
    int saved = errno;
    struct stat st;
    if (REAL(fstat)(fd, &st) == 0) {
        e->fd_dev = st.st_dev;
        e->fd_ino = st.st_ino;
    }
    e->remote = 1;
    e->spliced = 1;
    e->family = view->family;
    e->socktype = view->type;
    socklen_t pl = view->peer_len < sizeof e->peer ? view->peer_len : sizeof e->peer;
    memcpy(&e->peer, view->peer, pl);
    e->peer_len = view->peer_len;
    if (view->local_len > 0) {
        e->local = *view->local;
    }
    e->local_len = view->local_len;
    errno = saved;
    return 0;
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
        struct relayed_view view = {AF_UNIX, SOCK_STREAM, sa, len, NULL, 0};
        *ret = splice_and_mark(fd, e, rfd, &view);
        int saved = errno;
        ent_put(e);
        DBG("connect fd %d to unix socket %s in the target: %d", fd, path, *ret);
        errno = saved;
    }
    t_guard--;
    return R_DONE;
}

/* A loopback TCP connect() to a port the app itself listens on reaches the app, as in the pod;
 * where that port was busy here, at the port really bound (getpeername() then shows the port
 * asked for). R_BYPASS when no listener of the app has the port. */
static int connect_own_listener(int fd, const struct sockaddr *sa, socklen_t len, int *ret) {
    int want = get_port(sa), have = own_listener_port(want);
    if (have <= 0) {
        return R_BYPASS;
    }
    struct sockaddr_storage to;
    socklen_t tl = len < sizeof to ? len : sizeof to;
    memcpy(&to, sa, tl);
    set_port(&to, have);
    DBG("connect fd %d to the app's own listener on port %d (bound at %d)", fd, want, have);
    *ret = REAL(connect)(fd, (struct sockaddr *)&to, tl);
    int saved = errno;
    if (have != want && (*ret == 0 || errno == EINPROGRESS)) {
        t_guard++;
        struct ent *e = sock_ent(fd); /* getpeername shows the port asked for */
        if (e != NULL) {
            e->remote = 1;
            e->socktype = SOCK_STREAM;
            memcpy(&e->peer, sa, tl);
            e->peer_len = tl;
            e->local_len = 0;
            ent_put(e);
        }
        t_guard--;
    }
    errno = saved;
    return R_DONE;
}

/* The real connect() of a socket the outgoing filter keeps local; a UDP socket relayed before
 * and now connected to a local address is no longer relayed. A handed-over UDP socket lives in
 * the target's network namespace: a fresh socket of this machine takes its place first. */
static int connect_local(int fd, const struct sockaddr *sa, socklen_t len, int type) {
    struct ent *he = type == SOCK_DGRAM ? fd_peek(fd) : NULL;
    if (he != NULL && he->kind == K_SOCK && he->handed) {
        int fresh = REAL(socket)(sock_family(fd), SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fresh < 0 || splice_relay(fd, fresh, SOCK_DGRAM) < 0) {
            return -1;
        }
        struct ent *e = ent_get(fd);
        struct stat st;
        if (e != NULL && REAL(fstat)(fd, &st) == 0) {
            e->fd_dev = st.st_dev; /* the fresh socket's identity: still this entry */
            e->fd_ino = st.st_ino;
        }
        if (e != NULL) {
            e->handed = 0;
            e->spliced = 0;
        }
        ent_put(e);
    }
    int rc = REAL(connect)(fd, sa, len);
    struct ent *le = rc == 0 && type == SOCK_DGRAM ? fd_peek(fd) : NULL;
    if (le != NULL && le->kind == K_SOCK) {
        struct ent *e = ent_get(fd);
        t_guard++;
        udp_forget_relays(e);
        t_guard--;
        ent_put(e);
    }
    return rc;
}

/* connect() again on a stream already relayed (polling a non-blocking connect, as some
 * programs do): the kernel's answers for a connection that completed (0 once, then EISCONN),
 * and no second connection is opened in the target. R_BYPASS for any other socket. */
static int connect_again(int fd, int type, int *ret) {
    struct ent *pe = fd_peek(fd);
    if (pe == NULL || pe->kind != K_SOCK) {
        return R_BYPASS;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL || !e->remote || !e->spliced || type != SOCK_STREAM) {
        ent_put(e);
        return R_BYPASS;
    }
    int was = e->connecting;
    e->connecting = 0;
    ent_put(e);
    if (was) {
        *ret = 0;
    } else {
        errno = EISCONN;
        *ret = -1;
    }
    return R_DONE;
}

/* A TCP or UDP connect() the outgoing filter sends remote: LayerConnect, then the relay
 * spliced in. Called under t_guard. */
static int connect_remote(int fd, const struct sockaddr *sa, socklen_t len, int type) {
    struct sockaddr_storage relay, local;
    socklen_t relay_len, local_len;
    int family = sock_family(fd);
    int rfd;
    int rc = layer_connect(type == SOCK_STREAM ? "tcp" : "udp", sa, family, NULL, &relay,
                           &relay_len, &local, &local_len, &rfd);
    if (rc < 0) {
        if (errno == ECONNREFUSED && type == SOCK_STREAM &&
            (family == AF_INET || family == AF_INET6) && (REAL(fcntl)(fd, F_GETFL) & O_NONBLOCK)) {
            return refuse_in_progress(fd, family);
        }
        return rc;
    }
    int nonblocking = (REAL(fcntl)(fd, F_GETFL) & O_NONBLOCK) != 0;
    struct ent *e = sock_ent(fd);
    udp_forget_relays(e);
    struct relayed_view view = {family, type, sa, len, &local, local_len};
    rc = splice_and_mark(fd, e, rfd, &view);
    int saved = errno;
    if (rc == 0 && e != NULL) {
        e->nmaps = 0;
        e->maps[0].relay = relay;
        e->maps[0].relay_len = relay_len;
        e->handed = relay_len == 0; /* the agent's own socket: no relay to name */
        e->connecting = type == SOCK_STREAM && nonblocking;
        DBG("connect fd %d remotely through the daemon", fd);
    }
    ent_put(e);
    if (rc == 0 && type == SOCK_STREAM && nonblocking) {
        /* the connection exists already, but a non-blocking connect() answers "in progress"
         * and the app waits for writability, as it does with any socket */
        rc = -1;
        saved = EINPROGRESS;
    }
    errno = saved;
    return rc;
}

HOOK int connect(int fd, const struct sockaddr *sa, socklen_t len) {
    int ret;
    if (g_active && !t_guard && sa != NULL && len > sizeof(sa_family_t) &&
        sa->sa_family == AF_UNIX) {
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
    if (type == SOCK_STREAM && is_loopback(sa) && connect_own_listener(fd, sa, len, &ret) == R_DONE) {
        return ret;
    }
    if (debugger_port(sa, len, 0) || policy_connect(sa, len, type) == P_LOCAL) {
        return connect_local(fd, sa, len, type);
    }
    if (connect_again(fd, type, &ret) == R_DONE) {
        return ret;
    }
    t_guard++;
    ret = connect_remote(fd, sa, len, type);
    t_guard--;
    return ret;
}
