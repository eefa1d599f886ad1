/* Socket entries and addresses: what every socket hook shares (see net.h for the files).
 *
 * Owns: addresses as text and back, ports, the K_SOCK entry of a socket, the socket() hook
 * (a reused fd number forgets its stale entry) and getpeername()/getsockname(), which show
 * the target's view of a relayed connection and the address the app asked for of a listener.
 * Does not own: deciding or making connections (net_connect.c, net_udp.c, net_listen.c).
 */
#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

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

int sock_type(int fd) {
    int type = 0;
    socklen_t tl = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0) {
        return -1;
    }
    return type;
}

int sock_family(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (REAL(getsockname)(fd, (struct sockaddr *)&ss, &len) < 0) {
        return -1;
    }
    return ss.ss_family;
}

void copy_addr_out(const struct sockaddr_storage *ss, socklen_t len, struct sockaddr *out,
                          socklen_t *outlen) {
    if (out == NULL || outlen == NULL) {
        return;
    }
    memcpy(out, ss, len < *outlen ? len : *outlen);
    *outlen = len;
}

struct ent *sock_ent(int fd) {
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


void set_port(struct sockaddr_storage *ss, int port) {
    if (ss->ss_family == AF_INET) {
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    } else {
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    }
}

int get_port(const struct sockaddr *sa) {
    return sa->sa_family == AF_INET ? ntohs(((const struct sockaddr_in *)(const void *)sa)->sin_port)
                                    : ntohs(((const struct sockaddr_in6 *)(const void *)sa)->sin6_port);
}

int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
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

HOOK int socket(int domain, int type, int protocol) {
    if (domain == AF_INET6 && !g_set.ipv6 && g_active && !t_guard) {
        errno = EAFNOSUPPORT; /* feature.network.ipv6 off: as on a host without IPv6 */
        return -1;
    }
    int fd = REAL(socket)(domain, type, protocol);
    if (fd >= 0 && fd_peek(fd) != NULL) {
        fd_forget(fd); /* a number closed behind our back (close_range, syscall) */
    }
    return fd;
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

