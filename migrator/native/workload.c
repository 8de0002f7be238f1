/* The guest's hot loop over its region (migrator.native.workload); the layout is workload.h's.

   The PRNG is counter-based (SplitMix64 of the key and the step number), so its whole state is
   the key in the control block plus the step counter. A step is idempotent and is committed by
   one aligned 8-byte store of `steps`: a guest stopped (SIGSTOP) at any instruction and copied
   elsewhere redoes the interrupted step and then continues exactly as the original would.
   Nothing stored in the region is a pointer, so its content does not depend on where it is
   mapped. */

#include <errno.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "workload.h"

_Static_assert(sizeof(struct guest_control) <= GUEST_PAGE_SIZE, "control block fits page 0");
_Static_assert(offsetof(struct guest_control, settings_checksum) % 8 == 0, "checksummed words");
_Static_assert(sizeof(struct replay_interval) == 24 && sizeof(struct replay_run) == 16, "schedule packing");
_Static_assert(REPLAY_NAME_MAX % 8 == 0, "the intervals after the name are aligned");

#define GOLDEN 0x9e3779b97f4a7c15ULL
#define TAIL_VERSION 0xffffffffffffffffULL   /* stream id of a page's tail (never a step) */
#define SPARSE_KEEP_ONE_IN 16                 /* sparse fill: pages with content at start */

struct page_header { uint64_t magic, index, step, checksum; };
_Static_assert(sizeof(struct page_header) == GUEST_HEADER_BYTES, "the header workload.h sizes");

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

/* Text fill: 256 common words (a byte of PRNG output picks one) in 8-byte slots, word then a
   space; a few end a sentence or a line (a line break instead of the space), so "text" pages
   compress like prose. Only `len` bytes of a slot count. */
