/* migrator.native.pages: per-page loops over page buffers, called from Python without the GIL.

   cffi's cdef reads this file as it is, so it holds only what cdef parses: comments, integer
   #defines, declarations (no #include, no #if; include <stdint.h> before it). */

/* The zero-page scan reads a page this many bytes at a time, so a page size must be a multiple
   of it (migrator/protocol/_payload.py checks before calling). */
#define ZERO_SCAN_BYTES 32

/* Page digest tables: one hash per page (hash_pages computes them: out[i] = the hash of buf's
   page i; wide vector passes where the CPU has them, with the same results as hash_pages_scalar,
   which tests compare them with), and the table's digest sum (two words), kept current as entries change;
   page_hashes_sum computes sum from scratch. page_hashes_at sets the entries of runs, nruns
   (address, page count) pairs in regions, nregions (start, length, first page index) triples:
   the next of given's hashes (one per page of the runs, in order), or zero_hash for every page
   when given is NULL. Returns nruns, or the index of the first run outside the regions or the
   table (the entries before it are set). */
void hash_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, uint64_t *out);
void hash_pages_scalar(const uint8_t *buf, uint64_t npages, uint64_t page_size, uint64_t *out);
void page_hashes_sum(const uint64_t *table, uint64_t table_len, uint64_t sum[2]);
uint64_t page_hashes_at(const uint64_t *runs, uint64_t nruns, const uint64_t *regions, uint64_t nregions,
                        uint64_t page_size, uint64_t zero_hash, const uint64_t *given, uint64_t *table,
                        uint64_t table_len, uint64_t sum[2]);
/* table[pairs[2i]] = pairs[2i + 1] for i < n (page index, hash pairs: post-copy's fault loops log
   them, migrator/native/postcopy.h), the sum kept current as page_hashes_at keeps it. Returns n,
   or the index of the first pair whose page lies outside the table (none set from it on). */
uint64_t page_hashes_indexed(const uint64_t *pairs, uint64_t n, uint64_t *table, uint64_t table_len, uint64_t sum[2]);

/* Zero-page bitmaps: bit i (byte i / 8, least significant bit first) is set when page i is all
   zero. find_zero_pages fills bitmap ((npages + 7) / 8 bytes) and returns the number of zero
   pages; gather_pages copies the pages whose bit is clear, in order, to out; scatter_pages is
   the inverse (page i of out is zeroed where its bit is set, else the next page of kept). */
uint64_t find_zero_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, uint8_t *bitmap);
void gather_pages(const uint8_t *buf, uint64_t npages, uint64_t page_size, const uint8_t *bitmap, uint8_t *out);
void scatter_pages(const uint8_t *kept, uint64_t npages, uint64_t page_size, const uint8_t *bitmap, uint8_t *out);

/* Run lists: n (address, page count) pairs, 2 * n words. runs_union writes the sorted, coalesced
   union of a and b to out (room for na + nb pairs) and returns its length in pairs; it returns
   RUNS_UNSORTED when a or b is not sorted by address, or a run would end past the address space,
   and the caller falls back to sorting. */
#define RUNS_UNSORTED 0xFFFFFFFFFFFFFFFF
uint64_t runs_union(const uint64_t *a, uint64_t na, const uint64_t *b, uint64_t nb, uint64_t page_size,
                    uint64_t *out);

/* Copies between a mapping of a guest's memfd and buf: regions are nregions (start address,
   length, offset in the mapping) triples, the runs' region found as in page_hashes_at; runs are nruns (address, page count) pairs, whose
   pages follow each other in buf. into_map copies buf into the mapping, else the mapping into
   buf. Returns nruns, or the index of the first run not inside one region (copied up to it). */
uint64_t copy_runs(uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                   uint64_t page_size, uint8_t *buf, int into_map);

/* A raw Pages payload received straight into its runs' places in the same mapping (regions and
   runs as in copy_runs; the payload is the runs' pages in order). recv_runs makes one recvmsg
   (MSG_DONTWAIT) from byte skip of the payload on, into at most RECV_RUNS_IOV places (runs
   next to each other in the mapping joined) and at most max_bytes: the socket's copy is the only
   one, and no per-run work is left to the caller, where a scattered batch has a run per page.
   It returns the bytes received, 0 at the peer's end, -errno for a failure (-EAGAIN: nothing to
   read yet), or RECV_RUNS_REFUSED, before reading anything, for a run that is not inside one
   region. place_runs copies len bytes of buf to byte skip of the payload on (bytes of the frame
   read before it was placed), with the same answers but -errno. hash_runs hashes the runs'
   pages where they are (out[i]: the payload's page i, as hash_pages), and returns nruns or the
   index of the first run refused. */
#define RECV_RUNS_IOV 1024
#define RECV_RUNS_REFUSED -1000000
int64_t recv_runs(int fd, uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs,
                  uint64_t nruns, uint64_t page_size, uint64_t skip, uint64_t max_bytes);
int64_t place_runs(uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                   uint64_t page_size, uint64_t skip, const uint8_t *buf, uint64_t len);
uint64_t hash_runs(uint8_t *map, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                   uint64_t page_size, uint64_t *out);

/* Page states for post-copy (migrator/core/pagestate.py): state is one byte per page of a layout,
   nstate bytes, indexed as page_hashes_at indexes its table; regions are nregions (start, length,
   first page index) triples and runs nruns (address, page count) pairs, as there. A run is
   refused when its address is not page-aligned, it overflows, or its pages are not all inside
   one region and the table; a run of no pages is accepted and does nothing. Every function
   checks all the runs before it changes anything, so a refusal changes no state. Every state
   byte is read and written atomically (relaxed): an install and a claim may run at once on one
   table (the destination's push and its fault path), and a page claimed while it is installed
   ends current, counted as requested.
   runs_outside returns the index of the first refused run, or nruns. */
