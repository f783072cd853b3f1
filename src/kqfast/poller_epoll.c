/* epoll backend (Linux).  Included by poller.c only. */
#include "poller.h"
#include "rawsys.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define EPOLL_BATCH 256
#define CHANGE_CAP 64
/* The events bit of an entry the poller writes itself, for a queued change the kernel refused
 * (data: the errno above the fd).  EPOLLONESHOT is an input flag: epoll never reports it. */
#define REFUSED EPOLLONESHOT
/* The data of the wake eventfd and the timerfd: read as data.fd it is -1, "not the caller's",
 * on either endianness. */
#define WAKE_DATA UINT64_MAX

struct epoll_change {
    int fd, old_mask, new_mask;  /* old_mask: what the kernel has */
};

struct kq_poller {
    int epfd;
    int wakefd;          /* eventfd: a cross-thread wake is a write to it */
    int timerfd;         /* the poller's timer */
    volatile int woken;  /* coalesces wake-ups: only the 0 -> 1 transition writes */
    /* Modifications wait here for the next poll, one entry per fd: epoll has no batch call,
     * so the point is merging (pausing and resuming write interest in one iteration costs
     * one epoll_ctl, or none), as kqueue merges changes into its waiting kevent(). */
    int nchanges;
    struct epoll_change changes[CHANGE_CAP];
    struct epoll_event events[EPOLL_BATCH];
};

const char kq_poller_backend[] = "epoll";

static int ctl(kq_poller *p, int op, int fd, int mask) {
    struct epoll_event ev = {0};
    /* EPOLLRDHUP reports the peer's FIN together with any data still buffered: the loop
     * reads to the end before it acts on the hang-up. */
    if (mask & KQ_READABLE) ev.events |= EPOLLIN | EPOLLRDHUP;
    if (mask & KQ_WRITABLE) ev.events |= EPOLLOUT;
    ev.data.fd = fd;
    return epoll_ctl(p->epfd, op, fd, &ev);
}

kq_poller *kq_poller_create(void) {
    kq_poller *p = calloc(1, sizeof(*p));
    if (p == NULL) return NULL;
    p->wakefd = p->timerfd = -1;
    /* CLOEXEC: a forked-and-exec'd child must not keep our interest list alive. */
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    /* Edge-triggered: every write to an eventfd, every expiry of a timerfd, is a new edge,
     * so neither counter needs draining (it would take 2^64 of them to fill) and neither
     * costs the wait a read(). */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = WAKE_DATA};
    if (p->epfd < 0 || p->wakefd < 0 || p->timerfd < 0 ||
        epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->wakefd, &ev) < 0 ||
        epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->timerfd, &ev) < 0) {
        int saved = errno;
        kq_poller_free(p);
        errno = saved;
        return NULL;
    }
    return p;
}

static int find_change(const kq_poller *p, int fd) {
    for (int i = 0; i < p->nchanges; i++)
        if (p->changes[i].fd == fd) return i;
    return -1;
}

int kq_poller_set(kq_poller *p, int fd, int old_mask, int new_mask) {
    int i;
    if (new_mask == 0) {
        if ((i = find_change(p, fd)) >= 0) p->changes[i] = p->changes[--p->nchanges];
        /* Deregister before close: if the file description lives on in a dup() or a forked
         * child, epoll would keep reporting it under this fd number. */
        struct epoll_event ev = {0};
        if (epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, &ev) < 0 && errno != ENOENT && errno != EBADF)
            return -1;
        return 0;
    }
    /* Adds are never queued: epoll_ctl answers at once for the price a queued add would
     * cost anyway, and a refused fd (closed, a regular file) is the caller's to know. */
    if (old_mask == 0) return ctl(p, EPOLL_CTL_ADD, fd, new_mask);
    if ((i = find_change(p, fd)) >= 0) {
        p->changes[i].new_mask = new_mask;
        return 0;
    }
    if (p->nchanges == CHANGE_CAP) return ctl(p, EPOLL_CTL_MOD, fd, new_mask);
    p->changes[p->nchanges++] = (struct epoll_change){fd, old_mask, new_mask};
    return 0;
}

int kq_poller_add(kq_poller *p, int fd, int mask) { return kq_poller_set(p, fd, 0, mask); }

/* Applies the queued changes.  A refused one becomes a REFUSED entry at the head of events
 * (the last poll's events are spent by now); once cap of them are there, the rest waits for
 * the next poll.  Returns how many there are. */
