/* Post-copy's fault path without Python (migrator.native.pages; records in postcopy.h).

   Why C: a fault answered through both ends' event loops waited for whatever else those loops
   and the GIL were doing (the background push, on two vCPUs): 4 ms at the median, 10 ms at the
   99th percentile. Here a fault wakes one thread at each end, which sleeps in poll, never
   holds the GIL, and moves the request and its pages itself; Python starts the loops, stops
   them, and reads their counts and logs afterwards. */

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "pages.h"
#include "postcopy.h"

#define UFFD_MSG_BYTES 32            /* struct uffd_msg */
#define UFFD_PAGEFAULT 0x12          /* UFFD_EVENT_PAGEFAULT */
#define READ_MESSAGES 64
#define REQUEST_ROOM 512             /* request records gathered before one write */

enum { IO_DONE = 0, IO_STOPPED = 1, IO_EOF = 2 };

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The page index of the count pages at address, when they lie inside one region; else UINT64_MAX. */
static uint64_t index_of(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t nstate,
                         uint64_t address, uint64_t count)
{
    if (!count || address % page_size || count > (UINT64_MAX - address) / page_size)
        return UINT64_MAX;
    for (uint64_t r = 0; r < nregions; r++) {
        uint64_t start = regions[3 * r], length = regions[3 * r + 1];
        if (start <= address && address - start <= length && count * page_size <= length - (address - start)) {
            uint64_t first = regions[3 * r + 2] + (address - start) / page_size;
            return first < nstate && count <= nstate - first ? first : UINT64_MAX;
        }
    }
    return UINT64_MAX;
}

/* The address of page index in regions, with the pages from it to its region's end in *room;
   UINT64_MAX when no region holds it. */
static uint64_t address_of(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t index,
                           uint64_t *room)
{
    for (uint64_t r = 0; r < nregions; r++) {
        uint64_t first = regions[3 * r + 2], pages = regions[3 * r + 1] / page_size;
        if (first <= index && index - first < pages) {
            *room = pages - (index - first);
            return regions[3 * r] + (index - first) * page_size;
        }
    }
    return UINT64_MAX;
}

