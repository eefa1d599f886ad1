/* The session's settings (MIRRORD_LAYER_CONFIG) and every local/remote decision.
 *
 * Format (written by mirrord.layer.LayerSettings.encode, documented in docs/layer.md): one
 * `key=value` per line, repeated keys for lists, unknown keys ignored. Parsed once at init;
 * afterwards read-only, so the decisions take no lock.
 *
 * The bypass path of open()/stat() must stay within a few ns of the real call: the default
 * local set is checked with prefix/suffix comparisons before any regex, and the user's regex
 * lists are only run when they are non-empty.
 */
#include "layer.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

struct settings g_set = {
    .fs_mode = FS_READ,
    .out_tcp = 1,
    .out_udp = 1,
    .dns = 1,
    .incoming = IN_MIRROR,
    .hostname = 1,
    .skip_build_tools = 1,
    .timeout_ms = 30000,
    .fetch_limit = 8LL * 1024 * 1024,
    .read_ahead = 128000,
    .fs_handover = 1,
    .ipv6 = 1,
};

#define MAX_LIST 128

struct rlist {
    int n;
    regex_t re[MAX_LIST];
};

static struct rlist g_ro, g_rw, g_local, g_nf, g_unix;

/* An outgoing or DNS filter entry: protocol (0 any, 1 tcp, 2 udp), a host that is a name,
 * an address with a prefix length, or any; a port (0 any). */
struct nfilter {
    int proto;
    int kind; /* 0 any, 1 name, 2 v4 subnet, 3 v6 subnet */
    char name[256];
    uint8_t addr[16];
    int prefix;
    int port;
};

static struct nfilter g_out_f[MAX_LIST];
static int g_out_nf, g_out_mode; /* 0 no filter, 1 remote list, 2 local list */
static struct nfilter g_dns_f[MAX_LIST];
static int g_dns_nf, g_dns_mode;

static int g_port_map[MAX_LIST][2]; /* local -> remote (incoming.port_mapping) */
static int g_nport_map;
static int g_listen_map[MAX_LIST][2]; /* requested -> really bound (incoming.listen_ports) */
static int g_nlisten_map;
static int g_ignore_ports[MAX_LIST];
static int g_nignore;
static char *g_skip[MAX_LIST];
static int g_nskip;

static char g_cwd[4096];
static size_t g_cwd_len;
static char g_home[4096];
static size_t g_home_len;
static char g_exe[4096];
static size_t g_exe_len;
static char g_tmpdir[4096];
static size_t g_tmpdir_len;

/* feature.fs.mapping: the first pattern matching a path rewrites it (its leftmost match
 * replaced), before any other decision. Case-sensitive, as mirrord's replacement is. */
#define MAX_MAP 16
static struct {
    regex_t re;
    char *repl; /* "${N}" group references and "$$" only (LayerSettings normalises them) */
} g_map[MAX_MAP];
int g_nmap;

static void add_mapping(const char *v) {
    const char *tab = strchr(v, '\t');
    if (tab == NULL || g_nmap >= MAX_MAP) {
        return;
    }
    char pattern[4096];
    size_t n = (size_t)(tab - v);
    if (n >= sizeof pattern) {
        return;
    }
    memcpy(pattern, v, n);
    pattern[n] = 0;
    if (regcomp(&g_map[g_nmap].re, pattern, REG_EXTENDED) != 0) {
        DBG("bad mapping pattern %s: ignored", pattern);
        return;
    }
    g_map[g_nmap].repl = strdup(tab + 1);
    if (g_map[g_nmap].repl == NULL) {
        regfree(&g_map[g_nmap].re);
        return;
    }
    g_nmap++;
}

static int append(char *out, size_t cap, size_t *len, const char *s, size_t n) {
    if (*len + n >= cap) {
        return -1;
    }
    memcpy(out + *len, s, n);
    *len += n;
    out[*len] = 0;
    return 0;
}

