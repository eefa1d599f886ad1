/* I/O on remote fds: read/write/seek, vectors, sendfile, copy_file_range, mmap, syscall().
 *
 * Owns: the hooks that take an fd the app already has. A memfd-backed file (K_MFILE) is read
 * and written natively (with the access mode of the app's open enforced here); a
 * handle-backed file (K_RFILE) reads, writes and seeks through its remote handle.
 * Does not own: opening (files_open.c) or the caches' write-back (files_cache.c).
 */
#include "files.h"

#include <stdarg.h>
#include <sys/syscall.h>

/* Handle-backed fds only; memfd-backed ones read natively. */
#define RFILE_OR_BYPASS(fd, realcall)                               \
    struct ent *pe = fd_peek(fd);                                   \
    if (pe == NULL || t_guard || !is_file_kind(pe)) {               \
        return realcall;                                            \
    }

/* read() at the end of a fetched file: look again (mfile_refresh), then read once more. */
static __attribute__((noinline)) ssize_t mfile_read_at_end(int fd, void *buf, size_t n) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return 0;
    }
    mfile_refresh(fd, e);
    ent_put(e);
    return REAL(read)(fd, buf, n);
}

/* The memfd of a file opened write-only is readable: refuse as the real fd would. */
int mfile_writeonly(int fd, struct ent *pe) {
    if (pe->kind == K_MFILE && pe->writeback && (pe->oflags & O_ACCMODE) == O_WRONLY) {
        struct ent *e = ent_get(fd);
        if (e == NULL) {
            return 0;
        }
        ent_put(e);
        errno = EBADF;
        return 1;
    }
    return 0;
}

/* A memfd-backed file opened read-only: the memfd itself is writable, so refuse. A
 * write-back file is written natively (the memfd is the cache). Returns 1: refused,
 * 2: write natively, 0: handle-backed. */
static int mfile_readonly(int fd, struct ent *pe) {
    if (pe->kind == K_MFILE && !pe->writeback) {
        struct ent *e = ent_get(fd); /* still ours? (else: write natively) */
        if (e == NULL) {
            return 2;
        }
        ent_put(e);
        errno = EBADF;
        return 1;
    }
    return pe->kind == K_MFILE ? 2 : 0;
}

/* How an I/O call on a remote fd goes: 1 refused (errno set), 2 natively on the memfd, 0
 * through the handle. */
static int mfile_route(int fd, struct ent *pe, int write) {
    if (write) {
        return mfile_readonly(fd, pe);
    }
    if (pe->kind != K_MFILE) {
        return 0;
    }
    return mfile_writeonly(fd, pe) ? 1 : 2;
}

/* One transfer through e's handle at `off` (-1: its position); drops the caller's reference. */
static ssize_t rfile_xfer(struct ent *e, void *buf, size_t n, off_t off, int write) {
    t_guard++;
    ssize_t r = write ? rfile_write(e, buf, n, off) : rfile_read(e, buf, n, off);
    t_guard--;
    ent_put(e);
    return r;
}

/* pread/pwrite: at an explicit offset, which must not be negative. */
static ssize_t rfile_pxfer(struct ent *e, void *buf, size_t n, off_t off, int write) {
    if (off < 0) {
        ent_put(e);
        errno = EINVAL;
        return -1;
    }
    return rfile_xfer(e, buf, n, off, write);
}

HOOK ssize_t read(int fd, void *buf, size_t n) {
    RFILE_OR_BYPASS(fd, REAL(read)(fd, buf, n))
    if (pe->kind == K_MFILE) {
        if (mfile_writeonly(fd, pe)) {
            return -1;
        }
        ssize_t r = REAL(read)(fd, buf, n);
        if (__builtin_expect(r == 0 && n > 0 && !pe->writeback, 0)) {
            r = mfile_read_at_end(fd, buf, n);
        }
        return r;
    }
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(read)(fd, buf, n);
    }
    return rfile_xfer(e, buf, n, -1, 0);
}

/* ---------------------------------------------------------------- vectors */

/* readv/writev on a remote file: the vectors in order, stopping at a short transfer like the
 * kernel would. Drops the caller's reference to e. */
static ssize_t rfile_iov(struct ent *e, const struct iovec *iov, int cnt, int write) {
    ssize_t total = 0;
    t_guard++;
    for (int i = 0; i < cnt; i++) {
        if (iov[i].iov_len == 0) {
            continue;
        }
        ssize_t r = write ? rfile_write(e, iov[i].iov_base, iov[i].iov_len, -1)
                          : rfile_read(e, iov[i].iov_base, iov[i].iov_len, -1);
        if (r < 0) {
            total = total ? total : -1;
            break;
        }
        total += r;
        if ((size_t)r < iov[i].iov_len) {
            break;
        }
    }
    t_guard--;
    ent_put(e);
    return total;
}

