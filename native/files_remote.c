/* Requests to the agent (through the daemon) on remote paths and handles.
 *
 * Owns: rreq_call, the one way a file hook sends a request and waits for its reply (fields
 * typed with WF_*, the reply read in place before rreq_end), and the requests built on it:
 * stat, statfs, access, readlink, open/close/read/write/seek on a handle.
 * Does not own: the daemon connection (conn.c) or any decision (files_path.c).
 */
#include "files.h"

/* ---------------------------------------------------------------- one request */

int rreq_call(struct rreq *q, int kind, int expect, size_t n, const struct wf *f) {
    if (q->c == NULL && (q->c = conn_acquire()) == NULL) {
        return -1;
    }
    cbor_w *w = (conn_begin)(q->c, kind, n); /* RREQ checked the count at build time */
    for (size_t i = 0; i < n; i++) {
        switch (f[i].type) {
        case WF_NULL: cw_null(w); break;
        case WF_UINT: cw_uint(w, f[i].u); break;
        case WF_INT: cw_int(w, (int64_t)f[i].u); break;
        case WF_BYTES: cw_bytes(w, f[i].p, f[i].n); break;
        case WF_BOOL: cw_bool(w, (int)f[i].u); break;
        }
    }
    return conn_call(q->c, expect, &q->r);
}

void rreq_end(struct rreq *q) {
    if (q->c != NULL) {
        conn_release(q->c);
        q->c = NULL;
    }
}

int rreq_ok(int kind, size_t n, const struct wf *f) {
    struct rreq q = RREQ_INIT;
    int rc = rreq_call(&q, kind, M_OK, n, f);
    rreq_end(&q);
    return rc;
}

/* ---------------------------------------------------------------- stat, statfs */

int stat_from_wire(cbor_r *r, struct stat *st) {
    uint64_t n, v[13];
    if (cr_array(r, &n) < 0 || n != 13) {
        return -1;
    }
    for (int i = 0; i < 13; i++) {
        int64_t s;
        if (cr_peek(r) == CBOR_NINT) {
            if (cr_int(r, &s) < 0) {
                return -1;
            }
            v[i] = (uint64_t)s;
        } else if (cr_uint(r, &v[i]) < 0) {
            return -1;
        }
    }
    memset(st, 0, sizeof *st);
    st->st_dev = v[0];
    st->st_ino = v[1];
    st->st_mode = (mode_t)v[2];
    st->st_nlink = v[3];
    st->st_uid = (uid_t)v[4];
    st->st_gid = (gid_t)v[5];
    st->st_rdev = v[6];
    st->st_size = (off_t)v[7];
    st->st_blksize = (blksize_t)v[8];
    st->st_blocks = (blkcnt_t)v[9];
    st->st_atim.tv_sec = (time_t)((int64_t)v[10] / 1000000000);
    st->st_atim.tv_nsec = (long)((int64_t)v[10] % 1000000000);
    st->st_mtim.tv_sec = (time_t)((int64_t)v[11] / 1000000000);
    st->st_mtim.tv_nsec = (long)((int64_t)v[11] % 1000000000);
    st->st_ctim.tv_sec = (time_t)((int64_t)v[12] / 1000000000);
    st->st_ctim.tv_nsec = (long)((int64_t)v[12] % 1000000000);
    return 0;
}

int rstat(const char *path, uint64_t handle, int follow, struct stat *st) {
    struct rreq q = RREQ_INIT;
    int rc = RREQ(&q, M_FILE_STAT, M_STAT_REPLY, WF_PATH(path), WF_U_UNLESS(path != NULL, handle),
                  WF_B(follow));
    if (rc == 0 && stat_from_wire(&q.r, st) < 0) {
        errno = EIO;
        rc = -1;
    }
    rreq_end(&q);
    return rc;
}

int remote_stat_path(const char *path, int follow, struct stat *st) {
    return rstat(path, 0, follow, st);
}

/* statfs: [type, bsize, blocks, bfree, bavail, files, ffree, namelen, frsize, flags] */
static int statfs_from_wire(cbor_r *r, struct statfs *sf) {
    uint64_t n, v[10];
    if (cr_array(r, &n) < 0 || n != 10) {
        return -1;
    }
    for (int i = 0; i < 10; i++) {
        if (cr_uint(r, &v[i]) < 0) {
            return -1;
        }
    }
    memset(sf, 0, sizeof *sf);
    sf->f_type = (long)v[0];
    sf->f_bsize = (long)v[1];
    sf->f_blocks = v[2];
    sf->f_bfree = v[3];
    sf->f_bavail = v[4];
    sf->f_files = v[5];
    sf->f_ffree = v[6];
    sf->f_namelen = (long)v[7];
    sf->f_frsize = (long)v[8];
    sf->f_flags = (long)v[9];
    return 0;
}

int rstatfs(const char *path, uint64_t handle, struct statfs *sf) {
    struct rreq q = RREQ_INIT;
    int rc = RREQ(&q, M_STATFS, M_STATFS_REPLY, WF_PATH(path), WF_U_UNLESS(path != NULL, handle));
    if (rc == 0 && statfs_from_wire(&q.r, sf) < 0) {
        errno = EIO;
        rc = -1;
    }
    rreq_end(&q);
    return rc;
}

/* ---------------------------------------------------------------- access, readlink */

int raccess(const char *path, int mode) {
    return RREQ_OK(M_FILE_ACCESS, WF_PATH(path), WF_U(mode));
}

