/* Outgoing UDP without connect(): sendto()/sendmsg() to an address the outgoing filter sends
 * remote go through a per-destination daemon endpoint that takes datagrams from this socket's
 * address only; recvfrom()/recvmsg() show a datagram from such a relay as coming from the
 * remote address it stands for. A connected UDP socket (net_connect.c) has its relay in
 * maps[0].
 *
 * Owns: the socket's relay table (ent.maps) and ending its relays (LayerDisconnect) when the
 * socket closes or connects anew. Does not own: connect() itself (net_connect.c).
 */
#include "net.h"

#include <errno.h>
#include <netinet/in.h>
#include <string.h>

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
    if (e->remote && e->handed) {
        /* the agent's own socket lives in the target's network namespace: any remote
         * destination is reached from there directly, as the target's own socket would */
        memcpy(relay, &want, sizeof want);
        *relay_len = len < sizeof want ? len : sizeof want;
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

/* See net.h. */
void udp_forget_relays(struct ent *e) {
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

/* The fortified recvfrom (_FORTIFY_SOURCE): glibc's calls its internal one, which no hook sees
 * (a relayed datagram would come from the relay's address). */
ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags, struct sockaddr *sa,
                       socklen_t *len);
HOOK ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                            struct sockaddr *sa, socklen_t *len) {
    if (n > buflen) {
        __chk_fail();
    }
    return recvfrom(fd, buf, n, flags, sa, len);
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

