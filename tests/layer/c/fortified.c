/* The fortified libc calls a program built with -O2 -D_FORTIFY_SOURCE=2 makes (the default of
 * Ubuntu's gcc and of most distributions' packages) when the compiler knows a buffer's size
 * but not the length asked for: __read_chk, __pread_chk, __readlink_chk, __getcwd_chk,
 * __gethostname_chk, __recvfrom_chk. argv[1]: a file, argv[2]: a symlink, argv[3]: a directory; the lengths
 * come from argc so that the compiler cannot prove them in bounds. Built by test_hooks_c.py. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        return 9;
    }
    size_t chunk = (size_t)argc * 1024; /* 4 KiB, unknown to the compiler */
    char buf[8192];
    long total = 0;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        perror("open");
        return 7;
    }
    ssize_t n;
    while ((n = read(fd, buf, chunk)) > 0) {
        total += n;
    }
    n = pread(fd, buf, chunk, 10);
    printf("read %ld, pread %zd: %.4s\n", total, n, n >= 4 ? buf : "");
    close(fd);
    char link[256];
    n = readlink(argv[2], link, chunk / 32);
    printf("readlink %.*s\n", n > 0 ? (int)n : 0, link);
    char cwd[512];
    if (chdir(argv[3]) == 0 && getcwd(cwd, chunk / 8) != NULL) {
        printf("getcwd %s\n", cwd);
    }
    char host[256];
    if (gethostname(host, chunk / 16) == 0) {
        printf("hostname %s\n", host);
    }
    /* a datagram through the layer's UDP relay: its sender is the address it was sent to */
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(53)};
    inet_pton(AF_INET, "192.0.2.55", &to.sin_addr);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(u, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (sendto(u, "ping", 4, 0, (struct sockaddr *)&to, sizeof to) == 4) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        n = recvfrom(u, buf, chunk, 0, (struct sockaddr *)&from, &fl);
        char addr[64] = "?";
        inet_ntop(AF_INET, &from.sin_addr, addr, sizeof addr);
        printf("udp %.*s from %s:%d\n", n > 0 ? (int)n : 0, buf, addr, ntohs(from.sin_port));
    }
    close(u);
    return 0;
}
