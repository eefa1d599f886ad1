/* The layer's side of the system-call supervisor's socket calls (native/supervisor/, see
 * docs/layer.md). The supervisor runs with this library preloaded, takes the program's own
 * socket with pidfd_getfd and asks these functions what to do with the call it trapped, so the
 * local/remote decision and the daemon requests are the layer's own: policy_connect,
 * debugger_port and LayerConnect (net_connect.c) for connect; the layer's listen() hook, which
 * subscribes, for listen. The file calls' counterparts are files_supervisor.c's mirrord_supervisor_*.
 *
 * `fd` is always the supervisor's descriptor of the program's socket: the same open file, so
 * binding, connecting or listening it here does it to the program's socket, and the program's
 * epoll registration of its descriptor stays valid (docs/layer.md; notes pitfall 5).
 */
#include "net.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>

static int sock_int(int fd, int opt) {
    int v = -1;
    socklen_t l = sizeof v;
    return getsockopt(fd, SOL_SOCKET, opt, &v, &l) == 0 ? v : -1;
}

/* `fd` bound (to the loopback if the program had not bound it) and its address in *src: the
 * only source the daemon's relay endpoint accepts (a wildcard address connects from the
 * loopback). 0, or -1 with errno. */
static int bind_source(int fd, int family, struct sockaddr_storage *src, socklen_t *sl) {
    char host[INET6_ADDRSTRLEN];
    int port;
    *sl = sizeof *src;
    if (REAL(getsockname)(fd, (struct sockaddr *)src, sl) == 0 &&
        sockaddr_to_text((struct sockaddr *)src, host, sizeof host, &port) == 0 && port != 0) {
        if (strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0) {
            return sockaddr_from_text(host[0] == ':' ? "::1" : "127.0.0.1", port, family, src, sl);
        }
        return 0; /* bound by the program itself */
    }
    static const char *const v4[] = {"127.0.0.1", NULL};
    static const char *const v6[] = {"::1", "::ffff:127.0.0.1", NULL}; /* no IPv6 on lo */
    for (const char *const *t = family == AF_INET6 ? v6 : v4; *t != NULL; t++) {
        if (sockaddr_from_text(*t, 0, family, src, sl) == 0 &&
            REAL(bind)(fd, (struct sockaddr *)src, *sl) == 0) {
            *sl = sizeof *src;
            return REAL(getsockname)(fd, (struct sockaddr *)src, sl);
        }
    }
    return -1;
}

/* connect(2) of `fd` to the daemon's endpoint, waited for if the socket is non-blocking (a
 * loopback handshake: immediate but for a stalled machine). 0, or -1 with errno. */
static int connect_relay(int fd, const struct sockaddr_storage *relay, socklen_t len) {
    if (REAL(connect)(fd, (const struct sockaddr *)relay, len) == 0) {
        return 0;
    }
    if (errno != EINPROGRESS) {
        return -1;
    }
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int n;
    do {
        n = poll(&p, 1, g_set.timeout_ms);
    } while (n < 0 && errno == EINTR);
    if (n != 1) {
        errno = ETIMEDOUT;
        return -1;
    }
    int err = sock_int(fd, SO_ERROR);
    if (err != 0) {
        errno = err < 0 ? EIO : err;
        return -1;
    }
    return 0;
}

/* connect() trapped by the supervisor: 0 = local (the call goes on as it is); 1 = `fd` is now
 * connected through the daemon to `sa` in the target (the call's answer is 0; *local is the
 * target-side address getsockname must show, *local_len 0 if unknown); -1 = fail the call
 * with errno (the target's ECONNREFUSED..., EISCONN for a socket connected already). */