/* Wait until fd has events or stopfd is readable: 1 (fd), 0 (stop), or -errno. */
static int wait_for(int fd, short events, int stopfd)
{
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = stopfd, .events = POLLIN}};
    for (;;) {
        if (poll(p, stopfd >= 0 ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (stopfd >= 0 && p[1].revents)
            return 0;
        if (p[0].revents)
            return 1;
    }
}

/* Read exactly n bytes of a non-blocking socket: IO_DONE, IO_STOPPED (stopfd became readable;
   with *got bytes read), IO_EOF (the peer closed, after *got bytes), or -errno. */
static int read_full(int sock, uint8_t *buf, uint64_t n, int stopfd, uint64_t *got)
{
    *got = 0;
    while (*got < n) {
        ssize_t r = recv(sock, buf + *got, n - *got, 0);
        if (r > 0) {
            *got += (uint64_t)r;
            continue;
        }
        if (r == 0)
            return IO_EOF;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return -errno;
        int w = wait_for(sock, POLLIN, stopfd);
        if (w <= 0)
            return w ? w : IO_STOPPED;
    }
    return IO_DONE;
}

/* Write the n bytes of buf to a non-blocking socket (no SIGPIPE) from *done on: IO_DONE,
   IO_STOPPED (stopfd became readable; call again to go on), or -errno. */
static int write_full_from(int sock, const uint8_t *buf, uint64_t n, int stopfd, uint64_t *done)
{
    while (*done < n) {
        ssize_t w = send(sock, buf + *done, n - *done, MSG_NOSIGNAL);
        if (w > 0) {
            *done += (uint64_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno != EAGAIN)
            return -errno;
        int r = wait_for(sock, POLLOUT, stopfd);
        if (r <= 0)
            return r ? r : IO_STOPPED;
    }
    return IO_DONE;
}

static int write_full(int sock, const uint8_t *buf, uint64_t n, int stopfd)
{
    uint64_t done = 0;
    return write_full_from(sock, buf, n, stopfd, &done);
}

/* --- the destination ------------------------------------------------------------------------ */

struct requests {
    uint64_t words[2 * REQUEST_ROOM];
    uint64_t n;
};

/* Ask for the n pages from index first (inside one destination region), as records of source
   addresses that each lie inside one source region and hold at most FAULT_MAX_PAGES pages. */
static int64_t ask(struct fault_loop *s, struct requests *q, uint64_t first, uint64_t n)
{
    while (n) {
        uint64_t room, at = address_of(s->src_regions, s->nsrc, s->page_size, first, &room);
        if (at == UINT64_MAX)
            return -EFAULT;     /* the layouts number their pages alike: checked when they were given */
        uint64_t take = n < room ? n : room;
        if (take > FAULT_MAX_PAGES)
            take = FAULT_MAX_PAGES;
        if (q->n == REQUEST_ROOM) {
            int rc = write_full(s->sock, (const uint8_t *)q->words, 16 * q->n, s->stopfd);
            if (rc)
                return rc < 0 ? rc : FAULT_STOPPED;
            q->n = 0;
        }
        q->words[2 * q->n] = at;
        q->words[2 * q->n + 1] = take;
        q->n++;
        first += take;
        n -= take;
    }
    return 0;
}

/* One fault at page address: zero-filled if current, else its window claimed and asked for. */
static int64_t take_fault(struct fault_loop *s, struct requests *q, uint64_t page, uint64_t now)
{
    uint64_t ps = s->page_size;
    uint64_t idx = index_of(s->dst_regions, s->ndst, ps, s->nstate, page, 1);
    if (idx == UINT64_MAX) {
        s->error_at = page;
        return -EFAULT;
    }
    if (__atomic_load_n(&s->state[idx], __ATOMIC_RELAXED) == 0) {
        int64_t filled = uffd_zero_fill(s->uffd, &page, 1, ps);
        if (filled < 0) {
            s->error_at = page;
            return filled;
        }
        s->zero_filled += (uint64_t)filled;
        return 0;
    }
    if (s->ended)
        return 0;       /* nobody answers any more: the push, all sent before the end record, brings it */
    if (!s->fault_ns[idx])
        s->fault_ns[idx] = now;
    uint64_t room;
    if (address_of(s->dst_regions, s->ndst, ps, idx, &room) == UINT64_MAX)
        return -EFAULT;
    uint64_t window = s->window < room ? s->window : room, start = 0, length = 0;
    for (uint64_t k = 0; k < window; k++) {
        uint8_t expected = 1;
        if (__atomic_compare_exchange_n(&s->state[idx + k], &expected, 2, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            if (!k)
                s->faults++;
            if (length && start + length == idx + k) {
                length++;
                continue;
            }
            if (length) {
                int64_t rc = ask(s, q, start, length);
                if (rc)
                    return rc;
            }
            start = idx + k;
            length = 1;
        }
    }
    return length ? ask(s, q, start, length) : 0;
}

static int64_t take_faults(struct fault_loop *s)
{
    uint8_t messages[READ_MESSAGES * UFFD_MSG_BYTES];
    struct requests q;
    q.n = 0;
    for (;;) {
        ssize_t r = read(s->uffd, messages, sizeof messages);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            break;
        if (r < 0)
            return -errno;
        uint64_t now = now_ns();
        for (ssize_t off = 0; off + UFFD_MSG_BYTES <= r; off += UFFD_MSG_BYTES) {
            uint64_t address;
            if (messages[off] != UFFD_PAGEFAULT)
                continue;
            memcpy(&address, messages + off + 16, 8);
            int64_t rc = take_fault(s, &q, address & ~(s->page_size - 1), now);
            if (rc)
                return rc;
        }
        if ((size_t)r < sizeof messages)
            break;
    }
    if (!q.n)
        return 0;
    int rc = write_full(s->sock, (const uint8_t *)q.words, 16 * q.n, s->stopfd);
    return rc < 0 ? rc : rc ? FAULT_STOPPED : 0;
}

/* One record from the source: an answer installed, or its end. */
static int64_t take_answer(struct fault_loop *s)
{
    uint64_t header[2], got, ps = s->page_size;
    int rc = read_full(s->sock, (uint8_t *)header, sizeof header, s->stopfd, &got);
    if (rc == IO_EOF)
        return got ? -ECONNRESET : FAULT_PEER_CLOSED;
    if (rc)
        return rc < 0 ? rc : FAULT_STOPPED;
    if (header[0] == FAULT_END && header[1] == 0) {
        s->ended = 1;
        return FAULT_ENDED;
    }
    uint64_t count = header[1];
    uint64_t first = count <= FAULT_MAX_PAGES ? index_of(s->src_regions, s->nsrc, ps, s->nstate, header[0], count)
                                              : UINT64_MAX;
    uint64_t room, at = first == UINT64_MAX ? UINT64_MAX : address_of(s->dst_regions, s->ndst, ps, first, &room);
    if (at == UINT64_MAX || room < count) {
        s->error_at = header[0];
        return FAULT_BAD_RECORD;
    }
    rc = read_full(s->sock, s->buf, count * ps, s->stopfd, &got);
    if (rc == IO_EOF)
        return -ECONNRESET;
    if (rc)
        return rc < 0 ? rc : FAULT_STOPPED;
    if (count > s->log_cap - s->log_len)
        return FAULT_LOG_FULL;
    uint64_t hashes[FAULT_MAX_PAGES];
    hash_pages(s->buf, count, ps, hashes);
    for (uint64_t k = 0; k < count; k++) {
        s->log[2 * s->log_len] = first + k;
        s->log[2 * s->log_len + 1] = hashes[k];
        s->log_len++;
    }
    uint64_t run[2] = {at, count}, counts[2];
    int64_t installed = uffd_install(s->uffd, s->state, s->nstate, s->dst_regions, s->ndst, ps, run, 1, s->buf, 0, counts);
    if (installed) {
        s->error_at = at;
        return installed == INSTALL_OUTSIDE ? -EFAULT : installed;
    }
    s->installed_pages += counts[0];
    s->requested_pages += counts[1];
    uint64_t now = now_ns();
    for (uint64_t k = 0; k < count; k++) {
        uint64_t *since = &s->fault_ns[first + k];
        if (*since) {
            if (s->latency_len < s->latency_cap)
                s->latency_ns[s->latency_len++] = now - *since;
            *since = 0;
        }
    }
    return 0;
}

int64_t fault_serve(struct fault_loop *s)
{
    if (!s->page_size || s->page_size & (s->page_size - 1) || !s->window || s->window > FAULT_MAX_PAGES)
        return -EINVAL;
    for (;;) {
        struct pollfd p[3] = {{.fd = s->stopfd, .events = POLLIN}, {.fd = s->uffd, .events = POLLIN},
                              {.fd = s->sock, .events = POLLIN}};
        if (poll(p, s->ended ? 2 : 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[0].revents)
            return FAULT_STOPPED;
        if (p[1].revents & ~POLLIN)
            return -EPIPE;          /* the guest's userfaultfd broke */
        if (p[1].revents) {
            int64_t rc = take_faults(s);
            if (rc)
                return rc;
        }
        if (!s->ended && p[2].revents) {
            int64_t rc = take_answer(s);
            if (rc)
                return rc;
        }
    }
}

/* --- the source ----------------------------------------------------------------------------- */

/* The stop eventfd became readable: consumed; 1 when the loop is to end at once (abort). */
static int stop_requested(struct request_loop *s, int *stopping)
{
    uint64_t value;
    if (read(s->stopfd, &value, sizeof value) < 0 && errno != EAGAIN && errno != EINTR)
        return 1;
    *stopping = 1;
    return __atomic_load_n(&s->abort, __ATOMIC_RELAXED);
}

/* Read, claim and send the pages one request asks for (its header in header). */
static int64_t answer(struct request_loop *s, const uint64_t header[2], int *stopping)
{
    uint64_t ps = s->page_size, count = header[1];
    uint64_t first = count <= FAULT_MAX_PAGES ? index_of(s->regions, s->nregions, ps, s->nstate, header[0], count)
                                              : UINT64_MAX;
    if (first == UINT64_MAX) {
        s->error_at = header[0];
        return FAULT_BAD_RECORD;
    }
    uint8_t claimed[FAULT_MAX_PAGES];
    uint64_t nclaimed = 0;
    for (uint64_t k = 0; k < count; k++)
        nclaimed += claimed[k] = __atomic_exchange_n(&s->state[first + k], 0, __ATOMIC_RELAXED) == 1;
    if (nclaimed > s->log_cap - s->log_len)
        return FAULT_LOG_FULL;
    uint8_t *pages = s->buf + 16;
    uint64_t run[2] = {header[0], count}, hashes[FAULT_MAX_PAGES];
    if (s->map) {
        if (copy_runs(s->map, s->mem_regions, s->nmem, run, 1, ps, pages, 0) != 1) {
            s->error_at = header[0];
            return -EFAULT;
        }
        hash_pages(pages, count, ps, hashes);
    } else {
        int64_t moved = vm_transfer(s->pid, s->mem_regions, s->nmem, run, 1, ps, pages, 0, HASHED_CALL_BYTES, hashes);
        if (moved != (int64_t)(count * ps)) {
            s->error_at = header[0];
            return moved < 0 ? moved : -EFAULT;
        }
    }
    for (uint64_t k = 0; k < count; k++) {
        if (!claimed[k])
            continue;
        s->log[2 * s->log_len] = first + k;
        s->log[2 * s->log_len + 1] = hashes[k];
        s->log_len++;
    }
    memcpy(s->buf, header, 16);
    uint64_t sent = 0;
    for (;;) {
        /* a stop while writing lets this answer finish, unless it is an abort (which ends the
           session anyway): a partial record is never left on the link otherwise */
        int rc = write_full_from(s->sock, s->buf, 16 + count * ps, s->stopfd, &sent);
        if (rc < 0)
            return rc;
        if (rc == IO_DONE)
            break;
        if (stop_requested(s, stopping))
            return FAULT_STOPPED;
    }
    __atomic_add_fetch(&s->answered_bytes, 16 + count * ps, __ATOMIC_RELAXED);
    s->requests++;
    s->claimed_pages += nclaimed;
    s->duplicate_pages += count - nclaimed;
    return 0;
}

int64_t request_serve(struct request_loop *s)
{
    if (!s->page_size || s->page_size & (s->page_size - 1))
        return -EINVAL;
    int stopping = 0;
    for (;;) {
        if (stopping) {
            uint64_t end[2] = {FAULT_END, 0}, sent = 0;
            int rc;
            while ((rc = write_full_from(s->sock, (const uint8_t *)end, sizeof end, s->stopfd, &sent)) == IO_STOPPED)
                if (stop_requested(s, &stopping))
                    break;
            return rc < 0 ? rc : FAULT_STOPPED;
        }
        int ready = wait_for(s->sock, POLLIN, s->stopfd);
        if (ready < 0)
            return ready;
        if (!ready) {
            if (stop_requested(s, &stopping))
                return FAULT_STOPPED;
            continue;
        }
        uint64_t header[2], got;
        int rc = read_full(s->sock, (uint8_t *)header, sizeof header, s->stopfd, &got);
        if (rc == IO_EOF)
            return got ? -ECONNRESET : FAULT_PEER_CLOSED;
        if (rc < 0)
            return rc;
        if (rc == IO_STOPPED) {
            /* a request cut short by the stop: the push has sent its pages, so the end follows */
            if (stop_requested(s, &stopping))
                return FAULT_STOPPED;
            continue;
        }
        int64_t done = answer(s, header, &stopping);
        if (done)
            return done;
    }
}