int policy_map_path(const char *path, char *out, size_t cap) {
    for (int i = 0; i < g_nmap; i++) {
        regmatch_t m[10];
        if (regexec(&g_map[i].re, path, 10, m, 0) != 0) {
            continue;
        }
        size_t len = 0;
        out[0] = 0;
        int bad = append(out, cap, &len, path, (size_t)m[0].rm_so);
        for (const char *r = g_map[i].repl; *r && !bad; r++) {
            if (r[0] == '$' && r[1] == '$') {
                bad = append(out, cap, &len, "$", 1);
                r++;
            } else if (r[0] == '$' && r[1] == '{' && r[2] >= '0' && r[2] <= '9' && r[3] == '}') {
                regmatch_t g = m[r[2] - '0'];
                if (g.rm_so >= 0) {
                    bad = append(out, cap, &len, path + g.rm_so, (size_t)(g.rm_eo - g.rm_so));
                }
                r += 3;
            } else {
                bad = append(out, cap, &len, r, 1);
            }
        }
        if (!bad) {
            bad = append(out, cap, &len, path + m[0].rm_eo, strlen(path + m[0].rm_eo));
        }
        return bad ? 0 : 1; /* too long: the path stays as it is */
    }
    return 0;
}

static int add_regex(struct rlist *l, const char *v) {
    if (l->n >= MAX_LIST) {
        return -1;
    }
    if (regcomp(&l->re[l->n], v, REG_EXTENDED | REG_NOSUB | REG_ICASE) != 0) {
        DBG("bad regex %s: ignored", v);
        return -1;
    }
    l->n++;
    return 0;
}

static int parse_filter(struct nfilter *f, const char *v, int with_proto) {
    char proto[16] = "any", host[256] = "*";
    int port = 0;
    memset(f, 0, sizeof *f);
    if (with_proto) {
        if (sscanf(v, "%15s %255s %d", proto, host, &port) < 2) {
            return -1;
        }
    } else if (sscanf(v, "%255s %d", host, &port) < 1) {
        return -1;
    }
    f->proto = strcmp(proto, "tcp") == 0 ? 1 : strcmp(proto, "udp") == 0 ? 2 : 0;
    f->port = port;
    if (strcmp(host, "*") == 0) {
        f->kind = 0;
        return 0;
    }
    char *slash = strchr(host, '/');
    int prefix = -1;
    if (slash != NULL) {
        *slash = 0;
        prefix = atoi(slash + 1);
    }
    if (inet_pton(AF_INET, host, f->addr) == 1) {
        f->kind = 2;
        f->prefix = prefix < 0 || prefix > 32 ? 32 : prefix;
    } else if (inet_pton(AF_INET6, host, f->addr) == 1) {
        f->kind = 3;
        f->prefix = prefix < 0 || prefix > 128 ? 128 : prefix;
    } else {
        f->kind = 1;
        snprintf(f->name, sizeof f->name, "%s", host);
    }
    return 0;
}

static int flag(const char *v) { return strcmp(v, "1") == 0 || strcasecmp(v, "true") == 0; }

static void suffix_init(void);

static void fast_init(void);

/* Keys of MIRRORD_LAYER_CONFIG by the shape of their value. */
static const struct {
    const char *key;
    int *flag;
} FLAG_KEYS[] = {
    {"outgoing_tcp", &g_set.out_tcp},
    {"outgoing_udp", &g_set.out_udp},
    {"dns", &g_set.dns},
    {"ignore_localhost", &g_set.ignore_localhost},
    {"incoming_ignore_localhost", &g_set.incoming_ignore_localhost},
    {"hostname", &g_set.hostname},
    {"skip_build_tools", &g_set.skip_build_tools},
    {"fs_handover", &g_set.fs_handover},
    {"ipv6", &g_set.ipv6},
};

