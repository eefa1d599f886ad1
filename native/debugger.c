/* Debugger ports: a debugger's own connections stay on this machine.
 *
 * An IDE starts the user app under its debugger, and the debugger talks to the IDE (or to
 * its adapter) over loopback TCP: debugpy's `--connect 127.0.0.1:P`, node's inspector on
 * 127.0.0.1:9229, a JVM's JDWP agent, dlv's `--listen`. Those connections must never go to the
 * target (its loopback has no IDE), and a debugger's listener must not subscribe the target's
 * traffic. The ports come from the process's own environment, as mirrord's IDE extensions set
 * it in the debuggee's environment:
 *   MIRRORD_IGNORE_DEBUGGER_PORTS  "P", "A-B", or a comma list of those
 *   MIRRORD_DETECT_DEBUGGER_PORT   debugpy | pydevd | javaagent | nodeinspector | dlv: read the
 *                                  debugger's port from this process's command line (java:
 *                                  also its @argfiles; node: also NODE_OPTIONS and
 *                                  NODE_INSPECTOR_INFO)
 * A detected port is added to MIRRORD_IGNORE_DEBUGGER_PORTS for child processes (the
 * debugger's helper processes talk on it too) and MIRRORD_DETECT_DEBUGGER_PORT is removed
 * (node's stays: each node child may open an inspector of its own).
 * The decision is local, without a round trip: `debugger_port()` is one load when no port is
 * set. Only loopback addresses match (and, for bind/listen, the unspecified address): a
 * debugger on another machine is not ours to guess.
 */
#include "layer.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_RANGES 32
static struct {
    int lo, hi;
} g_ranges[MAX_RANGES];
static int g_nranges;

static void add_range(int lo, int hi) {
    if (lo < 1 || hi > 65535 || lo > hi) {
        return;
    }
    for (int i = 0; i < g_nranges; i++) {
        if (g_ranges[i].lo == lo && g_ranges[i].hi == hi) {
            return;
        }
    }
    if (g_nranges < MAX_RANGES) {
        g_ranges[g_nranges].lo = lo;
        g_ranges[g_nranges].hi = hi;
        g_nranges++;
    }
}

/* A decimal port of exactly the n bytes at s, or -1. */
static int port_of(const char *s, size_t n) {
    if (n == 0 || n > 5) {
        return -1;
    }
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }
        v = v * 10 + (s[i] - '0');
    }
    return v >= 1 && v <= 65535 ? v : -1;
}

/* "P", "A-B", "P,A-B,...": malformed entries are skipped (as mirrord does). */
static void parse_ranges(const char *v) {
    while (v != NULL && *v) {
        const char *end = strchr(v, ',');
        size_t n = end ? (size_t)(end - v) : strlen(v);
        const char *dash = memchr(v, '-', n);
        if (dash == NULL) {
            int p = port_of(v, n);
            add_range(p, p);
        } else {
            add_range(port_of(v, (size_t)(dash - v)), port_of(dash + 1, n - (size_t)(dash - v) - 1));
        }
        v = end ? end + 1 : NULL;
    }
}

/* A host a debugger on this machine would name: empty (all interfaces / the default),
 * localhost, a loopback or unspecified address. */
static int local_host(const char *h, size_t n) {
    char buf[64];
    if (n == 0) {
        return 1;
    }
    if (n >= 2 && h[0] == '[' && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n >= sizeof buf) {
        return 0;
    }
    memcpy(buf, h, n);
    buf[n] = 0;
    if (strcmp(buf, "localhost") == 0 || strcmp(buf, "*") == 0) {
        return 1;
    }
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, buf, &a4) == 1) {
        uint32_t a = ntohl(a4.s_addr);
        return (a >> 24) == 127 || a == 0;
    }
    if (inet_pton(AF_INET6, buf, &a6) == 1) {
        return IN6_IS_ADDR_LOOPBACK(&a6) || IN6_IS_ADDR_UNSPECIFIED(&a6);
    }
    return 0;
}

/* "[host:]port" (host may be [v6]) naming this machine: add its port. */
static void add_address(const char *v) {
    size_t n = strlen(v);
    const char *colon = NULL;
    for (const char *p = v + n; p > v; p--) {
        if (p[-1] == ':') {
            colon = p - 1;
            break;
        }
    }
    const char *port = colon ? colon + 1 : v;
    if (colon != NULL && !local_host(v, (size_t)(colon - v))) {
        return;
    }
    int p = port_of(port, strlen(port));
    add_range(p, p);
}

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* The value of option `name` at argv[*i]: `name=V` or `name V` (then *i moves on). */
static const char *opt_value(char **argv, int argc, int *i, const char *name) {
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0) {
        return NULL;
    }
    if (argv[*i][n] == '=') {
        return argv[*i] + n + 1;
    }
    if (argv[*i][n] == 0 && *i + 1 < argc) {
        return argv[++*i];
    }
    return NULL;
}

