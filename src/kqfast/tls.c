/* TLS records through the interpreter's own OpenSSL: the functions looked up at load, and the
 * few operations the core performs with them (see tls.h). */
#include "tls.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct bio_method_st BIO_METHOD;

/* OpenSSL's values, the same in 1.1.1 and 3.x (the versions CPython 3.10+ builds with). */
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define SSL_SENT_SHUTDOWN 1
#define SSL_CTRL_MODE 33
#define SSL_CTRL_CLEAR_MODE 78
#define SSL_MODE_RELEASE_BUFFERS 0x10
#define SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2
#define SSL_MODE_AUTO_RETRY 0x4
#define BIO_CTRL_PENDING 10
#define TLSEXT_NAMETYPE_host_name 0

static struct {
    int (*SSL_read_ex)(SSL *, void *, size_t, size_t *);
    int (*SSL_write_ex)(SSL *, const void *, size_t, size_t *);
    int (*SSL_get_error)(const SSL *, int);
    int (*SSL_pending)(const SSL *);
    int (*SSL_shutdown)(SSL *);
    int (*SSL_get_shutdown)(const SSL *);
    int (*SSL_is_init_finished)(const SSL *);
    SSL *(*SSL_new)(SSL_CTX *);
    void (*SSL_free)(SSL *);
    void (*SSL_set_bio)(SSL *, BIO *, BIO *);
    void (*SSL_set_accept_state)(SSL *);
    long (*SSL_ctrl)(SSL *, int, long, void *);
    SSL_CTX *(*SSL_get_SSL_CTX)(const SSL *);
    BIO *(*SSL_get_rbio)(const SSL *);
    BIO *(*SSL_get_wbio)(const SSL *);
    int (*SSL_is_server)(const SSL *);
    const char *(*SSL_get_servername)(const SSL *, const int);
    long (*SSL_get_verify_result)(const SSL *);
    unsigned long (*SSL_CTX_get_options)(const SSL_CTX *);  /* uint64_t in 3.x: same width */
    BIO *(*BIO_new)(const BIO_METHOD *);
    const BIO_METHOD *(*BIO_s_mem)(void);
    int (*BIO_free)(BIO *);
    int (*BIO_read)(BIO *, void *, int);
    int (*BIO_write)(BIO *, const void *, int);
    long (*BIO_ctrl)(BIO *, int, long, void *);
    void (*ERR_clear_error)(void);
    unsigned long (*ERR_peek_error)(void);
    unsigned long (*ERR_peek_last_error)(void);
    const char *(*ERR_reason_error_string)(unsigned long);
    const char *(*X509_verify_cert_error_string)(long);
    unsigned long (*OpenSSL_version_num)(void);
    const char *(*OpenSSL_version)(int);
} ossl;

/* The names, in the table's order. */
static const char *const ossl_names[] = {
    "SSL_read_ex", "SSL_write_ex", "SSL_get_error", "SSL_pending", "SSL_shutdown",
    "SSL_get_shutdown", "SSL_is_init_finished", "SSL_new", "SSL_free", "SSL_set_bio",
    "SSL_set_accept_state", "SSL_ctrl", "SSL_get_SSL_CTX", "SSL_get_rbio", "SSL_get_wbio",
    "SSL_is_server", "SSL_get_servername", "SSL_get_verify_result", "SSL_CTX_get_options",
    "BIO_new", "BIO_s_mem", "BIO_free", "BIO_read", "BIO_write", "BIO_ctrl",
    "ERR_clear_error", "ERR_peek_error", "ERR_peek_last_error", "ERR_reason_error_string",
    "X509_verify_cert_error_string", "OpenSSL_version_num", "OpenSSL_version",
};

static int loaded;
static int err_v3;  /* OpenSSL 3 packs error codes differently from 1.1.1 */

