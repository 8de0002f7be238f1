/* Per-page hashes, zero-page find/gather/scatter, the union of run lists and copies of page runs
   in a mapped memfd (migrator.native.pages).

   Why C: --verify pages hashes every page each time it moves; in Python that loop holds the GIL
   and competes with the transport's threads, here it is a memory-bound loop that releases it.
   Likewise the zero-page bitmap of compressed Pages payloads (migrator/protocol/_payload.py):
   found, gathered and scattered a page at a time in Python it held the GIL long enough that two
   streams' worker threads queued behind each other. And the union of the last round's dirty runs
   with the final scan's, which sits inside the downtime: a linear merge here, where Python's
   sort of tuples cost milliseconds per ten thousand runs. And a shared guest's page runs copied
   out of or into its mapping: a Python slice per run cost more than the copy of its page.
   And post-copy's page states: a switch-over marks and claims runs of 100k scattered pages, and
   installs pages through the guest's userfaultfd in one ioctl per stretch of missing pages. */

#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/userfaultfd.h>

#include "pages.h"

static inline uint64_t mix(uint64_t h)
{
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

/* Four independent multiply-rotate lanes over the page's 8-byte words, then a finaliser.
   Not cryptographic (the stream's MAC is): it tells a changed or misplaced page apart. */
static uint64_t hash_page(const uint8_t *p, uint64_t size)
{
    const uint64_t k = 0x9E3779B97F4A7C15ULL;
    uint64_t a = 1, b = 2, c = 3, d = 4, w[4];
    for (uint64_t off = 0; off + 32 <= size; off += 32) {
        memcpy(w, p + off, 32);
        a = ((a ^ w[0]) * k); a = (a << 31) | (a >> 33);
        b = ((b ^ w[1]) * k); b = (b << 31) | (b >> 33);
        c = ((c ^ w[2]) * k); c = (c << 31) | (c >> 33);
        d = ((d ^ w[3]) * k); d = (d << 31) | (d >> 33);
    }
    return mix(a ^ mix(b + 0x1234567) ^ mix(c + 0x89abcdef) ^ mix(d + size));
}

/* The table's digest is two sums (mod 2^64) of independent mixes of (index, entry), kept current
   as entries change: comparing two tables at the switch-over then costs nothing that grows with
   them. A changed, missing or misplaced page changes both sums but by chance (2^-128 odds). */
static inline void sum_entry(uint64_t sum[2], uint64_t i, uint64_t h, int add)
{
    uint64_t a = mix(h ^ (i * 0x9E3779B97F4A7C15ULL)), b = mix(h + mix(i + 0x632BE59BD9B4E019ULL));
    if (add) {
        sum[0] += a;
        sum[1] += b;
    } else {
        sum[0] -= a;
        sum[1] -= b;
    }
}

static inline void set_entry(uint64_t *table, uint64_t i, uint64_t h, uint64_t sum[2])
{
    sum_entry(sum, i, table[i], 0);
    table[i] = h;
    sum_entry(sum, i, h, 1);
}

/* The region (of nregions (start, length, first page index) triples) holding the whole run, or nregions. */
static uint64_t region_of(const uint64_t *regions, uint64_t nregions, uint64_t hint, uint64_t address, uint64_t length)
{
    if (hint < nregions && regions[3 * hint] <= address && address + length <= regions[3 * hint] + regions[3 * hint + 1])
        return hint;
    for (uint64_t r = 0; r < nregions; r++)
        if (regions[3 * r] <= address && address + length <= regions[3 * r] + regions[3 * r + 1])
            return r;
    return nregions;
}

/* The region of the run (address, count pages), with *hint the region of the previous run; nregions
   when the run overflows or is not inside one region. */
static uint64_t run_region(const uint64_t *regions, uint64_t nregions, uint64_t *hint, uint64_t address,
                           uint64_t count, uint64_t page_size)
{
    uint64_t length = count * page_size;
    if (length / page_size != count || address + length < address)
        return nregions;
    uint64_t r = region_of(regions, nregions, *hint, address, length);
    if (r < nregions)
        *hint = r;
    return r;
}

uint64_t page_hashes_at(const uint64_t *runs, uint64_t nruns, const uint64_t *regions, uint64_t nregions,
                        uint64_t page_size, uint64_t zero_hash, const uint64_t *given, uint64_t *table,
                        uint64_t table_len, uint64_t sum[2])
{
    uint64_t r, hint = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t address = runs[2 * i], count = runs[2 * i + 1];
        if ((r = run_region(regions, nregions, &hint, address, count, page_size)) == nregions)
            return i;
        uint64_t first = regions[3 * r + 2] + (address - regions[3 * r]) / page_size;
        if (first + count > table_len || first + count < first)
            return i;
        for (uint64_t k = 0; k < count; k++)
            set_entry(table, first + k, given ? *given++ : zero_hash, sum);
    }
    return nruns;
}

