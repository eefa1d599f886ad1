/* For each path argument: open + read (up to 63 bytes) and stat, the way a C program does
 * them, printed as one tab-separated line: path, open errno, stat errno, first line read. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char buf[64] = {0};
        int open_err = 0, stat_err = 0;
        int fd = open(argv[i], O_RDONLY);
        if (fd < 0) {
            open_err = errno;
        } else {
            ssize_t n = read(fd, buf, sizeof buf - 1);
            buf[n > 0 ? n : 0] = 0;
            close(fd);
        }
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            stat_err = errno;
        }
        buf[strcspn(buf, "\n\t")] = 0;
        printf("%s\t%d\t%d\t%s\n", argv[i], open_err, stat_err, buf);
    }
    return 0;
}