ssize_t rreadlink(const char *path, char *buf, size_t size) {
    struct rreq q = RREQ_INIT;
    ssize_t n = -1;
    if (RREQ(&q, M_READLINK, M_READLINK_REPLY, WF_PATH(path)) == 0) {
        const uint8_t *p;
        size_t len;
        if (cr_bytes(&q.r, &p, &len) < 0) {
            errno = EIO;
        } else {
            n = (ssize_t)(len < size ? len : size); /* truncated, no NUL: like readlink(2) */
            memcpy(buf, p, (size_t)n);
        }
    }
    rreq_end(&q);
    return n;
}

/* ---------------------------------------------------------------- handles */

int rfile_open(const char *path, int rflags, mode_t mode, uint64_t *handle) {
    struct rreq q = RREQ_INIT;
    int rc = RREQ(&q, M_FILE_OPEN, M_FILE_OPENED, WF_PATH(path), WF_U(rflags), WF_U(mode));
    if (rc == 0 && cr_uint(&q.r, handle) < 0) {
        errno = EIO;
        rc = -1;
    }
    rreq_end(&q);
    return rc;
}

int rfile_close_handle(uint64_t handle) {
    return RREQ_OK(M_FILE_CLOSE, WF_U(handle));
}

/* An offset, or null for the handle's own position. */
#define WF_OFF(off) WF_U_UNLESS((off) < 0, (off))

ssize_t rfile_read_chunk(uint64_t handle, void *buf, size_t n, off_t off) {
    struct rreq q = RREQ_INIT;
    ssize_t got = -1;
    if (RREQ(&q, M_FILE_READ, M_FILE_DATA, WF_U(handle), WF_U(n), WF_OFF(off)) == 0) {
        const uint8_t *p;
        size_t len;
        if (cr_bytes(&q.r, &p, &len) < 0 || len > n) {
            errno = EIO;
        } else {
            memcpy(buf, p, len);
            got = (ssize_t)len;
        }
    }
    rreq_end(&q);
    return got;
}

ssize_t rfile_write_chunk(uint64_t handle, const void *buf, size_t n, off_t off) {
    struct rreq q = RREQ_INIT;
    ssize_t done = -1;
    if (RREQ(&q, M_FILE_WRITE, M_FILE_WRITTEN, WF_U(handle), WF_BUF(buf, n), WF_OFF(off)) == 0) {
        uint64_t k;
        if (cr_uint(&q.r, &k) < 0 || k > n) {
            errno = EIO;
        } else {
            done = (ssize_t)k;
        }
    }
    rreq_end(&q);
    return done;
}

off_t rfile_seek(struct ent *e, off_t off, int whence) {
    off_t pos;
    if (e->fb != NULL && fbuf_seek(e, off, whence, &pos)) {
        return pos;
    }
    return rfile_seek_handle(e, off, whence);
}

off_t rfile_seek_handle(struct ent *e, off_t off, int whence) {
    if (!e->has_handle) {
        errno = ESPIPE;
        return -1;
    }
    struct rreq q = RREQ_INIT;
    off_t pos = -1;
    if (RREQ(&q, M_FILE_SEEK, M_FILE_POSITION, WF_U(e->handle), WF_I(off), WF_I(whence)) == 0) {
        uint64_t p;
        if (cr_uint(&q.r, &p) < 0) {
            errno = EIO;
        } else {
            pos = (off_t)p;
        }
    }
    rreq_end(&q);
    return pos;
}

ssize_t rfile_read(struct ent *e, void *buf, size_t n, off_t off) {
    if (!e->has_handle || e->is_dir) {
        errno = e->is_dir ? EISDIR : EBADF;
        return -1;
    }
    if ((e->oflags & O_ACCMODE) == O_WRONLY) {
        errno = EBADF;
        return -1;
    }
    ssize_t r;
    if (e->fb != NULL && fbuf_read(e, buf, n, off, &r)) {
        return r;
    }
    return rfile_read_chunk(e->handle, buf, n > MAX_DATA_CHUNK ? MAX_DATA_CHUNK : n, off);
}

ssize_t rfile_write(struct ent *e, const void *buf, size_t n, off_t off) {
    if (!e->has_handle || e->is_dir || (e->oflags & O_ACCMODE) == O_RDONLY) {
        errno = EBADF;
        return -1;
    }
    ssize_t r;
    if (e->fb != NULL && fbuf_write(e, buf, n, off, &r)) {
        return r;
    }
    size_t done = 0;
    while (done < n) {
        size_t k = n - done > MAX_DATA_CHUNK - 4096 ? MAX_DATA_CHUNK - 4096 : n - done;
        ssize_t w = rfile_write_chunk(e->handle, (const char *)buf + done, k,
                                      off < 0 ? -1 : off + (off_t)done);
        if (w < 0) {
            return done ? (ssize_t)done : -1;
        }
        done += (size_t)w;
        if ((size_t)w < k) {
            break;
        }
    }
    return (ssize_t)done;
}

off_t rfile_copy_into(uint64_t handle, int fd, off_t from, off_t end) {
    char *buf = from < end ? malloc(MAX_DATA_CHUNK) : NULL;
    off_t off = from;
    while (buf != NULL && off < end) {
        size_t want = end - off > MAX_DATA_CHUNK ? MAX_DATA_CHUNK : (size_t)(end - off);
        ssize_t n = rfile_read_chunk(handle, buf, want, off);
        if (n <= 0 || REAL(pwrite)(fd, buf, (size_t)n, off) != n) {
            break;
        }
        off += n;
    }
    free(buf);
    return off;
}