uint64_t page_hashes_indexed(const uint64_t *pairs, uint64_t n, uint64_t *table, uint64_t table_len, uint64_t sum[2])
{
    for (uint64_t i = 0; i < n; i++) {
        if (pairs[2 * i] >= table_len)
            return i;
        set_entry(table, pairs[2 * i], pairs[2 * i + 1], sum);
    }
    return n;
}

/* The same hash of HASH_LANES pages at once, for CPUs with 64-bit vector multiplies (AVX-512DQ):
   each page's four lanes are one 256-bit vector, and the pages' chains are independent, so
   the multiplies' latency overlaps instead of bounding the loop. Its results equal hash_page's
   (tests/test_runs_and_digest.py compares them), so tables and images do not depend on the CPU. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HASH_LANES 8

/* Eight named vectors, not an array: an array's entries stayed in memory between steps. */
#define LANE_STEP(h, j) \
    h = _mm256_rol_epi64(_mm256_mullo_epi64(_mm256_xor_si256( \
            h, _mm256_loadu_si256((const __m256i *)(buf + (j) * page_size + off))), k), 31)

__attribute__((target("avx512f,avx512dq,avx512vl")))
static void hash_pages_wide(const uint8_t *buf, uint64_t page_size, uint64_t *out)
{
    const __m256i k = _mm256_set1_epi64x((long long)0x9E3779B97F4A7C15ULL);
    __m256i h0, h1, h2, h3, h4, h5, h6, h7;
    h0 = h1 = h2 = h3 = h4 = h5 = h6 = h7 = _mm256_set_epi64x(4, 3, 2, 1);
    for (uint64_t off = 0; off + 32 <= page_size; off += 32) {
        LANE_STEP(h0, 0); LANE_STEP(h1, 1); LANE_STEP(h2, 2); LANE_STEP(h3, 3);
        LANE_STEP(h4, 4); LANE_STEP(h5, 5); LANE_STEP(h6, 6); LANE_STEP(h7, 7);
    }
    __m256i h[HASH_LANES] = {h0, h1, h2, h3, h4, h5, h6, h7};
    for (int j = 0; j < HASH_LANES; j++) {
        uint64_t v[4];
        _mm256_storeu_si256((__m256i *)v, h[j]);
        out[j] = mix(v[0] ^ mix(v[1] + 0x1234567) ^ mix(v[2] + 0x89abcdef) ^ mix(v[3] + page_size));
    }
}

static int wide_hashing(void)
{
    static int wide = -1;
    if (wide < 0) {
        __builtin_cpu_init();
        wide = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
               && __builtin_cpu_supports("avx512vl");
    }
    return wide;
}
#else
#define HASH_LANES 1
static int wide_hashing(void) { return 0; }
static void hash_pages_wide(const uint8_t *buf, uint64_t page_size, uint64_t *out) { *out = hash_page(buf, page_size); }
#endif

void hash_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, uint64_t *out)
{
    uint64_t i = 0;
    if (wide_hashing())
        for (; i + HASH_LANES <= npages; i += HASH_LANES)
            hash_pages_wide(buf + i * page_size, page_size, out + i);
    hash_pages_scalar(buf + i * page_size, npages - i, page_size, out + i);   /* the pages left */
}

void hash_pages_scalar(const uint8_t *buf, uint64_t npages, uint64_t page_size, uint64_t *out)
{
    for (uint64_t i = 0; i < npages; i++, buf += page_size)
        out[i] = hash_page(buf, page_size);
}

void page_hashes_sum(const uint64_t *table, uint64_t table_len, uint64_t sum[2])
{
    sum[0] = sum[1] = 0;
    for (uint64_t i = 0; i < table_len; i++)
        sum_entry(sum, i, table[i], 1);
}

static int page_is_zero(const uint8_t *p, uint64_t size)
{
    uint64_t w[ZERO_SCAN_BYTES / 8];
    _Static_assert(sizeof w == ZERO_SCAN_BYTES, "one scan step is the four words tested below");
    for (uint64_t off = 0; off < size; off += ZERO_SCAN_BYTES) {   /* stops at the first non-zero word */
        memcpy(w, p + off, ZERO_SCAN_BYTES);
        if (w[0] | w[1] | w[2] | w[3])
            return 0;
    }
    return 1;
}

