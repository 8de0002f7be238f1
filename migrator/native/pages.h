/* migrator.native.pages: per-page loops over page buffers, called from Python without the GIL.

   cffi's cdef reads this file as it is, so it holds only what cdef parses: comments, integer
   #defines, declarations (no #include, no #if; include <stdint.h> before it). */

/* The zero-page scan reads a page this many bytes at a time, so a page size must be a multiple
   of it (migrator/protocol/_payload.py checks before calling). */
#define ZERO_SCAN_BYTES 32

/* runs: nruns (first table index, page count) pairs; the pages of buf follow the runs in order.
   table[first + i] = hash of the run's i-th page, for indices below table_len; sum is the
   table's digest (two words), kept current. page_hashes_sum computes sum from scratch. */
void page_hashes(const uint8_t *buf, const uint64_t *runs, uint64_t nruns, uint64_t page_size,
                 uint64_t *table, uint64_t table_len, uint64_t sum[2]);
void page_hashes_sum(const uint64_t *table, uint64_t table_len, uint64_t sum[2]);
/* The same by address: runs are nruns (address, page count) pairs in regions, nregions (start,
   length, first page index) triples; with zero, every page's entry is zero_hash and buf is not
   read. Returns nruns, or the index of the first run outside the regions or the table (the
   entries before it are set). */
uint64_t page_hashes_at(const uint8_t *buf, const uint64_t *runs, uint64_t nruns, const uint64_t *regions,
                        uint64_t nregions, uint64_t page_size, int zero, uint64_t zero_hash, uint64_t *table,
                        uint64_t table_len, uint64_t sum[2]);

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