static const struct { char s[8]; unsigned char len; } WORDS[] = {
    {"the     ", 4}, {"of      ", 3}, {"and     ", 4}, {"to      ", 3}, {"a       ", 2}, {"in      ", 3},
    {"is      ", 3}, {"it      ", 3}, {"you     ", 4}, {"that    ", 5}, {"he      ", 3}, {"was     ", 4},
    {"for     ", 4}, {"on      ", 3}, {"are     ", 4}, {"with    ", 5}, {"as      ", 3}, {"I       ", 2},
    {"his     ", 4}, {"they    ", 5}, {"be      ", 3}, {"at      ", 3}, {"one     ", 4}, {"have    ", 5},
    {"this    ", 5}, {"from    ", 5}, {"or      ", 3}, {"had     ", 4}, {"by      ", 3}, {"hot     ", 4},
    {"word    ", 5}, {"but     ", 4}, {"what    ", 5}, {"some    ", 5}, {"we      ", 3}, {"can     ", 4},
    {"out     ", 4}, {"other   ", 6}, {"were    ", 5}, {"all     ", 4}, {"there   ", 6}, {"when    ", 5},
    {"up      ", 3}, {"use     ", 4}, {"your    ", 5}, {"how     ", 4}, {"said    ", 5}, {"an      ", 3},
    {"each    ", 5}, {"she     ", 4}, {"which   ", 6}, {"do      ", 3}, {"their   ", 6}, {"time    ", 5},
    {"if      ", 3}, {"will    ", 5}, {"way     ", 4}, {"about   ", 6}, {"many    ", 5}, {"then    ", 5},
    {"them    ", 5}, {"write   ", 6}, {"would   ", 6}, {"like    ", 5}, {"so      ", 3}, {"these   ", 6},
    {"her     ", 4}, {"long    ", 5}, {"make    ", 5}, {"thing   ", 6}, {"see     ", 4}, {"him     ", 4},
    {"two     ", 4}, {"has     ", 4}, {"look    ", 5}, {"more    ", 5}, {"day     ", 4}, {"could   ", 6},
    {"go      ", 3}, {"come    ", 5}, {"did     ", 4}, {"number  ", 7}, {"sound   ", 6}, {"no      ", 3},
    {"most    ", 5}, {"people  ", 7}, {"my      ", 3}, {"over    ", 5}, {"know    ", 5}, {"water   ", 6},
    {"than    ", 5}, {"call    ", 5}, {"first   ", 6}, {"who     ", 4}, {"may     ", 4}, {"down    ", 5},
    {"side    ", 5}, {"been    ", 5}, {"now     ", 4}, {"find    ", 5}, {"any     ", 4}, {"new     ", 4},
    {"work    ", 5}, {"part    ", 5}, {"take    ", 5}, {"get     ", 4}, {"place   ", 6}, {"made    ", 5},
    {"live    ", 5}, {"where   ", 6}, {"after   ", 6}, {"back    ", 5}, {"little  ", 7}, {"only    ", 5},
    {"round   ", 6}, {"man     ", 4}, {"year    ", 5}, {"came    ", 5}, {"show    ", 5}, {"every   ", 6},
    {"good    ", 5}, {"me      ", 3}, {"give    ", 5}, {"our     ", 4}, {"under   ", 6}, {"name    ", 5},
    {"very    ", 5}, {"through ", 8}, {"just    ", 5}, {"form    ", 5}, {"great   ", 6}, {"think   ", 6},
    {"say     ", 4}, {"help    ", 5}, {"low     ", 4}, {"line    ", 5}, {"differ  ", 7}, {"turn    ", 5},
    {"cause   ", 6}, {"much    ", 5}, {"mean    ", 5}, {"before  ", 7}, {"move    ", 5}, {"right   ", 6},
    {"boy     ", 4}, {"old     ", 4}, {"too     ", 4}, {"same    ", 5}, {"tell    ", 5}, {"does    ", 5},
    {"set     ", 4}, {"three   ", 6}, {"want    ", 5}, {"air     ", 4}, {"well    ", 5}, {"also    ", 5},
    {"play    ", 5}, {"small   ", 6}, {"end     ", 4}, {"put     ", 4}, {"home    ", 5}, {"read    ", 5},
    {"hand    ", 5}, {"port    ", 5}, {"large   ", 6}, {"spell   ", 6}, {"add     ", 4}, {"even    ", 5},
    {"land    ", 5}, {"here    ", 5}, {"must    ", 5}, {"big     ", 4}, {"high    ", 5}, {"such    ", 5},
    {"follow  ", 7}, {"act     ", 4}, {"why     ", 4}, {"ask     ", 4}, {"men     ", 4}, {"change  ", 7},
    {"went    ", 5}, {"light   ", 6}, {"kind    ", 5}, {"off     ", 4}, {"need    ", 5}, {"house   ", 6},
    {"picture ", 8}, {"try     ", 4}, {"us      ", 3}, {"again   ", 6}, {"animal  ", 7}, {"point   ", 6},
    {"mother  ", 7}, {"world   ", 6}, {"near    ", 5}, {"build   ", 6}, {"self    ", 5}, {"earth   ", 6},
    {"father  ", 7}, {"head    ", 5}, {"stand   ", 6}, {"own     ", 4}, {"page    ", 5}, {"should  ", 7},
    {"country ", 8}, {"found   ", 6}, {"answer  ", 7}, {"school  ", 7}, {"grow    ", 5}, {"study   ", 6},
    {"still   ", 6}, {"learn   ", 6}, {"plant   ", 6}, {"cover   ", 6}, {"food    ", 5}, {"sun     ", 4},
    {"four    ", 5}, {"between ", 8}, {"state   ", 6}, {"keep    ", 5}, {"eye     ", 4}, {"never   ", 6},
    {"last    ", 5}, {"let     ", 4}, {"thought ", 8}, {"city    ", 5}, {"tree    ", 5}, {"cross   ", 6},
    {"farm    ", 5}, {"hard    ", 5}, {"start   ", 6}, {"might   ", 6}, {"story   ", 6}, {"saw     ", 4},
    {"far     ", 4}, {"sea     ", 4}, {"draw    ", 5}, {"left    ", 5}, {"late    ", 5}, {"run     ", 4},
    {"while,  ", 7}, {"press,  ", 7}, {"close,  ", 7}, {"night,  ", 7}, {"real,   ", 6}, {"life,   ", 6},
    {"few,    ", 5}, {"north,  ", 7}, {"The     ", 4}, {"It      ", 3}, {"And     ", 4}, {"book.\n  ", 6},
    {"carry.  ", 7}, {"took.   ", 6}, {"science ", 8}, {"eat.\n   ", 5},
};
_Static_assert(sizeof WORDS / sizeof WORDS[0] == 256, "a byte picks a word");

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
    return 1 + ctl->table_pages + ctl->schedule_pages;
}

static inline const uint8_t *schedule_of(const struct guest_control *ctl)
{
    return (const uint8_t *)ctl + (1 + ctl->table_pages) * GUEST_PAGE_SIZE;
}

static inline const struct replay_interval *intervals_of(const struct guest_control *ctl)
{
    return (const struct replay_interval *)(schedule_of(ctl) + REPLAY_NAME_MAX);
}