/* debugpy: `python [-X opt] .../debugpy --connect|--listen [host:]port ...`, also
 * `python -m debugpy ...`. */
static void detect_debugpy(char **argv, int argc) {
    if (argc < 2 || strncmp(base_name(argv[0]), "py", 2) != 0) {
        return;
    }
    int seen = 0;
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (!seen) {
            seen = ends_with(argv[i], "debugpy") || ends_with(argv[i], "debugpy/");
        } else if ((v = opt_value(argv, argc, &i, "--connect")) != NULL ||
                   (v = opt_value(argv, argc, &i, "--listen")) != NULL) {
            add_address(v);
            return;
        }
    }
}

/* PyCharm: `python .../pydevd.py ... --client HOST --port P ...`. */
static void detect_pydevd(char **argv, int argc) {
    if (argc < 2 || strncmp(base_name(argv[0]), "py", 2) != 0 || !strstr(base_name(argv[1]), "pydevd")) {
        return;
    }
    const char *client = NULL, *port = NULL;
    for (int i = 2; i < argc; i++) {
        const char *v;
        if ((v = opt_value(argv, argc, &i, "--client")) != NULL) {
            client = v;
        } else if ((v = opt_value(argv, argc, &i, "--port")) != NULL) {
            port = v;
        }
    }
    if (client != NULL && port != NULL && local_host(client, strlen(client))) {
        int p = port_of(port, strlen(port));
        add_range(p, p);
    }
}

/* One JVM option: -agentlib:jdwp=transport=dt_socket,...,address=[host:]P (or -Xrunjdwp:...),
 * n bytes at arg. */
static void jdwp_option(const char *arg, size_t n) {
    char buf[1024];
    if (n >= sizeof buf) {
        return;
    }
    memcpy(buf, arg, n);
    buf[n] = 0;
    const char *opts = NULL;
    if (strncmp(buf, "-agentlib:jdwp=", 15) == 0) {
        opts = buf + 15;
    } else if (strncmp(buf, "-Xrunjdwp:", 10) == 0) {
        opts = buf + 10;
    }
    for (const char *p = opts; p != NULL && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        if (strncmp(p, "address=", 8) == 0) {
            char addr[128];
            size_t k = strcspn(p + 8, ",");
            if (k < sizeof addr) {
                memcpy(addr, p + 8, k);
                addr[k] = 0;
                add_address(addr);
            }
        }
    }
}

/* A JVM `@argfile` (IDEs put long option lists there): its whitespace-separated options. */
static void jdwp_argfile(const char *path) {
    char buf[64 * 1024 + 1];
    int fd = REAL(open)(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return;
    }
    ssize_t len = 0, r;
    while (len < (ssize_t)sizeof buf - 1 && (r = REAL(read)(fd, buf + len, sizeof buf - 1 - len)) > 0) {
        len += r;
    }
    REAL(close)(fd);
    buf[len > 0 ? len : 0] = 0;
    for (const char *p = buf; *p;) {
        p += strspn(p, " \t\r\n\"'");
        size_t n = strcspn(p, " \t\r\n\"'");
        jdwp_option(p, n);
        p += n;
    }
}

/* `java -agentlib:jdwp=transport=dt_socket,...,address=[host:]P ...`, also inside `@argfile`s. */
static void detect_javaagent(char **argv, int argc) {
    const char *b = base_name(argv[0]);
    if (strcmp(b, "java") != 0 && strcmp(b, "javaw") != 0 && strcmp(b, "java.exe") != 0) {
        return;
    }
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '@') {
            jdwp_argfile(argv[i] + 1);
        } else {
            jdwp_option(argv[i], strlen(argv[i]));
        }
    }
}

/* One node flag: --inspect, --inspect-brk, --inspect-wait [=[host:]port], --inspect-port=P. */
static void node_flag(const char *f, size_t n) {
    static const char *const flags[] = {"--inspect-brk", "--inspect-wait", "--inspect", NULL};
    char buf[128];
    if (n >= sizeof buf) {
        return;
    }
    memcpy(buf, f, n);
    buf[n] = 0;
    if (strncmp(buf, "--inspect-port=", 15) == 0) {
        add_address(buf + 15);
        return;
    }
    for (int i = 0; flags[i]; i++) {
        size_t k = strlen(flags[i]);
        if (strncmp(buf, flags[i], k) == 0) {
            if (buf[k] == 0) {
                add_range(9229, 9229); /* node's default inspector port */
            } else if (buf[k] == '=') {
                add_address(buf + k + 1);
            }
            return;
        }
    }
}

