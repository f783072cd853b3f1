# The TLS engine's Python side: a TlsLink ties one asyncio SSLProtocol on a core stream to
# the OpenSSL connection behind its ssl.SSLObject, so the core reads and writes records on
# that very connection in C.  asyncio's SSLProtocol stays the state machine (handshake,
# shutdown, timeouts, flow control: each Python's own, so its rules are exactly that
# Python's); the link mirrors the part of its state the core needs (may it decrypt? may it
# send?) and takes the two steps that run per record: plaintext to the app protocol
# (deliver) and the app's writes to the socket (write).  Everything else the link leaves to
# the SSLProtocol, which works on the same SSL object and memory BIOs, so either can take
# any step.
import _ssl
import ssl as _ssl_module
from asyncio import sslproto as _sslproto

cdef extern from *:
    """
    /* Python's ssl objects, as _ssl.c lays them out: each begins with the pointer kqfast
       needs (tls_probe checks that it finds what it expects there). */
    typedef struct { PyObject_HEAD SSL_CTX *ctx; } kq_PySSLContext;
    typedef struct { PyObject_HEAD PyObject *socket; SSL *ssl; } kq_PySSLSocket;
    typedef struct { PyObject_HEAD BIO *bio; } kq_PySSLMemoryBIO;
    #define kq_context_ctx(o) (((kq_PySSLContext *)(o))->ctx)
    #define kq_socket_ssl(o) (((kq_PySSLSocket *)(o))->ssl)
    #define kq_memory_bio(o) (((kq_PySSLMemoryBIO *)(o))->bio)
    """
    SSL_CTX *kq_context_ctx(object context)
    SSL *kq_socket_ssl(object sslsocket)
    BIO *kq_memory_bio(object memory_bio)

cdef enum:
    MAX_RECORD = 16384 + 2048 + 5   # a TLS record's most ciphertext: payload, expansion, header

# SSLProtocolState, as small numbers the core compares.
cdef enum:
    S_UNWRAPPED = 0
    S_DO_HANDSHAKE = 1
    S_WRAPPED = 2
    S_FLUSHING = 3
    S_SHUTDOWN = 4

cdef dict _STATES = {}
cdef object _native_why = "not checked yet"  # None once OpenSSL may be called from C
cdef object _engine_why = "not checked yet"  # None once the loop's engine may be used


def native_tls():
    """None when native handlers can serve TLS on this interpreter, else why not (checked
    once: OpenSSL's functions reached through _ssl, and Python's ssl objects where kqfast
    reads them).  asyncio's SSLProtocol plays no part in them."""
    global _native_why
    if _native_why == "not checked yet":
        _native_why = _openssl_probe()
    return _native_why


def tls_engine():
    """None when kqfast's TLS engine runs TLS on kqfast.Loop here, else why not: what
    native_tls() needs, and an asyncio SSLProtocol as kqfast was written for."""
    global _engine_why
    if _engine_why == "not checked yet":
        _engine_why = _engine_probe()
    return _engine_why


def tls_library():
    """The OpenSSL version string of the library the engine calls."""
    return kq_tls_library_version().decode() if kq_tls_loaded() else None


cdef object _engine_probe():
    if _os.environ.get("KQFAST_TLS_ENGINE") == "asyncio":
        return "KQFAST_TLS_ENGINE=asyncio asks for asyncio's own"
    from kqfast import _asyncio_hooks  # (a module of the package this one is part of)
    if not hasattr(_sslproto, "SSLProtocolState"):
        return "Python 3.10's asyncio has an older SSLProtocol, which the engine does not drive"
    if not _asyncio_hooks.usable("tls engine"):
        return f"this Python's asyncio SSLProtocol {_asyncio_hooks.mismatch('tls engine')}"
    if native_tls() is not None:
        return native_tls()
    for state in _sslproto.SSLProtocolState:
        _STATES[state] = {"UNWRAPPED": S_UNWRAPPED, "DO_HANDSHAKE": S_DO_HANDSHAKE,
                          "WRAPPED": S_WRAPPED, "FLUSHING": S_FLUSHING,
                          "SHUTDOWN": S_SHUTDOWN}[state.name]
    return None


