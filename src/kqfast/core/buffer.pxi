# Byte buffers for a connection's unsent output and its incomplete line: one allocation, the
# bytes right after the header, held only while they hold bytes.
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove


cdef inline char *buf_data(Buffer *b) noexcept nogil:
    return <char *>(b + 1)


cdef inline size_t buf_len(Buffer *b) noexcept nogil:
    return 0 if b is NULL else b.end - b.start


cdef Buffer *buf_append(Buffer *b, const char *src, size_t n) noexcept nogil:
    """Appends n bytes, growing or compacting the buffer; NULL when memory runs out (the old
    buffer is then freed)."""
    cdef size_t live, cap
    cdef Buffer *grown
    if b is NULL:
        cap = n if n > 4096 else 4096
        b = <Buffer *>malloc(sizeof(Buffer) + cap)
        if b is NULL:
            return NULL
        b.start = b.end = 0
        b.cap = cap
    elif b.end + n > b.cap:
        live = b.end - b.start
        if b.start:
            memmove(buf_data(b), buf_data(b) + b.start, live)
            b.start, b.end = 0, live
        if live + n > b.cap:
            cap = b.cap * 2
            if cap < live + n:
                cap = live + n
            grown = <Buffer *>realloc(b, sizeof(Buffer) + cap)
            if grown is NULL:
                free(b)
                return NULL
            b = grown
            b.cap = cap
    memcpy(buf_data(b) + b.end, src, n)
    b.end += n
    return b
