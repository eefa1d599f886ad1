/* nftw and ftw over a tree: argv[1] the directory holding it, argv[2] the tree's name (walked
 * by a relative path from argv[1]). One line per callback: the mode, flag, level, base and
 * path; with FTW_CHDIR also whether the entry is found by its name from the working directory.
 * Built by test_hooks_c.py, which runs it through the layer on a pod's tree and directly on a
 * local copy. */
#define _GNU_SOURCE
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *g_mode;

static int cb(const char *path, const struct stat *st, int flag, struct FTW *f) {
    struct stat here;
    const char *found = "";
    if (strcmp(g_mode, "chdir") == 0) {
        found = lstat(path + f->base, &here) == 0 ? " found" : " missing";
    }
    printf("%s %d %d %d %s%s%s\n", g_mode, flag, f->level, f->base, path,
           flag == FTW_F ? (st->st_size == 5 ? " 5" : " ?") : "", found);
    if (strcmp(g_mode, "action") == 0) {
        if (flag == FTW_D && strcmp(path + f->base, "skip") == 0) {
            return FTW_SKIP_SUBTREE;
        }
    }
    if (strcmp(g_mode, "stop") == 0) {
        return FTW_STOP; /* at the start: readdir's order cannot change what comes before */
    }
    return 0;
}

static int old_cb(const char *path, const struct stat *st, int flag) {
    (void)st;
    printf("ftw %d %s\n", flag, path);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || chdir(argv[1]) < 0) {
        return 9;
    }
    static const struct {
        const char *mode;
        int flags;
    } runs[] = {
        {"plain", 0},
        {"phys", FTW_PHYS},
        {"depth", FTW_DEPTH | FTW_PHYS},
        {"chdir", FTW_CHDIR | FTW_PHYS},
        {"action", FTW_ACTIONRETVAL | FTW_PHYS},
        {"stop", FTW_ACTIONRETVAL | FTW_PHYS},
    };
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        g_mode = runs[i].mode;
        int rc = nftw(argv[2], cb, 4, runs[i].flags);
        char cwd[4096];
        printf("%s rc %d, back in %s\n", g_mode, rc,
               getcwd(cwd, sizeof cwd) != NULL && strcmp(cwd, argv[1]) == 0 ? "the start" : "?");
    }
    printf("ftw rc %d\n", ftw(argv[2], old_cb, 4));
    printf("missing rc %d\n", nftw("no-such-tree", cb, 4, 0));
    return 0;
}
