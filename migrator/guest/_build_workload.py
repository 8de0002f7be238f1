"""cffi API-mode build of the guest's hot loop (``migrator.guest._workload``), run at install time.

``setup.py`` names this file in ``cffi_modules``; ``pip install -e .`` compiles it with the
machine's C compiler. cffi executes this file standalone, so it imports nothing from migrator.

Everything the workload needs lives in its region (see ``docs/guest-protocol.md``)::

    page 0                  struct guest_control: settings, step counter, in-flight marker, tag
    pages 1 .. table_pages  version table: u64 per data page, the (1-based) step that last wrote it
    the rest                data pages: a 32-byte header (magic, region page index, step,
                            checksum), a chunk rewritten by every write, and a tail from the fill

The PRNG is counter-based (SplitMix64 of the key and the step number), so its whole state is the
key in the control block plus the step counter. A step is idempotent and is committed by one
aligned 8-byte store of ``steps``: a guest stopped (SIGSTOP) at any instruction and copied
elsewhere redoes the interrupted step and then continues exactly as the original would. Nothing
stored in the region is a pointer, so its content does not depend on where it is mapped.
"""

from cffi import FFI

# Shared by cdef and the C source, so Python and C agree on the control block by construction.
TYPES = r"""
#define GUEST_LAYOUT_VERSION 1
#define GUEST_PAGE_SIZE 4096
#define GUEST_HEADER_BYTES 32
#define GUEST_TAG_MAX 200

#define PATTERN_UNIFORM 0
#define PATTERN_HOT 1
#define PATTERN_SEQUENTIAL 2

#define FILL_RANDOM 0
#define FILL_TEXT 1
#define FILL_SPARSE 2

/* check() problem codes; migrator/guest/workload.py words them. */
#define PROBLEM_NONE 0
#define PROBLEM_CTL_MAGIC 1
#define PROBLEM_CTL_VERSION 2
#define PROBLEM_CTL_GEOMETRY 3
#define PROBLEM_CTL_SETTINGS 4
#define PROBLEM_CTL_CHECKSUM 5
#define PROBLEM_CTL_STEPS 6
#define PROBLEM_CTL_TAG 7
#define PROBLEM_TABLE_AHEAD 10
#define PROBLEM_TABLE_WRONG_STEP 11
#define PROBLEM_HEADER_MISSING 12
#define PROBLEM_HEADER_CORRUPT 13
#define PROBLEM_HEADER_INDEX 14
#define PROBLEM_STALE 15
#define PROBLEM_BODY 16

struct guest_control {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t page_size;
    uint64_t region_pages;      /* control page + table pages + data pages */
    uint64_t table_pages;
    uint64_t data_pages;
    uint64_t seed;
    uint64_t prng_key;          /* derived from seed by guest_format */
    uint32_t pattern;
    uint32_t fill;
    uint64_t hot_pages;         /* PATTERN_HOT: size of the hot set */
    uint64_t hot_threshold;     /* PATTERN_HOT: a write is hot when rand < threshold (share * 2^64) */
    uint64_t hot_stride;        /* PATTERN_HOT: data page of rank r is (r * stride) % data_pages */
    double dirty_rate;          /* page writes per second; 0 = unlimited */
    uint64_t settings_checksum; /* over every field above */
    uint64_t steps;             /* steps done: the commit point of a step */
    uint64_t in_flight;         /* steps + 1 while step `steps` is being written */
    uint32_t tag_len;
    uint8_t tag[200];           /* opaque tag (set-tag) */
};
"""

CDEF = TYPES + r"""
static const uint64_t GUEST_MAGIC;
static const uint64_t PAGE_MAGIC;

void guest_format(uint8_t *region);
uint64_t guest_run(uint8_t *region, uint64_t count);
uint64_t guest_pick(const uint8_t *region, uint64_t step);
int guest_check_control(const uint8_t *region, uint64_t region_bytes, uint64_t detail[2]);
int64_t guest_check(const uint8_t *region, uint64_t region_bytes, int deep, int *problem, uint64_t detail[2]);
"""

