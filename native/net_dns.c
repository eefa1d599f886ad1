/* Name resolution: getaddrinfo()/gethostbyname*() through DnsLookup, gethostname() through
 * HostnameRequest.
 *
 * Owns: the addrinfo chains it builds (freeaddrinfo() recognises them) and the hostent
 * buffers. Does not own: deciding which names resolve remotely (policy_dns, policy.c); the
 * names resolved are remembered for the outgoing filter (policy_remember_name).
 */
#include "net.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

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

/* One getaddrinfo() question, as the hints and the service gave it. */
struct dns_query {
    const char *host;
    int family, socktype, protocol, flags;
    int stmask; /* ST_STREAM/ST_DGRAM: the socket types a named service exists for; 0: any */
};

/* The entry of a DnsReply ([family, socktype, protocol, address, port]) at r appended to the
 * chain at *tail, unless the query's hints exclude it. 0 (appended or skipped), or an EAI_*. */
static int dns_entry(cbor_r *r, const struct dns_query *q, struct addrinfo ***tail) {
    uint64_t k, fam, st, pr, p;
    char addr[64];
    if (cr_array(r, &k) < 0 || k != 5 || cr_uint(r, &fam) < 0 || cr_uint(r, &st) < 0 ||
        cr_uint(r, &pr) < 0 || cr_strbuf(r, addr, sizeof addr) < 0 || cr_uint(r, &p) < 0 ||
        p > 65535) {
        return EAI_FAIL;
    }
    if ((q->family != AF_UNSPEC && (int)fam != q->family) ||
        (q->socktype && st && (int)st != q->socktype)) {
        return 0;
    }
    if (q->stmask && !((st == SOCK_STREAM && (q->stmask & ST_STREAM)) ||
                       (st == SOCK_DGRAM && (q->stmask & ST_DGRAM)))) {
        return 0;
    }
    struct ai_node *node = calloc(1, sizeof *node);
    socklen_t alen;
    if (node == NULL) {
        return EAI_MEMORY;
    }
    if (sockaddr_from_text(addr, (int)p, (int)fam, &node->ss, &alen) < 0) {
        free(node);
        return 0;
    }
    node->ai.ai_family = node->ss.ss_family;
    node->ai.ai_socktype = st ? (int)st : q->socktype;
    node->ai.ai_protocol = pr ? (int)pr : q->protocol;
    node->ai.ai_addr = (struct sockaddr *)&node->ss;
    node->ai.ai_addrlen = alen;
    node->ai.ai_flags = q->flags;
    **tail = &node->ai;
    *tail = &node->ai.ai_next;
    policy_remember_name(node->ai.ai_addr, q->host);
    return 0;
}

/* The addrinfo chain of a DnsReply at r (its entries, then the canonical name when asked
 * for) into *head. 0, or an EAI_* with what was built so far in *head. */
static int dns_chain(cbor_r *r, const struct dns_query *q, struct addrinfo **head) {
    uint64_t n;
    struct addrinfo **tail = head;
    *head = NULL;
    if (cr_array(r, &n) < 0) {
        return EAI_FAIL;
    }
    for (uint64_t i = 0; i < n; i++) {
        int rc = dns_entry(r, q, &tail);
        if (rc != 0) {
            return rc;
        }
    }
    if (*head != NULL && (q->flags & AI_CANONNAME)) {
        const char *cn;
        size_t cl;
        if (cr_peek(r) == CBOR_TEXT && cr_text(r, &cn, &cl) == 0 && cl > 0) {
            (*head)->ai_canonname = strndup(cn, cl);
        } else {
            (*head)->ai_canonname = strdup(q->host);
        }
    }
    return *head == NULL ? EAI_NONAME : 0;
}

/* Records a chain as ours, for freeaddrinfo. 0, or EAI_MEMORY (the chain is freed). */
static int ai_own(struct addrinfo *head) {
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
    return 0;
}

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
    struct dns_query q = {host, family, socktype, protocol, flags, stmask};
    struct addrinfo *head;
    int rc = dns_chain(&r, &q, &head);
    conn_release(c);
    if (rc != 0) {
        free_chain(head);
        return rc;
    }
    rc = ai_own(head);
    if (rc == 0) {
        *res = head;
    }
    return rc;
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
    if (!g_active || t_guard || node == NULL) {
        return REAL(getaddrinfo)(node, service, hints, res);
    }
    if (!g_set.ipv6 && strcmp(node, "::") == 0) {
        /* IPv6 off (feature.network.ipv6): "all interfaces" is IPv4's (a gRPC server's
         * `[::]:PORT`), as no IPv6 socket can be made */
        struct addrinfo v4 = {.ai_family = AF_INET};
        if (hints != NULL) {
            v4.ai_flags = hints->ai_flags;
            v4.ai_socktype = hints->ai_socktype;
            v4.ai_protocol = hints->ai_protocol;
        }
        return REAL(getaddrinfo)("0.0.0.0", service, &v4, res);
    }
    if (hints && (hints->ai_flags & AI_NUMERICHOST)) {
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

/* The fortified gethostname (_FORTIFY_SOURCE): glibc's calls its internal one (the local
 * hostname). The length check, then the hook. */
int __gethostname_chk(char *name, size_t len, size_t buflen);
HOOK int __gethostname_chk(char *name, size_t len, size_t buflen) {
    if (len > buflen) {
        __chk_fail();
    }
    return gethostname(name, len);
}