uint64_t find_zero_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, uint8_t *bitmap)
{
    uint64_t zero = 0;
    memset(bitmap, 0, (npages + 7) / 8);
    for (uint64_t i = 0; i < npages; i++, buf += page_size)
        if (page_is_zero(buf, page_size)) {
            bitmap[i / 8] |= (uint8_t)(1u << (i % 8));
            zero++;
        }
    return zero;
}

void gather_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, const uint8_t *bitmap, uint8_t *out)
{
    for (uint64_t i = 0; i < npages; i++, buf += page_size)
        if (!(bitmap[i / 8] >> (i % 8) & 1)) {
            memcpy(out, buf, page_size);
            out += page_size;
        }
}

void scatter_pages(const uint8_t *kept, uint64_t npages, uint64_t page_size, const uint8_t *bitmap, uint8_t *out)
{
    for (uint64_t i = 0; i < npages; i++, out += page_size)
        if (bitmap[i / 8] >> (i % 8) & 1)
            memset(out, 0, page_size);
        else {
            memcpy(out, kept, page_size);
            kept += page_size;
        }
}

/* 1 when the pairs are sorted by address and every run's end fits in 64 bits. */
static int runs_valid(const uint64_t *r, uint64_t n, uint64_t page_size)
{
    for (uint64_t i = 0; i < n; i++) {
        if (r[2 * i + 1] > (UINT64_MAX - r[2 * i]) / page_size)
            return 0;
        if (i && r[2 * i] < r[2 * i - 2])
            return 0;
    }
    return 1;
}

uint64_t runs_union(const uint64_t *a, uint64_t na, const uint64_t *b, uint64_t nb, uint64_t page_size,
                    uint64_t *out)
{
    if (!page_size || !runs_valid(a, na, page_size) || !runs_valid(b, nb, page_size))
        return RUNS_UNSORTED;
    uint64_t i = 0, j = 0, n = 0, start = 0, end = 0;
    while (i < na || j < nb) {
        const uint64_t *r;
        if (j >= nb || (i < na && a[2 * i] <= b[2 * j]))
            r = a + 2 * i++;
        else
            r = b + 2 * j++;
        if (!r[1])
            continue;
        uint64_t s = r[0], e = r[0] + r[1] * page_size;
        if (n && s <= end) {
            if (e > end)
                end = e;
            continue;
        }
        if (n) {
            out[2 * n - 2] = start;
            out[2 * n - 1] = (end - start) / page_size;
        }
        start = s, end = e, n++;
    }
    if (n) {
        out[2 * n - 2] = start;
        out[2 * n - 1] = (end - start) / page_size;
    }
    return n;
}

uint64_t copy_runs(uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                   uint64_t page_size, uint8_t *buf, int into_map)
{
    uint64_t r, hint = 0;   /* hint: the region of the previous run (runs come sorted, mostly in one region) */
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t address = runs[2 * i], length = runs[2 * i + 1] * page_size;
        if ((r = run_region(regions, nregions, &hint, address, runs[2 * i + 1], page_size)) == nregions)
            return i;
        uint8_t *at = map + regions[3 * r + 2] + (address - regions[3 * r]);
        if (into_map)
            memcpy(at, buf, length);
        else
            memcpy(buf, at, length);
        buf += length;
    }
    return nruns;
}

/* The places of a payload's bytes from byte skip on, at most RECV_RUNS_IOV and max_bytes in
   all, a place next to the one before it in the mapping joined to it; their count, or -1 when
   any run is not inside one region (all are checked, so a refusal comes before any byte moves). */
static int run_places(uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                      uint64_t page_size, uint64_t skip, uint64_t max_bytes, struct iovec *iov)
{
    int n = 0, full = 0;
    uint64_t r, hint = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t address = runs[2 * i], length = runs[2 * i + 1] * page_size;
        if ((r = run_region(regions, nregions, &hint, address, runs[2 * i + 1], page_size)) == nregions)
            return -1;
        if (full || !max_bytes)
            continue;
        if (skip >= length) {
            skip -= length;
            continue;
        }
        uint8_t *at = map + regions[3 * r + 2] + (address - regions[3 * r]) + skip;
        length -= skip;
        skip = 0;
        if (length > max_bytes)
            length = max_bytes;
        if (n && (uint8_t *)iov[n - 1].iov_base + iov[n - 1].iov_len == at) {
            iov[n - 1].iov_len += length;
        } else if (n == RECV_RUNS_IOV) {
            full = 1;
            continue;
        } else {
            iov[n].iov_base = at;
            iov[n].iov_len = length;
            n++;
        }
        max_bytes -= length;
    }
    return n;
}

