/* Incoming: bind(), listen() and accept() of the app's listeners.
 *
 * bind() records the requested address (binding port 0 instead when the port is busy on the
 * user's machine), listen() subscribes the target's port with LayerListen, accept() and
 * getpeername() on its connections report the real remote peer (PeerLookup). Listening
 * sockets survive exec (MIRRORD_LAYER_LISTENERS). Every listener of the app is remembered, so
 * that a loopback connect() to its port stays local (own_listener_port, for net_connect.c).
 *
 * Owns: subscriptions made by listen(). Does not own: ending them (the entry's last close,
 * preload.c), the daemon side of incoming traffic.
 */
#include "net.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Listening sockets of this process are at or below this fd (see own_listener_port). */
static int g_listen_fd_max = -1;

/* See net.h. */
int own_listener_port(int port) {
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

static void note_listener_fd(int fd) {
    if (fd > g_listen_fd_max) {
        g_listen_fd_max = fd;
    }
}

/* A listener not bound through our bind() (a port nobody subscribes): remembered all the
 * same, so that a connect() of the app to its own port stays local. */
static void remember_listener(int fd) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (REAL(getsockname)(fd, (struct sockaddr *)&ss, &sl) < 0 ||
        (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
        return;
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
    note_listener_fd(fd);
}

/* The address fd is really bound to, as the daemon connects to it: an unspecified address
 * becomes loopback. 0, or -1. */
static int bound_address(int fd, char *host, size_t cap, int *port) {
    struct sockaddr_storage real;
    socklen_t rl = sizeof real;
    if (REAL(getsockname)(fd, (struct sockaddr *)&real, &rl) < 0 ||
        sockaddr_to_text((struct sockaddr *)&real, host, cap, port) < 0) {
        return -1;
    }
    if (strcmp(host, "0.0.0.0") == 0) {
        strcpy(host, "127.0.0.1");
    } else if (strcmp(host, "::") == 0) {
        strcpy(host, "::1");
    }
    return 0;
}

/* LayerListen for the listener fd (entry e) on the target's port rport. Failing leaves the
 * app serving locally; the session reports the failure. errno is kept. */
static void subscribe(int fd, struct ent *e, int rport, int backlog) {
    char host[INET6_ADDRSTRLEN];
    int bport;
    if (bound_address(fd, host, sizeof host, &bport) < 0) {
        return;
    }
    struct lconn *c = conn_acquire();
    if (c == NULL) {
        return;
    }
    cbor_w *w = conn_begin(c, M_LAYER_LISTEN, 3);
    cw_uint(w, (uint64_t)rport);
    cw_str(w, host);
    cw_uint(w, (uint64_t)bport);
    cbor_r r;
    int saved = errno;
    if (conn_call(c, M_OK, &r) == 0) {
        /* The daemon opens the connections of a burst of flows at once and each accept()
         * here costs a PeerLookup round trip: with Python's default backlog of 5 the accept
         * queue overflows, the kernel answers with SYN cookies and then resets the daemon's
         * connections once they carry data (mirrored requests were lost that way). Listening
         * again only deepens the queue (the kernel caps it at net.core.somaxconn). */
        if (backlog < SUBSCRIBED_BACKLOG) {
            REAL(listen)(fd, SUBSCRIBED_BACKLOG);
        }
        e->subscribed = 1;
        e->sub_port = rport;
        e->sub_owner = getpid();
        __atomic_fetch_add(&g_nhandles, 1, __ATOMIC_RELAXED);
        DBG("daemon subscribed port %d (listening on %s:%d)", rport, host, bport);
    } else {
        DBG("subscribing port %d failed: %s", rport, strerror(errno));
    }
    errno = saved;
    conn_release(c);
}

HOOK int listen(int fd, int backlog) {
    int rc = REAL(listen)(fd, backlog);
    struct ent *pe = fd_peek(fd);
    if (rc < 0 || !g_active || t_guard || (pe != NULL && pe->kind != K_SOCK)) {
        return rc;
    }
    if (pe == NULL) {
        remember_listener(fd);
        return rc;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return rc;
    }
    e->listening = 1;
    note_listener_fd(fd);
    int rport = e->bound && !e->subscribed &&
                        !debugger_port((struct sockaddr *)&e->req, e->req_len, 1)
                    ? policy_listen_port(get_port((struct sockaddr *)&e->req))
                    : -1;
    if (rport >= 0 && !(g_set.incoming_ignore_localhost && is_loopback((struct sockaddr *)&e->req))) {
        t_guard++;
        subscribe(fd, e, rport, backlog);
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