static int apply_changes(kq_poller *p, int cap) {
    int i, refused = 0;
    for (i = 0; i < p->nchanges && refused < cap; i++) {
        const struct epoll_change *c = &p->changes[i];
        if (c->new_mask != c->old_mask && ctl(p, EPOLL_CTL_MOD, c->fd, c->new_mask) < 0) {
            struct epoll_event *e = &p->events[refused++];
            e->events = REFUSED;
            e->data.u64 = (uint64_t)(uint32_t)errno << 32 | (uint32_t)c->fd;
        }
    }
    p->nchanges -= i;
    memmove(p->changes, p->changes + i, (size_t)p->nchanges * sizeof(p->changes[0]));
    return refused;
}

static inline int kq_poller_poll(kq_poller *p, int cap, int timeout_ms) {
    if (cap > EPOLL_BATCH) cap = EPOLL_BATCH;
    /* Refusals are this poll's events: waiting first would only delay them. */
    int refused = p->nchanges ? apply_changes(p, cap) : 0;
    if (refused) return refused;
    /* Not libc's epoll_wait (see rawsys.h); with no sigmask, epoll_pwait is epoll_wait. */
    return (int)kq_sys6(SYS_epoll_pwait, p->epfd, (long)p->events, cap, timeout_ms, 0, 8);
}

/* Everything but plain readability, decoded out of line: the hot path stays small. */
static kq_event unusual_event(const struct epoll_event *e) {
    kq_event ev = {e->data.fd, 0, 0};
    if (e->events & REFUSED) {
        ev.fd = (int)(uint32_t)e->data.u64;
        ev.mask = KQ_ERROR;
        ev.err = (int)(e->data.u64 >> 32);
        return ev;
    }
    if (e->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) ev.mask |= KQ_READABLE;
    /* EPOLLERR: the socket error is fetched by the read or write that follows. */
    if (e->events & (EPOLLOUT | EPOLLERR)) ev.mask |= KQ_WRITABLE;
    if (e->events & (EPOLLRDHUP | EPOLLHUP)) ev.mask |= KQ_HANGUP;
    return ev;
}

static inline kq_event kq_poller_event(const kq_poller *p, int i) {
    const struct epoll_event *e = &p->events[i];
    if (e->events == EPOLLIN) return (kq_event){e->data.fd, KQ_READABLE, 0};
    return unusual_event(e);
}

int kq_poller_wake(kq_poller *p) {
    if (__atomic_exchange_n(&p->woken, 1, __ATOMIC_ACQ_REL)) return 0;
    uint64_t one = 1;
    return write(p->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN ? -1 : 0;
}

void kq_poller_wake_seen(kq_poller *p) {
    /* A wake() that finds the flag set skips its write: the one that set it wrote (or is
     * about to write) an edge, which the loop sees (now, or in a later wait), and it looks
     * for work after that.  So the flag may be cleared at any event that is not the
     * loop's, the edge's or another's; the exchange pairs with wake()'s, so the work of a
     * wake() that skipped is visible to the look that follows. */
    __atomic_exchange_n(&p->woken, 0, __ATOMIC_ACQ_REL);
}

int kq_poller_set_timer(kq_poller *p, double deadline) {
    /* Absolute on CLOCK_MONOTONIC, kq_monotonic()'s clock: it fires no earlier than the loop
     * reads the deadline.  An it_value of zero would disarm: the clock is never at 0. */
    struct itimerspec when = {{0, 0}, {0, 0}};
    if (deadline <= 0) {
        when.it_value.tv_nsec = 1;
    } else if (deadline < INFINITY) {
        /* Rounded up to the next nanosecond. */
        when.it_value.tv_sec = (time_t)deadline;
        when.it_value.tv_nsec = (long)((deadline - (double)when.it_value.tv_sec) * 1e9) + 1;
        if (when.it_value.tv_nsec > 999999999) {
            when.it_value.tv_sec += 1;
            when.it_value.tv_nsec -= 1000000000;
        }
    }
    return timerfd_settime(p->timerfd, TFD_TIMER_ABSTIME, &when, NULL);
}

void kq_poller_disown(kq_poller *p) {
    /* The child's copies only: the instance lives on in the parent, with its interest list
     * untouched (a delete through a copy would delete it for the parent). */
    if (p->wakefd >= 0) close(p->wakefd);
    if (p->timerfd >= 0) close(p->timerfd);
    if (p->epfd >= 0) close(p->epfd);
    p->wakefd = p->timerfd = p->epfd = -1;
    p->nchanges = 0;
}

void kq_poller_free(kq_poller *p) {
    if (p == NULL) return;
    if (p->wakefd >= 0) close(p->wakefd);
    if (p->timerfd >= 0) close(p->timerfd);
    if (p->epfd >= 0) close(p->epfd);
    free(p);
}