/* preadv/pwritev on a handle-backed file: the vectors in order at `off`, stopping at a short
 * transfer. Drops the caller's reference to e. */
static ssize_t rfile_piov(struct ent *e, const struct iovec *iov, int cnt, off_t off, int write) {
    ssize_t total = 0;
    t_guard++;
    if (off < 0 || cnt < 0) {
        errno = EINVAL;
        total = -1;
    }
    for (int i = 0; total >= 0 && i < cnt; i++) {
        size_t done = 0;
        while (done < iov[i].iov_len) {
            char *base = (char *)iov[i].iov_base + done;
            size_t want = iov[i].iov_len - done;
            ssize_t r = write ? rfile_write(e, base, want, off + total)
                              : rfile_read(e, base, want, off + total);
            if (r < 0) {
                total = total ? total : -1;
                goto out;
            }
            total += r;
            done += (size_t)r;
            if (r == 0) {
                goto out;
            }
        }
    }
out:
    t_guard--;
    ent_put(e);
    return total;
}

/* The I/O table: every hook but read() has this shape; `args` are the real call's, `xfer` the
 * transfer through the handle (it drops e). */
#define IO_HOOK(name, params, args, write, xfer)                                     \
    HOOK ssize_t name params {                                                       \
        RFILE_OR_BYPASS(fd, REAL(name) args)                                         \
        switch (mfile_route(fd, pe, write)) {                                        \
        case 1: return -1;                                                           \
        case 2: return REAL(name) args;                                              \
        }                                                                            \
        struct ent *e = ent_get(fd);                                                 \
        if (e == NULL) {                                                             \
            return REAL(name) args;                                                  \
        }                                                                            \
        return xfer;                                                                 \
    }
IO_HOOK(write, (int fd, const void *buf, size_t n), (fd, buf, n), 1,
        rfile_xfer(e, (void *)buf, n, -1, 1))
IO_HOOK(pread, (int fd, void *buf, size_t n, off_t off), (fd, buf, n, off), 0,
        rfile_pxfer(e, buf, n, off, 0))
IO_HOOK(pread64, (int fd, void *buf, size_t n, off64_t off), (fd, buf, n, off), 0,
        rfile_pxfer(e, buf, n, (off_t)off, 0))
/* The fortified reads (_FORTIFY_SOURCE, a buffer whose size the compiler knows): glibc's call
 * its internal read/pread, which no hook sees, so a remote file read through them gave the
 * placeholder's bytes (none). The length check, then the hook. */
ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen);
HOOK ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen) {
    if (n > buflen) {
        __chk_fail();
    }
    return read(fd, buf, n);
}
ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen);
HOOK ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen) {
    if (n > buflen) {
        __chk_fail();
    }
    return pread(fd, buf, n, off);
}
ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen);
HOOK ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen) {
    if (n > buflen) {
        __chk_fail();
    }
    return pread64(fd, buf, n, off);
}
IO_HOOK(pwrite, (int fd, const void *buf, size_t n, off_t off), (fd, buf, n, off), 1,
        rfile_pxfer(e, (void *)buf, n, off, 1))
IO_HOOK(pwrite64, (int fd, const void *buf, size_t n, off64_t off), (fd, buf, n, off), 1,
        rfile_pxfer(e, (void *)buf, n, (off_t)off, 1))
IO_HOOK(readv, (int fd, const struct iovec *iov, int cnt), (fd, iov, cnt), 0,
        rfile_iov(e, iov, cnt, 0))
IO_HOOK(writev, (int fd, const struct iovec *iov, int cnt), (fd, iov, cnt), 1,
        rfile_iov(e, iov, cnt, 1))
IO_HOOK(preadv, (int fd, const struct iovec *iov, int cnt, off_t off), (fd, iov, cnt, off), 0,
        rfile_piov(e, iov, cnt, off, 0))
IO_HOOK(preadv64, (int fd, const struct iovec *iov, int cnt, off64_t off), (fd, iov, cnt, off), 0,
        rfile_piov(e, iov, cnt, (off_t)off, 0))
IO_HOOK(pwritev, (int fd, const struct iovec *iov, int cnt, off_t off), (fd, iov, cnt, off), 1,
        rfile_piov(e, iov, cnt, off, 1))
IO_HOOK(pwritev64, (int fd, const struct iovec *iov, int cnt, off64_t off), (fd, iov, cnt, off),
        1, rfile_piov(e, iov, cnt, (off_t)off, 1))

/* ---------------------------------------------------------------- seek */

