/* faultsync: an LD_PRELOAD shim that makes fdatasync(2) and fsync(2) fail with EIO, for the
 * robustness tests (ingest_faults.rs compiles it with the system cc into the test's temp dir).
 * This kernel has no device-mapper (no dm-error / dm-flakey), so the fault is injected at the
 * libc symbol; Rust's File::sync_data / sync_all call these symbols (std links glibc).
 *
 *   FAULT_SYNC_MATCH=s   only calls on a file descriptor whose path (readlink of
 *                        /proc/self/fd/N) contains s count and fail (unset: every call)
 *   FAULT_SYNC_AFTER=n   the first n matching calls pass, then calls fail
 *   FAULT_SYNC_TIMES=k   only k calls fail, later ones pass again (unset: every later call)
 *   FAULT_SYNC_MARK=f    a line is appended to file f for each injected failure
 *
 * Why C and not a Rust cdylib: a test cannot make cargo build a cdylib for it on stable (artifact
 * dependencies are nightly-only), so a Rust shim would need a nested cargo run inside the test;
 * forty lines of C built by the cc that rustc already links with keeps `unsafe` out of the
 * workspace and the test self-contained. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_long calls;

static int matches(int fd) {
    const char *m = getenv("FAULT_SYNC_MATCH");
    if (!m || !*m) return 1;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strstr(path, m) != NULL;
}

static int inject(int fd, const char *what) {
    if (!matches(fd)) return 0;
    const char *a = getenv("FAULT_SYNC_AFTER"), *t = getenv("FAULT_SYNC_TIMES");
    long after = a ? atol(a) : 0, n = atomic_fetch_add(&calls, 1);
    if (n < after) return 0;
    if (t && n >= after + atol(t)) return 0;
    const char *mark = getenv("FAULT_SYNC_MARK");
    if (mark) {
        int f = open(mark, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (f >= 0) {
            char line[128];
            int len = snprintf(line, sizeof line, "%s call %ld -> EIO\n", what, n);
            if (len > 0) { ssize_t w = write(f, line, (size_t)len); (void)w; }
            close(f);
        }
    }
    return 1;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (inject(fd, "fdatasync")) { errno = EIO; return -1; }
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (inject(fd, "fsync")) { errno = EIO; return -1; }
    return real(fd);
}
