# The one line framer, used by the native LINE_ECHO and by LineProtocol alike.  A connection
# keeps its incomplete line in c.partial; each call finds the next complete line, so every
# byte is scanned once, however the line arrives in pieces.

# What next_line found.
cdef enum:
    LINE_MORE = 0       # no complete line left: an incomplete rest is kept in c.partial
    LINE_FOUND = 1
    LINE_TOO_LONG = 2   # more than max_line bytes before the newline
    LINE_NOMEM = 3

ctypedef struct LineCursor:
    const char *data
    size_t n
    size_t pos          # where the next line starts in data
    Buffer *joined      # holds the line just found when it began in c.partial; free() it


cdef inline void line_cursor_init(LineCursor *cur, const char *data, size_t n) noexcept nogil:
    cur.data, cur.n, cur.pos, cur.joined = data, n, 0, NULL


cdef int next_line(Conn *c, LineCursor *cur, size_t max_line, const char **line,
                   size_t *length) noexcept nogil:
    """Finds the next line (newline included) in cur's data, joined to the partial line kept
    from earlier data.  The line stays valid until the next call; free(cur.joined) after the
    last one."""
    cdef const char *s = cur.data + cur.pos
    cdef size_t rest = cur.n - cur.pos
    cdef const char *nl = <const char *>memchr(s, b'\n', rest) if rest else NULL
    cdef size_t take = (nl - s + 1) if nl is not NULL else rest
    cdef Buffer *p = c.partial
    free(cur.joined)
    cur.joined = NULL
    if buf_len(p) + take - (1 if nl is not NULL else 0) > max_line:
        return LINE_TOO_LONG
    if nl is NULL:
        cur.pos = cur.n
        if rest:
            c.partial = buf_append(p, s, rest)
            if c.partial is NULL:
                return LINE_NOMEM
        return LINE_MORE
    cur.pos += take
    if p is NULL:
        line[0], length[0] = s, take
        return LINE_FOUND
    c.partial = NULL
    p = buf_append(p, s, take)
    if p is NULL:
        return LINE_NOMEM
    cur.joined = p
    line[0], length[0] = buf_data(p) + p.start, p.end - p.start
    return LINE_FOUND