HOOK int mirrord_supervisor_connect(int fd, const struct sockaddr *sa, socklen_t len,
                                    struct sockaddr_storage *local, socklen_t *local_len) {
    *local_len = 0;
    if (!g_active || sa == NULL || len < sizeof(sa_family_t) ||
        (sa->sa_family != AF_INET && sa->sa_family != AF_INET6)) {
        return 0;
    }
    int type = sock_int(fd, SO_TYPE), family = sock_int(fd, SO_DOMAIN);
    if ((type != SOCK_STREAM && type != SOCK_DGRAM) || debugger_port(sa, len, 0) ||
        policy_connect(sa, len, type) == P_LOCAL) {
        return 0;
    }
    struct sockaddr_storage peer;
    socklen_t pl = sizeof peer;
    if (type == SOCK_STREAM && REAL(getpeername)(fd, (struct sockaddr *)&peer, &pl) == 0) {
        errno = EISCONN; /* what the kernel says to a second connect of a stream */
        return -1;
    }
    t_guard++;
    struct sockaddr_storage src, relay;
    socklen_t src_len, relay_len = 0;
    int rfd = -1;
    int rc = bind_source(fd, family, &src, &src_len);
    if (rc == 0) { /* with a source: the daemon passes nothing, its endpoint takes only that */
        rc = layer_connect(type == SOCK_STREAM ? "tcp" : "udp", sa, family,
                           (struct sockaddr *)&src, &relay, &relay_len, local, local_len, &rfd);
    }
    if (rc == 0) {
        rc = connect_relay(fd, &relay, relay_len);
    }
    DBG("supervisor: connect of fd %d through the daemon: %d", fd, rc);
    t_guard--;
    return rc == 0 ? 1 : -1;
}

/* bind() trapped by the supervisor, done here by the layer's own bind() (a port it may
 * subscribe is bound elsewhere when busy on this machine, as for a libc program): 1 = bound,
 * and the layer would subscribe the address asked for at listen() (the supervisor remembers it:
 * getsockname shows it, mirrord_supervisor_listen gets it back); 2 = bound, nothing to
 * remember; -1 = fail with errno. The supervisor closes `fd` afterwards (the layer forgets
 * it). */
HOOK int mirrord_supervisor_bind(int fd, const struct sockaddr *sa, socklen_t len) {
    if (bind(fd, sa, len) != 0) {
        return -1;
    }
    struct ent *e = ent_get(fd);
    int recorded = e != NULL && e->kind == K_SOCK && e->bound;
    ent_put(e);
    return recorded ? 1 : 2;
}

/* listen() trapped by the supervisor, `req` the address its bind asked for (NULL: the one it
 * is bound to): 0 = local (the call goes on); 1 = `fd` listens, and the layer subscribed its
 * port as for its own listen() (mirror or steal by the session's settings), answer 0: the
 * supervisor keeps `fd` open while the program runs (the layer's entry for it holds the
 * subscription); 2 = `fd` listens, nothing subscribed (the layer forgot it), answer 0; -1 =
 * fail with errno. */
HOOK int mirrord_supervisor_listen(int fd, int backlog, const struct sockaddr *req,
                                   socklen_t req_len) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (!g_active || g_set.incoming == IN_OFF || sock_int(fd, SO_TYPE) != SOCK_STREAM ||
        REAL(getsockname)(fd, (struct sockaddr *)&ss, &sl) < 0 ||
        (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
        return 0;
    }
    if (req != NULL && req_len <= sizeof ss) {
        memcpy(&ss, req, req_len);
        sl = req_len;
    }
    struct ent *e = ent_new(K_SOCK); /* as the layer's bind() records a socket */
    if (e == NULL) {
        return 0;
    }
    e->bound = 1;
    e->req = ss;
    e->req_len = sl;
    e->socktype = SOCK_STREAM;
    fd_set_ent(fd, e);
    if (listen(fd, backlog) != 0) { /* the layer's hook: it subscribes */
        int saved = errno;
        ent_put(fd_take(fd));
        errno = saved;
        return -1;
    }
    e = ent_get(fd);
    int subscribed = e != NULL && e->subscribed;
    ent_put(e);
    if (!subscribed) {
        ent_put(fd_take(fd));
    }
    return subscribed ? 1 : 2;
}
