/* Daemon connections of the layer: registration (LayerHello), per-thread connections,
 * request/reply with a deadline, fork and exec hand-over.
 *
 * One "process connection" registers the process (first LayerHello, with parent_pid for a
 * child); it is kept across exec (its fd number travels in MIRRORD_LAYER_FD) so the daemon
 * keeps the process's subscriptions. A thread that finds the process connection busy opens
 * its own connection (LayerHello with the same pid), so remote calls from several threads
 * run in parallel. Every wait is bounded by the config's timeout; a daemon that is gone or
 * misbehaves makes the call fail with EIO and the connection is dropped.
 */
#include "layer.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

struct lconn {
    int fd;
    int rfd; /* a socket the daemon passed with the last reply (SCM_RIGHTS), or -1 */
    int kind; /* the kind of the last reply conn_call accepted */
    unsigned gen;
    uint64_t rid;
    cbor_w w;
    const uint8_t *ext; /* conn_bytes_ref: these ext_len bytes go after w.buf[0..ext_at) */
    size_t ext_len, ext_at;
    uint8_t *rbuf;
    size_t rcap;
};

static struct lconn g_proc = {.fd = -1, .rfd = -1};
#define MAX_CONNS 1024
static struct lconn *g_conns[MAX_CONNS]; /* every open connection, for relocation */
static pthread_mutex_t g_conns_lock = PTHREAD_MUTEX_INITIALIZER;

static void conns_add(struct lconn *c) {
    pthread_mutex_lock(&g_conns_lock);
    for (int i = 0; i < MAX_CONNS; i++) {
        if (g_conns[i] == NULL || g_conns[i] == c) {
            g_conns[i] = c;
            break;
        }
    }
    pthread_mutex_unlock(&g_conns_lock);
}

static void conns_remove(struct lconn *c) {
    pthread_mutex_lock(&g_conns_lock);
    for (int i = 0; i < MAX_CONNS; i++) {
        if (g_conns[i] == c) {
            g_conns[i] = NULL;
        }
    }
    pthread_mutex_unlock(&g_conns_lock);
}

/* The app dup2()s onto one of our fds: move our connection to another number first. */
int layer_fd_relocate(int fd) {
    int moved = -1;
    pthread_mutex_lock(&g_conns_lock);
    for (int i = 0; i < MAX_CONNS; i++) {
        struct lconn *c = g_conns[i];
        if (c != NULL && c->fd == fd) {
            int nfd = REAL(fcntl)(fd, F_DUPFD_CLOEXEC, fd + 1);
            if (nfd >= 0) {
                nfd = layer_fd_protect(nfd);
                c->fd = nfd;
                moved = nfd;
            }
            break;
        }
    }
    pthread_mutex_unlock(&g_conns_lock);
    if (moved >= 0) {
        layer_fd_release(fd);
    }
    return moved;
}
static pthread_mutex_t g_proc_use = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_reg_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned g_gen = 1;
static pid_t g_parent; /* announced by the next registration (fork / spawn child) */
static pid_t g_fork_parent;
static pid_t g_announced; /* the parent this process registered with */
static int g_layer_fd_max = -1;
static LAYER_TLS struct lconn *t_conn;
static pthread_key_t g_key;
static struct sockaddr_un g_addr;
static char g_session[256];
static char g_exe[1024];

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void conn_drop(struct lconn *c) {
    conns_remove(c);
    if (c->rfd >= 0) {
        REAL(close)(c->rfd);
        c->rfd = -1;
    }
    if (c->fd >= 0) {
        layer_fd_release(c->fd);
        c->fd = -1;
    }
}

static int send_all(int fd, const uint8_t *p, size_t n, long long deadline) {
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            long long left = deadline - now_ms();
            if (left <= 0) {
                return -1;
            }
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, (int)left) < 0 && errno != EINTR) {
                return -1;
            }
            continue;
        }
        return -1;
    }
    return 0;
}

/* A socket passed with the bytes just read: kept for the caller (conn_take_fd); any other
 * is closed, so nothing the daemon sends can leak fds into the app. */
static void keep_passed_fds(struct lconn *c, struct msghdr *mh) {
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm != NULL; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) {
            continue;
        }
        size_t nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfds; i++) {
            int pfd;
            memcpy(&pfd, CMSG_DATA(cm) + i * sizeof(int), sizeof pfd);
            if (c->rfd < 0) {
                c->rfd = pfd;
            } else {
                REAL(close)(pfd);
            }
        }
    }
}

