# Declarations of the C this package calls: the poller contract and the socket API.
from libc.stdint cimport uint32_t

cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t

# poller.c, not poller.h: the backend is compiled into this module, so its event decoder
# inlines into the loop (see poller.h).
cdef extern from "poller.c" nogil:
    enum:
        KQ_READABLE
        KQ_WRITABLE
        KQ_HANGUP
        KQ_ERROR
    ctypedef struct kq_event:
        int fd
        int mask
        int err
    ctypedef struct kq_poller:
        pass
    kq_poller *kq_poller_create()
    int kq_poller_set(kq_poller *p, int fd, int old_mask, int new_mask)
    int kq_poller_add(kq_poller *p, int fd, int mask)
    int kq_poller_poll(kq_poller *p, int cap, int timeout_ms)
    kq_event kq_poller_event(kq_poller *p, int i)
    int kq_poller_wait(kq_poller *p, kq_event *out, int cap, int timeout_ms)
    int kq_poller_wake(kq_poller *p)
    void kq_poller_wake_seen(kq_poller *p)
    int kq_poller_set_timer(kq_poller *p, double deadline)
    void kq_poller_free(kq_poller *p)
    void kq_poller_disown(kq_poller *p)
    const char kq_poller_backend[]

cdef extern from "netio.h" nogil:
    # Thin portability layer over accept4/MSG_NOSIGNAL/SO_NOSIGPIPE (see netio.h).
    int kq_accept(int listen_fd)
    ssize_t kq_recv(int fd, void *buf, size_t n)
    ssize_t kq_send(int fd, const void *buf, size_t n)
    int kq_prepare_accepted(int fd, int is_tcp)
    int kq_listen(const char *host, int port, int backlog, int reuse_port, int *family)
    int kq_connect(const char *host, int port)
    int kq_socket_error(int fd)
    int kq_socket_quiet(int fd)
    void kq_abort_fd(int fd)
    int kq_unsent(int fd)
    int kq_write_fd(int pipe_fd, int fd)
    int kq_read_fd(int pipe_fd)
    int kq_open_reserve()
    double kq_monotonic()
    bint kq_retry_later(int err)
    int kq_load(int *flag)
    void kq_store(int *flag, int value)

cdef extern from "tls.h" nogil:
    # OpenSSL through the interpreter's own _ssl (see tls.h).
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct BIO:
        pass
    ctypedef struct kq_tls:
        SSL *ssl
        BIO *rbio
        BIO *wbio
        int flags
        int fail_kind
        unsigned long fail_code
    enum:
        KQ_TLS_OWNED
        KQ_TLS_DECRYPT
        KQ_TLS_SEND
        KQ_TLS_DONE
        KQ_TLS_MORE
        KQ_TLS_CLOSED
        KQ_TLS_FULL
        KQ_TLS_FAILED
    int kq_tls_load(const char *module_path, unsigned long expected_version, char *why, size_t n)
    int kq_tls_loaded()
    int kq_tls_accept(kq_tls *t, SSL_CTX *ctx)
    void kq_tls_release(kq_tls *t)
    void kq_tls_keep_buffers(kq_tls *t)
    int kq_tls_feed(kq_tls *t, const void *data, size_t n)
    int kq_tls_read(kq_tls *t, char *out, size_t cap, size_t *got)
    int kq_tls_write(kq_tls *t, const void *data, size_t n)
    void kq_tls_close_notify(kq_tls *t)
    size_t kq_tls_pending_in(const kq_tls *t)
    size_t kq_tls_pending_out(const kq_tls *t)
    size_t kq_tls_take_out(kq_tls *t, char *buf, size_t cap)
    int kq_tls_error_lib(unsigned long code)
    int kq_tls_error_reason(unsigned long code)
    const char *kq_tls_error_string(unsigned long code)
    long kq_tls_verify_result(SSL *ssl)
    const char *kq_tls_verify_string(long result)
    unsigned long kq_tls_ctx_options(SSL_CTX *ctx)
    SSL_CTX *kq_tls_ctx_of(SSL *ssl)
    BIO *kq_tls_rbio_of(SSL *ssl)
    BIO *kq_tls_wbio_of(SSL *ssl)
    int kq_tls_is_server(SSL *ssl)
    const char *kq_tls_servername(SSL *ssl)
    size_t kq_tls_bio_pending(BIO *bio)
    const char *kq_tls_library_version()

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int SHUT_WR
    int AF_UNIX
    int AF_INET
    int AF_INET6

cdef extern from "<string.h>" nogil:
    void *memchr(const void *s, int c, size_t n)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM
        ECONNABORTED
        EPROTO
        EMSGSIZE
        ETIMEDOUT
        EADDRNOTAVAIL