static const struct {
    const char *key;
    struct rlist *list;
} REGEX_KEYS[] = {
    {"read_only", &g_ro}, {"read_write", &g_rw},     {"local", &g_local},
    {"not_found", &g_nf}, {"unix_stream", &g_unix},
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static int filter_mode(const char *v) {
    return strcmp(v, "remote") == 0 ? 1 : strcmp(v, "local") == 0 ? 2 : 0;
}

/* The keys naming one of a few words. 1 if `k` is one of them. */
static int set_choice(const char *k, const char *v) {
    if (strcmp(k, "fs_mode") == 0) {
        g_set.fs_mode = strcmp(v, "local") == 0                ? FS_LOCAL
                        : strcmp(v, "localwithoverrides") == 0 ? FS_LOCAL_WITH_OVERRIDES
                        : strcmp(v, "write") == 0              ? FS_WRITE
                                                               : FS_READ;
    } else if (strcmp(k, "incoming") == 0) {
        g_set.incoming = strcmp(v, "off") == 0 ? IN_OFF : strcmp(v, "steal") == 0 ? IN_STEAL : IN_MIRROR;
    } else if (strcmp(k, "outgoing_filter_mode") == 0) {
        g_out_mode = filter_mode(v);
    } else if (strcmp(k, "dns_filter_mode") == 0) {
        g_dns_mode = filter_mode(v);
    } else {
        return 0;
    }
    return 1;
}

/* `v` ("A B") appended to a table of port pairs unless it is full or malformed. */
static void add_port_pair(int pairs[][2], int *n, const char *v) {
    if (*n < MAX_LIST && sscanf(v, "%d %d", &pairs[*n][0], &pairs[*n][1]) == 2) {
        (*n)++;
    }
}

/* The repeated keys other than regex lists: one entry each. 1 if `k` is one of them. */
static int add_entry(const char *k, const char *v) {
    if (strcmp(k, "fs_map") == 0) {
        add_mapping(v);
    } else if (strcmp(k, "outgoing_filter") == 0) {
        if (g_out_nf < MAX_LIST && parse_filter(&g_out_f[g_out_nf], v, 1) == 0) {
            g_out_nf++;
        }
    } else if (strcmp(k, "dns_filter") == 0) {
        if (g_dns_nf < MAX_LIST && parse_filter(&g_dns_f[g_dns_nf], v, 0) == 0) {
            g_dns_nf++;
        }
    } else if (strcmp(k, "port_mapping") == 0) {
        add_port_pair(g_port_map, &g_nport_map, v);
    } else if (strcmp(k, "listen_ports") == 0) {
        add_port_pair(g_listen_map, &g_nlisten_map, v);
    } else if (strcmp(k, "ignore_ports") == 0) {
        if (g_nignore < MAX_LIST) {
            g_ignore_ports[g_nignore++] = atoi(v);
        }
    } else if (strcmp(k, "skip_process") == 0) {
        if (g_nskip < MAX_LIST) {
            g_skip[g_nskip++] = strdup(v);
        }
    } else {
        return 0;
    }
    return 1;
}

/* One `key=value` setting; unknown keys (a newer writer) are ignored. */
static void apply_setting(const char *k, const char *v) {
    for (size_t i = 0; i < COUNT(FLAG_KEYS); i++) {
        if (strcmp(k, FLAG_KEYS[i].key) == 0) {
            *FLAG_KEYS[i].flag = flag(v);
            return;
        }
    }
    for (size_t i = 0; i < COUNT(REGEX_KEYS); i++) {
        if (strcmp(k, REGEX_KEYS[i].key) == 0) {
            add_regex(REGEX_KEYS[i].list, v);
            return;
        }
    }
    if (set_choice(k, v) || add_entry(k, v)) {
        return;
    }
    if (strcmp(k, "fetch_limit") == 0) {
        long long t = strtoll(v, NULL, 10);
        g_set.fetch_limit = t >= 0 ? t : g_set.fetch_limit;
    } else if (strcmp(k, "read_ahead") == 0) {
        long long t = strtoll(v, NULL, 10);
        g_set.read_ahead = t >= 0 ? t : g_set.read_ahead;
    } else if (strcmp(k, "timeout_ms") == 0) {
        long t = strtol(v, NULL, 10);
        g_set.timeout_ms = t > 0 && t < 3600000 ? (int)t : 30000;
    }
}

/* `dir` without its trailing slashes ("/" stays "/"); its new length. */
static size_t trim_slashes(char *dir) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') {
        dir[--n] = 0;
    }
    return n;
}

