/* Socket helpers for the loop (Redis anet style): the few places where Linux and the BSDs
 * differ (accept4, MSG_NOSIGNAL vs SO_NOSIGPIPE) are hidden here. */
#ifndef KQFAST_NETIO_H
#define KQFAST_NETIO_H

#include <errno.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "rawsys.h"

/* Creates a non-blocking, close-on-exec listening socket.  host is an IPv4 or IPv6 literal,
 * a name to resolve, or (when it contains a '/') a Unix socket path.  Returns the fd, or -1
 * with errno set (for a failed name lookup errno is EADDRNOTAVAIL).  *family gets the
 * address family. */
int kq_listen(const char *host, int port, int backlog, int reuse_port, int *family);
/* Starts a non-blocking, close-on-exec TCP connect to host:port with TCP_NODELAY (and
 * SO_NOSIGPIPE where it exists), or connects to a Unix socket path (a host containing '/';
 * port unused).  Returns the fd, usually with a TCP connect still in progress: it is done when
 * the fd turns writable, and kq_socket_error then says how it went.  -1 with errno set
 * (EADDRNOTAVAIL for a failed name lookup). */
int kq_connect(const char *host, int port);
/* The pending error of a socket (SO_ERROR), cleared by the call; 0 when there is none. */
int kq_socket_error(int fd);
/* 1 when the kernel holds nothing of a connection either way: no input unread, no output
 * unsent or unacknowledged.  Closing it then loses nothing and cannot reset it.  0 otherwise,
 * or where the kernel cannot tell. */
int kq_socket_quiet(int fd);
/* Accepts one connection as a non-blocking, close-on-exec fd; -1 with errno as accept(2). */
int kq_accept(int listen_fd);
/* TCP_NODELAY for TCP, SO_NOSIGPIPE where it exists. */
int kq_prepare_accepted(int fd, int is_tcp);
/* The hot path's recv() and send(), without libc's cancellation points on Linux (see
 * rawsys.h).  send() never raises SIGPIPE, whatever Python's SIGPIPE disposition is
 * (MSG_NOSIGNAL, or SO_NOSIGPIPE set on the socket where there is no such flag). */
static inline ssize_t kq_recv(int fd, void *buf, size_t n) {
#ifdef __linux__
    return kq_sys6(SYS_recvfrom, fd, (long)buf, (long)n, 0, 0, 0);
#else
    return recv(fd, buf, n, 0);
#endif
}
static inline ssize_t kq_send(int fd, const void *buf, size_t n) {
#ifdef __linux__
    return kq_sys6(SYS_sendto, fd, (long)buf, (long)n, MSG_NOSIGNAL, 0, 0);
#elif defined(MSG_NOSIGNAL)
    return send(fd, buf, n, MSG_NOSIGNAL);
#else
    return send(fd, buf, n, 0);
#endif
}
/* Closes with an RST: SO_LINGER 0 drops unsent data instead of letting it drain. */
void kq_abort_fd(int fd);
/* Pass an accepted fd to another loop of this process through its inbox pipe: one int, which
 * a pipe writes atomically.  kq_write_fd returns 0 or -1; kq_read_fd the fd or -1. */
int kq_write_fd(int pipe_fd, int fd);
int kq_read_fd(int pipe_fd);
/* An fd held in reserve for the EMFILE shed (see the loop's shed_at_fd_limit). */
int kq_open_reserve(void);
/* Seconds on a clock that never goes back.  Inline: the loop reads it on every wake. */
static inline double kq_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The call may be retried later: nothing is wrong with the socket.  macOS's loopback
 * answers a send with ENOBUFS when its mbufs run short under load: a full buffer, not a
 * failed connection (the write is retried when the socket is next writable). */
static inline int kq_retry_later(int err) {
#ifdef __APPLE__
    if (err == ENOBUFS) return 1;
#endif
    return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

/* Flags shared between the loop's thread and threads that ask it to stop or wake. */
static inline int kq_load(int *flag) { return __atomic_load_n(flag, __ATOMIC_ACQUIRE); }
static inline void kq_store(int *flag, int value) { __atomic_store_n(flag, value, __ATOMIC_RELEASE); }

#endif