cdef object _openssl_probe():
    cdef char why[256]
    cdef bytes path
    cdef SSL *ssl
    cdef BIO *rbio
    # _ssl built into the interpreter has no file: its OpenSSL is then the program's.
    path = _os.fsencode(_ssl.__file__) if hasattr(_ssl, "__file__") else None
    if kq_tls_load(NULL if path is None else <const char *>path,
                   _ssl_module.OPENSSL_VERSION_NUMBER, why, sizeof(why)) < 0:
        return why.decode()
    context = _ssl_module.SSLContext(_ssl_module.PROTOCOL_TLS_CLIENT)
    context.options |= _ssl_module.OP_NO_TICKET
    if kq_tls_ctx_options(kq_context_ctx(context)) != context.options:
        return "ssl.SSLContext's SSL_CTX is not where kqfast looks for it"
    incoming, outgoing = _ssl_module.MemoryBIO(), _ssl_module.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname="probe.kqfast.invalid")
    ssl = kq_socket_ssl(sslobj._sslobj)
    rbio = kq_memory_bio(incoming)
    if (kq_tls_ctx_of(ssl) != kq_context_ctx(context) or kq_tls_rbio_of(ssl) != rbio
            or kq_tls_wbio_of(ssl) != kq_memory_bio(outgoing) or kq_tls_is_server(ssl)
            or kq_tls_servername(ssl) != b"probe.kqfast.invalid"):
        return "ssl.SSLObject's SSL or ssl.MemoryBIO's BIO is not where kqfast looks for it"
    incoming.write(b"kqfast")
    if kq_tls_bio_pending(rbio) != 6:
        return "ssl.MemoryBIO's BIO does not behave as kqfast expects"
    return None


