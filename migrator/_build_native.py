"""cffi API-mode build of ``migrator._native``: per-page loops without the GIL.

``setup.py`` names this file in ``cffi_modules``; ``pip install -e .`` compiles it. cffi runs
this file standalone, so it imports nothing from migrator.

Why C: ``--verify pages`` hashes every page each time it moves (a GiB is 262,144 pages). In
Python that costs ~1.3 us a page under the GIL, competing with the transport's threads; here it is
a memory-bound loop that releases the GIL. Likewise the zero-page bitmap of compressed Pages
payloads (``protocol._payload``): found, gathered and scattered a page at a time in Python it
held the GIL ~0.3 ms per 4 MiB batch, and two streams' worker threads queued behind each other.
"""

from cffi import FFI

CDEF = """
void page_hashes(const uint8_t *buf, const uint64_t *runs, uint64_t nruns, uint64_t page_size,
                 uint64_t *table, uint64_t table_len);
uint64_t find_zero_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, uint8_t *bitmap);
void gather_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, const uint8_t *bitmap, uint8_t *out);
void scatter_pages(const uint8_t *kept, uint64_t npages, uint64_t page_size, const uint8_t *bitmap, uint8_t *out);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

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

/* runs: (first table index, page count) pairs; pages of buf follow the runs in order. */
void page_hashes(const uint8_t *buf, const uint64_t *runs, uint64_t nruns, uint64_t page_size,
                 uint64_t *table, uint64_t table_len)
{
    for (uint64_t r = 0; r < nruns; r++) {
        uint64_t first = runs[2 * r], count = runs[2 * r + 1];
        for (uint64_t i = 0; i < count; i++, buf += page_size)
            if (first + i < table_len)
                table[first + i] = hash_page(buf, page_size);
    }
}

/* Zero-page bitmaps: bit i (byte i / 8, least significant bit first) is set when page i is all
   zero. page_size is a multiple of 8 (checked by the caller). */
static int page_is_zero(const uint8_t *p, uint64_t size)
{
    uint64_t w[4];
    for (uint64_t off = 0; off < size; off += 32) {     /* stops at the first non-zero word */
        memcpy(w, p + off, 32);
        if (w[0] | w[1] | w[2] | w[3])
            return 0;
    }
    return 1;
}

/* Fill bitmap ((npages + 7) / 8 bytes); returns the number of zero pages. */
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

/* Copy the pages whose bit is clear, in order, to out. */
void gather_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, const uint8_t *bitmap, uint8_t *out)
{
    for (uint64_t i = 0; i < npages; i++, buf += page_size)
        if (!(bitmap[i / 8] >> (i % 8) & 1)) {
            memcpy(out, buf, page_size);
            out += page_size;
        }
}

/* The inverse: page i of out is zeroed where its bit is set, else the next page of kept. */
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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("migrator._native", SOURCE, extra_compile_args=["-O2", "-std=gnu11"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
