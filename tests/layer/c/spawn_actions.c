/* posix_spawn with file actions on remote files, as Rust's Command builds them: argv[1] names
 * the case, argv[2] a path in the target. The parent closes its fd right after the spawn (as
 * Command drops its Stdio), then waits. Prints the spawn's error, if any, and whether a child
 * is left to reap. Built by test_process.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv) {
    if (argc < 3) {
        return 9;
    }
    const char *how = argv[1];
    char *path = argv[2];
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    char *cat[] = {"cat", NULL, NULL};
    char *echo[] = {"echo", "spawned", NULL};
    char *missing[] = {"no-such-program-here", NULL};
    char **args = cat;
    int fd = -1;
    if (strcmp(how, "dup2-read") == 0 || strcmp(how, "missing") == 0) {
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || lseek(fd, 10, SEEK_SET) != 10) {
            perror("open");
            return 7;
        }
        posix_spawn_file_actions_adddup2(&fa, fd, 0);
        args = how[0] == 'm' ? missing : cat;
    } else if (strcmp(how, "dup2-write") == 0) {
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) {
            perror("open");
            return 7;
        }
        posix_spawn_file_actions_adddup2(&fa, fd, 1);
        args = echo;
    } else if (strcmp(how, "open-write") == 0) {
        posix_spawn_file_actions_addopen(&fa, 1, path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        args = echo;
    } else if (strcmp(how, "pgroup") == 0) { /* and an attribute: a process group of its own */
        static char *sh[] = {"sh", "-c", "wc -c; cut -d' ' -f5 /proc/$$/stat; echo $$", NULL};
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            perror("open");
            return 7;
        }
        posix_spawn_file_actions_adddup2(&fa, fd, 0);
        posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
        posix_spawnattr_setpgroup(&attr, 0);
        args = sh;
    } else if (strcmp(how, "chdir-read") == 0) {
        char dir[4096], base[4096];
        snprintf(dir, sizeof dir, "%s", path);
        snprintf(base, sizeof base, "%s", path);
        posix_spawn_file_actions_addchdir_np(&fa, dirname(dir));
        cat[1] = basename(base);
    }
    pid_t pid;
    int rc = posix_spawnp(&pid, args[0], &fa, &attr, args, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (fd >= 0) {
        close(fd);
    }
    int status = 0;
    if (rc == 0 && waitpid(pid, &status, 0) < 0) {
        return 8;
    }
    fflush(stdout);
    fprintf(stderr, "spawn: %s; ", rc ? strerror(rc) : "ok");
    fprintf(stderr, "left to reap: %s\n", waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD ? "none" : "some");
    return rc == 0 ? WEXITSTATUS(status) : 0;
}
