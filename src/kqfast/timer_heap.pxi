# The loop's timer heap (its _scheduled): asyncio's TimerHandles in a list in heapq's order,
# so asyncio's own code may push onto it too.  heapq compares items with TimerHandle.__lt__, a
# Python method, about log2(n) times a push or pop: here the same sift compares their _when
# in C.
cdef object _heappush = _heapq.heappush
cdef object _heappop = _heapq.heappop


cdef int heap_push(list heap, handle) except -1:
    """heapq.heappush(heap, handle)."""
    if not HANDLES_IN_C:
        _heappush(heap, handle)
        return 0
    heap.append(handle)
    sift_down(heap, 0, len(heap) - 1)
    return 0


cdef object heap_pop(list heap):
    """heapq.heappop(heap)."""
    if not HANDLES_IN_C:
        return _heappop(heap)
    last = heap.pop()
    if not heap:
        return last
    first = heap[0]
    heap[0] = last
    sift_up(heap, 0)
    return first


cdef int sift_down(list heap, Py_ssize_t start, Py_ssize_t pos) except -1:
    """heapq's _siftdown: the item at pos moves up towards start past every later timer."""
    item = heap[pos]
    cdef double when = timer_when(item)
    cdef Py_ssize_t parent
    while pos > start:
        parent = (pos - 1) >> 1
        above = heap[parent]
        if not when < timer_when(above):
            break
        heap[pos] = above
        pos = parent
    heap[pos] = item
    return 0


cdef int sift_up(list heap, Py_ssize_t pos) except -1:
    """heapq's _siftup: the item at pos goes down to a leaf along the earlier children, then
    back up to its place."""
    cdef Py_ssize_t end = len(heap), start = pos, child = 2 * pos + 1
    item = heap[pos]
    while child < end:
        if child + 1 < end and not timer_when(heap[child]) < timer_when(heap[child + 1]):
            child += 1
        heap[pos] = heap[child]
        pos = child
        child = 2 * pos + 1
    heap[pos] = item
    return sift_down(heap, start, pos)



cdef inline double timer_when(handle) except? -1.0:
    if HANDLES_IN_C:
        return <double><object>slot_get(handle, T_WHEN)
    return handle._when


cdef inline bint timer_cancelled(handle) except -1:
    if HANDLES_IN_C:
        return <object>slot_get(handle, H_CANCELLED) is not False
    return handle._cancelled


cdef inline int unschedule(handle) except -1:
    if HANDLES_IN_C:
        slot_set(handle, T_SCHEDULED, False)
    else:
        handle._scheduled = False
    return 0


cdef int drop_cancelled_timers(Reactor R) except -1:
    """Too many cancelled timers in the heap: a new heap without them."""
    kept = []
    for handle in R.scheduled:
        if timer_cancelled(handle):
            unschedule(handle)
        else:
            kept.append(handle)
    _heapq.heapify(kept)
    R.scheduled = kept
    R.timer_cancelled_count = 0
    return 0


def timer_handle_cancelled(self, handle):
    """kqfast.Loop._timer_handle_cancelled: a scheduled timer was cancelled (its heap is
    cleaned up when cancelled ones pile up)."""
    if handle._scheduled:
        (<Reactor>self._reactor).timer_cancelled_count += 1
