/* Exercises the layer's file hooks from C, on a directory given as argv[1] (remote or
 * local: the same checks must pass both ways). Prints "<check> ok" or "<check> FAIL ..."
 * per check; exits non-zero if any failed. Built by tests/layer/test_hooks_c.py. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

static int fails;
#define CHECK(name, cond)                                                              \
    do {                                                                               \
        int ok_ = (cond);                                                              \
        printf("%s %s\n", name, ok_ ? "ok" : "FAIL");                                  \
        if (!ok_) {                                                                    \
            printf("  errno=%d (%s) at line %d\n", errno, strerror(errno), __LINE__);  \
            fails++;                                                                   \
        }                                                                              \
    } while (0)

static char D[512];
static char *P(const char *name) {
    static char bufs[8][600];
    static int i;
    char *b = bufs[i++ % 8];
    snprintf(b, 600, "%s/%s", D, name);
    return b;
}

static const char HELLO[] = "hello from the target\n";
#define HLEN 22

int __open_2(const char *, int);

static int dir_has(DIR *d, const char *name, int use64) {
    int found = 0;
    if (use64) {
        struct dirent64 *e;
        while ((e = readdir64(d)) != NULL) {
            found |= strcmp(e->d_name, name) == 0;
        }
    } else {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            found |= strcmp(e->d_name, name) == 0;
        }
    }
    return found;
}

static void files(void) {
    char buf[128];
    struct stat st;
    char t[600];
    snprintf(t, sizeof t, "%s", P("test.txt"));

    int fd = open(t, O_RDONLY);
    CHECK("open", fd >= 0 && read(fd, buf, sizeof buf) == HLEN && memcmp(buf, HELLO, HLEN) == 0);
    CHECK("fstat", fstat(fd, &st) == 0 && st.st_size == HLEN && S_ISREG(st.st_mode));
    CHECK("fcntl_getfl", (fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY);
    struct stat64 st64;
    CHECK("fstat64", fstat64(fd, &st64) == 0 && st64.st_size == HLEN);
    CHECK("close", close(fd) == 0);
    CHECK("close_twice_ebadf", close(fd) == -1 && errno == EBADF);

    fd = open(P("missing"), O_RDONLY);
    CHECK("open_enoent", fd == -1 && errno == ENOENT);

    /* opened read-write: handle-backed, so read/pread/readv/lseek/write go through it */
    fd = open64(t, O_RDWR);
    CHECK("open64_rdwr", fd >= 0);
    CHECK("read", read(fd, buf, 5) == 5 && memcmp(buf, "hello", 5) == 0);
    CHECK("lseek", lseek(fd, 0, SEEK_CUR) == 5);
    CHECK("pread", pread(fd, buf, 4, 6) == 4 && memcmp(buf, "from", 4) == 0);
    CHECK("pread64", pread64(fd, buf, 3, 11) == 3 && memcmp(buf, "the", 3) == 0);
    CHECK("lseek64", lseek64(fd, 0, SEEK_SET) == 0);
    char a[6] = {0}, b[5] = {0};
    struct iovec iov[2] = {{a, 6}, {b, 4}};
    CHECK("readv", readv(fd, iov, 2) == 10 && memcmp(a, "hello ", 6) == 0 && memcmp(b, "from", 4) == 0);
    int d1 = dup(fd);
    CHECK("dup", d1 >= 0 && read(d1, buf, 4) == 4 && memcmp(buf, " the", 4) == 0);
    CHECK("dup2", dup2(fd, 50) == 50 && pread(50, buf, 5, 0) == 5 && memcmp(buf, "hello", 5) == 0);
    CHECK("dup3", dup3(fd, 51, O_CLOEXEC) == 51 && pread(51, buf, 5, 0) == 5);
    int d2 = fcntl(fd, F_DUPFD_CLOEXEC, 60);
    CHECK("fcntl_dupfd", d2 >= 60 && pread(d2, buf, 5, 0) == 5 && memcmp(buf, "hello", 5) == 0);
    close(d1);
    close(50);
    close(51);
    close(d2);
    CHECK("read_after_dup_close", pread(fd, buf, 5, 0) == 5);
    struct statfs sf;
    CHECK("fstatfs", fstatfs(fd, &sf) == 0 && sf.f_bsize > 0);
    close(fd);

    fd = openat(AT_FDCWD, t, O_RDONLY);
    CHECK("openat", fd >= 0 && read(fd, buf, 5) == 5);
    close(fd);
    int dfd = open(D, O_RDONLY | O_DIRECTORY);
    fd = openat64(dfd, "test.txt", O_RDONLY);
    CHECK("openat64_dirfd", dfd >= 0 && fd >= 0 && read(fd, buf, 5) == 5 && memcmp(buf, "hello", 5) == 0);
    close(fd);
    CHECK("fstatat_dirfd", fstatat(dfd, "test.txt", &st, 0) == 0 && st.st_size == HLEN);
    DIR *fdd = fdopendir(dfd);
    CHECK("fdopendir_readdir64", fdd != NULL && dir_has(fdd, "test.txt", 1));
    CHECK("closedir_fdopendir", fdd != NULL && closedir(fdd) == 0);
    fd = __open_2(t, O_RDONLY);
    CHECK("__open_2", fd >= 0);
    close(fd);

    CHECK("stat", stat(t, &st) == 0 && st.st_size == HLEN && S_ISREG(st.st_mode));
    CHECK("stat64", stat64(t, &st64) == 0 && st64.st_size == HLEN);
    CHECK("lstat_link", lstat(P("link"), &st) == 0 && S_ISLNK(st.st_mode));
    CHECK("lstat64_link", lstat64(P("link"), &st64) == 0 && S_ISLNK(st64.st_mode));
    CHECK("stat_follows_link", stat(P("link"), &st) == 0 && S_ISREG(st.st_mode));
    CHECK("fstatat", fstatat(AT_FDCWD, t, &st, 0) == 0 && st.st_size == HLEN);
    CHECK("fstatat64", fstatat64(AT_FDCWD, t, &st64, 0) == 0 && st64.st_size == HLEN);
    CHECK("stat_enoent", stat(P("missing"), &st) == -1 && errno == ENOENT);
    struct statx sx;
    CHECK("statx", statx(AT_FDCWD, t, 0, STATX_BASIC_STATS, &sx) == 0 && sx.stx_size == HLEN);
    int (*xstat)(int, const char *, struct stat *) = (int (*)(int, const char *, struct stat *))dlsym(RTLD_DEFAULT, "__xstat");
    CHECK("__xstat", xstat != NULL && xstat(1, t, &st) == 0 && st.st_size == HLEN);
    CHECK("statfs", statfs(D, &sf) == 0 && sf.f_bsize > 0);
    CHECK("access", access(t, R_OK) == 0);
    CHECK("access_enoent", access(P("missing"), F_OK) == -1 && errno == ENOENT);
    CHECK("faccessat", faccessat(AT_FDCWD, t, R_OK, AT_EACCESS) == 0);
    CHECK("euidaccess", euidaccess(t, R_OK) == 0 && eaccess(P("missing"), R_OK) == -1 && errno == ENOENT);
    struct dirent **names = NULL;
    int nn = scandir(D, &names, NULL, alphasort);
    CHECK("scandir", nn >= 4 && strcmp(names[nn - 1]->d_name, "test.txt") == 0 &&
                         strcmp(names[nn - 2]->d_name, "link") == 0);
    for (int i = 0; i < nn; i++) free(names[i]);
    free(names);
    struct dirent64 **names64 = NULL;
    nn = scandir64(D, &names64, NULL, alphasort64);
    CHECK("scandir64", nn >= 4);
    for (int i = 0; i < nn; i++) free(names64[i]);
    free(names64);
    CHECK("scandir_enoent", scandir(P("missing"), &names, NULL, NULL) == -1 && errno == ENOENT);
    ssize_t n = readlink(P("link"), buf, sizeof buf);
    CHECK("readlink", n == (ssize_t)strlen(t) && memcmp(buf, t, (size_t)n) == 0);
    n = readlinkat(AT_FDCWD, P("link"), buf, sizeof buf);
    CHECK("readlinkat", n == (ssize_t)strlen(t));
    CHECK("readlink_einval", readlink(t, buf, sizeof buf) == -1 && errno == EINVAL);

    DIR *dir = opendir(D);
    CHECK("opendir", dir != NULL);
    CHECK("dirfd", dir != NULL && dirfd(dir) >= 0);
    CHECK("readdir", dir != NULL && dir_has(dir, "link", 0));
    CHECK("closedir", dir != NULL && closedir(dir) == 0);

    dir = opendir(D);
    int n1 = 0, n2 = 0;
    while (dir && readdir(dir)) n1++;
    if (dir) rewinddir(dir);
    while (dir && readdir(dir)) n2++;
    CHECK("rewinddir", dir != NULL && n1 >= 4 && n1 == n2);
    if (dir) rewinddir(dir);
    if (dir) { readdir(dir); readdir(dir); }
    long loc = dir ? telldir(dir) : -1;
    struct dirent *third = dir ? readdir(dir) : NULL;
    char third_name[256] = "";
    if (third) snprintf(third_name, sizeof third_name, "%s", third->d_name);
    if (dir) { readdir(dir); seekdir(dir, loc); }
    third = dir ? readdir(dir) : NULL;
    CHECK("telldir_seekdir", loc >= 0 && third != NULL && strcmp(third->d_name, third_name) == 0);
    if (dir) rewinddir(dir);
    struct dirent ent, *res = NULL;
    int found = 0;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    while (dir && readdir_r(dir, &ent, &res) == 0 && res != NULL) found |= strcmp(ent.d_name, "test.txt") == 0;
