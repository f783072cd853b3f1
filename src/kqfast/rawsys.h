/* System calls on the hot path without libc's wrappers, on Linux.
 *
 * glibc's recv, send and epoll_wait are cancellation points: in a process with more than one
 * thread (a Python server always has) each call turns asynchronous cancellation on and off
 * around the system call, some 60 instructions, more than the loop spends on the rest of a
 * request; syscall(2) still costs two dozen more for its variadic shuffle.  kqfast never
 * cancels a thread, so on x86-64 and arm64 the instruction is issued inline, as liburing does
 * (its arch/<name>/syscall.h).  Elsewhere syscall(2) does the same job.  Either way: the
 * result, or -1 with errno set, as the libc function would. */
#ifndef KQFAST_RAWSYS_H
#define KQFAST_RAWSYS_H

#ifdef __linux__
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline long kq_sys6(long nr, long a1, long a2, long a3, long a4, long a5, long a6) {
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = nr;
    register long x0 __asm__("x0") = a1;
    register long x1 __asm__("x1") = a2;
    register long x2 __asm__("x2") = a3;
    register long x3 __asm__("x3") = a4;
    register long x4 __asm__("x4") = a5;
    register long x5 __asm__("x5") = a6;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory", "cc");
    long ret = x0;
#else
    return syscall(nr, a1, a2, a3, a4, a5, a6);
#endif
#if defined(__x86_64__) || defined(__aarch64__)
    /* The kernel answers -errno, in -4095..-1. */
    if ((unsigned long)ret > -4096UL) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
#endif
}
#endif

#endif
