/* Write-behind and read-ahead as a C program sees them (tests/layer/test_file_buffers.py).
 * argv[1]: a remote file of 2 MiB (written here block by block); argv[2]: a remote file whose
 * writes past 3 MiB the agent refuses (EFBIG). Prints FAIL lines, then "done". */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCK 4096
#define BLOCKS 512

static int failures;

#define CHECK(cond, ...)                             \
    do {                                             \
        if (!(cond)) {                               \
            printf("FAIL line %d: ", __LINE__);      \
            printf(__VA_ARGS__);                     \
            printf(" (errno %s)\n", strerror(errno)); \
            failures++;                              \
        }                                            \
    } while (0)

static void fill(char *b, int i) { memset(b, i % 256, BLOCK); }

int main(int argc, char **argv) {
    if (argc != 3) {
        return 2;
    }
    char b[BLOCK], want[BLOCK];
    int fd = open(argv[1], O_RDWR);
    CHECK(fd >= 0, "open %s", argv[1]);
    for (int i = 0; i < BLOCKS; i++) {
        fill(b, i);
        CHECK(write(fd, b, BLOCK) == BLOCK, "write block %d", i);
    }
    CHECK(lseek(fd, 0, SEEK_CUR) == (off_t)BLOCKS * BLOCK, "offset after the writes");
    CHECK(fsync(fd) == 0, "fsync");

    /* another fd reads it all, 4 KiB at a time, from the read-ahead */
    int rd = open(argv[1], O_RDONLY);
    CHECK(rd >= 0, "open for reading");
    for (int i = 0; i < BLOCKS; i++) {
        fill(want, i);
        CHECK(read(rd, b, BLOCK) == BLOCK && memcmp(b, want, BLOCK) == 0, "read block %d", i);
    }
    CHECK(read(rd, b, BLOCK) == 0, "end of file");
    close(rd);

    /* a fork child writes at the shared offset; the parent sees its bytes and its offset */
    pid_t pid = fork();
    if (pid == 0) {
        lseek(fd, 0, SEEK_SET);
        ssize_t w = write(fd, "child", 5);
        _exit(w == 5 ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && status == 0, "child");
    CHECK(lseek(fd, 0, SEEK_CUR) == 5, "offset shared with the child");
    CHECK(pread(fd, b, 5, 0) == 5 && memcmp(b, "child", 5) == 0, "the child's bytes");

    /* dup'd fds share the file: closing one writes back, the other goes on */
    int d = dup(fd);
    CHECK(d >= 0, "dup");
    CHECK(close(fd) == 0, "close the first fd");
    CHECK(lseek(d, 0, SEEK_CUR) == 5, "offset through the dup");
    CHECK(close(d) == 0, "close the dup");

    /* a write-back the target refuses: the error of fsync, then of close */
    int f = open(argv[2], O_WRONLY);
    CHECK(f >= 0, "open %s", argv[2]);
    lseek(f, 4 << 20, SEEK_SET);
    CHECK(write(f, "too far", 7) == 7, "a buffered write is accepted");
    errno = 0;
    CHECK(fsync(f) == -1 && errno == EFBIG, "fsync reports the refused write-back");
    CHECK(write(f, "again", 5) == 5, "write after a failed fsync");
    errno = 0;
    CHECK(fdatasync(f) == -1 && errno == EFBIG, "fdatasync reports it too");
    CHECK(write(f, "last", 4) == 4, "one more");
    errno = 0;
    CHECK(close(f) == -1 && errno == EFBIG, "close reports the refused write-back");
    printf("%s\n", failures ? "failed" : "done");
    return failures != 0;
}