/* The process's own directories the default local set names: working directory, home,
 * executable, TMPDIR. */
static void init_own_dirs(void) {
    if (getcwd(g_cwd, sizeof g_cwd) != NULL) {
        g_cwd_len = trim_slashes(g_cwd);
        if (g_cwd_len == 1) { /* cwd "/" would make everything local: mirrord skips it too */
            g_cwd_len = 0;
        }
    }
    const char *home = getenv("HOME");
    if (home != NULL && *home == '/') {
        snprintf(g_home, sizeof g_home, "%s", home);
        g_home_len = trim_slashes(g_home);
    }
    suffix_init();
    ssize_t en = readlink("/proc/self/exe", g_exe, sizeof g_exe - 1);
    if (en > 0) {
        g_exe[en] = 0;
        g_exe_len = (size_t)en;
    }
    const char *tmp = getenv("TMPDIR");
    if (tmp != NULL && *tmp == '/' && strlen(tmp) > 1) {
        snprintf(g_tmpdir, sizeof g_tmpdir, "%s", tmp);
        g_tmpdir_len = trim_slashes(g_tmpdir);
    }
}

int policy_load(const char *text) {
    char line[4096];
    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        if (n >= sizeof line) {
            return -1;
        }
        memcpy(line, p, n);
        line[n] = 0;
        p += n + (nl ? 1 : 0);
        if (n == 0 || line[0] == '#') {
            continue;
        }
        char *eq = strchr(line, '=');
        if (eq == NULL) {
            return -1;
        }
        *eq = 0;
        apply_setting(line, eq + 1);
    }
    init_own_dirs();
    fast_init();
    return 0;
}

static const char *const BUILD_TOOLS[] = {
    "as", "cc", "c++", "cpp", "ld", "ld.bfd", "ld.gold", "ld.lld", "gcc", "g++", "clang",
    "clang++", "cc1", "cc1plus", "collect2", "make", "gmake", "cmake", "ninja", "cargo",
    "rustc", "go", "ar", "strip", "javac", "gradle", "mvn", "bazel", "pkg-config", NULL,
};

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

