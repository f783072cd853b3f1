# The native handlers: raw echo and the tutorial's line echo, entirely in C.  They echo from
# the loop's read buffer; only what the socket does not take is copied.


cdef inline bint is_blank(const char *s, size_t n) noexcept nogil:
    """True when the line holds only ASCII whitespace (Go's strings.TrimSpace leaves "")."""
    cdef size_t i
    cdef char ch
    for i in range(n):
        ch = s[i]
        if ch != b' ' and ch != b'\t' and ch != b'\n' and ch != b'\r' and ch != b'\v' and ch != b'\f':
            return False
    return True


cdef inline void after_emit(LoopCore *L, Conn *c, int fd, int err) noexcept nogil:
    """Backpressure: a peer that does not read stops being read from.  err: what emit()
    returned."""
    if err > 0:
        fail(L, fd, err)
    elif buf_len(c.out) >= L.high_water and not (c.flags & C_READ_PAUSED):
        c.flags |= C_READ_PAUSED
        if set_conn_mask(L, c, fd, c.mask & ~KQ_READABLE) < 0:
            fail(L, fd, errno)


cdef inline void echo_bytes(LoopCore *L, Conn *c, int fd, const char *data,
                            size_t n) noexcept nogil:
    """Raw echo.  All sent leaves nothing queued, so no backpressure to check, unless
    high_water is 0 (reading then stops at any amount, none included)."""
    cdef int err = emit(L, c, fd, data, n)
    if err != SENT or L.high_water == 0:
        after_emit(L, c, fd, err)


cdef void echo_lines(LoopCore *L, int fd, const char *data, size_t n) noexcept nogil:
    """Complete lines go back byte for byte, the contiguous ones in one send; a blank line
    closes (after what is owed is flushed), and so does a line over max_line."""
    cdef Conn *c = &L.conns[fd]
    cdef LineCursor cur
    cdef const char *line
    cdef const char *run_start = data
    cdef size_t length, run = 0
    cdef int found, err
    line_cursor_init(&cur, data, n)
    while True:
        found = next_line(c, &cur, L.max_line, &line, &length)
        if found != LINE_FOUND or is_blank(line, length):
            break
        if cur.joined is NULL:
            run += length
            continue
        # The line began in earlier data: it is echoed from its own buffer.
        err = emit(L, c, fd, line, length)
        if err > 0:
            free(cur.joined)
            fail(L, fd, err)
            return
        run_start = data + cur.pos
    free(cur.joined)
    err = emit(L, c, fd, run_start, run)
    if err > 0:
        fail(L, fd, err)
    elif found == LINE_MORE:
        after_emit(L, c, fd, 0)
    elif found == LINE_NOMEM:
        fail(L, fd, ENOMEM)
    else:
        begin_close(L, fd)  # a blank line, or one too long