static inline const struct replay_run *runs_of(const struct guest_control *ctl)
{
    return (const struct replay_run *)(intervals_of(ctl) + ctl->replay_intervals);
}

/* Bytes of the schedule that are used (name, intervals, runs); guest_check_control has bounded
   the counts by the schedule's pages before anything calls this. */
static inline uint64_t schedule_bytes(const struct guest_control *ctl)
{
    return REPLAY_NAME_MAX + ctl->replay_intervals * sizeof(struct replay_interval)
        + ctl->replay_runs * sizeof(struct replay_run);
}

/* The data page of loop step m: binary search for the run holding it. */
static inline uint64_t replay_pick(const struct guest_control *ctl, uint64_t n)
{
    const struct replay_run *runs = runs_of(ctl);
    uint64_t m = n % ctl->replay_steps, lo = 0, hi = ctl->replay_runs;
    while (hi - lo > 1) {                /* invariant: runs[lo].step <= m < runs[hi].step */
        uint64_t mid = lo + (hi - lo) / 2;
        if (runs[mid].step <= m)
            lo = mid;
        else
            hi = mid;
    }
    uint64_t j = runs[lo].page + (m - runs[lo].step);
    return j < ctl->data_pages ? j : j % ctl->data_pages;   /* never leave the region */
}

