/* TLS records through the OpenSSL the interpreter already loaded.
 *
 * kqfast links no OpenSSL of its own: two copies in one process cannot share an SSL_CTX, and
 * the user's ssl.SSLContext is the configuration.  kq_tls_load() looks up the few functions
 * the core calls in the interpreter's _ssl module and the libraries it links (dlopen with
 * RTLD_NOLOAD: it is loaded already), and checks that the library answering is the one
 * _ssl reports.  Where that fails (an OpenSSL linked statically with hidden symbols, say),
 * nothing here is called and TLS stays asyncio's.
 *
 * A connection's ciphertext goes through two memory BIOs, as in Python's ssl.SSLObject: the
 * core writes what it receives into rbio, SSL_read turns complete records into plaintext,
 * SSL_write and the handshake leave records in wbio, which the core sends.  No call here
 * touches a socket or Python. */
#ifndef KQFAST_TLS_H
#define KQFAST_TLS_H

#include <stddef.h>

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct bio_st BIO;

typedef struct kq_tls {
    SSL *ssl;
    BIO *rbio;               /* records from the peer, not yet read */
    BIO *wbio;               /* records for the peer, not yet sent */
    int flags;               /* KQ_TLS_* below */
    /* The last failure, as OpenSSL told it: SSL_get_error()'s answer and the last error
     * queued then (0: none), for the Python side to build the exception ssl would raise. */
    int fail_kind;
    unsigned long fail_code;
} kq_tls;

/* kq_tls.flags */
#define KQ_TLS_OWNED 1       /* the core made ssl (a native server's) and frees it */
#define KQ_TLS_DECRYPT 2     /* input may be decrypted in the nogil pass (asyncio: WRAPPED,
                                the app reading, not a BufferedProtocol) */
#define KQ_TLS_SEND 4        /* records made may be sent at once (asyncio: the underlying
                                transport has not paused its protocol's writing) */

/* What the calls below return. */
#define KQ_TLS_DONE 0        /* all done: read to the end of the complete records, written */
#define KQ_TLS_MORE 1        /* the peer's next records are needed first */
#define KQ_TLS_CLOSED 2      /* the peer sent close_notify */
#define KQ_TLS_FULL 3        /* the output buffer filled before the input ran out */
#define KQ_TLS_FAILED (-1)   /* fail_kind and fail_code say why */

/* 0, or -1 with a reason in why.  module_path: the _ssl extension's file (NULL when _ssl is
 * built into the interpreter); expected_version: ssl.OPENSSL_VERSION_NUMBER. */
int kq_tls_load(const char *module_path, unsigned long expected_version, char *why, size_t n);
int kq_tls_loaded(void);

/* A server-side connection on ctx with memory BIOs of its own (a native server's): 0, or -1
 * when OpenSSL is out of memory. */
int kq_tls_accept(kq_tls *t, SSL_CTX *ctx);
/* Keeps the connection's record buffers between records (see tls.c). */
void kq_tls_keep_buffers(kq_tls *t);
/* Frees what kq_tls_accept made; a borrowed connection (Python's) is only forgotten. */
void kq_tls_release(kq_tls *t);

/* Ciphertext received: 0, or -1 when the BIO cannot grow. */
int kq_tls_feed(kq_tls *t, const void *data, size_t n);
/* Decrypts complete records into out (the handshake first, if it is not done): DONE when
 * rbio holds no complete record any more, CLOSED, FULL or FAILED.  *got: plaintext bytes. */
int kq_tls_read(kq_tls *t, char *out, size_t cap, size_t *got);
/* Encrypts all of data into wbio: DONE, MORE (renegotiation or a handshake must progress
 * first: nothing was taken) or FAILED. */
int kq_tls_write(kq_tls *t, const void *data, size_t n);
/* Queues close_notify in wbio (once; later calls do nothing). */
void kq_tls_close_notify(kq_tls *t);
size_t kq_tls_pending_in(const kq_tls *t);
size_t kq_tls_pending_out(const kq_tls *t);
/* Takes up to cap bytes of wbio's records into buf; returns how many. */
size_t kq_tls_take_out(kq_tls *t, char *buf, size_t cap);

/* Reading a failure (fail_code, an SSL) the way Python's ssl module reports one. */
int kq_tls_error_lib(unsigned long code);
int kq_tls_error_reason(unsigned long code);
const char *kq_tls_error_string(unsigned long code);
long kq_tls_verify_result(SSL *ssl);
const char *kq_tls_verify_string(long result);

/* What kqfast checks when it reaches the SSL, SSL_CTX and BIO behind Python's objects. */
unsigned long kq_tls_ctx_options(SSL_CTX *ctx);
SSL_CTX *kq_tls_ctx_of(SSL *ssl);
BIO *kq_tls_rbio_of(SSL *ssl);
BIO *kq_tls_wbio_of(SSL *ssl);
int kq_tls_is_server(SSL *ssl);
const char *kq_tls_servername(SSL *ssl);
size_t kq_tls_bio_pending(BIO *bio);
const char *kq_tls_library_version(void);

#endif
