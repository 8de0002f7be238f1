"""Kernel ABI for userfaultfd, PAGEMAP_SCAN, ptrace and cross-process memory access: the only place.

The system headers on many machines predate these features, so everything is written out here
from the released kernel's uapi headers (``include/uapi/linux/userfaultfd.h``,
``include/uapi/linux/fs.h``) and checked by ``tests/tracker/test_uapi.py`` (sizes, ioctl numbers).
cffi ABI mode: no compiler at import; a mismatch here would corrupt memory, hence the tests.

Beware the seed patch (v11): the bit it gives WP_ASYNC, 14, is ``UFFD_FEATURE_POISON`` in
released kernels. Upstream WP_ASYNC is ``1<<15``. With the wrong bit the protection stays
synchronous and the guest's first write blocks forever.
"""

from __future__ import annotations

import platform

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
    struct uffdio_range { uint64_t start; uint64_t len; };
    struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
    struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
    struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
    struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
    struct uffd_msg {
        uint8_t event; uint8_t reserved1; uint16_t reserved2; uint32_t reserved3;
        union {
            struct { uint64_t flags; uint64_t address; uint32_t ptid; uint32_t pad; } pagefault;
            struct { uint64_t reserved1; uint64_t reserved2; uint64_t reserved3; } reserved;
        } arg;
    };
    struct pm_scan_arg {
        uint64_t size; uint64_t flags; uint64_t start; uint64_t end; uint64_t walk_end;
        uint64_t vec; uint64_t vec_len; uint64_t max_pages; uint64_t category_inverted;
        uint64_t category_mask; uint64_t category_anyof_mask; uint64_t return_mask;
    };
    struct page_region { uint64_t start; uint64_t end; uint64_t categories; };
    struct iovec { void *iov_base; size_t iov_len; };
    /* x86-64 arch/x86/include/uapi/asm/ptrace.h, as PTRACE_GETREGS/SETREGS move it */
    struct user_regs_struct {
        uint64_t r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax;
        uint64_t rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs;
    };

    long syscall(long number, ...);
    int ioctl(int fd, unsigned long request, ...);
    """
)
libc = ffi.dlopen(None)

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) -----------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _IO(kind: int, nr: int) -> int:
    return _IOC(_IOC_NONE, kind, nr, 0)


def _IOR(kind: int, nr: int, struct: str) -> int:
    return _IOC(_IOC_READ, kind, nr, ffi.sizeof(struct))


def _IOWR(kind: int, nr: int, struct: str) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, kind, nr, ffi.sizeof(struct))


# --- syscall numbers: x86-64 only (arch-specific; other arches would add a row) -----------------
_SYSCALLS = {
    "x86_64": {"userfaultfd": 323, "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 101},
    "aarch64": {"userfaultfd": 282, "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 117},
}
SYSCALLS = _SYSCALLS.get(platform.machine(), {})

# --- userfaultfd (include/uapi/linux/userfaultfd.h) ---------------------------------------------
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFDIO = 0xAA

UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, "struct uffdio_register")
UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, "struct uffdio_range")
# Post-copy's installs (Linux 4.3): migrator/native/pages.c issues them from <linux/userfaultfd.h>,
# and tests/tracker/test_uapi.py checks these numbers against the ones C compiled.
UFFDIO_WAKE = _IOR(UFFDIO, 0x02, "struct uffdio_range")
UFFDIO_COPY = _IOWR(UFFDIO, 0x03, "struct uffdio_copy")
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, 0x04, "struct uffdio_zeropage")
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, "struct uffdio_writeprotect")
UFFDIO_API = _IOWR(UFFDIO, 0x3F, "struct uffdio_api")
USERFAULTFD_IOC_NEW = _IO(UFFDIO, 0x00)

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14  # the seed patch's (wrong) value for WP_ASYNC
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16
# Bits above 16 differ between kernel trees: deliberately not named here.
FEATURE_NAMES = {
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    1 << 1: "EVENT_FORK",
    1 << 2: "EVENT_REMAP",
    1 << 3: "EVENT_REMOVE",
    1 << 4: "MISSING_HUGETLBFS",
    1 << 5: "MISSING_SHMEM",
    1 << 6: "EVENT_UNMAP",
    1 << 7: "SIGBUS",
    UFFD_FEATURE_THREAD_ID: "THREAD_ID",
    1 << 9: "MINOR_HUGETLBFS",
    1 << 10: "MINOR_SHMEM",
    UFFD_FEATURE_EXACT_ADDRESS: "EXACT_ADDRESS",
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: "WP_HUGETLBFS_SHMEM",
    UFFD_FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED",
    UFFD_FEATURE_POISON: "POISON",
    UFFD_FEATURE_WP_ASYNC: "WP_ASYNC",
    UFFD_FEATURE_MOVE: "MOVE",
}

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_MSG_SIZE = 32

# --- PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7+) -----------------------------------------
PAGEMAP_SCAN = _IOWR(ord("f"), 16, "struct pm_scan_arg")

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

# --- classic /proc/PID/pagemap entries (Documentation/admin-guide/mm/pagemap.rst) ---------------
PM_ENTRY_SOFT_DIRTY = 1 << 55
PM_ENTRY_UFFD_WP = 1 << 57
PM_ENTRY_SWAPPED = 1 << 62
PM_ENTRY_PRESENT = 1 << 63

# --- ptrace (include/uapi/linux/ptrace.h) and wait flags (include/uapi/linux/wait.h) -----------
# Only what a stop that ends with its tracer needs: SEIZE (attach without stopping), INTERRUPT
# (stop), CONT / LISTEN (resume, or stay in a group-stop someone else started), DETACH, and the
# clone event that attaches new threads by themselves. Never PTRACE_O_EXITKILL: the whole point
# is that the tracees live on, running, when the tracer dies.
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12      # x86-64: struct user_regs_struct
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
PTRACE_O_TRACECLONE = 1 << PTRACE_EVENT_CLONE

WAIT_ALL = 0x40000000        # __WALL: threads (clone children) as well as processes
WAIT_NOTHREAD = 0x20000000   # __WNOTHREAD: only the calling thread's children and tracees

# What ``inject`` runs inside a stopped thread (x86-64 numbers; the instruction is ``syscall``).
INJECT_SYSCALLS = {"userfaultfd": 323, "close": 3}
SYSCALL_INSTRUCTION = b"\x0f\x05"

# madvise advice that faults pages in without changing them (include/uapi/asm-generic/mman-common.h,
# Linux 5.14+): restore guests pre-fault their region, receivers the mapping of a guest's memfd.
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