/* The data page (0-based) written by step n (0-based). */
static inline uint64_t pick(const struct guest_control *ctl, uint64_t n)
{
    uint64_t pages = ctl->data_pages;
    if (ctl->pattern == PATTERN_SEQUENTIAL)
        return n % pages;
    if (ctl->pattern == PATTERN_REPLAY)
        return replay_pick(ctl, n);
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

static uint64_t bytes_checksum(const uint8_t *p, uint64_t len)
{
    uint64_t h = len, w;
    for (uint64_t off = 0; off + 8 <= len; off += 8) {
        memcpy(&w, p + off, 8);
        h = mix64(h ^ w);
    }
    return h;
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
    ctl->schedule_checksum =
        ctl->pattern == PATTERN_REPLAY ? bytes_checksum(schedule_of(ctl), schedule_bytes(ctl)) : 0;
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

/* Is a replay's schedule whole (its checksum) and consistent: runs back to back over the loop's
   steps and inside the data pages, intervals in time order ending at the loop's steps? */
static int schedule_valid(const struct guest_control *ctl)
{
    uint64_t room = ctl->schedule_pages * GUEST_PAGE_SIZE;
    if (ctl->replay_runs == 0 || ctl->replay_intervals == 0 || ctl->replay_steps == 0
        || ctl->replay_name_len > REPLAY_NAME_MAX
        || !(ctl->replay_seconds > 0 && ctl->replay_seconds <= 1e9)
        || room < REPLAY_NAME_MAX || ctl->replay_intervals > room / sizeof(struct replay_interval)
        || ctl->replay_runs > room / sizeof(struct replay_run) || schedule_bytes(ctl) > room)
        return 0;
    if (bytes_checksum(schedule_of(ctl), schedule_bytes(ctl)) != ctl->schedule_checksum)
        return 0;
    const struct replay_run *runs = runs_of(ctl);
    uint64_t step = 0;
    for (uint64_t k = 0; k < ctl->replay_runs; k++) {
        if (runs[k].step != step || runs[k].pages == 0
            || (uint64_t)runs[k].page + runs[k].pages > ctl->data_pages)
            return 0;
        step += runs[k].pages;
    }
    if (step != ctl->replay_steps)
        return 0;
    const struct replay_interval *iv = intervals_of(ctl);
    double time = 0;
    uint64_t steps = 0;
    for (uint64_t k = 0; k < ctl->replay_intervals; k++) {
        if (!(iv[k].start >= time && iv[k].end > iv[k].start && iv[k].end <= ctl->replay_seconds)
            || iv[k].steps_end < steps || iv[k].steps_end > ctl->replay_steps)
            return 0;
        time = iv[k].end;
        steps = iv[k].steps_end;
    }
    return steps == ctl->replay_steps;
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
        || ctl->table_pages > pages || ctl->schedule_pages > pages
        || 1 + ctl->table_pages + ctl->schedule_pages + ctl->data_pages != pages
        || ctl->table_pages * (GUEST_PAGE_SIZE / 8) < ctl->data_pages) {
        detail[0] = ctl->region_pages;
        detail[1] = pages;
        return PROBLEM_CTL_GEOMETRY;
    }
    if (ctl->pattern > PATTERN_REPLAY || ctl->fill > FILL_SPARSE
        || !(ctl->dirty_rate >= 0 && ctl->dirty_rate <= 1e12)     /* also refuses NaN and inf */
        || (ctl->pattern == PATTERN_HOT
            && (ctl->hot_pages == 0 || ctl->hot_pages >= ctl->data_pages || ctl->hot_stride == 0)))
        return PROBLEM_CTL_SETTINGS;
    if (ctl->settings_checksum != settings_checksum(ctl))
        return PROBLEM_CTL_CHECKSUM;
    if (ctl->pattern == PATTERN_REPLAY ? !schedule_valid(ctl)
        : (ctl->schedule_pages | ctl->replay_steps | ctl->replay_runs | ctl->replay_intervals
           | ctl->replay_name_len | ctl->schedule_checksum) != 0 || ctl->replay_seconds != 0)
        return PROBLEM_CTL_SCHEDULE;
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

/* What guest_check verifies of data page j: its table entry, header and (deep) body. */
struct check_state {
    const struct guest_control *ctl;
    const uint8_t *region;
    const uint64_t *table;
    uint64_t first, key, steps, in_flight_page;
    unsigned fill, chunk;
    int deep;
};

static struct check_state check_state(const uint8_t *region, int deep)
{
    const struct guest_control *ctl = (const struct guest_control *)region;
    struct check_state c = {
        .ctl = ctl, .region = region, .table = (const uint64_t *)(region + GUEST_PAGE_SIZE),
        .first = first_data_page(ctl), .key = ctl->prng_key, .steps = ctl->steps,
        .fill = ctl->fill, .chunk = CHUNK_BYTES[ctl->fill], .deep = deep,
    };
    c.in_flight_page = ctl->in_flight == c.steps + 1 ? pick(ctl, c.steps) : ctl->data_pages;
    return c;
}

/* PROBLEM_NONE, or the problem of data page j (detail as guest_check says). */
static int check_page(const struct check_state *c, uint64_t j, uint64_t detail[2])
{
    uint64_t r = c->first + j, t = c->table[j], steps = c->steps;
    const uint8_t *page = c->region + r * GUEST_PAGE_SIZE;
    size_t tail_off = GUEST_HEADER_BYTES + c->chunk, tail_len = GUEST_PAGE_SIZE - tail_off;
    uint8_t expect[GUEST_PAGE_SIZE];
    struct page_header h;
    memcpy(&h, page, sizeof h);
    detail[0] = t;
    detail[1] = steps;
    if (j == c->in_flight_page) {
        /* Stopped inside this page's step: header and chunk are rewritten when the step is
           redone; the table may already hold the new version; the tail must be intact. */
        if (t != steps + 1 && !plausible_version(c->ctl, j, t, steps))
            return PROBLEM_TABLE_WRONG_STEP;
        gen_tail(expect, c->fill, c->key, r);
        if (c->deep && memcmp(page + tail_off, expect, tail_len) != 0)
            return PROBLEM_BODY;
        return PROBLEM_NONE;
    }
    if (t > steps)
        return PROBLEM_TABLE_AHEAD;
    if (!plausible_version(c->ctl, j, t, steps))
        return PROBLEM_TABLE_WRONG_STEP;
    if (t == 0 && c->fill == FILL_SPARSE && !sparse_filled(c->key, r))
        return is_zero(page, c->deep ? GUEST_PAGE_SIZE : GUEST_HEADER_BYTES) ? PROBLEM_NONE : PROBLEM_BODY;
    if (is_zero(page, GUEST_HEADER_BYTES))
        return PROBLEM_HEADER_MISSING;
    if (h.magic != PAGE_MAGIC || h.checksum != header_checksum(c->key, h.magic, h.index, h.step))
        return PROBLEM_HEADER_CORRUPT;
    if (h.index != r) {
        detail[0] = h.index;
        return PROBLEM_HEADER_INDEX;
    }
    if (h.step != t) {
        detail[0] = h.step;
        detail[1] = t;
        return PROBLEM_STALE;
    }
    if (!c->deep)
        return PROBLEM_NONE;
    gen_chunk(expect, c->fill, c->key, r, t);
    gen_tail(expect + c->chunk, c->fill, c->key, r);
    if (memcmp(page + GUEST_HEADER_BYTES, expect, GUEST_PAGE_SIZE - GUEST_HEADER_BYTES) != 0)
        return PROBLEM_BODY;
    return PROBLEM_NONE;
}

int64_t guest_check(const uint8_t *region, uint64_t region_bytes, int deep, int *problem, uint64_t detail[2])
{
    *problem = guest_check_control(region, region_bytes, detail);
    if (*problem)
        return 0;
    struct check_state c = check_state(region, deep);
    for (uint64_t j = 0; j < c.ctl->data_pages; j++)
        if ((*problem = check_page(&c, j, detail)))
            return (int64_t)(c.first + j);
    return -1;
}

int64_t guest_check_pages(const uint8_t *region, uint64_t region_bytes, int deep, const uint64_t *runs,
                          uint64_t n_runs, int *problem, uint64_t detail[2])
{
    *problem = guest_check_control(region, region_bytes, detail);
    if (*problem)
        return 0;
    struct check_state c = check_state(region, deep);
    uint64_t region_pages = region_bytes / GUEST_PAGE_SIZE;
    for (uint64_t i = 0; i < n_runs; i++) {
        uint64_t start = runs[2 * i], end = start + runs[2 * i + 1];
        if (end < start || end > region_pages) {
            detail[0] = start;
            detail[1] = region_pages;
            return *problem = PROBLEM_OUTSIDE, (int64_t)start;
        }
    }
    /* Scattered pages cost a cache and TLB miss each: ask for all their headers and table
       entries first, so the misses overlap instead of being paid one after another. */
    for (uint64_t i = 0; i < n_runs; i++)
        for (uint64_t r = runs[2 * i], k = 0; k < runs[2 * i + 1] && k < 64; r++, k++)
            if (r >= c.first) {
                __builtin_prefetch(region + r * GUEST_PAGE_SIZE);
                __builtin_prefetch(&c.table[r - c.first]);
            }
    /* Data pages only: the control block, version table and schedule pages of the final copy
       are the source's by the page digest, and checking every entry of a table page would cost
       the pages it versions, not the page. */
    for (uint64_t i = 0; i < n_runs; i++) {
        uint64_t start = runs[2 * i] > c.first ? runs[2 * i] : c.first, end = runs[2 * i] + runs[2 * i + 1];
        for (uint64_t r = start; r < end; r++)
            if ((*problem = check_page(&c, r - c.first, detail)))
                return (int64_t)r;
    }
    return -1;
}

/* Batched: process_madvise on this process (allowed for MADV_DONTNEED on oneself since Linux
   6.13) takes up to DISCARD_BATCH runs a call, and the kernel flushes the TLB once per batch
   rather than once per run: three times faster for scattered pages here. A kernel that refuses
   it gets one madvise per run. Returns 0, or the errno of a failed madvise. */
#define DISCARD_BATCH 1024
static int discard_batch(int pidfd, struct iovec *iov, uint64_t n)
{
    uint64_t want = 0;
    for (uint64_t i = 0; i < n; i++)
        want += iov[i].iov_len;
#ifdef SYS_process_madvise
    if (pidfd >= 0 && syscall(SYS_process_madvise, pidfd, iov, n, MADV_DONTNEED, 0) == (long)want)
        return 0;
#endif
    for (uint64_t i = 0; i < n; i++)    /* refused, or stopped part-way: dropping twice is harmless */
        if (madvise(iov[i].iov_base, iov[i].iov_len, MADV_DONTNEED))
            return errno;
    return 0;
}

int64_t discard_pages(uint8_t *region, uint64_t region_bytes, const uint64_t *runs, uint64_t n_runs, uint64_t done[2])
{
    uint64_t region_pages = region_bytes / GUEST_PAGE_SIZE;
    done[0] = done[1] = 0;
    for (uint64_t i = 0; i < n_runs; i++)
        if (runs[2 * i] > region_pages || runs[2 * i + 1] > region_pages - runs[2 * i])
            return DISCARD_OUTSIDE;
    int pidfd = -1;
#ifdef SYS_pidfd_open
    pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
#endif
    struct iovec iov[DISCARD_BATCH];
    uint64_t n = 0, pages = 0;
    int err = 0;
    for (uint64_t i = 0; i <= n_runs && !err; i++) {
        if (n == DISCARD_BATCH || (i == n_runs && n)) {
            if ((err = discard_batch(pidfd, iov, n)))
                break;
            done[0] += pages;
            done[1] += n;
            n = pages = 0;
        }
        if (i < n_runs && runs[2 * i + 1]) {
            iov[n].iov_base = region + runs[2 * i] * GUEST_PAGE_SIZE;
            iov[n++].iov_len = runs[2 * i + 1] * GUEST_PAGE_SIZE;
            pages += runs[2 * i + 1];
        }
    }
    if (pidfd >= 0)
        close(pidfd);
    return err ? -err : 0;
}