int kq_tls_load(const char *module_path, unsigned long expected_version, char *why, size_t n) {
    void **slot = (void **)&ossl;
    void *lib;
    size_t i;
    if (loaded)
        return 0;
    /* The _ssl module is loaded already: this finds it, and dlsym() on its handle searches
     * it and then the libraries it was linked with, the OpenSSL it calls. */
    lib = dlopen(module_path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        snprintf(why, n, "cannot reach the _ssl module's libraries (%s)", dlerror());
        return -1;
    }
    for (i = 0; i < sizeof(ossl_names) / sizeof(ossl_names[0]); i++) {
        slot[i] = dlsym(lib, ossl_names[i]);
        if (slot[i] == NULL) {
            snprintf(why, n, "the interpreter's OpenSSL does not export %s", ossl_names[i]);
            return -1;
        }
    }
    if (ossl.OpenSSL_version_num() != expected_version) {
        snprintf(why, n, "the OpenSSL found (0x%lx) is not the one _ssl reports (0x%lx)",
                 ossl.OpenSSL_version_num(), expected_version);
        return -1;
    }
    err_v3 = ossl.OpenSSL_version_num() >= 0x30000000UL;
    loaded = 1;
    return 0;
}

int kq_tls_loaded(void) { return loaded; }

int kq_tls_accept(kq_tls *t, SSL_CTX *ctx) {
    memset(t, 0, sizeof(*t));
    t->ssl = ossl.SSL_new(ctx);
    t->rbio = ossl.BIO_new(ossl.BIO_s_mem());
    t->wbio = ossl.BIO_new(ossl.BIO_s_mem());
    if (t->ssl == NULL || t->rbio == NULL || t->wbio == NULL) {
        if (t->rbio) ossl.BIO_free(t->rbio);
        if (t->wbio) ossl.BIO_free(t->wbio);
        if (t->ssl) ossl.SSL_free(t->ssl);
        t->ssl = NULL;
        return -1;
    }
    /* As Python's ssl sets them: a write retried after WANT_READ may come from a moved
     * buffer, and a read goes on past non-application records (tickets, key updates). */
    ossl.SSL_ctrl(t->ssl, SSL_CTRL_MODE,
                  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_AUTO_RETRY, NULL);
    ossl.SSL_set_bio(t->ssl, t->rbio, t->wbio);  /* the SSL owns them from here on */
    ossl.SSL_set_accept_state(t->ssl);
    kq_tls_keep_buffers(t);
    t->flags = KQ_TLS_OWNED | KQ_TLS_DECRYPT | KQ_TLS_SEND;
    return 0;
}

void kq_tls_keep_buffers(kq_tls *t) {
    /* Python's ssl contexts ask OpenSSL to free a connection's record buffers whenever they
     * are empty: a malloc, a memset and a free per record, more than a third of a small
     * record's cost.  The core keeps them (some 50 KiB per busy connection). */
    ossl.SSL_ctrl(t->ssl, SSL_CTRL_CLEAR_MODE, SSL_MODE_RELEASE_BUFFERS, NULL);
}

/* SSL_get_error() reads the thread's error queue, which must be empty before a call; it
 * almost always is (a failure empties it: failed() below, Python's ssl), and looking costs
 * a fraction of emptying it. */
static inline void clear_errors(void) {
    if (ossl.ERR_peek_error() != 0)
        ossl.ERR_clear_error();
}

void kq_tls_release(kq_tls *t) {
    if (t->flags & KQ_TLS_OWNED && t->ssl != NULL)
        ossl.SSL_free(t->ssl);
    t->ssl = NULL;
    t->rbio = t->wbio = NULL;
}

int kq_tls_feed(kq_tls *t, const void *data, size_t n) {
    /* A memory BIO takes everything (n is at most a read's chunk) or fails to grow. */
    return ossl.BIO_write(t->rbio, data, (int)n) == (int)n ? 0 : -1;
}

/* A call failed with SSL_get_error() kind: the ones Python's ssl retries (asyncio's
 * SSLAgainErrors: a want-read, or a "syscall" error with an error queued) are not failures;
 * the others are kept for the exception. */
static int failed(kq_tls *t, int kind) {
    unsigned long code;
    if (kind == SSL_ERROR_WANT_READ || kind == SSL_ERROR_WANT_WRITE)
        return KQ_TLS_MORE;
    code = ossl.ERR_peek_last_error();
    if (kind == SSL_ERROR_SYSCALL && code != 0)
        return KQ_TLS_MORE;
    t->fail_kind = kind;
    t->fail_code = code;
    ossl.ERR_clear_error();
    return KQ_TLS_FAILED;
}

