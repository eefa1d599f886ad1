/* mirrord-supervisor, remote files opened to write (fs mode `write`): the layer's write-back
 * cache of the file (a memfd, native/supervise_files.c) is installed in the program as a new
 * open of it, so that the program's last close of that open is seen here (inotify's
 * IN_CLOSE_* on the memfd: the supervisor's own open of it stays another open file); then the
 * supervisor closes the layer's descriptor, and the layer writes the file back (wfile_flush),
 * as its close hook does for a libc program. Write-back is therefore done by the supervisor
 * just after the program's close, not in it; whatever is still open when the program ends is
 * written back then (sv_wback_finish). The close event is queued before the program's close
 * returns, so every trapped call first handles the events queued so far (sv_wback_sync): a
 * program that writes a file and opens it again reads what it wrote. */
#include "sv.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/inotify.h>
#include <sys/syscall.h>
#include <unistd.h>

#define WBACKS 256 /* write-back files open at once in the supervised processes */

static struct {
    int wd;       /* 0: a free slot */
    int layer_fd; /* the layer's descriptor: closing it writes the file back */
} g_wb[WBACKS];
static int g_in = -1;
static pthread_mutex_t g_wb_lock = PTHREAD_MUTEX_INITIALIZER; /* held while writing back */
/* held from reading events to having written their files back (watcher and sv_wback_sync) */
static pthread_mutex_t g_read_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* The program's open of the watched file `wd` was closed: write it back. */
static void closed(int wd) {
    pthread_mutex_lock(&g_wb_lock);
    for (int i = 0; i < WBACKS; i++) {
        if (g_wb[i].wd == wd) {
            inotify_rm_watch(g_in, wd);
            g_wb[i].wd = 0;
            close(g_wb[i].layer_fd); /* the layer's close hook: wfile_flush */
            break;
        }
    }
    pthread_mutex_unlock(&g_wb_lock);
}

/* Read and handle the events queued now (g_in is non-blocking); 0 when the watch is gone. */
static int drain(void) {
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t n = read(g_in, buf, sizeof buf);
        if (n <= 0) {
            return n < 0 && (errno == EAGAIN || errno == EINTR);
        }
        for (char *p = buf; p < buf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            if (ev->mask & (IN_CLOSE_WRITE | IN_CLOSE_NOWRITE)) {
                closed(ev->wd);
            }
            p += sizeof *ev + ev->len;
        }
    }
}

static void *watcher(void *arg) {
    (void)arg;
    for (;;) {
        struct pollfd pfd = {.fd = g_in, .events = POLLIN};
        if (poll(&pfd, 1, -1) < 0 && errno != EINTR) {
            return NULL;
        }
        pthread_mutex_lock(&g_read_lock);
        int alive = drain();
        pthread_mutex_unlock(&g_read_lock);
        if (!alive) {
            return NULL;
        }
    }
}

void sv_wback_sync(void) {
    if (__atomic_load_n(&g_in, __ATOMIC_ACQUIRE) < 0) {
        return; /* no file was opened to write */
    }
    pthread_mutex_lock(&g_read_lock);
    drain();
    pthread_mutex_unlock(&g_read_lock);
}

static void start(void) {
    pthread_t t;
    int in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    __atomic_store_n(&g_in, in, __ATOMIC_RELEASE);
    if (in >= 0 && pthread_create(&t, NULL, watcher, NULL) == 0) {
        pthread_detach(t);
    } else if (in >= 0) {
        __atomic_store_n(&g_in, -1, __ATOMIC_RELEASE);
        close(in);
    }
}

void sv_reply_wback(const struct seccomp_notif *req, int layer_fd, int flags) {
    pthread_once(&g_once, start);
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", layer_fd);
    /* a new open file of the same memfd, with the program's access mode and O_APPEND */
    int mine = g_in >= 0 ? (int)syscall(SYS_openat, AT_FDCWD, self,
                                        (flags & (O_ACCMODE | O_APPEND)) | O_CLOEXEC)
                         : -1;
    int wd = mine >= 0 ? inotify_add_watch(g_in, self, IN_CLOSE_WRITE | IN_CLOSE_NOWRITE) : -1;
    int slot = -1;
    pthread_mutex_lock(&g_wb_lock);
    for (int i = 0; i < WBACKS && wd > 0 && slot < 0; i++) {
        if (g_wb[i].wd == 0) {
            slot = i;
            g_wb[i].wd = wd;
            g_wb[i].layer_fd = layer_fd;
        }
    }
    pthread_mutex_unlock(&g_wb_lock);
    if (slot < 0) {
        if (wd > 0) {
            inotify_rm_watch(g_in, wd);
        }
        if (mine >= 0) {
            close(mine);
        }
        close(layer_fd);
        sv_reply(req->id, EMFILE, 0);
        return;
    }
    sv_reply_fd(req->id, mine, (flags & O_CLOEXEC) != 0);
    close(mine); /* the program's copy is now the only one of this open file */
}

void sv_wback_finish(void) {
    pthread_mutex_lock(&g_wb_lock);
    for (int i = 0; i < WBACKS; i++) {
        if (g_wb[i].wd != 0) {
            inotify_rm_watch(g_in, g_wb[i].wd);
            g_wb[i].wd = 0;
            close(g_wb[i].layer_fd);
        }
    }
    pthread_mutex_unlock(&g_wb_lock);
}