int64_t recv_runs(int fd, uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs,
                  uint64_t nruns, uint64_t page_size, uint64_t skip, uint64_t max_bytes)
{
    struct iovec iov[RECV_RUNS_IOV];
    int n = run_places(map, regions, nregions, runs, nruns, page_size, skip, max_bytes, iov);
    if (n < 0)
        return RECV_RUNS_REFUSED;
    if (n == 0)
        return -EINVAL;     /* nothing left to receive: the caller's count is wrong */
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    ssize_t got = recvmsg(fd, &msg, MSG_DONTWAIT);
    return got < 0 ? -errno : got;
}

int64_t place_runs(uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                   uint64_t page_size, uint64_t skip, const uint8_t *buf, uint64_t len)
{
    struct iovec iov[RECV_RUNS_IOV];
    uint64_t done = 0;
    while (done < len) {
        int n = run_places(map, regions, nregions, runs, nruns, page_size, skip + done, len - done, iov);
        if (n < 0)
            return RECV_RUNS_REFUSED;
        if (n == 0)
            return -EINVAL;     /* more bytes than the payload holds */
        for (int k = 0; k < n; k++) {
            memcpy(iov[k].iov_base, buf + done, iov[k].iov_len);
            done += iov[k].iov_len;
        }
    }
    return (int64_t)done;
}

uint64_t hash_runs(uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                   uint64_t page_size, uint64_t *out)
{
    uint64_t r, hint = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t address = runs[2 * i], count = runs[2 * i + 1];
        if ((r = run_region(regions, nregions, &hint, address, count, page_size)) == nregions)
            return i;
        hash_pages(map + regions[3 * r + 2] + (address - regions[3 * r]), count, page_size, out);
        out += count;
    }
    return nruns;
}

/* The first state index of a run (address, count) that lies in one region and the table, with
   *hint the region of the previous run (runs come sorted, mostly in one region); UINT64_MAX when
   it is refused. A run of no pages gives its would-be index unchecked (nothing reads it). */
static uint64_t run_first(const uint64_t *regions, uint64_t nregions, uint64_t *hint, uint64_t page_size,
                          uint64_t nstate, uint64_t address, uint64_t count)
{
    if (!count)
        return 0;
    if (!page_size || address % page_size || count > (UINT64_MAX - address) / page_size)
        return UINT64_MAX;
    uint64_t r = region_of(regions, nregions, *hint, address, count * page_size);
    if (r == nregions)
        return UINT64_MAX;
    *hint = r;
    uint64_t first = regions[3 * r + 2] + (address - regions[3 * r]) / page_size;
    if (first < regions[3 * r + 2] || first > nstate || count > nstate - first)
        return UINT64_MAX;
    return first;
}

uint64_t runs_outside(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t nstate,
                      const uint64_t *runs, uint64_t nruns)
{
    uint64_t hint = 0;
    for (uint64_t i = 0; i < nruns; i++)
        if (run_first(regions, nregions, &hint, page_size, nstate, runs[2 * i], runs[2 * i + 1]) == UINT64_MAX)
            return i;
    return nruns;
}

uint64_t runs_check(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t nstate,
                    uint64_t max_count, const uint64_t *runs, uint64_t nruns, uint64_t *pages)
{
    uint64_t hint = 0, total = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t count = runs[2 * i + 1];
        if (!count || count > max_count)
            return i;
        if (nregions && run_first(regions, nregions, &hint, page_size, nstate, runs[2 * i], count) == UINT64_MAX)
            return i;
        total += count;
    }
    *pages = total;
    return nruns;
}

uint64_t runs_set(uint8_t *state, uint64_t nstate, const uint64_t *regions, uint64_t nregions, uint64_t page_size,
                  const uint64_t *runs, uint64_t nruns, uint8_t value)
{
    if (runs_outside(regions, nregions, page_size, nstate, runs, nruns) != nruns)
        return RUNS_OUTSIDE;
    uint64_t hint = 0, changed = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t count = runs[2 * i + 1];
        uint8_t *at = state + run_first(regions, nregions, &hint, page_size, nstate, runs[2 * i], count);
        for (uint64_t k = 0; k < count; k++)
            changed += __atomic_exchange_n(&at[k], value, __ATOMIC_RELAXED) != value;
    }
    return changed;
}

