/* Built with -static by tests/cli/test_syscall_supervisor.py: a program the layer cannot reach.
 * For each line on stdin (a path), opens it with the open system call it names (openat by
 * default; "open:" / "openat2:" prefixes pick the others) and prints "<path> = <content>" or
 * "<path> ! <errno name>". At start it prints "pid <pid> supervisor <MIRRORD_SUPERVISOR_PID>".
 * "access:PATH" calls faccessat(PATH, R_OK) and prints "<path> access ok" or "<path> access !
 * <errno name>"; "stat:PATH" calls newfstatat(PATH) and prints "<path> stat <size> <mode>",
 * "fstat:PATH" opens PATH and prints the same from fstat(fd); "statx:PATH" the same from statx;
 * "readlink:PATH" prints "<path> -> <target>" (readlinkat); "mkdir:PATH", "rmdir:PATH",
 * "unlink:PATH" and "rename:OLD NEW" (mkdirat, unlinkat, renameat) print "<op> ok" or "<op> !
 * <errno name>"; "exec:PROG ARG..." runs PROG (fork, execv, wait) and prints "exit <status>";
 * "threads:N:PATH" reads PATH 25 times in each of N threads and prints "threads <reads that
 * returned the same content as the first>/<reads>". With arguments, it reads each argument
 * (as a path) instead of stdin, without the first line. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *errname(int e) {
    switch (e) {
    case ENOENT: return "ENOENT";
    case EIO: return "EIO";
    case ENOSYS: return "ENOSYS";
    case EACCES: return "EACCES";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EINTR: return "EINTR";
    case EEXIST: return "EEXIST";
    case ENOTEMPTY: return "ENOTEMPTY";
    case EXDEV: return "EXDEV";
    default: return "OTHER";
    }
}

static int read_whole(const char *path, char *buf, size_t cap) {
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    return 0;
}

static char g_first[4096];
static const char *g_path;
static int g_same;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static void *reader(void *arg) {
    (void)arg;
    for (int i = 0; i < 25; i++) {
        char buf[4096];
        if (read_whole(g_path, buf, sizeof buf) == 0 && strcmp(buf, g_first) == 0) {
            pthread_mutex_lock(&g_lock);
            g_same++;
            pthread_mutex_unlock(&g_lock);
        }
    }
    return NULL;
}

static void threads(char *spec) {
    int n = atoi(spec);
    char *colon = strchr(spec, ':');
    if (n <= 0 || n > 64 || colon == NULL || read_whole(colon + 1, g_first, sizeof g_first) != 0) {
        printf("threads ! bad\n");
        return;
    }
    g_path = colon + 1;
    g_same = 0;
    pthread_t t[64];
    for (int i = 0; i < n; i++) {
        pthread_create(&t[i], NULL, reader, NULL);
    }
    for (int i = 0; i < n; i++) {
        pthread_join(t[i], NULL);
    }
    printf("threads %d/%d\n", g_same, n * 25);
}

static void run(char *cmdline) {
    char *argv[16];
    int argc = 0;
    for (char *tok = strtok(cmdline, " "); tok != NULL && argc < 15; tok = strtok(NULL, " ")) {
        argv[argc++] = tok;
    }
    argv[argc] = NULL;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        execv(argv[0], argv);
        _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    printf("exit %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
}

/* statx, readlink and the mutators: 1 if `line` was one of them. */
static int paths(char *line) {
    char *arg = strchr(line, ':');
    if (arg == NULL) {
        return 0;
    }
    *arg++ = 0;
    long r;
    if (strcmp(line, "statx") == 0) {
        struct statx sx;
        r = syscall(SYS_statx, AT_FDCWD, arg, 0, STATX_BASIC_STATS, &sx);
        if (r == 0) {
            printf("%s statx %llu %o\n", arg, (unsigned long long)sx.stx_size,
                   (unsigned)sx.stx_mode);
        } else {
            printf("%s statx ! %s\n", arg, errname(errno));
        }
        return 1;
    }
    if (strcmp(line, "readlink") == 0) {
        char buf[4096];
        r = syscall(SYS_readlinkat, AT_FDCWD, arg, buf, sizeof buf - 1);
        buf[r > 0 ? r : 0] = 0;
        printf(r >= 0 ? "%s -> %s\n" : "%s readlink ! %s\n", arg, r >= 0 ? buf : errname(errno));
        return 1;
    }
    char *second = strchr(arg, ' ');
    if (strcmp(line, "mkdir") == 0) {
        r = syscall(SYS_mkdirat, AT_FDCWD, arg, 0755);
    } else if (strcmp(line, "rmdir") == 0 || strcmp(line, "unlink") == 0) {
        r = syscall(SYS_unlinkat, AT_FDCWD, arg, line[0] == 'r' ? AT_REMOVEDIR : 0);
    } else if (strcmp(line, "rename") == 0 && second != NULL) {
        *second++ = 0;
        r = syscall(SYS_renameat, AT_FDCWD, arg, AT_FDCWD, second);
    } else {
        line[strlen(line)] = ':'; /* not ours: as it was */
        return 0;
    }
    printf(r == 0 ? "%s ok\n" : "%s ! %s\n", line, r == 0 ? "" : errname(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc > 1) {
        for (int i = 1; i < argc; i++) {
            char buf[4096];
            if (read_whole(argv[i], buf, sizeof buf) != 0) {
                printf("%s ! %s\n", argv[i], errname(errno));
            } else {
                buf[strcspn(buf, "\n")] = 0;
                printf("%s = %s\n", argv[i], buf);
            }
        }
        return 0;
    }
    const char *sv = getenv("MIRRORD_SUPERVISOR_PID");
    printf("pid %d supervisor %s\n", (int)getpid(), sv != NULL ? sv : "none");
    fflush(stdout);
    char line[4096];
    while (fgets(line, sizeof line, stdin) != NULL) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "exec:", 5) == 0) {
            run(line + 5);
            fflush(stdout);
            continue;
        }
        if (strncmp(line, "access:", 7) == 0) {
            long r = syscall(SYS_faccessat, AT_FDCWD, line + 7, R_OK);
            if (r == 0) {
                printf("%s access ok\n", line + 7);
            } else {
                printf("%s access ! %s\n", line + 7, errname(errno));
            }
            fflush(stdout);
            continue;
        }
        if (strncmp(line, "stat:", 5) == 0 || strncmp(line, "fstat:", 6) == 0) {
            int f = line[0] == 'f';
            char *p = line + (f ? 6 : 5);
            struct stat st;
            long r;
            if (f) {
                int fd = (int)syscall(SYS_openat, AT_FDCWD, p, O_RDONLY | O_CLOEXEC);
                r = fd < 0 ? -1 : fstat(fd, &st);
                if (fd >= 0) {
                    close(fd);
                }
            } else {
                r = syscall(SYS_newfstatat, AT_FDCWD, p, &st, 0);
            }
            if (r == 0) {
                printf("%s %s %lld %o\n", p, f ? "fstat" : "stat", (long long)st.st_size,
                       (unsigned)st.st_mode);
            } else {
                printf("%s %s ! %s\n", p, f ? "fstat" : "stat", errname(errno));
            }
            fflush(stdout);
            continue;
        }
        if (paths(line)) {
            fflush(stdout);
            continue;
        }
        if (strncmp(line, "threads:", 8) == 0) {
            threads(line + 8);
            fflush(stdout);
            continue;
        }
        char *path = line;
        long fd;
        if (strncmp(line, "open:", 5) == 0) {
            path = line + 5;
            fd = syscall(SYS_open, path, O_RDONLY | O_CLOEXEC);
        } else if (strncmp(line, "openat2:", 8) == 0) {
            struct open_how how = {.flags = O_RDONLY | O_CLOEXEC};
            path = line + 8;
            fd = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
        } else {
            fd = syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
        }
        if (fd < 0) {
            printf("%s ! %s\n", path, errname(errno));
        } else {
            char buf[4096];
            ssize_t n = read((int)fd, buf, sizeof buf - 1);
            buf[n > 0 ? n : 0] = 0;
            buf[strcspn(buf, "\n")] = 0;
            int cloexec = fcntl((int)fd, F_GETFD) & FD_CLOEXEC;
            close((int)fd);
            printf("%s = %s%s\n", path, buf, cloexec ? "" : " (no cloexec)");
        }
        fflush(stdout);
    }
    return 0;
}