static off_t lseek_common(int fd, off_t off, int whence) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return REAL(lseek)(fd, off, whence);
    }
    t_guard++;
    off_t r = rfile_seek(e, off, whence);
    t_guard--;
    ent_put(e);
    return r;
}

#define LSEEK_HOOK(name, offtype)                                   \
    HOOK offtype name(int fd, offtype off, int whence) {            \
        RFILE_OR_BYPASS(fd, REAL(name)(fd, off, whence))            \
        if (pe->kind == K_MFILE) {                                  \
            return REAL(name)(fd, off, whence);                     \
        }                                                           \
        return lseek_common(fd, off, whence);                       \
    }
LSEEK_HOOK(lseek, off_t)
LSEEK_HOOK(lseek64, off64_t)

/* ---------------------------------------------------------------- sendfile, copy_file_range */

/* copy_file_range / sendfile cannot reach a handle-backed file: emulate sendfile with reads,
 * and make copy_file_range fail with EXDEV, which callers (cat, cp) treat as "fall back". */
HOOK ssize_t copy_file_range(int in, off64_t *ioff, int out, off64_t *ooff, size_t n, unsigned flags) {
    struct ent *a = fd_peek(in), *b = fd_peek(out);
    if (t_guard || ((a == NULL || a->kind != K_RFILE) && (b == NULL || b->kind != K_RFILE))) {
        return REAL(copy_file_range)(in, ioff, out, ooff, n, flags);
    }
    errno = EXDEV;
    return -1;
}

static ssize_t sendfile_emulated(int out, int in, off_t *off, size_t n) {
    char buf[65536];
    size_t want = n < sizeof buf ? n : sizeof buf;
    ssize_t r = off ? pread(in, buf, want, *off) : read(in, buf, want);
    if (r <= 0) {
        return r;
    }
    ssize_t w = write(out, buf, (size_t)r);
    if (w > 0 && off) {
        *off += w;
    } else if (w >= 0 && w < r && !off) {
        lseek(in, w - r, SEEK_CUR);
    }
    return w;
}

#define SENDFILE_HOOK(name, offtype)                                        \
    HOOK ssize_t name(int out, int in, offtype *off, size_t n) {            \
        struct ent *a = fd_peek(in);                                        \
        if (t_guard || a == NULL || a->kind != K_RFILE) {                   \
            return REAL(name)(out, in, off, n);                             \
        }                                                                   \
        return sendfile_emulated(out, in, (off_t *)off, n);                 \
    }
SENDFILE_HOOK(sendfile, off_t)
SENDFILE_HOOK(sendfile64, off64_t)

/* ---------------------------------------------------------------- mmap, syscall()
 *
 * Found by running real programs against a pod: mmap of a handle-backed file mapped the empty
 * placeholder (SIGBUS on the first access); libuv (node) issues close, statx and
 * copy_file_range through syscall(). */

#define MMAP_HOOK(name, offtype)                                                        \
    HOOK void *name(void *addr, size_t len, int prot, int flags, int fd, offtype off) { \
        struct ent *pe = fd_peek(fd);                                                   \
        if (__builtin_expect(pe != NULL, 0) && !(flags & MAP_ANONYMOUS) && !t_guard &&  \
            pe->kind == K_RFILE) {                                                      \
            rfile_fill_placeholder(fd);                                                 \
        }                                                                               \
        return REAL(name)(addr, len, prot, flags, fd, off);                             \
    }
MMAP_HOOK(mmap, off_t)
MMAP_HOOK(mmap64, off64_t)

/* syscall(): the file calls libuv makes this way (close, statx, copy_file_range) go through
 * their hooks; every other number is passed on unchanged. Six arguments are read as the
 * kernel ABI has at most six (what glibc's own syscall() does too). */
HOOK long syscall(long n, ...) {
    va_list ap;
    va_start(ap, n);
    long a0 = va_arg(ap, long), a1 = va_arg(ap, long), a2 = va_arg(ap, long);
    long a3 = va_arg(ap, long), a4 = va_arg(ap, long), a5 = va_arg(ap, long);
    va_end(ap);
    if (g_active && !t_guard) {
        if (n == SYS_close) {
            return close((int)a0); /* a write-back file is written back at its close */
        }
        if (n == SYS_statx) {
            return statx((int)a0, (const char *)a1, (int)a2, (unsigned)a3, (struct statx *)a4);
        }
        if (n == SYS_copy_file_range) {
            return copy_file_range((int)a0, (off64_t *)a1, (int)a2, (off64_t *)a3, (size_t)a4,
                                   (unsigned)a5);
        }
    }
    return REAL(syscall)(n, a0, a1, a2, a3, a4, a5);
}