uint64_t runs_index(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t nstate,
                    const uint64_t *runs, uint64_t nruns, uint64_t *out)
{
    uint64_t hint = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t first = run_first(regions, nregions, &hint, page_size, nstate, runs[2 * i], runs[2 * i + 1]);
        if (first == UINT64_MAX)
            return i;
        out[2 * i] = first;
        out[2 * i + 1] = runs[2 * i + 1];
    }
    return nruns;
}

uint64_t runs_claim(uint8_t *state, uint64_t nstate, const uint64_t *regions, uint64_t nregions, uint64_t page_size,
                    const uint64_t *runs, uint64_t nruns, uint8_t from, uint8_t to, uint64_t *out, uint64_t out_pairs)
{
    if (runs_outside(regions, nregions, page_size, nstate, runs, nruns) != nruns)
        return RUNS_OUTSIDE;
    uint64_t hint = 0, n = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t address = runs[2 * i], count = runs[2 * i + 1];
        uint8_t *st = state + run_first(regions, nregions, &hint, page_size, nstate, address, count);
        for (uint64_t k = 0; k < count; k++) {
            if (__atomic_load_n(&st[k], __ATOMIC_RELAXED) != from)   /* the cheap test first */
                continue;
            uint64_t at = address + k * page_size;
            int extends = n && out[2 * n - 2] + out[2 * n - 1] * page_size == at;
            if (!extends && n == out_pairs)
                return RUNS_NO_ROOM;
            uint8_t expected = from;     /* an install may take the page meanwhile: the exchange decides */
            if (!__atomic_compare_exchange_n(&st[k], &expected, to, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                continue;
            if (extends) {
                out[2 * n - 1]++;
            } else {
                out[2 * n] = at;
                out[2 * n + 1] = 1;
                n++;
            }
        }
    }
    return n;
}

/* One UFFDIO_COPY (buf) or UFFDIO_ZEROPAGE (buf NULL) of [dst, dst + len): 0 or an errno, and
   the bytes the kernel installed before it stopped in *done. */
static int install_once(int uffd, uint64_t dst, const uint8_t *buf, uint64_t len, uint64_t *done)
{
    long rc;
    int64_t moved;
    if (buf) {
        struct uffdio_copy copy = {.dst = dst, .src = (uint64_t)(uintptr_t)buf, .len = len, .mode = 0, .copy = 0};
        rc = ioctl(uffd, UFFDIO_COPY, &copy);
        moved = copy.copy;
    } else {
        struct uffdio_zeropage zero = {.range = {.start = dst, .len = len}, .mode = 0, .zeropage = 0};
        rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zero);
        moved = zero.zeropage;
    }
    int err = rc ? errno : 0;
    *done = rc == 0 ? len : moved > 0 ? (uint64_t)moved : 0;
    return err;
}

/* Install the n consecutive pages at dst whose states are st (all non-zero), from buf or zero. */
static int64_t install_stretch(int uffd, uint8_t *st, uint64_t dst, const uint8_t *buf, uint64_t n,
                               uint64_t page_size, uint64_t out_counts[2])
{
    uint64_t k = 0;
    while (k < n) {
        uint64_t done;
        int err = install_once(uffd, dst + k * page_size, buf ? buf + k * page_size : NULL, (n - k) * page_size, &done);
        for (uint64_t end = k + done / page_size; k < end; k++) {
            out_counts[0]++;
            out_counts[1] += __atomic_exchange_n(&st[k], 0, __ATOMIC_RELAXED) == 2;
        }
        if (!err || err == EAGAIN || err == EINTR)
            continue;
        if (err != EEXIST)
            return -err;
        /* page k is present already: keep it, wake whoever waits on it, go on after it */
        struct uffdio_range range = {.start = dst + k * page_size, .len = page_size};
        ioctl(uffd, UFFDIO_WAKE, &range);
        __atomic_store_n(&st[k++], 0, __ATOMIC_RELAXED);
    }
    return 0;
}

