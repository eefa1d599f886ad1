/* Built with -static by tests/cli/test_syscall_supervisor.py: a program the layer cannot reach.
 * For each line on stdin (a path), opens it with the open system call it names (openat by
 * default; "open:" / "openat2:" prefixes pick the others) and prints "<path> = <content>" or
 * "<path> ! <errno name>". At start it prints "pid <pid> supervisor <MIRRORD_SUPERVISOR_PID>". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    default: return "OTHER";
    }
}

int main(void) {
    const char *sv = getenv("MIRRORD_SUPERVISOR_PID");
    printf("pid %d supervisor %s\n", (int)getpid(), sv != NULL ? sv : "none");
    fflush(stdout);
    char line[4096];
    while (fgets(line, sizeof line, stdin) != NULL) {
        line[strcspn(line, "\n")] = 0;
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
