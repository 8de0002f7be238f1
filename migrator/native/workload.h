/* migrator.native.workload: the guest's region layout and its hot loop.

   The one definition of the control block and of the constants Python reads: cffi's cdef reads
   this file as it is (migrator/native/build.py), so migrator/guest/workload.py sees exactly the
   struct the C compiler lays out. It holds only what cdef parses: comments, integer #defines,
   the struct, prototypes (no #include, no #if; include <stdint.h> before it).

   Everything the workload needs lives in its region (docs/guest-protocol.md):

       page 0                  struct guest_control: settings, step counter, in-flight marker, tag
       pages 1 .. table_pages  version table: u64 per data page, the (1-based) step that last wrote it
       schedule_pages more     PATTERN_REPLAY only: the replay schedule (trace name, intervals,
                               runs; see struct replay_run), none for the other patterns
       the rest                data pages: a GUEST_HEADER_BYTES header (magic, region page index,
                               step, checksum), a chunk rewritten by every write, and a tail from
                               the initial fill */

#define GUEST_LAYOUT_VERSION 2
#define GUEST_PAGE_SIZE 4096
#define GUEST_HEADER_BYTES 32
#define GUEST_TAG_MAX 200

#define GUEST_MAGIC 0x5453455547494d47ULL   /* "GMIGUEST" */
#define PAGE_MAGIC 0x31454741504d4947ULL    /* "GIMPAGE1" */

#define PATTERN_UNIFORM 0
#define PATTERN_HOT 1
#define PATTERN_SEQUENTIAL 2
#define PATTERN_REPLAY 3

#define REPLAY_NAME_MAX 128

#define FILL_RANDOM 0
#define FILL_TEXT 1
#define FILL_SPARSE 2

/* guest_check() problem codes; migrator/guest/workload.py words them. */
#define PROBLEM_NONE 0
#define PROBLEM_CTL_MAGIC 1
#define PROBLEM_CTL_VERSION 2
#define PROBLEM_CTL_GEOMETRY 3
#define PROBLEM_CTL_SETTINGS 4
#define PROBLEM_CTL_CHECKSUM 5
#define PROBLEM_CTL_STEPS 6
#define PROBLEM_CTL_TAG 7
#define PROBLEM_CTL_SCHEDULE 8
#define PROBLEM_TABLE_AHEAD 10
#define PROBLEM_TABLE_WRONG_STEP 11
#define PROBLEM_HEADER_MISSING 12
#define PROBLEM_HEADER_CORRUPT 13
#define PROBLEM_HEADER_INDEX 14
#define PROBLEM_STALE 15
#define PROBLEM_BODY 16
#define PROBLEM_OUTSIDE 17

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
    uint64_t schedule_pages;    /* PATTERN_REPLAY: pages between the table and the data pages */
    uint64_t replay_steps;      /* PATTERN_REPLAY: steps in one loop of the trace */
    uint64_t replay_runs;
    uint64_t replay_intervals;
    uint64_t replay_name_len;
    double replay_seconds;      /* PATTERN_REPLAY: one loop's length */
    uint64_t schedule_checksum; /* PATTERN_REPLAY: over the schedule's bytes */
    uint64_t settings_checksum; /* over every field above */
    uint64_t steps;             /* steps done: the commit point of a step */
    uint64_t in_flight;         /* steps + 1 while step `steps` is being written */
    uint32_t tag_len;
    uint8_t tag[GUEST_TAG_MAX]; /* opaque tag (set-tag) */
};

/* The replay schedule, at page 1 + table_pages: REPLAY_NAME_MAX bytes of the trace's name, then
   replay_intervals intervals, then replay_runs runs. Step n of a replay writes the page of loop
   step m = n % replay_steps: the run whose [step, step + pages) holds m, page + (m - step). */
struct replay_interval {
    double start;               /* seconds into the loop */
    double end;
    uint64_t steps_end;         /* loop steps done by the interval's end */
};

struct replay_run {
    uint64_t step;              /* loop steps before this run */
    uint32_t page;              /* first data page (0-based) */
    uint32_t pages;
};

/* The caller fills magic .. replay_seconds (and a replay's schedule); this derives prng_key and
   the checksums, zeroes the counters and writes the initial fill of every data page. */
void guest_format(uint8_t *region);
/* Do count steps; returns the step counter after them. */
uint64_t guest_run(uint8_t *region, uint64_t count);
/* The region page index that step `step` (0-based) writes. */
uint64_t guest_pick(const uint8_t *region, uint64_t step);
/* A PROBLEM_CTL_* code (PROBLEM_NONE if the control block can be continued); detail gets the
   two numbers its wording names. */
int guest_check_control(const uint8_t *region, uint64_t region_bytes, uint64_t detail[2]);
/* The first bad page's index (its PROBLEM_* code in *problem), or -1 if the region is clean.
   deep also regenerates every page body; shallow checks the control block, version table and
   page headers only (what fits in a migration's downtime). */
int64_t guest_check(const uint8_t *region, uint64_t region_bytes, int deep, int *problem, uint64_t detail[2]);
/* The same for the data pages among n_runs runs (pairs of first region page, count) and the
   control block: what a migration's final copy wrote, checked inside its downtime. */
int64_t guest_check_pages(const uint8_t *region, uint64_t region_bytes, int deep, const uint64_t *runs,
                          uint64_t n_runs, int *problem, uint64_t detail[2]);
/* A restore guest's post-copy discard: MADV_DONTNEED over each of n_runs runs (pairs of first
   region page, count), so that the next touch of one of those pages faults to whoever holds the
   region's userfaultfd (MISSING mode). Batched: process_madvise on the guest itself, up to 1024
   runs a call, where the kernel allows it (Linux 6.13+), else one madvise per run. All runs are
   checked against the region first: DISCARD_OUTSIDE, and nothing dropped, when one is not inside
   it. done[0] = pages dropped, done[1] = runs of pages dropped. Returns 0, DISCARD_OUTSIDE, or
   -errno of a failed madvise (the batches before it are dropped and counted). */
#define DISCARD_OUTSIDE 1
int64_t discard_pages(uint8_t *region, uint64_t region_bytes, const uint64_t *runs, uint64_t n_runs, uint64_t done[2]);