#define RUNS_OUTSIDE 0xFFFFFFFFFFFFFFFF
#define RUNS_NO_ROOM 0xFFFFFFFFFFFFFFFE
uint64_t runs_outside(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t nstate,
                      const uint64_t *runs, uint64_t nruns);
/* A batch of runs named by a peer: nruns (address, page count) pairs checked against regions,
   nregions (start, length, first page index) triples as in page_hashes_at, nstate pages in all.
   Returns nruns with *pages set to their total, or the index of the first run that has no pages
   or more than max_count, is not page-aligned, or does not lie inside one region (with no
   regions, only the page counts are checked). */
uint64_t runs_check(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t nstate,
                    uint64_t max_count, const uint64_t *runs, uint64_t nruns, uint64_t *pages);
/* Every page of runs gets state value; returns how many changed, or RUNS_OUTSIDE (nothing did). */
uint64_t runs_set(uint8_t *state, uint64_t nstate, const uint64_t *regions, uint64_t nregions, uint64_t page_size,
                  const uint64_t *runs, uint64_t nruns, uint8_t value);
/* Each run as (first state index, count) in out (2 * nruns words; a run of no pages as (0, 0));
   returns nruns, or the index of the first refused run (out is written up to it). */
uint64_t runs_index(const uint64_t *regions, uint64_t nregions, uint64_t page_size, uint64_t nstate,
                    const uint64_t *runs, uint64_t nruns, uint64_t *out);
/* Every page of runs whose state is from becomes to; the pages that did are written to out as
   sorted-as-visited, coalesced (address, count) pairs (room for out_pairs). Returns the number
   of pairs, RUNS_OUTSIDE (nothing changed), or RUNS_NO_ROOM (out filled up: exactly the pages of
   its out_pairs pairs were changed; room for min(pages of runs, nstate) pairs always suffices
   when from != to). */
uint64_t runs_claim(uint8_t *state, uint64_t nstate, const uint64_t *regions, uint64_t nregions, uint64_t page_size,
                    const uint64_t *runs, uint64_t nruns, uint8_t from, uint8_t to, uint64_t *out, uint64_t out_pairs);
/* Every page of runs whose state is not 0 is installed through uffd (addresses in the memory of
   the uffd's owner): UFFDIO_COPY from buf, where the pages of the runs follow each other (a page
   whose state is 0 is skipped there too), or UFFDIO_ZEROPAGE when zero (buf unread); one ioctl
   per stretch of consecutive pages, retried on EAGAIN. Installed pages become state 0. A page
   the kernel says is present (EEXIST) becomes state 0 too, is not counted, and its waiters are
   woken (UFFDIO_WAKE). out_counts[0] = pages installed, out_counts[1] = those of them whose state
   was 2. Returns 0, -errno of the first other failure (pages before it stay installed and
   counted), or INSTALL_OUTSIDE (nothing done). */
#define INSTALL_OUTSIDE 1
int64_t uffd_install(int uffd, uint8_t *state, uint64_t nstate, const uint64_t *regions, uint64_t nregions,
                     uint64_t page_size, const uint64_t *runs, uint64_t nruns, const uint8_t *buf, int zero,
                     uint64_t out_counts[2]);
/* Faults on pages that are current by the table but absent (never written, never populated:
   zero): each of the n page-aligned addresses gets a zero page (UFFDIO_ZEROPAGE), or, when the
   kernel says it is present already (EEXIST: installed meanwhile), its waiters are woken
   (UFFDIO_WAKE). Returns the pages zero-filled, or -errno of the first other failure. */
int64_t uffd_zero_fill(int uffd, const uint64_t *addresses, uint64_t n, uint64_t page_size);
/* The ioctl numbers this file was compiled with, from <linux/userfaultfd.h>: UFFDIO_COPY,
   UFFDIO_ZEROPAGE, UFFDIO_WAKE (tests compare them with migrator/tracker/_uapi.py). */
void uffd_ioctl_numbers(uint64_t out[3]);

/* Page runs moved between buf and the memory of process pid (process_vm_readv, or
   process_vm_writev with write): nruns (address, page count) pairs whose pages follow each other
   in buf. With nregions > 0, regions are (start, length, target start) triples and each run is
   moved at its offset in the target of the region that holds it; a run outside every region
   moves nothing (the result falls short). Up to IOV_BATCH spans and at most call_bytes bytes per
   system call (the kernel moves at most MAX_RW_COUNT, just under 2 GiB, and reports the rest as
   not mapped). With hashes (not NULL), hashes[i] gets the hash of the runs' page i (as
   hash_pages computes it) and a call moves at most HASHED_CALL_BYTES (a multiple of page_size,
   else -EINVAL): each call's pages are hashed in buf right after the call copied them (read or
   written), while the copy has them in the cache, instead of in a second pass over a buffer the
   cache no longer holds. Returns the bytes moved (short of the runs' total when part of a run is not mapped in
   pid, or lies outside the regions: the hashes are then not all set), or -errno. */
#define IOV_BATCH 1024
#define HASHED_CALL_BYTES 262144
int64_t vm_transfer(int pid, const uint64_t *regions, uint64_t nregions, const uint64_t *runs, uint64_t nruns,
                    uint64_t page_size, uint8_t *buf, int write, uint64_t call_bytes, uint64_t *hashes);
