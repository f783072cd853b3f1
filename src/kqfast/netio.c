/* accept4() and SOCK_NONBLOCK are GNU extensions on Linux. */
#define _GNU_SOURCE
#include "netio.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#ifdef __linux__
#include <linux/sockios.h>
#endif
#include <time.h>
#include <unistd.h>

static int set_cloexec_nonblocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
    return fcntl(fd, F_SETFD, FD_CLOEXEC);
}

/* Where the kernel cannot create an fd non-blocking and close-on-exec in one call (macOS). */
static int cloexec_nonblocking_or_close(int fd) {
    if (fd >= 0 && set_cloexec_nonblocking(fd) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static int new_socket(int family) {
#ifdef SOCK_CLOEXEC
    return socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
#else
    return cloexec_nonblocking_or_close(socket(family, SOCK_STREAM, 0));
#endif
}

/* sa for a Unix socket path; -1 with ENAMETOOLONG when it does not fit. */
static int unix_address(const char *path, struct sockaddr_un *sa) {
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa->sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sa->sun_path, path);
    return 0;
}

static int listen_unix(const char *path, int backlog) {
    struct sockaddr_un sa;
    if (unix_address(path, &sa) < 0) return -1;
    int fd = new_socket(AF_UNIX);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, backlog) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int kq_listen(const char *host, int port, int backlog, int reuse_port, int *family) {
    if (strchr(host, '/') != NULL) {
        *family = AF_UNIX;
        return listen_unix(host, backlog);
    }
    /* The address is parsed by the resolver, never copied by hand: the tutorial's bind copied
     * the first 4 bytes of a 16-byte address and so listened on 0.0.0.0. */
    struct addrinfo hints, *res;
    char service[16];
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(service, sizeof(service), "%d", port);
    if (getaddrinfo(host, service, &hints, &res) != 0) {
        errno = EADDRNOTAVAIL;
        return -1;
    }
    int fd = new_socket(res->ai_family), one = 1;
    *family = res->ai_family;
    if (fd < 0) goto fail;
    /* SO_REUSEADDR lets a restarted server bind while old connections sit in TIME_WAIT. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0) goto fail;
    if (reuse_port) {
#if defined(SO_REUSEPORT_LB)
        /* FreeBSD: plain SO_REUSEPORT does not spread connections, the _LB variant does. */
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT_LB, &one, sizeof(one)) < 0) goto fail;
#elif defined(SO_REUSEPORT) && (defined(__linux__) || defined(__DragonFly__))
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) goto fail;
#else
        /* macOS has SO_REUSEPORT, but it sends every connection to one socket: refuse, as
         * libuv does, rather than pretend to balance. */
        errno = ENOTSUP;
        goto fail;
#endif
    }
    /* "::" means IPv6 only, as in asyncio; a dual-stack server binds both explicitly. */
    if (res->ai_family == AF_INET6 &&
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) < 0)
        goto fail;
#ifdef SO_NOSIGPIPE
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
#endif
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, backlog) < 0) goto fail;
    freeaddrinfo(res);
    return fd;
fail:;
    int saved = errno;
    if (fd >= 0) close(fd);
    freeaddrinfo(res);
    errno = saved;
    return -1;
}

int kq_accept(int listen_fd) {
#if defined(__linux__) || defined(__FreeBSD__)
    /* accept4 makes the fd non-blocking and close-on-exec atomically: Linux accepted sockets
     * do not inherit O_NONBLOCK from the listener. */
    return accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    return cloexec_nonblocking_or_close(accept(listen_fd, NULL, NULL));
#endif
}

int kq_prepare_accepted(int fd, int is_tcp) {
    int one = 1;
#ifdef SO_NOSIGPIPE
    /* macOS has no MSG_NOSIGNAL; whether accepted sockets inherit this from the listener is
     * not documented, so every socket gets it. */
    if (setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one)) < 0) return -1;
#endif
    if (is_tcp && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) return -1;
    return 0;
}

void kq_abort_fd(int fd) {
    struct linger hard = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &hard, sizeof(hard));
    close(fd);
}

int kq_write_fd(int pipe_fd, int fd) {
    return write(pipe_fd, &fd, sizeof(fd)) == (ssize_t)sizeof(fd) ? 0 : -1;
}

int kq_read_fd(int pipe_fd) {
    int fd;
    return read(pipe_fd, &fd, sizeof(fd)) == (ssize_t)sizeof(fd) ? fd : -1;
}

int kq_open_reserve(void) { return open("/dev/null", O_RDONLY | O_CLOEXEC); }

static int connect_unix(const char *path) {
    struct sockaddr_un sa;
    if (unix_address(path, &sa) < 0) return -1;
    int fd = new_socket(AF_UNIX);
    if (fd < 0) return -1;
    /* A Unix connect completes at once or fails; EAGAIN is a full backlog, a failure here. */
    if (kq_prepare_accepted(fd, 0) < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int kq_connect(const char *host, int port) {
    if (strchr(host, '/') != NULL) return connect_unix(host);
    struct addrinfo hints, *res;
    char service[16];
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(service, sizeof(service), "%d", port);
    if (getaddrinfo(host, service, &hints, &res) != 0) {
        errno = EADDRNOTAVAIL;
        return -1;
    }
    int fd = new_socket(res->ai_family);
    if (fd < 0 || kq_prepare_accepted(fd, 1) < 0 ||
        (connect(fd, res->ai_addr, res->ai_addrlen) < 0 && errno != EINPROGRESS)) {
        int saved = errno;
        if (fd >= 0) close(fd);
        freeaddrinfo(res);
        errno = saved;
        return -1;
    }
    freeaddrinfo(res);
    return fd;
}

int kq_socket_error(int fd) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
    return err;
}

int kq_socket_quiet(int fd) {
    int unread = 0, unacknowledged = 0;
    if (ioctl(fd, FIONREAD, &unread) < 0 || unread != 0) return 0;
#if defined(__linux__)
    /* TCP: bytes sent and not yet acknowledged, or not yet sent; Unix: not yet read. */
    if (ioctl(fd, SIOCOUTQ, &unacknowledged) < 0) return 0;
#elif defined(__APPLE__)
    socklen_t len = sizeof(unacknowledged);
    if (getsockopt(fd, SOL_SOCKET, SO_NWRITE, &unacknowledged, &len) < 0) return 0;
#elif defined(FIONWRITE)
    if (ioctl(fd, FIONWRITE, &unacknowledged) < 0) return 0;
#else
    return 0; /* cannot tell: the caller closes as if something were still owed */
#endif
    return unacknowledged == 0;
}
