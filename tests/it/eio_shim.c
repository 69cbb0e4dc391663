/* An LD_PRELOAD shim for tests/it/catalog_eio.rs: fails with EIO the reads or writes (fsyncs included) of files
 * whose path contains SNAPSTORE_EIO_PATH, from the SNAPSTORE_EIO_FROM-th such call on (0: every one), as a
 * failing disk would. SNAPSTORE_EIO_OPS is "read" or "write". The catalog is SQLite, inside the binary: a
 * backend wrapper cannot reach its I/O, the C library's entry points can. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static long counter;

static int armed(int fd, const char *kind) {
    const char *path = getenv("SNAPSTORE_EIO_PATH");
    const char *ops = getenv("SNAPSTORE_EIO_OPS");
    const char *from = getenv("SNAPSTORE_EIO_FROM");
    if (!path || !ops || !from || strcmp(ops, kind) != 0) return 0;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return 0;
    target[n] = 0;
    if (!strstr(target, path)) return 0;
    return __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST) >= atol(from);
}

#define REAL(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return REAL(pwrite64)(fd, buf, count, offset);
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return REAL(pwrite)(fd, buf, count, offset);
}
ssize_t write(int fd, const void *buf, size_t count) {
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return REAL(write)(fd, buf, count);
}
int fsync(int fd) {
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return REAL(fsync)(fd);
}
int fdatasync(int fd) {
    if (armed(fd, "write")) { errno = EIO; return -1; }
    return REAL(fdatasync)(fd);
}
ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    if (armed(fd, "read")) { errno = EIO; return -1; }
    return REAL(pread64)(fd, buf, count, offset);
}
ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    if (armed(fd, "read")) { errno = EIO; return -1; }
    return REAL(pread)(fd, buf, count, offset);
}
ssize_t read(int fd, void *buf, size_t count) {
    if (armed(fd, "read")) { errno = EIO; return -1; }
    return REAL(read)(fd, buf, count);
}