int policy_skip_process(const char *exe, const char *name) {
    const char *b = base_name(exe);
    for (int i = 0; i < g_nskip; i++) {
        if (strcmp(g_skip[i], b) == 0 || (name && strcmp(g_skip[i], name) == 0)) {
            return 1;
        }
    }
    if (g_set.skip_build_tools) {
        for (int i = 0; BUILD_TOOLS[i]; i++) {
            if (strcmp(BUILD_TOOLS[i], b) == 0 || (name && strcmp(BUILD_TOOLS[i], name) == 0)) {
                return 1;
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- files */

static int matches(const struct rlist *l, const char *path) {
    for (int i = 0; i < l->n; i++) {
        if (regexec(&l->re[i], path, 0, NULL, 0) == 0) {
            return 1;
        }
    }
    return 0;
}

int policy_unix_stream(const char *path) { return g_unix.n > 0 && matches(&g_unix, path); }

/* `path` is `dir` or below it. */
/* A byte loop, not strncmp: the prefixes are short and most paths differ in their first
 * bytes, so this is on the bypass path of every local open/stat. It never reads past the
 * path's end: dir has no NUL in its first n bytes, so a shorter path mismatches first. */
static inline int under(const char *path, const char *dir, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (path[i] != dir[i]) {
            return 0;
        }
    }
    return path[n] == 0 || path[n] == '/';
}

static inline int ends_with(const char *s, size_t n, const char *suffix) {
    size_t k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

static const char *const LOCAL_SUFFIXES[] = {
    ".so", ".d", ".pyc", ".py", ".jar", ".class", ".js", ".pth", ".plist", "venv.cfg",
    ".pdb", ".dll", "/jvm.cfg", "/package.json", "/.yarnrc", "/.yarnrc.yml", "/.yarnrc.json",
    "/.tool-versions", NULL,
};

static size_t g_suffix_len[32];

static void suffix_init(void) {
    for (int i = 0; i < 32 && LOCAL_SUFFIXES[i]; i++) {
        g_suffix_len[i] = strlen(LOCAL_SUFFIXES[i]);
    }
}

/* The default local set: system, runtime and tool paths, the working directory. Ordered so
 * the common local paths (system directories, the working directory) are decided first. */
static int default_local(const char *path) {
    if (path_system_dir(path)) {
        return 1;
    }
    if (g_cwd_len && under(path, g_cwd, g_cwd_len)) {
        return 1;
    }
    if (g_home_len > 1 && under(path, g_home, g_home_len)) {
        return 1; /* $HOME is the user's, wherever it is (/home is local already; root's is /root) */
    }
    if (g_tmpdir_len && under(path, g_tmpdir, g_tmpdir_len)) {
        return 1;
    }
    size_t n = strlen(path);
    for (int i = 0; LOCAL_SUFFIXES[i]; i++) {
        size_t k = g_suffix_len[i];
        if (n >= k && memcmp(path + n - k, LOCAL_SUFFIXES[i], k) == 0) {
            return 1;
        }
    }
    if (g_exe_len && strcmp(path, g_exe) == 0) {
        return 1;
    }
    if (strstr(path, "/node_modules") != NULL || strstr(path, ".asdf/") != NULL ||
        strstr(path, ".so.") != NULL) {
        return 1;
    }
    return 0;
}


/* Credentials under $HOME are "not found" in every mode but local (as mirrord does). */
static int default_not_found(const char *path) {
    if (!g_home_len || !under(path, g_home, g_home_len) || path[g_home_len] != '/') {
        return 0;
    }
    const char *rest = path + g_home_len + 1;
    return under(rest, ".aws", 4) || under(rest, ".config/gcloud", 14) ||
           under(rest, ".kube", 5) || under(rest, ".azure", 6);
}

/* path_fast_local's table (layer.h): path[1] -> 1 when, for absolute paths with that second
 * byte, the system-directory set alone decides "local". Only without regex lists
 * (policy_file consults them first), and never for the letter of a system directory holding
 * $HOME (its credentials are "not found"); /etc's remote defaults are checked inline. */
unsigned char g_fast_dir[256];

static void fast_init(void) {
    memset(g_fast_dir, 0, sizeof g_fast_dir);
    if (g_nf.n || g_rw.n || g_ro.n || g_local.n || g_nmap) {
        return;
    }
    for (const char *c = "bdehlnoprstuv"; *c; c++) {
        g_fast_dir[(unsigned char)*c] = 1;
    }
    g_fast_dir[0] = 1; /* "/" itself */
    if (g_home_len > 1 && path_system_dir(g_home)) {
        g_fast_dir[(unsigned char)g_home[1]] = 0;
    }
}

int policy_file(const char *path, int write) {
    if (g_set.fs_mode == FS_LOCAL || path == NULL || path[0] != '/') {
        return P_LOCAL;
    }
    if (g_nf.n && matches(&g_nf, path)) {
        return P_NOT_FOUND;
    }
    if (g_rw.n && matches(&g_rw, path)) {
        return P_REMOTE;
    }
    if (g_ro.n && matches(&g_ro, path)) {
        return write ? P_LOCAL : P_REMOTE;
    }
    if (g_local.n && matches(&g_local, path)) {
        return P_LOCAL;
    }
    if (g_set.fs_mode == FS_LOCAL_WITH_OVERRIDES) {
        return P_LOCAL;
    }
    if (etc_remote_default(path)) {
        return write ? P_LOCAL : P_REMOTE;
    }
    if (default_not_found(path)) {
        return P_NOT_FOUND; /* cloud credentials of the user's machine */
    }
    if (default_local(path)) {
        return P_LOCAL;
    }
    if (g_set.fs_mode == FS_READ && write) {
        return P_LOCAL;
    }
    return P_REMOTE;
}

/* ---------------------------------------------------------------- network */

int is_loopback(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) {
            return 1;
        }
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            return in6->sin6_addr.s6_addr[12] == 127;
        }
    }
    return 0;
}

static int is_unspecified(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) {
        return ((const struct sockaddr_in *)(const void *)sa)->sin_addr.s_addr == 0;
    }
    return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr);
}