static int recv_all(struct lconn *c, uint8_t *p, size_t n, long long deadline) {
    int fd = c->fd;
    while (n > 0) {
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(4 * sizeof(int))];
        } ctl;
        struct iovec iov = {.iov_base = p, .iov_len = n};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                            .msg_controllen = sizeof ctl.buf};
        ssize_t k = REAL(recvmsg)(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (k >= 0 && mh.msg_controllen > 0) {
            keep_passed_fds(c, &mh);
        }
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            continue;
        }
        if (k == 0) {
            return -1; /* the daemon closed the connection */
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            long long left = deadline - now_ms();
            if (left <= 0) {
                return -1;
            }
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            if (poll(&pfd, 1, (int)left) < 0 && errno != EINTR) {
                return -1;
            }
            continue;
        }
        return -1;
    }
    return 0;
}

/* The frame conn_bytes_ref split in three: w.buf up to ext_at, the caller's bytes, the rest of
 * w.buf; one sendmsg per try, then what is left, as send_all does. */
static int send_parts(struct lconn *c, long long deadline) {
    struct iovec iov[3] = {
        {.iov_base = c->w.buf, .iov_len = c->ext_at},
        {.iov_base = (void *)c->ext, .iov_len = c->ext_len},
        {.iov_base = c->w.buf + c->ext_at, .iov_len = c->w.len - c->ext_at},
    };
    int first = 0;
    while (first < 3) {
        struct msghdr mh = {.msg_iov = iov + first, .msg_iovlen = (size_t)(3 - first)};
        ssize_t k = REAL(sendmsg)(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            long long left = deadline - now_ms();
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
            if (left <= 0 || (poll(&pfd, 1, (int)left) < 0 && errno != EINTR)) {
                return -1;
            }
            continue;
        }
        if (k < 0) {
            return -1;
        }
        size_t done = (size_t)k;
        while (first < 3 && done >= iov[first].iov_len) {
            done -= iov[first].iov_len; /* this part went out whole (or was empty) */
            first++;
        }
        if (first < 3) {
            iov[first].iov_base = (char *)iov[first].iov_base + done;
            iov[first].iov_len -= done;
        }
    }
    return 0;
}

static int send_frame(struct lconn *c, long long deadline) {
    size_t ext = c->ext != NULL ? c->ext_len : 0;
    if (c->w.err || c->w.len - 4 + ext > MAX_FRAME) {
        return -1;
    }
    uint32_t n = (uint32_t)(c->w.len - 4 + ext);
    c->w.buf[0] = (uint8_t)(n >> 24);
    c->w.buf[1] = (uint8_t)(n >> 16);
    c->w.buf[2] = (uint8_t)(n >> 8);
    c->w.buf[3] = (uint8_t)n;
    if (c->ext == NULL) {
        return send_all(c->fd, c->w.buf, c->w.len, deadline);
    }
    int rc = send_parts(c, deadline);
    c->ext = NULL;
    return rc;
}

static int rbuf_reserve(struct lconn *c, size_t n) {
    if (c->rcap < n) {
        uint8_t *b = realloc(c->rbuf, n);
        if (b == NULL) {
            return -1;
        }
        c->rbuf = b;
        c->rcap = n;
    }
    return 0;
}

/* A FileData reply at least this big may be received straight into its destination. */
#define DIRECT_MIN (64 * 1024)
#define DIRECT_HEAD 32 /* its head: array, kind, request id, the bytes' head (at most 28) */

/* The first DIRECT_HEAD bytes of a large frame (already in rbuf) are a FileData reply whose
 * bytes run to the frame's end and `into` has room for them: receive them there. 1: done (r
 * covers the head only), 0: not such a frame (nothing more read), -1: broken. */
static int recv_direct(struct lconn *c, cbor_r *r, size_t n, struct conn_into *into,
                       long long deadline) {
    cbor_r t;
    uint64_t items, kind, rid, len;
    cr_init(&t, c->rbuf, DIRECT_HEAD);
    if (cr_array(&t, &items) < 0 || items != 3 || cr_uint(&t, &kind) < 0 || kind != M_FILE_DATA ||
        cr_uint(&t, &rid) < 0 || cr_bytes_head(&t, &len) < 0) {
        return 0;
    }
    size_t off = (size_t)(t.p - c->rbuf);
    if (off + len != n) {
        return 0;
    }
    char *dst = into->dst(into->ctx, rid, (size_t)len);
    if (dst == NULL) {
        return 0;
    }
    size_t already = DIRECT_HEAD - off;
    memcpy(dst, c->rbuf + off, already);
    if (recv_all(c, (uint8_t *)dst + already, (size_t)len - already, deadline) < 0) {
        return -1;
    }
    into->got = (ssize_t)len;
    cr_init(r, c->rbuf, off);
    return 1;
}