int64_t uffd_install(int uffd, uint8_t *state, uint64_t nstate, const uint64_t *regions, uint64_t nregions,
                     uint64_t page_size, const uint64_t *runs, uint64_t nruns, const uint8_t *buf, int zero,
                     uint64_t out_counts[2])
{
    out_counts[0] = out_counts[1] = 0;
    if (runs_outside(regions, nregions, page_size, nstate, runs, nruns) != nruns)
        return INSTALL_OUTSIDE;
    uint64_t hint = 0;
    for (uint64_t i = 0; i < nruns; i++) {
        uint64_t address = runs[2 * i], count = runs[2 * i + 1];
        uint64_t first = run_first(regions, nregions, &hint, page_size, nstate, address, count);
        uint64_t k = 0;
        while (k < count) {
            if (!__atomic_load_n(&state[first + k], __ATOMIC_RELAXED)) {   /* current: skipped here and in buf */
                k++;
                continue;
            }
            uint64_t start = k;
            while (k < count && __atomic_load_n(&state[first + k], __ATOMIC_RELAXED))
                k++;
            int64_t rc = install_stretch(uffd, state + first + start, address + start * page_size,
                                         zero ? NULL : buf + start * page_size, k - start, page_size, out_counts);
            if (rc)
                return rc;
        }
        if (!zero)
            buf += count * page_size;
    }
    return 0;
}

int64_t uffd_zero_fill(int uffd, const uint64_t *addresses, uint64_t n, uint64_t page_size)
{
    int64_t filled = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t done;
        int err;
        while ((err = install_once(uffd, addresses[i], NULL, page_size, &done)) == EAGAIN || err == EINTR)
            ;
        if (!err) {
            filled++;
        } else if (err == EEXIST) {
            struct uffdio_range range = {.start = addresses[i], .len = page_size};
            ioctl(uffd, UFFDIO_WAKE, &range);
        } else {
            return -err;
        }
    }
    return filled;
}

void uffd_ioctl_numbers(uint64_t out[3])
{
    out[0] = UFFDIO_COPY;
    out[1] = UFFDIO_ZEROPAGE;
    out[2] = UFFDIO_WAKE;
}

/* The run's address in the target: its offset in the region of triples (start, length, target)
   that holds it; UINT64_MAX when none does. */
static uint64_t target_of(const uint64_t *regions, uint64_t nregions, uint64_t *hint, uint64_t address, uint64_t length)
{
    if (!nregions)
        return address;
    uint64_t r = region_of(regions, nregions, *hint, address, length);
    if (r == nregions)
        return UINT64_MAX;
    *hint = r;
    return regions[3 * r + 2] + (address - regions[3 * r]);
}

int64_t vm_transfer(int pid, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                    uint64_t page_size, uint8_t *buf, int write, uint64_t call_bytes, uint64_t *hashes)
{
    struct iovec local[IOV_BATCH], remote[IOV_BATCH];
    uint64_t moved = 0, hint = 0, i = 0, offset = 0;   /* offset: of run i's pages not yet moved */
    if (hashes) {
        if (!page_size || HASHED_CALL_BYTES % page_size)
            return -EINVAL;
        if (call_bytes > HASHED_CALL_BYTES)
            call_bytes = HASHED_CALL_BYTES;
    }
    while (i < nruns) {
        uint64_t n = 0, want = 0;
        while (i < nruns && n < IOV_BATCH && want < call_bytes) {
            uint64_t count = runs[2 * i + 1];
            if (!page_size || count > (UINT64_MAX - runs[2 * i]) / page_size)
                return (int64_t)moved;
            uint64_t length = count * page_size;
            uint64_t at = target_of(regions, nregions, &hint, runs[2 * i], length);
            if (at == UINT64_MAX)
                break;
            uint64_t take = length - offset;
            if (take > call_bytes - want)
                take = call_bytes - want;
            local[n].iov_base = buf + moved + want;
            local[n].iov_len = take;
            remote[n].iov_base = (void *)(uintptr_t)(at + offset);
            remote[n].iov_len = take;
            n++;
            want += take;
            offset += take;
            if (offset == length) {
                i++;
                offset = 0;
            }
        }
        if (!n)
            return (int64_t)moved;     /* a run outside every region */
        ssize_t done = write ? process_vm_writev(pid, local, n, remote, n, 0)
                             : process_vm_readv(pid, local, n, remote, n, 0);
        if (done < 0)
            return -errno;
        if (hashes)   /* the copy just brought buf's pages into the cache: hashed while there */
            hash_pages(buf + moved, (uint64_t)done / page_size, page_size, hashes + moved / page_size);
        moved += (uint64_t)done;
        if ((uint64_t)done != want)
            return (int64_t)moved;     /* part of a span is not mapped */
    }
    return (int64_t)moved;
}