/* Names our DNS hook resolved, so that a filter naming a host matches its addresses. */
#define NAME_CACHE 256
static struct {
    uint8_t addr[16];
    int family;
    char name[256];
} g_names[NAME_CACHE];
static int g_names_next;
static pthread_mutex_t g_names_lock = PTHREAD_MUTEX_INITIALIZER;

void policy_after_fork_child(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    g_names_lock = fresh;
}

static int addr_bytes(const struct sockaddr *sa, uint8_t out[16], int *family, int *port) {
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        memcpy(out, &in->sin_addr, 4);
        *family = AF_INET;
        *port = ntohs(in->sin_port);
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            memcpy(out, &in6->sin6_addr.s6_addr[12], 4);
            *family = AF_INET;
        } else {
            memcpy(out, &in6->sin6_addr, 16);
            *family = AF_INET6;
        }
        *port = ntohs(in6->sin6_port);
        return 0;
    }
    return -1;
}

void policy_remember_name(const struct sockaddr *sa, const char *name) {
    uint8_t a[16];
    int fam, port;
    if (g_out_nf == 0 || addr_bytes(sa, a, &fam, &port) < 0) {
        return;
    }
    pthread_mutex_lock(&g_names_lock);
    int i = g_names_next++ % NAME_CACHE;
    memcpy(g_names[i].addr, a, 16);
    g_names[i].family = fam;
    snprintf(g_names[i].name, sizeof g_names[i].name, "%s", name);
    pthread_mutex_unlock(&g_names_lock);
}

static int name_of(const uint8_t a[16], int fam, const char *name) {
    size_t nl = strlen(name);
    if (strcasecmp(name, "localhost") == 0 || ends_with(name, nl, ".localhost")) {
        /* resolved without asking anyone (curl does it itself): any loopback address */
        static const uint8_t v6lo[16] = {[15] = 1};
        return fam == AF_INET ? a[0] == 127 : memcmp(a, v6lo, 16) == 0;
    }
    int hit = 0;
    pthread_mutex_lock(&g_names_lock);
    for (int i = 0; i < NAME_CACHE && !hit; i++) {
        if (g_names[i].family == fam && memcmp(g_names[i].addr, a, fam == AF_INET ? 4 : 16) == 0 &&
            strcasecmp(g_names[i].name, name) == 0) {
            hit = 1;
        }
    }
    pthread_mutex_unlock(&g_names_lock);
    return hit;
}

static int prefix_match(const uint8_t *a, const uint8_t *b, int bits) {
    int full = bits / 8, rest = bits % 8;
    if (memcmp(a, b, (size_t)full) != 0) {
        return 0;
    }
    if (rest == 0) {
        return 1;
    }
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (a[full] & mask) == (b[full] & mask);
}