/* Reads one frame; r covers its payload, checked to be one well-formed CBOR item (with
 * `into`, a large FileData reply's bytes may go to into->dst instead: into->got says how many,
 * r covers the rest). */
static int recv_frame(struct lconn *c, cbor_r *r, long long deadline, struct conn_into *into) {
    uint8_t h[4];
    if (recv_all(c, h, 4, deadline) < 0) {
        return -1;
    }
    size_t n = ((size_t)h[0] << 24) | ((size_t)h[1] << 16) | ((size_t)h[2] << 8) | h[3];
    if (n == 0 || n > MAX_FRAME) {
        return -1;
    }
    size_t have = 0;
    if (into != NULL && n >= DIRECT_MIN) {
        if (rbuf_reserve(c, DIRECT_HEAD) < 0 || recv_all(c, c->rbuf, DIRECT_HEAD, deadline) < 0) {
            return -1;
        }
        int d = recv_direct(c, r, n, into, deadline);
        if (d != 0) {
            return d < 0 ? -1 : 0;
        }
        have = DIRECT_HEAD;
    }
    if (rbuf_reserve(c, n) < 0 || recv_all(c, c->rbuf + have, n - have, deadline) < 0 ||
        cbor_validate(c->rbuf, n) < 0) {
        return -1;
    }
    cr_init(r, c->rbuf, n);
    return 0;
}

/* Only our own user's daemon (or root's) hears the session id and serves remote calls: the
 * kernel records who listens on the socket (SO_PEERCRED), which a process put in its place by
 * another user cannot forge. */
static int daemon_is_ours(int fd) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        DBG("cannot tell who listens on %s (%s): not used", g_addr.sun_path, strerror(errno));
        return 0;
    }
    if (cred.uid != geteuid() && cred.uid != 0) {
        DBG("the process on %s (pid %d) runs as uid %d, not as this user (%d): not used",
            g_addr.sun_path, (int)cred.pid, (int)cred.uid, (int)geteuid());
        return 0;
    }
    return 1;
}

/* Connects and says LayerHello; the fd is protected (high, marked). -1 if unreachable. */
static int open_conn(struct lconn *c, pid_t parent) {
    int s = REAL(socket)(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        return -1;
    }
    /* bounds a connect() to a daemon whose backlog is full */
    struct timeval tv = {.tv_sec = g_set.timeout_ms / 1000,
                         .tv_usec = (g_set.timeout_ms % 1000) * 1000};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    /* a 1 MiB FileWrite in one write, not five wake-ups of the daemon (best effort: the
     * kernel caps it at net.core.wmem_max) */
    int sndbuf = 4 * 1024 * 1024;
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    if (REAL(connect)(s, (struct sockaddr *)&g_addr, sizeof g_addr) < 0) {
        DBG("cannot reach the daemon at %s: %s", g_addr.sun_path, strerror(errno));
        REAL(close)(s);
        return -1;
    }
    if (!daemon_is_ours(s)) {
        REAL(close)(s);
        errno = ECONNREFUSED;
        return -1;
    }
    s = layer_fd_protect(s);
    if (s > g_layer_fd_max) {
        g_layer_fd_max = s;
    }
    c->fd = s;
    c->gen = g_gen;
    c->rid = 0;
    conns_add(c);
    long long deadline = now_ms() + g_set.timeout_ms;
    cw_reset(&c->w);
    cw_array(&c->w, 1 + M_LAYER_HELLO_NFIELDS);
    cw_uint(&c->w, M_LAYER_HELLO);
    cw_str(&c->w, MIRRORD_BUILD_ID);
    cw_str(&c->w, g_session);
    cw_uint(&c->w, (uint64_t)getpid());
    if (parent > 0) {
        cw_uint(&c->w, (uint64_t)parent);
    } else {
        cw_null(&c->w);
    }
    cw_bytes(&c->w, g_exe, strlen(g_exe));
    cbor_r r;
    uint64_t n, kind;
    if (send_frame(c, deadline) < 0 || recv_frame(c, &r, deadline, NULL) < 0 ||
        cr_array(&r, &n) < 0 || n < 1 || cr_uint(&r, &kind) < 0 || kind != M_LAYER_WELCOME) {
        DBG("the daemon refused or broke the handshake");
        conn_drop(c);
        return -1;
    }
    DBG("connected to the daemon (fd %d, parent %d)", s, (int)parent);
    return 0;
}

