/* Starts `cat /app/test.txt` with an environment that lacks the layer, by the exec/spawn
 * function named in argv[1]: the layer must put itself back. Built by test_process.py. */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv) {
    char *env[] = {"PATH=/usr/bin:/bin", NULL};
    char *args[] = {"cat", "/app/test.txt", NULL};
    const char *how = argc > 1 ? argv[1] : "";
    if (strcmp(how, "execle") == 0) {
        execle("/bin/cat", "cat", "/app/test.txt", (char *)NULL, env);
    } else if (strcmp(how, "execlp") == 0) {
        environ = env; /* execlp uses environ: one without the layer */
        execlp("cat", "cat", "/app/test.txt", (char *)NULL);
    } else if (strcmp(how, "execl") == 0) {
        environ = env;
        execl("/bin/cat", "cat", "/app/test.txt", (char *)NULL);
    } else if (strcmp(how, "execve") == 0) {
        execve("/bin/cat", args, env);
    } else if (strcmp(how, "execvp") == 0) {
        environ = env;
        execvp("cat", args);
    } else if (strcmp(how, "posix_spawn") == 0 || strcmp(how, "posix_spawnp") == 0) {
        pid_t pid;
        int rc = how[11] == 'p' ? posix_spawnp(&pid, "cat", NULL, NULL, args, env)
                                : posix_spawn(&pid, "/bin/cat", NULL, NULL, args, env);
        int status = 0;
        if (rc != 0 || waitpid(pid, &status, 0) < 0) {
            return 8;
        }
        return WEXITSTATUS(status);
    }
    perror(how);
    return 9;
}