static int filter_match(const struct nfilter *f, const uint8_t a[16], int fam, int port, int proto) {
    if (f->proto && f->proto != proto) {
        return 0;
    }
    if (f->port && f->port != port) {
        return 0;
    }
    switch (f->kind) {
    case 0: return 1;
    case 1: return name_of(a, fam, f->name);
    case 2: return fam == AF_INET && prefix_match(a, f->addr, f->prefix);
    case 3: return fam == AF_INET6 && prefix_match(a, f->addr, f->prefix);
    }
    return 0;
}

int policy_connect(const struct sockaddr *sa, socklen_t len, int socktype) {
    if (sa == NULL || len < sizeof(sa_family_t) ||
        (sa->sa_family != AF_INET && sa->sa_family != AF_INET6)) {
        return P_LOCAL;
    }
    if ((sa->sa_family == AF_INET && len < sizeof(struct sockaddr_in)) ||
        (sa->sa_family == AF_INET6 && len < sizeof(struct sockaddr_in6))) {
        return P_LOCAL; /* the real call reports EINVAL */
    }
    int proto = socktype == SOCK_STREAM ? 1 : socktype == SOCK_DGRAM ? 2 : 0;
    if (proto == 0 || (proto == 1 && !g_set.out_tcp) || (proto == 2 && !g_set.out_udp)) {
        return P_LOCAL;
    }
    if (is_unspecified(sa) || (g_set.ignore_localhost && is_loopback(sa))) {
        return P_LOCAL;
    }
    uint8_t a[16];
    int fam, port;
    addr_bytes(sa, a, &fam, &port);
    if (g_out_mode == 0 || g_out_nf == 0) {
        return g_out_mode == 1 ? P_LOCAL : P_REMOTE;
    }
    int hit = 0;
    for (int i = 0; i < g_out_nf && !hit; i++) {
        hit = filter_match(&g_out_f[i], a, fam, port, proto);
    }
    return (g_out_mode == 1) == hit ? P_REMOTE : P_LOCAL;
}

int policy_dns(const char *host, int port) {
    if (!g_set.dns || host == NULL || *host == 0) {
        return P_LOCAL;
    }
    if (strcasecmp(host, "localhost") == 0 || strcasecmp(host, "localhost.") == 0 ||
        strcasecmp(host, "ip6-localhost") == 0 || ends_with(host, strlen(host), ".localhost")) {
        return P_LOCAL;
    }
    uint8_t a[16];
    if (inet_pton(AF_INET, host, a) == 1 || inet_pton(AF_INET6, host, a) == 1) {
        return P_LOCAL; /* numeric: nothing to resolve */
    }
    if (g_dns_mode == 0 || g_dns_nf == 0) {
        return g_dns_mode == 1 ? P_LOCAL : P_REMOTE;
    }
    int hit = 0;
    for (int i = 0; i < g_dns_nf && !hit; i++) {
        const struct nfilter *f = &g_dns_f[i];
        if (f->port && port && f->port != port) {
            continue;
        }
        hit = f->kind == 0 || (f->kind == 1 && strcasecmp(f->name, host) == 0);
    }
    return (g_dns_mode == 1) == hit ? P_REMOTE : P_LOCAL;
}

int policy_bind_port(int port) {
    for (int i = 0; i < g_nlisten_map; i++) {
        if (g_listen_map[i][0] == port) {
            return g_listen_map[i][1];
        }
    }
    return port;
}

int policy_listen_port(int port) {
    if (g_set.incoming == IN_OFF || port == 0) {
        return -1;
    }
    for (int i = 0; i < g_nignore; i++) {
        if (g_ignore_ports[i] == port) {
            return -1;
        }
    }
    for (int i = 0; i < g_nport_map; i++) {
        if (g_port_map[i][0] == port) {
            return g_port_map[i][1];
        }
    }
    return port;
}