cdef SSL_CTX *context_ctx(context) except NULL:
    """The SSL_CTX of an ssl.SSLContext, for a native server."""
    if native_tls() is not None:
        raise RuntimeError(f"kqfast cannot call OpenSSL here: {native_tls()}")
    if not isinstance(context, _ssl._SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext, not {type(context).__name__}")
    return kq_context_ctx(context)


cdef object ssl_error(kq_tls *t, server_hostname):
    """The exception Python's ssl raises for the failure t recorded: its class, errno,
    message ("[LIBRARY: REASON] text"), reason and library, as _ssl makes them (the
    message's last part names kqfast, where _ssl names its own source line)."""
    cdef unsigned long code = t.fail_code
    cdef int lib = kq_tls_error_lib(code), reason = kq_tls_error_reason(code)
    cdef const char *text
    kind, errno_, message = _ssl_module.SSLError, _ssl_module.SSL_ERROR_SSL, None
    verify = None
    if t.fail_kind == 6:  # SSL_ERROR_ZERO_RETURN
        kind, errno_ = _ssl_module.SSLZeroReturnError, _ssl_module.SSL_ERROR_ZERO_RETURN
        message = "TLS/SSL connection has been closed (EOF)"
    elif t.fail_kind == 5 or (lib == 20 and reason == 294):  # SYSCALL; UNEXPECTED_EOF
        kind, errno_ = _ssl_module.SSLEOFError, _ssl_module.SSL_ERROR_EOF
        message = "EOF occurred in violation of protocol"
    elif t.fail_kind != 1:
        errno_, message = _ssl_module.SSL_ERROR_INVALID_ERROR_CODE, "Invalid error code"
    elif code == 0:
        message = "A failure in the SSL library occurred"
    elif lib == 20 and reason == 134:  # CERTIFICATE_VERIFY_FAILED
        kind = _ssl_module.SSLCertVerificationError
        verify_code = kq_tls_verify_result(t.ssl)
        if verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
            what = "Hostname" if verify_code == 62 else "IP address"
            verify = f"{what} mismatch, certificate is not valid for '{server_hostname}'."
        else:
            text = kq_tls_verify_string(verify_code)
            verify = text.decode() if text is not NULL else None
    library = _library_name(lib) if code else None
    reason_name = _reason_name(code, lib, reason) if code else None
    if message is None:
        text = kq_tls_error_string(code) if code else NULL
        message = text.decode() if text is not NULL else "unknown error"
    if verify is not None:
        message = f"{message}: {verify}"
    if library is not None:
        message = f"[{library}: {reason_name}] {message}" if reason_name else \
            f"[{library}] {message}"
    exc = kind(errno_, f"{message} (kqfast tls.c)")
    exc.library, exc.reason = library, reason_name
    if kind is _ssl_module.SSLCertVerificationError:
        exc.verify_code, exc.verify_message = verify_code, verify
    return exc


# OpenSSL's libraries by code (ERR_LIB_*, the same in 1.1.1 and 3.x), named as Python's ssl
# names them: its own tables say so up to 3.14 (_ssl.lib_codes_to_names, err_codes_to_names),
# which 3.15 no longer exposes.
_LIBRARIES = {2: "SYS", 3: "BN", 4: "RSA", 5: "DH", 6: "EVP", 7: "BUF", 8: "OBJ", 9: "PEM",
              10: "DSA", 11: "X509", 13: "ASN1", 14: "CONF", 15: "CRYPTO", 16: "EC", 20: "SSL",
              32: "BIO", 33: "PKCS7", 34: "X509V3", 35: "PKCS12", 36: "RAND", 37: "DSO",
              38: "ENGINE", 39: "OCSP", 40: "UI", 41: "COMP", 42: "ECDSA", 43: "ECDH",
              44: "OSSL_STORE", 45: "FIPS", 46: "CMS", 47: "TS", 48: "HMAC", 50: "CT",
              51: "ASYNC", 52: "KDF", 53: "SM2", 54: "ESS", 55: "PROP", 56: "CRMF", 57: "PROV",
              58: "CMP", 59: "OSSL_ENCODER", 60: "OSSL_DECODER", 61: "HTTP"}


cdef object _library_name(int lib):
    names = getattr(_ssl, "lib_codes_to_names", None)
    return names.get(lib) if names is not None else _LIBRARIES.get(lib)


cdef object _reason_name(unsigned long code, int lib, int reason):
    """A reason's name: Python's table's where it has one, else OpenSSL's text for it in the
    form of its macro's name ("bad record mac" -> BAD_RECORD_MAC), as those tables are made."""
    cdef const char *text
    names = getattr(_ssl, "err_codes_to_names", None)
    if names is not None:
        return names.get((lib, reason))
    text = kq_tls_error_string(code)
    return text.decode().upper().replace(" ", "_") if text is not NULL else None


@cython.final
cdef class TlsLink:
    """One asyncio SSLProtocol on a core stream: the OpenSSL connection the core works on,
    and the SSLProtocol's state as far as the core needs it."""
    cdef kq_tls tls
    cdef StreamHandle handle        # the stream it is attached to, or None
    cdef PyObject *protocol         # the SSLProtocol: the handle's protocol while attached
    cdef object sslobj, incoming, outgoing  # what tls's pointers point into
    cdef object app, data_received  # the app protocol and its data_received function
    cdef object held                # plaintext decrypted before the app paused reading
    cdef object server_hostname
    cdef int state
    cdef bint app_paused, app_buffered, ssl_writing_paused, app_writing_paused
    cdef bint ssl_reading_paused, backlog
    cdef double out_high, out_low, in_high, in_low

    cdef bint attach(self, StreamHandle h, protocol) except -1:
        """Ties protocol (an SSLProtocol) to h's stream; False when its ssl objects are not
        what the engine works on (the SSLProtocol then does everything itself)."""
        cdef Conn *c = h.conn()
        sslobj = protocol._sslobj
        if (c is NULL or type(sslobj) is not _ssl_module.SSLObject
                or type(sslobj._sslobj) is not _ssl._SSLSocket
                or type(protocol._incoming) is not _ssl.MemoryBIO
                or type(protocol._outgoing) is not _ssl.MemoryBIO):
            return False
        self.tls.ssl = kq_socket_ssl(sslobj._sslobj)
        self.tls.rbio = kq_memory_bio(protocol._incoming)
        self.tls.wbio = kq_memory_bio(protocol._outgoing)
        if (kq_tls_rbio_of(self.tls.ssl) != self.tls.rbio or
                kq_tls_wbio_of(self.tls.ssl) != self.tls.wbio):
            return False
        self.sslobj, self.incoming, self.outgoing = sslobj, protocol._incoming, protocol._outgoing
        self.server_hostname = protocol._server_hostname
        kq_tls_keep_buffers(&self.tls)
        self.handle, self.protocol = h, <PyObject *>protocol
        h.tls = self
        c.tls = &self.tls
        c.flags |= C_TLS
        self.sync(protocol)
        return True

    cdef int check_thread(self) except -1:
        """The SSL object is the core's too: only the loop's thread may touch it."""
        if self.handle is not None:
            self.handle.check_thread()
        return 0

    cdef detach(self):
        """The stream is no longer the SSLProtocol's (it ended, or has another protocol)."""
        cdef StreamHandle h = self.handle
        cdef Conn *c
        if h is None:
            return
        c = h.conn()
        if c is not NULL and c.tls == &self.tls:
            c.tls = NULL
            c.flags &= ~C_TLS
        h.tls = None
        self.handle, self.protocol = None, NULL
        # The app transport outlives the stream (its protocol may keep it), and keeps this
        # link: nothing of the connection may stay reachable through it (asyncio's own lets
        # go of its SSLProtocol once closed twice).
        self.sslobj = self.incoming = self.outgoing = self.app = self.data_received = None
        self.held = None
        self.tls.ssl = NULL
        self.tls.rbio = self.tls.wbio = NULL

    def __dealloc__(self):
        self.detach()

    cdef sync(self, protocol):
        """Reads the SSLProtocol's state after one of its steps changed it (while attached:
        the core is what needs it)."""
        if self.handle is None:
            return
        self.state = _STATES[protocol._state]
        app = protocol._app_protocol
        if app is not self.app:
            self.app = app
            self.data_received = None if app is None else _protocol_method(app, "data_received")
        self.app_paused = protocol._app_reading_paused
        self.app_buffered = protocol._app_protocol_is_buffer
        self.ssl_writing_paused = protocol._ssl_writing_paused
        self.app_writing_paused = protocol._app_writing_paused
        self.ssl_reading_paused = protocol._ssl_reading_paused
        self.backlog = bool(protocol._write_backlog)
        self.out_high, self.out_low = protocol._outgoing_high_water, protocol._outgoing_low_water
        self.in_high, self.in_low = protocol._incoming_high_water, protocol._incoming_low_water
        self.tls.flags = (KQ_TLS_DECRYPT if self.state == S_WRAPPED and not self.app_paused
                          and not self.app_buffered and self.held is None else 0) | (
                          0 if self.ssl_writing_paused else KQ_TLS_SEND)

    # ---- records of the nogil pass (dispatch.pxi) -------------------------------------

    cdef int deliver(self, const char *data, size_t n) except -1:
        """Plaintext the core decrypted: data_received(), then what asyncio's read step does
        after it (the backlog, the records made, both flow controls)."""
        if self.held is not None or self.app_paused:
            self.hold(data, n)
            return 0
        if self.state != S_WRAPPED and self.state != S_FLUSHING:
            return 0  # (asyncio reads nothing in other states)
        result = call_with_bytes(self.data_received, self.app, data, n)
        if result is NULL:
            return self.read_failed()
        drop_reference(result)
        try:
            self.after_read(<object>self.protocol)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.read_error(exc)
        return 0

    cdef int read_failed(self) except -1:
        """deliver's error path, apart: the hot path then keeps no exception state."""
        try:
            pending_error()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.read_error(exc)
        return 0

    cdef read_error(self, exc):
        """What asyncio's read step does with an exception; one that is not an Exception
        (a CancelledError) as the socket transport reports a buffer_updated() failure."""
        if isinstance(exc, Exception):
            (<object>self.protocol)._fatal_error(exc, "Fatal error on SSL protocol")
        else:
            self.handle.fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    cdef after_read(self, protocol):
        cdef size_t pending
        if self.backlog:
            protocol._do_write()
        elif self.ssl_writing_paused or self.app_writing_due(0):
            # (Otherwise the nogil pass sent what reading made: nothing is pending.)
            protocol._process_outgoing()
        # What the core leaves in the incoming BIO is less than one record: read flow
        # control can only have work with a mark that low, or reading paused.
        if self.ssl_reading_paused or self.in_high <= MAX_RECORD:
            pending = kq_tls_pending_in(&self.tls)
            if (pending >= self.in_high and not self.ssl_reading_paused) or (
                    pending <= self.in_low and self.ssl_reading_paused):
                protocol._control_ssl_reading()

    cdef bint app_writing_due(self, size_t size):
        """Whether asyncio's app-side flow control has something to do, with size bytes
        buffered (its backlog empty)."""
        return (size >= self.out_high and not self.app_writing_paused) or (
            size <= self.out_low and self.app_writing_paused)

    cdef hold(self, const char *data, size_t n):
        """The app paused reading after the core decrypted: the plaintext waits here, and
        goes first when asyncio's read step runs next (CoreSSLProtocol._do_read)."""
        if self.held is None:
            self.held = bytearray()
        self.held += PyBytes_FromStringAndSize(data, n)
        self.tls.flags &= ~KQ_TLS_DECRYPT

    def deliver_held(self, protocol):
        """The held plaintext, if the app reads again (asyncio's read step is running)."""
        if self.held is None or protocol._app_reading_paused:
            return
        data, self.held = bytes(self.held), None
        self.sync(protocol)
        protocol._app_protocol.data_received(data)

    cdef step(self):
        """Records the core fed and left to the SSLProtocol: its own step for its state
        (asyncio's buffer_updated, with nothing new to copy: the BIO has the bytes)."""
        try:
            (<object>self.protocol).buffer_updated(0)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.handle.fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    cdef failed(self):
        """The records did not decrypt: what asyncio's read step does with ssl's error."""
        (<object>self.protocol)._fatal_error(ssl_error(&self.tls, self.server_hostname),
                                             "Fatal error on SSL protocol")

    # ---- the app transport's write ----------------------------------------------------

    cdef bint write(self, data) except -1:
        """asyncio's write of app data (its backlog empty, WRAPPED): encrypt, then the
        records to the stream unless its protocol's writing is paused, then app-side flow
        control.  False: not this case (the SSLProtocol does it)."""
        cdef const char *buf
        cdef Py_ssize_t n
        cdef int result
        if self.state != S_WRAPPED or self.backlog or self.handle is None:
            return False
        if PyBytes_CheckExact(data):
            buf, n = PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)
        elif type(data) is bytearray:
            buf, n = PyByteArray_AS_STRING(data), len(data)
        else:
            return False
        if n == 0:
            return False
        result = kq_tls_write(&self.tls, buf, n)
        if result == KQ_TLS_MORE:
            return False  # nothing taken: asyncio's backlog holds it and retries
        protocol = <object>self.protocol
        if result == KQ_TLS_FAILED:
            protocol._fatal_error(ssl_error(&self.tls, self.server_hostname),
                                  "Fatal error on SSL protocol")
            return True
        if not self.ssl_writing_paused:
            self.send_records()
        if self.app_writing_due(kq_tls_pending_out(&self.tls) if self.ssl_writing_paused else 0):
            protocol._control_app_writing()
        return True

    cdef send_records(self):
        """asyncio's _process_outgoing: every record made goes to the stream's write."""
        cdef LoopCore *L = &self.handle.reactor.core
        cdef size_t n
        while True:
            n = kq_tls_take_out(&self.tls, L.tls_out, TLS_OUT_CHUNK)
            if n:
                self.handle.write_bytes(L.tls_out, n)
            if n < TLS_OUT_CHUNK:
                return  # a memory BIO gives all it has


cdef object tls_transport_write(object self, PyObject **args, Py_ssize_t nargs,
                                PyObject *kwnames):
    """CoreSSLTransport.write: the link's, else asyncio's own."""
    data = _one_argument("write", "data", args, nargs, kwnames)
    link = getattr(self, "_kq_link", None)
    if link is not None:
        (<TlsLink>link).check_thread()
    if link is None or not (<TlsLink>link).write(data):
        _SSLProtocolTransport.write(self, data)
    return None