#pragma GCC diagnostic pop
    CHECK("readdir_r", found);
    errno = 0;
    CHECK("readdir_end_untouched_error", dir != NULL && readdir(dir) == NULL && errno == 0);
    if (dir) closedir(dir);
    CHECK("opendir_enoent", opendir(P("missing")) == NULL && errno == ENOENT);

    CHECK("mkdir", mkdir(P("new"), 0755) == 0);
    CHECK("mkdir_eexist", mkdir(P("new"), 0755) == -1 && errno == EEXIST);
    CHECK("mkdirat", mkdirat(AT_FDCWD, P("new2"), 0755) == 0);
    CHECK("rmdir", rmdir(P("new")) == 0);
    CHECK("unlinkat_removedir", unlinkat(AT_FDCWD, P("new2"), AT_REMOVEDIR) == 0);

    fd = creat(P("c.txt"), 0644);
    CHECK("creat", fd >= 0);
    CHECK("write", write(fd, "abcdef", 6) == 6);
    CHECK("pwrite", pwrite(fd, "Z", 1, 0) == 1);
    CHECK("pwrite64", pwrite64(fd, "Y", 1, 1) == 1);
    struct iovec wv[2] = {{(void *)"gh", 2}, {(void *)"ij", 2}};
    CHECK("writev", writev(fd, wv, 2) == 4);
    CHECK("fsync", fsync(fd) == 0);
    CHECK("ftruncate", ftruncate(fd, 8) == 0);
    CHECK("ftruncate64", ftruncate64(fd, 8) == 0);
    CHECK("fchmod", fchmod(fd, 0600) == 0);
    close(fd);
    fd = open(P("c.txt"), O_RDONLY);
    n = fd >= 0 ? read(fd, buf, sizeof buf) : -1;
    CHECK("written_content", n == 8 && memcmp(buf, "ZYcdefgh", 8) == 0);
    close(fd);
    CHECK("truncate", truncate(P("c.txt"), 4) == 0 && stat(P("c.txt"), &st) == 0 && st.st_size == 4);
    CHECK("truncate64", truncate64(P("c.txt"), 3) == 0 && stat(P("c.txt"), &st) == 0 && st.st_size == 3);
    CHECK("chmod", chmod(P("c.txt"), 0640) == 0 && stat(P("c.txt"), &st) == 0 && (st.st_mode & 0777) == 0640);
    CHECK("truncate_enoent", truncate(P("missing"), 0) == -1 && errno == ENOENT);
    CHECK("rename", rename(P("c.txt"), P("d.txt")) == 0 && access(P("c.txt"), F_OK) == -1);
    CHECK("renameat", renameat(AT_FDCWD, P("d.txt"), AT_FDCWD, P("e.txt")) == 0);
    CHECK("unlink", unlink(P("e.txt")) == 0 && access(P("e.txt"), F_OK) == -1);
    fd = open(P("f.txt"), O_CREAT | O_WRONLY, 0644);
    close(fd);
    CHECK("unlinkat", unlinkat(AT_FDCWD, P("f.txt"), 0) == 0);

    FILE *f = fopen(t, "r");
    CHECK("fopen", f != NULL && fgets(buf, sizeof buf, f) != NULL && strcmp(buf, HELLO) == 0);
    if (f) fclose(f);
    f = fopen64(t, "re");
    CHECK("fopen64", f != NULL && fgets(buf, sizeof buf, f) != NULL && strcmp(buf, HELLO) == 0);
    if (f) fclose(f);
    f = fopen(P("w.txt"), "w");
    CHECK("fopen_write", f != NULL && fputs("written\n", f) >= 0 && fclose(f) == 0);
    f = fopen(P("w.txt"), "r");
    CHECK("fopen_read_back", f != NULL && fgets(buf, sizeof buf, f) != NULL && strcmp(buf, "written\n") == 0);
    if (f) fclose(f);
    f = fopen("/dev/null", "r");
    f = f ? freopen(t, "r", f) : NULL;
    if (getenv("EXPECT_FREOPEN_ENOTSUP") != NULL) { /* a handle-backed file cannot take over a FILE */
        CHECK("freopen", f == NULL && errno == ENOTSUP);
    } else {
        CHECK("freopen", f != NULL && fgets(buf, sizeof buf, f) != NULL && strcmp(buf, HELLO) == 0);
    }
    if (f) fclose(f);

    /* fclose closes the fd inside libc, where no hook sees it: the number, reused by a pipe,
     * must behave as the pipe */
    f = fopen(t, "r");
    int old = f ? fileno(f) : -1;
    if (f) fclose(f);
    int pp[2];
    CHECK("fd_reused_after_fclose", pipe(pp) == 0 && (old < 0 || pp[0] == old || pp[1] == old) &&
                                        write(pp[1], "p", 1) == 1 && fstat(pp[0], &st) == 0 &&
                                        S_ISFIFO(st.st_mode) && read(pp[0], buf, 1) == 1);
    close(pp[0]);
    close(pp[1]);

    int pipefd[2];
    fd = open(t, O_RDWR);
    CHECK("sendfile", pipe(pipefd) == 0 && fd >= 0 && sendfile(pipefd[1], fd, NULL, 100) == HLEN &&
                          read(pipefd[0], buf, sizeof buf) == HLEN && memcmp(buf, HELLO, HLEN) == 0);
    close(fd);
    close(pipefd[0]);
    close(pipefd[1]);

    /* the rarer entry points */
    fd = creat64(P("g.txt"), 0644);
    CHECK("creat64", fd >= 0 && write(fd, "g", 1) == 1 && close(fd) == 0);
    fd = open(t, O_RDONLY);
    int fd2 = open(P("g.txt"), O_WRONLY);
    off64_t in_off = 0;
    ssize_t copied = (fd >= 0 && fd2 >= 0) ? copy_file_range(fd, &in_off, fd2, NULL, 5, 0) : -2;
    /* handle-backed files answer EXDEV (callers fall back to read/write) */
    CHECK("copy_file_range", copied == 5 || (copied == -1 && errno == EXDEV));
    close(fd);
    close(fd2);
    fd = open(t, O_RDWR);
    pipe(pipefd);
    off64_t soff = 6;
    CHECK("sendfile64", sendfile64(pipefd[1], fd, &soff, 4) == 4 && read(pipefd[0], buf, 4) == 4 &&
                            memcmp(buf, "from", 4) == 0 && soff == 10);
    close(pipefd[0]);
    close(pipefd[1]);
    close(fd);
    f = fopen("/dev/null", "r");
    f = f ? freopen64(t, "r", f) : NULL;
    if (getenv("EXPECT_FREOPEN_ENOTSUP") != NULL) {
        CHECK("freopen64", f == NULL && errno == ENOTSUP);
    } else {
        CHECK("freopen64", f != NULL && fgets(buf, sizeof buf, f) != NULL && strcmp(buf, HELLO) == 0);
    }
    if (f) fclose(f);
    struct statfs64 sf64;
    CHECK("statfs64", statfs64(D, &sf64) == 0 && sf64.f_bsize > 0);
    fd = open(t, O_RDONLY);
    CHECK("fstatfs64", fstatfs64(fd, &sf64) == 0 && sf64.f_bsize > 0);
    int (*lx)(int, const char *, struct stat *) = (int (*)(int, const char *, struct stat *))dlsym(RTLD_DEFAULT, "__lxstat");
    int (*fx)(int, int, struct stat *) = (int (*)(int, int, struct stat *))dlsym(RTLD_DEFAULT, "__fxstat");
    CHECK("__lxstat", lx != NULL && lx(1, P("link"), &st) == 0 && S_ISLNK(st.st_mode));
    CHECK("__fxstat", fx != NULL && fx(1, fd, &st) == 0 && st.st_size == HLEN);
    close(fd);
    CHECK("renameat2", renameat2(AT_FDCWD, P("g.txt"), AT_FDCWD, P("h.txt"), 0) == 0 &&
                           access(P("h.txt"), F_OK) == 0);
    CHECK("renameat2_noreplace", renameat2(AT_FDCWD, P("h.txt"), AT_FDCWD, t, RENAME_NOREPLACE) == -1 &&
                                     errno == EEXIST);
    unlink(P("h.txt"));
    ssize_t xl = listxattr(t, buf, sizeof buf);
    if (getenv("EXPECT_REMOTE") != NULL) {
        CHECK("listxattr", xl == -1 && errno == ENOTSUP);
        CHECK("getxattr", getxattr(t, "user.x", buf, sizeof buf) == -1 && errno == ENOTSUP);
    } else {
        CHECK("listxattr", xl >= 0 || errno == ENOTSUP);
        CHECK("getxattr", getxattr(t, "user.x", buf, sizeof buf) == -1);
    }
    char cwd[600];
    CHECK("chdir", chdir(D) == 0 && getcwd(cwd, sizeof cwd) != NULL && strcmp(cwd, D) == 0 &&
                       access("test.txt", R_OK) == 0);
    int dd = open(".", O_RDONLY | O_DIRECTORY);
    CHECK("fchdir", chdir("/") == 0 && dd >= 0 && fchdir(dd) == 0 && access("link", F_OK) == 0);
    close(dd);
    CHECK("chdir_back", chdir("/tmp") == 0 && getcwd(cwd, sizeof cwd) != NULL && strcmp(cwd, "/tmp") == 0);

    /* the layer's own connection (at fd 900) is invisible and survives the app's fd games */
    CHECK("layer_fd_invisible", fcntl(900, F_GETFD) == -1 && errno == EBADF && close(900) == -1);
    CHECK("dup2_onto_layer_fd", dup2(1, 900) == 900 && stat(t, &st) == 0 && st.st_size == HLEN);
    CHECK("close_after_dup2", close(900) == 0);
    fd = open(t, O_RDONLY);
    CHECK("close_range_keeps_layer", fd >= 3 && close_range(3, ~0U, 0) == 0 && stat(t, &st) == 0 &&
                                         st.st_size == HLEN && fcntl(fd, F_GETFD) == -1);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        return 2;
    }
    snprintf(D, sizeof D, "%s", argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    files();
    if (argc > 2) {
        struct hostent *h = gethostbyname(argv[2]);
        CHECK("gethostbyname", h != NULL && h->h_length == 4);
        if (h) printf("address %d.%d.%d.%d\n", (unsigned char)h->h_addr_list[0][0], (unsigned char)h->h_addr_list[0][1],
                      (unsigned char)h->h_addr_list[0][2], (unsigned char)h->h_addr_list[0][3]);
        struct hostent he, *hr = NULL;
        char hbuf[1024];
        int herr = 0;
        CHECK("gethostbyname_r", gethostbyname_r(argv[2], &he, hbuf, sizeof hbuf, &hr, &herr) == 0 &&
                                     hr == &he && he.h_length == 4 && he.h_addr_list[0] != NULL);
        CHECK("gethostbyname_r_erange", gethostbyname_r(argv[2], &he, hbuf, 8, &hr, &herr) == ERANGE);
        CHECK("gethostbyname2", gethostbyname2(argv[2], AF_INET) != NULL);
        char name[256];
        CHECK("gethostname", gethostname(name, sizeof name) == 0);
        printf("hostname %s\n", name);
    }
    return fails ? 1 : 0;
}
