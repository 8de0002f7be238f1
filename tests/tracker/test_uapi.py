"""The hand-written kernel ABI must match the released kernel headers exactly."""

from migrator.native import pages
from migrator.tracker import _uapi as u


def test_struct_sizes_match_kernel_headers():
    assert u.ffi.sizeof("struct uffdio_api") == 24
    assert u.ffi.sizeof("struct uffdio_range") == 16
    assert u.ffi.sizeof("struct uffdio_register") == 32
    assert u.ffi.sizeof("struct uffdio_writeprotect") == 24
    assert u.ffi.sizeof("struct uffdio_copy") == 40
    assert u.ffi.sizeof("struct uffdio_zeropage") == 32
    assert u.ffi.sizeof("struct uffd_msg") == 32
    assert u.ffi.sizeof("struct pm_scan_arg") == 96
    assert u.ffi.sizeof("struct page_region") == 24
    assert u.ffi.sizeof("struct iovec") == 16
    assert u.ffi.sizeof("struct user_regs_struct") == 27 * 8   # x86-64 PTRACE_GETREGS / SETREGS


def test_ioctl_numbers_match_kernel_headers():
    assert u.UFFDIO_API == 0xC018AA3F
    assert u.UFFDIO_REGISTER == 0xC020AA00
    assert u.UFFDIO_UNREGISTER == 0x8010AA01
    assert u.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert u.PAGEMAP_SCAN == 0xC0606610
    assert u.USERFAULTFD_IOC_NEW == 0xAA00
    assert u.UFFDIO_WAKE == 0x8010AA02
    assert u.UFFDIO_COPY == 0xC028AA03
    assert u.UFFDIO_ZEROPAGE == 0xC020AA04


def test_python_numbers_are_the_ones_the_c_installs_compile_from_the_system_header():
    # migrator/native/pages.c issues UFFDIO_COPY / ZEROPAGE / WAKE from <linux/userfaultfd.h>
    compiled = pages.ffi.new("uint64_t[3]")
    pages.lib.uffd_ioctl_numbers(compiled)
    assert list(compiled) == [u.UFFDIO_COPY, u.UFFDIO_ZEROPAGE, u.UFFDIO_WAKE]


def test_uffdio_copy_and_zeropage_field_offsets():
    assert [u.ffi.offsetof("struct uffdio_copy", f) for f in ("dst", "src", "len", "mode", "copy")] == [0, 8, 16, 24, 32]
    assert [u.ffi.offsetof("struct uffdio_zeropage", f) for f in ("range", "mode", "zeropage")] == [0, 16, 24]


def test_wp_async_is_the_released_bit_not_the_seed_patch_bit():
    assert u.UFFD_FEATURE_WP_ASYNC == 1 << 15
    assert u.UFFD_FEATURE_POISON == 1 << 14
    assert u.UFFD_FEATURE_WP_UNPOPULATED == 1 << 13


def test_uffd_msg_field_offsets():
    assert u.ffi.offsetof("struct uffd_msg", "arg") == 8
    assert u.ffi.offsetof("struct pm_scan_arg", "walk_end") == 32
    assert u.ffi.offsetof("struct pm_scan_arg", "return_mask") == 88


def test_ptrace_constants_match_kernel_headers():
    # include/uapi/linux/ptrace.h and include/uapi/linux/wait.h
    assert (u.PTRACE_CONT, u.PTRACE_DETACH) == (7, 17)
    assert (u.PTRACE_GETEVENTMSG, u.PTRACE_SEIZE, u.PTRACE_INTERRUPT, u.PTRACE_LISTEN) == (0x4201, 0x4206, 0x4207, 0x4208)
    assert (u.PTRACE_EVENT_CLONE, u.PTRACE_EVENT_STOP, u.PTRACE_O_TRACECLONE) == (3, 128, 0x8)
    assert (u.WAIT_ALL, u.WAIT_NOTHREAD) == (0x40000000, 0x20000000)
    assert u.ffi.sizeof("unsigned long") == 8     # what PTRACE_GETEVENTMSG writes
    assert u.SYSCALLS["ptrace"] in (101, 117)       # x86-64, aarch64
