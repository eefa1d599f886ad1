/* Memfd caches of remote files, kept in step with the target.
 *
 * Owns: the write-back of a write-back or append cache (wfile_flush: at the last close, fsync,
 * before exec, at exit, and before a remote open or stat of the same path), the growth of a
 * fetched file that the app keeps open (mfile_refresh), the stat of a fetched file after a
 * change through its fd (mfile_restat), and the placeholder filled for mmap.
 * Does not own: when a cache is made (files_open.c, files_exec.c).
 */
#include "files.h"

#include <time.h>

/* Bytes [from, to) of e's cache go to its handle: at the same offsets, or appended by the
 * target's kernel (`append`: the handle has O_APPEND). 0, or -1 with errno. */
static int cache_push(struct ent *e, off_t from, off_t to, int append) {
    if (from >= to) {
        return 0;
    }
    char *buf = malloc(MAX_DATA_CHUNK);
    if (buf == NULL) {
        errno = ENOMEM;
        return -1;
    }
    int rc = 0;
    for (off_t off = from; rc == 0 && off < to;) {
        ssize_t n = REAL(pread)(e->cache_fd, buf, MAX_DATA_CHUNK - 4096, off);
        if (n <= 0) {
            break;
        }
        for (ssize_t done = 0; done < n && rc == 0;) {
            ssize_t w = rfile_write_chunk(e->handle, buf + done, (size_t)(n - done),
                                          append ? -1 : off + done);
            if (w <= 0) {
                rc = -1;
            } else {
                done += w;
            }
        }
        off += n;
    }
    free(buf);
    return rc;
}

/* An append cache: the bytes appended since the last flush go to the target's current end of
 * file (another appender may have moved it), appended by the target's kernel (O_APPEND). */
static int wfile_flush_appended(struct ent *e, const struct stat *cur) {
    int rc = cache_push(e, e->synced_size, cur->st_size, 1);
    if (rc == 0 && cur->st_size > e->synced_size) {
        /* Back to the size at open: every holder of this memfd (a fork child, the image after
         * an exec, the shell that opened it for them) shares it and starts from that size, so
         * none of them appends these bytes again. */
        struct stat now;
        REAL(ftruncate)(e->cache_fd, e->synced_size);
        if (REAL(fstat)(e->cache_fd, &now) == 0) {
            e->synced_mtim = now.st_mtim;
        }
    }
    return rc;
}

/* Writes the memfd's content back to the remote file if it changed since the last flush. */
int wfile_flush(struct ent *e) {
    struct stat cur;
    if (!e->writeback || REAL(fstat)(e->cache_fd, &cur) < 0) {
        return 0;
    }
    if (cur.st_mtim.tv_sec == e->synced_mtim.tv_sec && cur.st_mtim.tv_nsec == e->synced_mtim.tv_nsec &&
        cur.st_size == e->synced_size) {
        return 0;
    }
    if (e->append_only && cur.st_size >= e->synced_size) {
        return wfile_flush_appended(e, &cur);
    }
    int rc = cache_push(e, 0, cur.st_size, 0);
    if (rc == 0) {
        rc = RREQ_OK(M_FTRUNCATE, WF_U(e->handle), WF_U(cur.st_size));
    }
    if (rc == 0) {
        e->synced_mtim = cur.st_mtim;
        e->synced_size = cur.st_size;
    }
    if (rc == 0 && e->share_offset) {
        /* the process that exec'd us (or a sibling) goes on through the handle */
        off_t pos = REAL(lseek)(e->cache_fd, 0, SEEK_CUR);
        if (pos >= 0) {
            (void)rfile_seek_handle(e, pos, SEEK_SET);
        }
    }
    return rc;
}

/* Calls fn on every fd below `limit` that is a write-back cache. */
static void each_writeback(int limit, void (*fn)(struct ent *e, const void *arg), const void *arg) {
    for (int fd = 0; fd < limit; fd++) {
        struct ent *pe = fd_peek(fd);
        if (pe == NULL || pe->kind != K_MFILE || !pe->writeback) {
            continue;
        }
        struct ent *e = ent_get(fd);
        if (e != NULL) {
            fn(e, arg);
            ent_put(e);
        }
    }
}

static void flush_one(struct ent *e, const void *path) {
    if (path == NULL || (e->path != NULL && strcmp(e->path, path) == 0)) {
        int saved = errno;
        (void)wfile_flush(e);
        errno = saved;
    }
}

void wfile_flush_all(void) {
    each_writeback(MAX_FDS, flush_one, NULL);
    fbuf_flush_all();
}