static void detect_node(char **argv, int argc) {
    for (int i = 1; i < argc; i++) {
        node_flag(argv[i], strlen(argv[i]));
    }
    const char *opts = getenv("NODE_OPTIONS");
    for (const char *p = opts; p != NULL && *p;) {
        p += strspn(p, " \t");
        size_t n = strcspn(p, " \t");
        if (n > 0) {
            node_flag(p, n);
        }
        p += n;
    }
    /* {"...","inspectorURL":"ws://127.0.0.1:9229/uuid",...} */
    const char *info = getenv("NODE_INSPECTOR_INFO");
    const char *url = info ? strstr(info, "inspectorURL") : NULL;
    const char *scheme = url ? strstr(url, "://") : NULL;
    if (scheme != NULL) {
        char addr[128];
        size_t n = strcspn(scheme + 3, "/\"");
        if (n < sizeof addr) {
            memcpy(addr, scheme + 3, n);
            addr[n] = 0;
            add_address(addr);
        }
    }
}

/* Go's debugger: `dlv ... --listen=[host]:P` (or `-l ADDR`). */
static void detect_dlv(char **argv, int argc) {
    if (strcmp(base_name(argv[0]), "dlv") != 0) {
        return;
    }
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = opt_value(argv, argc, &i, "--listen")) != NULL ||
            (v = opt_value(argv, argc, &i, "-l")) != NULL) {
            add_address(v);
        }
    }
}

#define MAX_ARGS 512
#define CMDLINE_CAP (256 * 1024)

void debugger_init(void) {
    g_nranges = 0;
    parse_ranges(getenv("MIRRORD_IGNORE_DEBUGGER_PORTS"));
    const char *kind = getenv("MIRRORD_DETECT_DEBUGGER_PORT");
    if (kind == NULL || *kind == 0) {
        return;
    }
    int fd = REAL(open)("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return;
    }
    char *buf = malloc(CMDLINE_CAP + 1);
    ssize_t len = 0, r;
    while (buf != NULL && len < CMDLINE_CAP && (r = REAL(read)(fd, buf + len, CMDLINE_CAP - len)) > 0) {
        len += r;
    }
    REAL(close)(fd);
    if (buf == NULL || len <= 0) {
        free(buf);
        return;
    }
    buf[len] = 0;
    char *argv[MAX_ARGS];
    int argc = 0;
    for (char *p = buf; p < buf + len && argc < MAX_ARGS; p += strlen(p) + 1) {
        argv[argc++] = p;
    }
    int before = g_nranges;
    if (strcmp(kind, "debugpy") == 0) {
        detect_debugpy(argv, argc);
    } else if (strcmp(kind, "pydevd") == 0) {
        detect_pydevd(argv, argc);
    } else if (strcmp(kind, "javaagent") == 0) {
        detect_javaagent(argv, argc);
    } else if (strcmp(kind, "nodeinspector") == 0) {
        detect_node(argv, argc);
    } else if (strcmp(kind, "dlv") == 0) {
        detect_dlv(argv, argc);
    } else {
        DBG("MIRRORD_DETECT_DEBUGGER_PORT=%s: not a debugger the layer knows", kind);
    }
    free(buf);
    if (g_nranges == before) {
        return;
    }
    /* children: the ports found here, and no second detection from their own command line */
    char list[MAX_RANGES * 12 + 1];
    size_t off = 0;
    for (int i = 0; i < g_nranges; i++) {
        int n = g_ranges[i].lo == g_ranges[i].hi
                    ? snprintf(list + off, sizeof list - off, "%s%d", i ? "," : "", g_ranges[i].lo)
                    : snprintf(list + off, sizeof list - off, "%s%d-%d", i ? "," : "",
                               g_ranges[i].lo, g_ranges[i].hi);
        if (n < 0 || (size_t)n >= sizeof list - off) {
            break;
        }
        off += (size_t)n;
    }
    setenv("MIRRORD_IGNORE_DEBUGGER_PORTS", list, 1);
    if (strcmp(kind, "nodeinspector") != 0) {
        unsetenv("MIRRORD_DETECT_DEBUGGER_PORT");
    }
    DBG("debugger ports (%s): %s", kind, list);
}

int debugger_port(const struct sockaddr *sa, socklen_t len, int any_addr) {
    if (__builtin_expect(g_nranges == 0, 1) || sa == NULL) {
        return 0;
    }
    int port;
    if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const void *)sa;
        if (!is_loopback(sa) && !(any_addr && in->sin_addr.s_addr == 0)) {
            return 0;
        }
        port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        if (!is_loopback(sa) && !(any_addr && IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr))) {
            return 0;
        }
        port = ntohs(in6->sin6_port);
    } else {
        return 0;
    }
    for (int i = 0; i < g_nranges; i++) {
        if (port >= g_ranges[i].lo && port <= g_ranges[i].hi) {
            return 1;
        }
    }
    return 0;
}