int kq_tls_read(kq_tls *t, char *out, size_t cap, size_t *got) {
    size_t total = 0, n;
    int kind, result;
    while (total < cap) {
        clear_errors();
        if (ossl.SSL_read_ex(t->ssl, out + total, cap - total, &n)) {
            total += n;
            continue;
        }
        kind = ossl.SSL_get_error(t->ssl, 0);
        *got = total;
        if (kind == SSL_ERROR_ZERO_RETURN)
            return KQ_TLS_CLOSED;
        result = failed(t, kind);
        return result == KQ_TLS_MORE ? KQ_TLS_DONE : result;
    }
    *got = total;
    /* Out of room: records may remain, decrypted (SSL_pending) or not. */
    return ossl.SSL_pending(t->ssl) > 0 || kq_tls_pending_in(t) > 0 ? KQ_TLS_FULL : KQ_TLS_DONE;
}

int kq_tls_write(kq_tls *t, const void *data, size_t n) {
    size_t done;
    while (n > 0) {
        clear_errors();
        if (!ossl.SSL_write_ex(t->ssl, data, n, &done))
            return failed(t, ossl.SSL_get_error(t->ssl, 0));
        data = (const char *)data + done;
        n -= done;
    }
    return KQ_TLS_DONE;
}

void kq_tls_close_notify(kq_tls *t) {
    /* Before the handshake is done there is no session to close (OpenSSL would queue an
     * error, not an alert). */
    if (ossl.SSL_is_init_finished(t->ssl) && !(ossl.SSL_get_shutdown(t->ssl) & SSL_SENT_SHUTDOWN))
        ossl.SSL_shutdown(t->ssl);
    ossl.ERR_clear_error();
}

size_t kq_tls_pending_in(const kq_tls *t) { return kq_tls_bio_pending(t->rbio); }

size_t kq_tls_pending_out(const kq_tls *t) { return kq_tls_bio_pending(t->wbio); }

size_t kq_tls_take_out(kq_tls *t, char *buf, size_t cap) {
    int n = ossl.BIO_read(t->wbio, buf, cap > INT32_MAX ? INT32_MAX : (int)cap);
    return n > 0 ? (size_t)n : 0;
}

/* OpenSSL 3 keeps the library in bits 23-30 and flags system errors in bit 31; 1.1.1 keeps
 * the library in bits 24-31 and the reason in the low 12. */
int kq_tls_error_lib(unsigned long code) {
    if (!err_v3)
        return (int)((code >> 24) & 0xFF);
    return code & 0x80000000UL ? 2 /* ERR_LIB_SYS */ : (int)((code >> 23) & 0xFF);
}

int kq_tls_error_reason(unsigned long code) {
    if (!err_v3)
        return (int)(code & 0xFFF);
    return code & 0x80000000UL ? (int)(code & 0x7FFFFFFF) : (int)(code & 0x7FFFFF);
}

const char *kq_tls_error_string(unsigned long code) { return ossl.ERR_reason_error_string(code); }

long kq_tls_verify_result(SSL *ssl) { return ossl.SSL_get_verify_result(ssl); }

const char *kq_tls_verify_string(long result) {
    return ossl.X509_verify_cert_error_string(result);
}

unsigned long kq_tls_ctx_options(SSL_CTX *ctx) { return ossl.SSL_CTX_get_options(ctx); }

SSL_CTX *kq_tls_ctx_of(SSL *ssl) { return ossl.SSL_get_SSL_CTX(ssl); }

BIO *kq_tls_rbio_of(SSL *ssl) { return ossl.SSL_get_rbio(ssl); }

BIO *kq_tls_wbio_of(SSL *ssl) { return ossl.SSL_get_wbio(ssl); }

int kq_tls_is_server(SSL *ssl) { return ossl.SSL_is_server(ssl); }

const char *kq_tls_servername(SSL *ssl) {
    return ossl.SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
}

size_t kq_tls_bio_pending(BIO *bio) {
    long n = ossl.BIO_ctrl(bio, BIO_CTRL_PENDING, 0, NULL);
    return n > 0 ? (size_t)n : 0;
}

const char *kq_tls_library_version(void) { return ossl.OpenSSL_version(0); }
