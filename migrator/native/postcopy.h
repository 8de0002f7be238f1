/* migrator.native.pages, post-copy's fault path: the two ends' loops that answer a fault without
   Python (compiled into the pages module; cdef reads this file as it reads pages.h).

   After the switch the urgent link of a session whose frames need no tags (an authenticated
   loopback or unix-socket link, no TLS) is handed to these loops and carries fixed
   records, both ways, instead of protocol frames:

     request (destination to source): u64 address, u64 count        (source addresses)
     answer  (source to destination): u64 address, u64 count, then count pages
     end     (source to destination): u64 FAULT_END, u64 0           (no answer follows)

   in the machine's byte order (both ends share one host: the link is loopback or a unix
   socket). Every record from the peer is checked against the layout before it is used.

   Regions are (start, length, first page index) triples, as page_hashes_at reads them; both
   layouts number their pages alike, which is how a page moves from one to the other. A state
   table is one byte per page, shared with Python's PageStates (atomic per byte).

   Hash logs are (page index, hash) pairs the loops fill and Python records afterwards
   (page_hashes_indexed): the digest table's running sum is updated under Python's lock only. */

#define FAULT_END 0xFFFFFFFFFFFFFFFF
#define FAULT_MAX_PAGES 64          /* pages per request or answer */

/* Return values of fault_serve and request_serve (or -errno). */
#define FAULT_STOPPED 0             /* the stop eventfd was written */
#define FAULT_ENDED 1               /* the source's end record was read (fault_serve) */
#define FAULT_PEER_CLOSED 2         /* the link ended between records */
#define FAULT_BAD_RECORD 3          /* the peer sent a record outside the layout or too large */
#define FAULT_LOG_FULL 4            /* more answered pages than the log holds */

/* The destination's loop: reads the restore guest's uffd (non-blocking, MISSING registered),
   and for each fault on a page not current claims it and the window - 1 pages after it in its
   region (MISSING 1 -> REQUESTED 2) and asks the source for them; a fault on a current page
   gets a zero page (or a wake-up when it is present). Reads answers, installs their pages with
   UFFDIO_COPY where still not current, logs every answered page's hash. fault_ns is one word
   per page (0, or when its fault was read, CLOCK_MONOTONIC ns); a latency (fault read to its
   page installed, or to its answer when the push installed it first) goes to latency_ns while
   room remains. With ended set (the source sent its end record), the socket is neither read nor
   written: faults on current pages are still served, the others wait for the push's install.
   Returns one of the codes above or -errno; error_at names the address of a refused record or
   failed install. */
struct fault_loop {
    int uffd;
    int sock;
    int stopfd;
    int ended;
    uint8_t *state;
    uint64_t nstate;
    const uint64_t *dst_regions;
    uint64_t ndst;
    const uint64_t *src_regions;
    uint64_t nsrc;
    uint64_t page_size;
    uint64_t window;
    uint8_t *buf;                   /* FAULT_MAX_PAGES pages */
    uint64_t *fault_ns;
    uint64_t *latency_ns;
    uint64_t latency_cap;
    uint64_t latency_len;
    uint64_t *log;                  /* 2 * log_cap words */
    uint64_t log_cap;
    uint64_t log_len;
    uint64_t faults;                /* faulting pages this loop asked for */
    uint64_t requested_pages;       /* pages installed from answers that a request claimed */
    uint64_t installed_pages;       /* pages installed from answers */
    uint64_t zero_filled;
    uint64_t error_at;
};
int64_t fault_serve(struct fault_loop *s);

/* The source's loop: reads requests, claims their pages (STALE 1 -> SENT 0), reads every asked
   page from the frozen guest (process_vm_readv of pid at the mem regions' targets, or copied
   from map at their offsets: (start, length, target or offset) triples, none for pid's own
   addresses) and answers at once; the hashes of the pages it claimed go to the log. When the
   stop eventfd is written it finishes the answer it is writing, sends the end record and
   returns FAULT_STOPPED; with abort set, it returns without the end record. */
struct request_loop {
    int sock;
    int stopfd;
    int abort;
    int pid;
    uint8_t *map;
    const uint64_t *mem_regions;
    uint64_t nmem;
    uint8_t *state;
    uint64_t nstate;
    const uint64_t *regions;
    uint64_t nregions;
    uint64_t page_size;
    uint8_t *buf;                   /* a header and FAULT_MAX_PAGES pages */
    uint64_t *log;
    uint64_t log_cap;
    uint64_t log_len;
    uint64_t requests;
    uint64_t claimed_pages;         /* pages first sent by this loop */
    uint64_t duplicate_pages;       /* asked for after the push (or an answer) had sent them */
    uint64_t answered_bytes;        /* written on the link, records and pages (read at any time) */
    uint64_t error_at;
};
int64_t request_serve(struct request_loop *s);