static int ensure_proc(void) {
    int rc = 0;
    pthread_mutex_lock(&g_reg_lock);
    if (g_proc.fd < 0 || g_proc.gen != g_gen) {
        g_proc.fd = -1;
        if (open_conn(&g_proc, g_parent) == 0) {
            if (g_parent > 0) {
                g_announced = g_parent;
            }
            g_parent = 0;
        } else {
            rc = -1;
        }
    }
    pthread_mutex_unlock(&g_reg_lock);
    return rc;
}

pid_t conn_parent(void) { return g_parent > 0 ? g_parent : g_announced; }

int conn_registered(void) { return g_proc.fd >= 0 && g_proc.gen == g_gen; }

int conn_register_now(void) { return ensure_proc(); }

static void thread_conn_free(void *p) {
    struct lconn *c = p;
    if (c != NULL) {
        if (c->gen == g_gen) {
            conn_drop(c);
        }
        cw_free(&c->w);
        free(c->rbuf);
        free(c);
    }
}

struct lconn *conn_acquire(void) {
    struct lconn *c = t_conn;
    if (c != NULL && c->gen == g_gen && c->fd >= 0) {
        return c;
    }
    if (c != NULL) {
        /* inherited through fork (its fd was closed in the child) or dropped */
        if (c->gen == g_gen) {
            conn_drop(c);
        }
        cw_free(&c->w);
        free(c->rbuf);
        free(c);
        t_conn = NULL;
        pthread_setspecific(g_key, NULL);
    }
    if (ensure_proc() < 0) {
        errno = EIO;
        return NULL;
    }
    if (pthread_mutex_trylock(&g_proc_use) == 0) {
        if (g_proc.fd >= 0) {
            return &g_proc;
        }
        pthread_mutex_unlock(&g_proc_use);
    }
    c = calloc(1, sizeof *c);
    if (c == NULL) {
        errno = EIO;
        return NULL;
    }
    c->fd = -1;
    c->rfd = -1;
    if (open_conn(c, 0) < 0) {
        free(c);
        errno = EIO;
        return NULL;
    }
    t_conn = c;
    pthread_setspecific(g_key, c);
    return c;
}

/* A connection of the caller's own, beside the process's and the threads': its requests'
 * replies may be read later (the write-behind's write-backs), which on a shared connection
 * would stand in the way of every other call. NULL with errno EIO. */
struct lconn *conn_open_own(void) {
    if (ensure_proc() < 0) {
        errno = EIO;
        return NULL;
    }
    struct lconn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        errno = EIO;
        return NULL;
    }
    c->fd = -1;
    c->rfd = -1;
    if (open_conn(c, 0) < 0) {
        free(c);
        errno = EIO;
        return NULL;
    }
    return c;
}

/* Something waits to be read on c (a reply, or its end): 1, else 0. Does not block. */
int conn_pending(struct lconn *c) {
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    return c->fd >= 0 && poll(&p, 1, 0) > 0;
}

/* Closes and frees a conn_open_own connection; in a fork child (`inherited`) only frees it:
 * its fd was the parent's and is gone already (conn_after_fork_child). */
void conn_close_own(struct lconn *c, int inherited) {
    if (c == NULL) {
        return;
    }
    if (!inherited && c->gen == g_gen) {
        conn_drop(c);
    }
    cw_free(&c->w);
    free(c->rbuf);
    free(c);
}

void conn_release(struct lconn *c) {
    if (c == &g_proc) {
        pthread_mutex_unlock(&g_proc_use);
    }
}

void conn_bytes_ref(struct lconn *c, const void *p, size_t n) {
    cw_bytes_head(&c->w, n);
    c->ext = p;
    c->ext_len = n;
    c->ext_at = c->w.len;
}

cbor_w *(conn_begin)(struct lconn *c, int kind, size_t nfields) {
    c->ext = NULL;
    cw_reset(&c->w);
    cw_array(&c->w, 2 + nfields);
    cw_uint(&c->w, (uint64_t)kind);
    cw_uint(&c->w, ++c->rid);
    return &c->w;
}