# Text fill: 256 common words (a byte of PRNG output picks one), a few ending a sentence or a line
# ("|" = followed by a line break instead of a space), so "text" pages compress like prose.
TEXT_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name
very through just form great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run while, press, close, night, real, life, few, north, The It And
book.| carry. took. science eat.|
""".split()
assert len(TEXT_WORDS) == 256 and all(len(w) <= 7 for w in TEXT_WORDS)


def _word_slot(word: str) -> str:
    """A C initializer {"word ", length} of an 8-byte slot, padded with spaces."""
    text = word[:-1] + "\\n" if word.endswith("|") else word + " "
    length = len(word) if word.endswith("|") else len(word) + 1
    return '{"%s", %d}' % (text + " " * (8 - length), length)


WORD_TABLE = ",\n".join("    " + _word_slot(w) for w in TEXT_WORDS)

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
""" + TYPES + r"""
static const uint64_t GUEST_MAGIC = 0x5453455547494d47ULL;  /* "GMIGUEST" */
static const uint64_t PAGE_MAGIC = 0x31454741504d4947ULL;   /* "GIMPAGE1" */

_Static_assert(sizeof(struct guest_control) <= GUEST_PAGE_SIZE, "control block fits page 0");
_Static_assert(offsetof(struct guest_control, settings_checksum) % 8 == 0, "checksummed words");

#define GOLDEN 0x9e3779b97f4a7c15ULL
#define TAIL_VERSION 0xffffffffffffffffULL   /* stream id of a page's tail (never a step) */
#define SPARSE_KEEP_ONE_IN 16                 /* sparse fill: pages with content at start */

struct page_header { uint64_t magic, index, step, checksum; };

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t below(uint64_t r, uint64_t n)    /* r scaled into [0, n) */
{
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static inline uint64_t stream_seed(uint64_t key, uint64_t page, uint64_t version)
{
    return mix64(mix64(key ^ page) + version * GOLDEN);
}

static inline uint64_t header_checksum(uint64_t key, uint64_t magic, uint64_t index, uint64_t step)
{
    /* each mix64 is a bijection: changing any one field always changes the checksum */
    return mix64(mix64(mix64(key ^ magic) ^ index) ^ step);
}

static const unsigned CHUNK_BYTES[3] = {
    [FILL_RANDOM] = 1024, [FILL_TEXT] = 1024, [FILL_SPARSE] = 64,
};

/* 256 words in 8-byte slots (word + space); only `len` bytes of a slot count. */
static const struct { char s[8]; unsigned char len; } WORDS[256] = {
""" + WORD_TABLE + r"""
};

static void gen_random(uint8_t *dst, size_t len, uint64_t seed)
{
    size_t words = len / 8;
    for (size_t i = 0; i < words; i++) {
        uint64_t v = mix64(seed + (i + 1) * GOLDEN);
        memcpy(dst + 8 * i, &v, 8);
    }
}

static void gen_text(uint8_t *dst, size_t len, uint64_t seed)
{
    uint8_t *end = dst + len;
    uint64_t counter = 0;
    while (end - dst >= 8) {
        uint64_t r = mix64(seed + (++counter) * GOLDEN);
        for (int k = 0; k < 8 && end - dst >= 8; k++, r >>= 8) {
            memcpy(dst, WORDS[r & 255].s, 8);
            dst += WORDS[r & 255].len;
        }
    }
    while (dst < end)
        *dst++ = '\n';
}

/* Bytes [32, 32 + chunk) of a page as written at `version` (0 = the initial fill). */
static void gen_chunk(uint8_t *dst, unsigned fill, uint64_t key, uint64_t page, uint64_t version)
{
    uint64_t seed = stream_seed(key, page, version);
    if (fill == FILL_TEXT)
        gen_text(dst, CHUNK_BYTES[fill], seed);
    else
        gen_random(dst, CHUNK_BYTES[fill], seed);
}

/* Bytes [32 + chunk, page end): written once by the initial fill, never by a step. */
static void gen_tail(uint8_t *dst, unsigned fill, uint64_t key, uint64_t page)
{
    size_t len = GUEST_PAGE_SIZE - GUEST_HEADER_BYTES - CHUNK_BYTES[fill];
    uint64_t seed = stream_seed(key, page, TAIL_VERSION);
    if (fill == FILL_RANDOM)
        gen_random(dst, len, seed);
    else if (fill == FILL_TEXT)
        gen_text(dst, len, seed);
    else
        memset(dst, 0, len);
}

static inline int sparse_filled(uint64_t key, uint64_t page)
{
    return mix64(key ^ (page * GOLDEN) ^ 0x5a5a5a5a5a5a5a5aULL) % SPARSE_KEEP_ONE_IN == 0;
}

static inline void write_header(uint8_t *page, uint64_t key, uint64_t index, uint64_t step)
{
    struct page_header h = { PAGE_MAGIC, index, step, header_checksum(key, PAGE_MAGIC, index, step) };
    memcpy(page, &h, sizeof h);
}

static inline uint64_t first_data_page(const struct guest_control *ctl)
{
    return 1 + ctl->table_pages;
}

/* The data page (0-based) written by step n (0-based). */
static inline uint64_t pick(const struct guest_control *ctl, uint64_t n)
{
    uint64_t pages = ctl->data_pages;
    if (ctl->pattern == PATTERN_SEQUENTIAL)
        return n % pages;
    uint64_t r = mix64(ctl->prng_key + (n + 1) * GOLDEN);
    if (ctl->pattern == PATTERN_UNIFORM)
        return below(r, pages);
    uint64_t hot = ctl->hot_pages, rank;
    uint64_t r2 = mix64(r);
    if (r < ctl->hot_threshold)
        rank = below(r2, hot);
    else
        rank = hot + below(r2, pages - hot);
    return (uint64_t)(((unsigned __int128)rank * ctl->hot_stride) % pages);
}

static uint64_t settings_checksum(const struct guest_control *ctl)
{
    const uint8_t *p = (const uint8_t *)ctl;
    uint64_t h = 0, w;
    for (size_t off = 0; off < offsetof(struct guest_control, settings_checksum); off += 8) {
        memcpy(&w, p + off, 8);
        h = mix64(h ^ w);
    }
    return h;
}

uint64_t guest_pick(const uint8_t *region, uint64_t step)
{
    const struct guest_control *ctl = (const struct guest_control *)region;
    return first_data_page(ctl) + pick(ctl, step);
}

void guest_format(uint8_t *region)
{
    struct guest_control *ctl = (struct guest_control *)region;
    ctl->prng_key = mix64(ctl->seed ^ 0x6d696772617465ULL);
    ctl->settings_checksum = settings_checksum(ctl);
    ctl->steps = 0;
    ctl->in_flight = 0;
    uint64_t key = ctl->prng_key, first = first_data_page(ctl);
    unsigned fill = ctl->fill, chunk = CHUNK_BYTES[fill];
    for (uint64_t r = first; r < ctl->region_pages; r++) {
        uint8_t *page = region + r * GUEST_PAGE_SIZE;
        if (fill == FILL_SPARSE && !sparse_filled(key, r))
            continue;                            /* never touched: stays unpopulated */
        write_header(page, key, r, 0);
        gen_chunk(page + GUEST_HEADER_BYTES, fill, key, r, 0);
        if (fill != FILL_SPARSE)
            gen_tail(page + GUEST_HEADER_BYTES + chunk, fill, key, r);
    }
}

uint64_t guest_run(uint8_t *region, uint64_t count)
{
    struct guest_control *ctl = (struct guest_control *)region;
    uint64_t *table = (uint64_t *)(region + GUEST_PAGE_SIZE);
    uint64_t first = first_data_page(ctl), key = ctl->prng_key, n = ctl->steps;
    unsigned fill = ctl->fill;
    for (uint64_t k = 0; k < count; k++, n++) {
        /* Order matters to a process stopped mid-step (SIGSTOP) and copied: marker, page,
           table, then the one-store commit. The signal fences stop the compiler reordering. */
        __atomic_store_n(&ctl->in_flight, n + 1, __ATOMIC_RELAXED);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        uint64_t j = pick(ctl, n), r = first + j;
        uint8_t *page = region + r * GUEST_PAGE_SIZE;
        gen_chunk(page + GUEST_HEADER_BYTES, fill, key, r, n + 1);
        write_header(page, key, r, n + 1);
        table[j] = n + 1;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        __atomic_store_n(&ctl->steps, n + 1, __ATOMIC_RELEASE);
    }
    return n;
}

int guest_check_control(const uint8_t *region, uint64_t region_bytes, uint64_t detail[2])
{
    const struct guest_control *ctl = (const struct guest_control *)region;
    uint64_t pages = region_bytes / GUEST_PAGE_SIZE;
    detail[0] = detail[1] = 0;
    if (ctl->magic != GUEST_MAGIC)
        return PROBLEM_CTL_MAGIC;
    if (ctl->layout_version != GUEST_LAYOUT_VERSION) {
        detail[0] = ctl->layout_version;
        detail[1] = GUEST_LAYOUT_VERSION;
        return PROBLEM_CTL_VERSION;
    }
    if (ctl->page_size != GUEST_PAGE_SIZE || ctl->region_pages != pages || ctl->data_pages == 0
        || ctl->table_pages > pages || 1 + ctl->table_pages + ctl->data_pages != pages
        || ctl->table_pages * (GUEST_PAGE_SIZE / 8) < ctl->data_pages) {
        detail[0] = ctl->region_pages;
        detail[1] = pages;
        return PROBLEM_CTL_GEOMETRY;
    }
    if (ctl->pattern > PATTERN_SEQUENTIAL || ctl->fill > FILL_SPARSE
        || !(ctl->dirty_rate >= 0 && ctl->dirty_rate <= 1e12)     /* also refuses NaN and inf */
        || (ctl->pattern == PATTERN_HOT
            && (ctl->hot_pages == 0 || ctl->hot_pages >= ctl->data_pages || ctl->hot_stride == 0)))
        return PROBLEM_CTL_SETTINGS;
    if (ctl->settings_checksum != settings_checksum(ctl))
        return PROBLEM_CTL_CHECKSUM;
    if (ctl->in_flight != ctl->steps && ctl->in_flight != ctl->steps + 1) {
        detail[0] = ctl->in_flight;
        detail[1] = ctl->steps;
        return PROBLEM_CTL_STEPS;
    }
    if (ctl->tag_len > GUEST_TAG_MAX) {
        detail[0] = ctl->tag_len;
        return PROBLEM_CTL_TAG;
    }
    return PROBLEM_NONE;
}

static int is_zero(const uint8_t *p, size_t len)
{
    uint64_t acc = 0, w;
    for (size_t i = 0; i < len; i += 8) {
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    return acc == 0;
}

/* Is `t` a version-table value that data page j may hold when `steps` steps are done? */
static inline int plausible_version(const struct guest_control *ctl, uint64_t j, uint64_t t, uint64_t steps)
{
    return t == 0 || (t <= steps && pick(ctl, t - 1) == j);
}

int64_t guest_check(const uint8_t *region, uint64_t region_bytes, int deep, int *problem, uint64_t detail[2])
{
    /* deep: also regenerate every page body (~0.2 s per GiB); shallow checks control block,
       version table and page headers only (what fits in a migration's downtime). */
    const struct guest_control *ctl = (const struct guest_control *)region;
    *problem = guest_check_control(region, region_bytes, detail);
    if (*problem)
        return 0;
    const uint64_t *table = (const uint64_t *)(region + GUEST_PAGE_SIZE);
    uint64_t first = first_data_page(ctl), key = ctl->prng_key, steps = ctl->steps;
    unsigned fill = ctl->fill, chunk = CHUNK_BYTES[fill];
    size_t tail_off = GUEST_HEADER_BYTES + chunk, tail_len = GUEST_PAGE_SIZE - tail_off;
    uint64_t in_flight_page = ctl->in_flight == steps + 1 ? pick(ctl, steps) : ctl->data_pages;
    uint8_t expect[GUEST_PAGE_SIZE];

    for (uint64_t j = 0; j < ctl->data_pages; j++) {
        uint64_t r = first + j, t = table[j];
        const uint8_t *page = region + r * GUEST_PAGE_SIZE;
        struct page_header h;
        memcpy(&h, page, sizeof h);
        detail[0] = t;
        detail[1] = steps;
        int untouched_sparse = fill == FILL_SPARSE && !sparse_filled(key, r);
        if (j == in_flight_page) {
            /* Stopped inside this page's step: header and chunk are rewritten when the step is
               redone; the table may already hold the new version; the tail must be intact. */
            if (t != steps + 1 && !plausible_version(ctl, j, t, steps))
                return *problem = PROBLEM_TABLE_WRONG_STEP, (int64_t)r;
            gen_tail(expect, fill, key, r);
            if (deep && memcmp(page + tail_off, expect, tail_len) != 0)
                return *problem = PROBLEM_BODY, (int64_t)r;
            continue;
        }
        if (t > steps)
            return *problem = PROBLEM_TABLE_AHEAD, (int64_t)r;
        if (!plausible_version(ctl, j, t, steps))
            return *problem = PROBLEM_TABLE_WRONG_STEP, (int64_t)r;
        if (t == 0 && untouched_sparse) {
            if (!is_zero(page, deep ? GUEST_PAGE_SIZE : GUEST_HEADER_BYTES))
                return *problem = PROBLEM_BODY, (int64_t)r;
            continue;
        }
        if (is_zero(page, GUEST_HEADER_BYTES))
            return *problem = PROBLEM_HEADER_MISSING, (int64_t)r;
        if (h.magic != PAGE_MAGIC || h.checksum != header_checksum(key, h.magic, h.index, h.step))
            return *problem = PROBLEM_HEADER_CORRUPT, (int64_t)r;
        if (h.index != r) {
            detail[0] = h.index;
            return *problem = PROBLEM_HEADER_INDEX, (int64_t)r;
        }
        if (h.step != t) {
            detail[0] = h.step;
            detail[1] = t;
            return *problem = PROBLEM_STALE, (int64_t)r;
        }
        if (!deep)
            continue;
        gen_chunk(expect, fill, key, r, t);
        gen_tail(expect + chunk, fill, key, r);
        if (memcmp(page + GUEST_HEADER_BYTES, expect, GUEST_PAGE_SIZE - GUEST_HEADER_BYTES) != 0)
            return *problem = PROBLEM_BODY, (int64_t)r;
    }
    return -1;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("migrator.guest._workload", SOURCE, extra_compile_args=["-O2", "-std=gnu11"])