/* Read-your-writes: a write-back cache reaches the target at close, fsync, exec or exit, so
 * before a remote open or stat of `path` this process's pending writes to it on other fds are
 * written back (a node stream reading its file back in its 'finish' callback, before the fd
 * closes, saw nothing). Only while the process holds remote handles; a look at 4096 fds. */
void flush_pending_for(const char *path) {
    if (__atomic_load_n(&g_nhandles, __ATOMIC_RELAXED) == 0) {
        return;
    }
    each_writeback(4096, flush_one, path);
    fbuf_flush_path(path);
}

/* ---------------------------------------------------------------- fetched files */

/* Appends to the memfd what the file grew by on the target (at most fetch_limit a look: a
 * runaway file is read in steps); `have` is the memfd's size. Returns the new size. */
static off_t mfile_grow(int fd, const char *path, off_t have, off_t size) {
    uint64_t h = 0;
    if (rfile_open(path, O_RDONLY, 0, &h) < 0) {
        return have;
    }
    off_t end = size - have > g_set.fetch_limit ? have + g_set.fetch_limit : size;
    have = rfile_copy_into(h, fd, have, end);
    rfile_close_handle(h);
    return have;
}

/* A fetched file is a snapshot taken at open. A program that keeps it open (tail -f, a log
 * follower) must see it grow or shrink on the target as it would locally: at fstat, and at a
 * read that hits the end, once the last look is a second old, the target's size is checked
 * again (by path; the same inode only: a replaced file is not the open one) and what it grew
 * by is appended to the memfd (or the memfd is cut). A file read whole right after its open
 * never pays for this; a followed file pays one stat a second. */
void mfile_refresh(int fd, struct ent *e) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long age_ms = (long long)(now.tv_sec - e->checked.tv_sec) * 1000 +
                       (now.tv_nsec - e->checked.tv_nsec) / 1000000;
    if (e->writeback || e->path == NULL || age_ms < 1000 ||
        __atomic_exchange_n(&e->refreshing, 1, __ATOMIC_ACQUIRE)) {
        return;
    }
    int saved = errno;
    t_guard++;
    struct stat rst, lst;
    if (REAL(fstat)(fd, &lst) == 0 && rstat(e->path, 0, 1, &rst) == 0 &&
        rst.st_ino == e->st.st_ino && rst.st_dev == e->st.st_dev && S_ISREG(rst.st_mode)) {
        off_t have = lst.st_size;
        if (rst.st_size < have) {
            REAL(ftruncate)(fd, rst.st_size); /* truncated on the target (tail says so) */
            have = rst.st_size;
        } else if (rst.st_size > have) {
            have = mfile_grow(fd, e->path, have, rst.st_size);
        }
        e->st = rst;
        e->st.st_size = have;
    }
    clock_gettime(CLOCK_MONOTONIC, &e->checked);
    t_guard--;
    __atomic_store_n(&e->refreshing, 0, __ATOMIC_RELEASE);
    errno = saved;
}

/* A fetched read-only file whose times, owner or mode were changed through its fd: its fstat
 * (the stat taken at open) follows. */
void mfile_restat(struct ent *e) {
    struct stat nst;
    t_guard++;
    if (e->path != NULL && rstat(e->path, 0, 1, &nst) == 0 && nst.st_ino == e->st.st_ino) {
        nst.st_size = e->st.st_size;
        e->st = nst;
    }
    t_guard--;
}

/* mmap of a handle-backed file (bigger than fetch_limit): its placeholder memfd is filled
 * with the remote content first, so the mapping shows the file (once per open file: a filled
 * placeholder is not fetched again). Writes through a shared mapping stay in the memfd. */
void rfile_fill_placeholder(int fd) {
    struct ent *e = ent_get(fd);
    if (e == NULL) {
        return;
    }
    struct stat rst, lst;
    t_guard++;
    if (e->fb != NULL) {
        (void)fbuf_flush(e); /* the mapping shows what was written */
    }
    if (e->kind == K_RFILE && e->has_handle && !e->is_dir && S_ISREG(e->st.st_mode) &&
        REAL(fstat)(fd, &lst) == 0 && lst.st_size == 0 &&
        rstat(NULL, e->handle, 1, &rst) == 0 && rst.st_size > 0) {
        off_t off = rfile_copy_into(e->handle, fd, 0, rst.st_size);
        DBG("mmap of %s: %lld bytes fetched into its placeholder", e->path ? e->path : "?",
            (long long)off);
    }
    t_guard--;
    ent_put(e);
}