static int conn_broken(struct lconn *c, const char *what) {
    DBG("daemon connection broken (%s): remote calls fail with EIO", what);
    if (c == &g_proc) {
        pthread_mutex_lock(&g_reg_lock);
        conn_drop(c);
        pthread_mutex_unlock(&g_reg_lock);
    } else {
        conn_drop(c);
    }
    errno = EIO;
    return -1;
}

static void drop_passed_fd(struct lconn *c) {
    if (c->rfd >= 0) {
        REAL(close)(c->rfd);
        c->rfd = -1;
    }
}

int conn_reply_kind(const struct lconn *c) { return c->kind; }

int conn_take_fd(struct lconn *c) {
    int fd = c->rfd;
    c->rfd = -1;
    return fd;
}

/* The next reply on c (pings answered on the way): 0 with *rid and r after the request id
 * (kind `expect`), 1 for an ErrorReply (errno set to the agent's), -1 when the connection
 * broke (dropped, errno EIO). */
static int next_reply(struct lconn *c, int expect, uint64_t *rid, cbor_r *r, long long deadline,
                      struct conn_into *into) {
    for (int spins = 0; spins < 64; spins++) {
        uint64_t n, kind;
        if (recv_frame(c, r, deadline, into) < 0) {
            return conn_broken(c, "no reply in time");
        }
        if (cr_array(r, &n) < 0 || n < 2 || cr_uint(r, &kind) < 0) {
            return conn_broken(c, "malformed frame");
        }
        if (kind == M_PING) {
            uint64_t nonce;
            if (cr_uint(r, &nonce) < 0) {
                return conn_broken(c, "malformed ping");
            }
            cw_reset(&c->w);
            cw_array(&c->w, 1 + M_PONG_NFIELDS);
            cw_uint(&c->w, M_PONG);
            cw_uint(&c->w, nonce);
            if (send_frame(c, deadline) < 0) {
                return conn_broken(c, "send pong");
            }
            continue;
        }
        if (kind == M_FATAL) {
            return conn_broken(c, "fatal from the daemon");
        }
        if (cr_uint(r, rid) < 0) {
            return conn_broken(c, "malformed reply");
        }
        if (kind == M_ERROR) {
            int64_t e;
            if (n < 3 || cr_int(r, &e) < 0) {
                return conn_broken(c, "malformed error");
            }
            /* negative: getaddrinfo's EAI_* code of a DnsLookup, passed on as it is */
            errno = (e > 0 && e < 4096) || (e < 0 && e > -256) ? (int)e : EIO;
            return 1;
        }
        /* FileFetch may be answered by FileHanded: the agent's own open file came along */
        if ((int)kind != expect && !(expect == M_FILE_FETCHED && kind == M_FILE_HANDED)) {
            return conn_broken(c, "unexpected reply kind");
        }
        c->kind = (int)kind;
        return 0;
    }
    return conn_broken(c, "too many pings");
}

/* Sends the request conn_begin built: 0, or -1 (errno EIO, the connection dropped). */
static int send_request(struct lconn *c, long long deadline) {
    drop_passed_fd(c); /* one the previous caller did not take */
    if (c->fd < 0) {
        errno = EIO;
        return -1;
    }
    if (c->w.err) {
        errno = ENOMEM;
        return -1;
    }
    if (send_frame(c, deadline) < 0) {
        return conn_broken(c, "send");
    }
    return 0;
}

int conn_call(struct lconn *c, int expect, cbor_r *r) {
    int saved = errno; /* a successful call leaves errno as the app had it */
    long long deadline = now_ms() + g_set.timeout_ms;
    if (send_request(c, deadline) < 0) {
        return -1;
    }
    uint64_t rid;
    int rc = next_reply(c, expect, &rid, r, deadline, NULL);
    if (rc >= 0 && rid != c->rid) {
        return conn_broken(c, "reply to another request");
    }
    if (rc != 0) {
        return -1;
    }
    errno = saved;
    return 0;
}

void conn_fail(struct lconn *c, const char *why) { (void)conn_broken(c, why); }

uint64_t conn_send(struct lconn *c) {
    if (send_request(c, now_ms() + g_set.timeout_ms) < 0) {
        return 0;
    }
    return c->rid;
}

int conn_reply(struct lconn *c, int expect, uint64_t *rid, cbor_r *r) {
    return next_reply(c, expect, rid, r, now_ms() + g_set.timeout_ms, NULL);
}

