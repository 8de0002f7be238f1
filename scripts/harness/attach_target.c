/* A target for `migrator track --pid` tests: a program that knows nothing of migrator.
 *
 * It reads one command per line on stdin and answers one line on stdout, so a test decides
 * exactly which pages are written, by which thread, in which mapping:
 *   map N                 mmap N private anonymous pages     -> "ok ADDR"
 *   shm N                 mmap N pages of a memfd, shared    -> "ok ADDR"
 *   write ADDR FIRST N    write pages FIRST..FIRST+N-1 of ADDR from the main thread -> "ok"
 *   twrite ADDR FIRST N   the same from a new thread, joined  -> "ok"
 *   unmap ADDR N          munmap                              -> "ok"
 *   spin                  start a thread that writes one page of its own mapping forever
 *                         and counts its writes               -> "ok ADDR"
 *   churn ADDR N          start a thread that writes random pages among the N of ADDR forever,
 *                         counting its writes (a workload whose speed tracking must not cut)
 *   count                 the spinner's or churner's count    -> "ok COUNT"
 *   exit                  exit(0)
 * Between commands the main thread blocks in read(2), so an attach interrupts a system call.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static long page;
static _Atomic unsigned long spins;
static volatile char *spin_page;

struct job { char *base; long first, count; };

static void write_pages(char *base, long first, long count) {
    for (long i = first; i < first + count; i++)
        ((volatile char *)base)[i * page] += 1;
}

static void *writer(void *arg) {
    struct job *job = arg;
    write_pages(job->base, job->first, job->count);
    return NULL;
}

static void *spinner(void *arg) {
    (void)arg;
    for (;;) {
        spin_page[0]++;
        atomic_fetch_add(&spins, 1);
    }
    return NULL;
}

static void *churner(void *arg) {
    struct job *job = arg;
    unsigned long x = 88172645463325252UL;
    for (;;) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;   /* xorshift: cheap, no libc lock */
        ((volatile char *)job->base)[(x % (unsigned long)job->count) * page] += 1;
        atomic_fetch_add_explicit(&spins, 1, memory_order_relaxed);
    }
    return NULL;
}

static void reply(const char *fmt, unsigned long value, int with_value) {
    if (with_value) printf(fmt, value); else fputs(fmt, stdout);
    fflush(stdout);
}

int main(void) {
    char line[256];
    page = sysconf(_SC_PAGESIZE);
    setvbuf(stdin, NULL, _IONBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16];
        unsigned long a = 0; long b = 0, c = 0;
        if (sscanf(line, "%15s %lx %ld %ld", cmd, &a, &b, &c) < 1) continue;
        if (!strcmp(cmd, "map") || !strcmp(cmd, "shm")) {
            long n = (long)strtol(line + strlen(cmd), NULL, 10);
            int shared = !strcmp(cmd, "shm");
            int fd = shared ? memfd_create("attach-target", 0) : -1;
            if (shared && ftruncate(fd, n * page)) { perror("ftruncate"); return 1; }
            void *p = mmap(NULL, n * page, PROT_READ | PROT_WRITE,
                           shared ? MAP_SHARED : MAP_PRIVATE | MAP_ANONYMOUS, fd, 0);
            if (p == MAP_FAILED) { perror("mmap"); return 1; }
            if (shared) close(fd);
            reply("ok %lx\n", (unsigned long)p, 1);
        } else if (!strcmp(cmd, "write")) {
            write_pages((char *)a, b, c);
            reply("ok\n", 0, 0);
        } else if (!strcmp(cmd, "twrite")) {
            pthread_t t;
            struct job job = {(char *)a, b, c};
            if (pthread_create(&t, NULL, writer, &job)) return 1;
            pthread_join(t, NULL);
            reply("ok\n", 0, 0);
        } else if (!strcmp(cmd, "unmap")) {
            if (munmap((void *)a, b * page)) { perror("munmap"); return 1; }
            reply("ok\n", 0, 0);
        } else if (!strcmp(cmd, "spin")) {
            pthread_t t;
            spin_page = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (spin_page == MAP_FAILED || pthread_create(&t, NULL, spinner, NULL)) return 1;
            reply("ok %lx\n", (unsigned long)spin_page, 1);
        } else if (!strcmp(cmd, "churn")) {
            static struct job job;
            pthread_t t;
            job.base = (char *)a; job.first = 0; job.count = b;
            if (b < 1 || pthread_create(&t, NULL, churner, &job)) return 1;
            reply("ok\n", 0, 0);
        } else if (!strcmp(cmd, "count")) {
            reply("ok %lu\n", atomic_load(&spins), 1);
        } else if (!strcmp(cmd, "exit")) {
            return 0;
        } else {
            reply("error unknown command\n", 0, 0);
        }
    }
    return 0;
}