int conn_reply_into(struct lconn *c, uint64_t *rid, cbor_r *r, struct conn_into *into) {
    into->got = -1;
    return next_reply(c, M_FILE_DATA, rid, r, now_ms() + g_set.timeout_ms, into);
}

/* ---------------------------------------------------------------- fork and exec */

static void atfork_prepare(void) { g_fork_parent = getpid(); }

/* In the child: every inherited daemon connection belongs to the parent; close them
 * (without a word on the wire) and register again, naming the parent, when needed. */
static void atfork_child(void) { conn_after_fork_child(g_fork_parent); }

void conn_after_fork_child(pid_t parent) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    g_proc_use = fresh;
    g_reg_lock = fresh;
    g_fd_lock = fresh;
    g_conns_lock = fresh;
    memset(g_conns, 0, sizeof g_conns);
    files_after_fork_child();
    net_after_fork_child();
    policy_after_fork_child();
    int was = g_proc.fd >= 0;
    g_gen++;
    g_proc.fd = -1;
    for (int fd = 0; fd <= g_layer_fd_max && fd < MAX_FDS; fd++) {
        if (g_fd[fd] != NULL && g_fd[fd]->kind == K_LAYER) {
            layer_fd_release(fd);
        }
    }
    (void)was;
    g_parent = parent;
    g_announced = 0;
    proc_fork_child();
}

void conn_prepare_exec(int *fd, pid_t *pid) {
    *fd = -1;
    *pid = getpid();
    if (conn_registered()) {
        if (REAL(fcntl)(g_proc.fd, F_SETFD, 0) == 0) {
            *fd = g_proc.fd;
        }
    }
}

void conn_exec_failed(void) {
    if (conn_registered()) {
        REAL(fcntl)(g_proc.fd, F_SETFD, FD_CLOEXEC);
    }
}

/* An fd handed over through exec must really be our connection to this daemon. */
static int adopt_fd(int fd) {
    struct stat st;
    struct sockaddr_un peer;
    socklen_t len = sizeof peer;
    if (fd < 0 || REAL(fstat)(fd, &st) < 0 || !S_ISSOCK(st.st_mode) ||
        REAL(getpeername)(fd, (struct sockaddr *)&peer, &len) < 0 || peer.sun_family != AF_UNIX ||
        strncmp(peer.sun_path, g_addr.sun_path, sizeof peer.sun_path) != 0 ||
        !daemon_is_ours(fd)) {
        return -1;
    }
    REAL(fcntl)(fd, F_SETFD, FD_CLOEXEC);
    g_proc.fd = layer_fd_protect(fd);
    if (g_proc.fd > g_layer_fd_max) {
        g_layer_fd_max = g_proc.fd;
    }
    g_proc.gen = g_gen;
    g_proc.rid = 1000000;
    conns_add(&g_proc); /* request ids only need to differ from the old image's pending */
    return 0;
}

void conn_init(void) {
    const char *sock = getenv("MIRRORD_LAYER_SOCKET");
    const char *session = getenv("MIRRORD_SESSION");
    g_addr.sun_family = AF_UNIX;
    snprintf(g_addr.sun_path, sizeof g_addr.sun_path, "%s", sock);
    snprintf(g_session, sizeof g_session, "%s", session);
    ssize_t n = readlink("/proc/self/exe", g_exe, sizeof g_exe - 1);
    g_exe[n > 0 ? n : 0] = 0;
    pthread_key_create(&g_key, thread_conn_free);
    pthread_atfork(atfork_prepare, NULL, atfork_child);
    cw_init(&g_proc.w);

    pid_t me = getpid();
    const char *fdv = getenv("MIRRORD_LAYER_FD");
    if (fdv != NULL) {
        int fd = -1;
        int pid = 0;
        if (sscanf(fdv, "%d:%d", &fd, &pid) == 2 && pid == me && adopt_fd(fd) == 0) {
            DBG("kept the daemon connection across exec (fd %d)", g_proc.fd);
            return;
        }
    }
    const char *pv = getenv("MIRRORD_LAYER_PARENT");
    if (pv != NULL) {
        long p = strtol(pv, NULL, 10);
        if (p > 0 && p != me) {
            g_parent = (pid_t)p;
        }
    }
    if (ensure_proc() < 0) {
        DBG("no daemon: remote calls will fail with EIO / ECONNREFUSED");
    }
}
