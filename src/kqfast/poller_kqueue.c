/* kqueue backend (macOS, the BSDs; libkqueue on Linux).  Included by poller.c only. */
#include "poller.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/event.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define KQUEUE_BATCH 256
#define CHANGE_CAP 256
#define WAKE_IDENT 0          /* EVFILT_USER idents are their own namespace, not fds */
#define MAX_WAIT_MS 86400000  /* Darwin answers EINVAL for very large timeouts */
/* The udata of every delete.  An EV_ERROR entry is the change it answers with data set to
 * the errno, udata included on every kqueue (FreeBSD does not echo the change's flags), so
 * this is how an entry tells a delete's "already gone" from an add's refusal. */
#define DELETE_TAG ((void *)1)

struct kq_poller {
    int kq;
    pid_t owner;         /* a kqueue is not inherited by fork(): see kq_poller_free */
    volatile int woken;  /* coalesces wake-ups: only the 0 -> 1 transition triggers */
    /* The timer: no EVFILT_TIMER, whose every change libkqueue backs with a new fd (a loop
     * at its fd limit would get none), but the wait's own timeout, from this deadline. */
    double deadline;
    int nchanges, nfailed;
    /* Interest changes wait here and reach the kernel inside the kevent() call that waits:
     * one syscall per loop iteration, whatever the number of changes. */
    struct kevent changes[CHANGE_CAP];
    /* Receipts of other fds' changes that failed when a full queue was applied early: they
     * are those fds' errors, not the caller's, and the next poll reports them as events. */
    struct kevent failed[CHANGE_CAP];
    struct kevent events[KQUEUE_BATCH];
};

const char kq_poller_backend[] = "kqueue";

kq_poller *kq_poller_create(void) {
    kq_poller *p = calloc(1, sizeof(*p));
    if (p == NULL) return NULL;
    /* A kqueue is not inherited across fork(), so there is no CLOEXEC to ask for. */
    p->kq = kqueue();
    p->owner = getpid();
    p->deadline = INFINITY;
    if (p->kq < 0) {
        free(p);
        return NULL;
    }
    /* EV_CLEAR: a trigger is consumed when reported, or the loop would spin on it. */
    struct kevent wake;
    EV_SET(&wake, WAKE_IDENT, EVFILT_USER, EV_ADD | EV_CLEAR, 0, 0, NULL);
    if (kevent(p->kq, &wake, 1, NULL, 0, NULL) < 0) {
        int saved = errno;
        kq_poller_free(p);
        errno = saved;
        return NULL;
    }
    return p;
}

/* A filter that is already gone is what a delete wants. */
static int is_gone(const struct kevent *e) {
    return e->udata == DELETE_TAG && (e->data == ENOENT || e->data == EBADF);
}

/* Applies changes at once: EV_RECEIPT makes the kernel answer every change with an EV_ERROR
 * entry (data 0 on success) instead of stopping at the first failure.  A refusal is fd's
 * own (-1, errno) or another fd's (kept for the next poll). */
static int apply_now(kq_poller *p, struct kevent *changes, int n, int fd) {
    struct kevent receipts[CHANGE_CAP];
    struct timespec zero = {0, 0};
    for (int i = 0; i < n; i++) changes[i].flags |= EV_RECEIPT;
    int got = kevent(p->kq, changes, n, receipts, n, &zero);
    if (got < 0) return -1;
    int own_err = 0;
    for (int i = 0; i < got; i++) {
        if (!(receipts[i].flags & EV_ERROR) || receipts[i].data == 0 || is_gone(&receipts[i]))
            continue;
        if ((int)receipts[i].ident == fd)
            own_err = (int)receipts[i].data;
        else if (p->nfailed < CHANGE_CAP)
            p->failed[p->nfailed++] = receipts[i];
    }
    if (own_err) {
        errno = own_err;
        return -1;
    }
    return 0;
}

static int queue_change(kq_poller *p, int fd, short filter, unsigned short flags) {
    if (p->nchanges == CHANGE_CAP) {
        int failed = apply_now(p, p->changes, p->nchanges, fd);
        p->nchanges = 0;
        if (failed < 0) return -1;
    }
    EV_SET(&p->changes[p->nchanges++], fd, filter, flags, 0, 0,
           flags & EV_DELETE ? DELETE_TAG : NULL);
    return 0;
}

/* Queues the filters that change; two filters, never OR-ed: EVFILT_READ | EVFILT_WRITE ==
 * EVFILT_READ. */
static int queue_interest(kq_poller *p, int fd, int old_mask, int new_mask) {
    int changed = old_mask ^ new_mask;
    if ((changed & KQ_READABLE) &&
        queue_change(p, fd, EVFILT_READ, (new_mask & KQ_READABLE) ? EV_ADD : EV_DELETE) < 0)
        return -1;
    if ((changed & KQ_WRITABLE) &&
        queue_change(p, fd, EVFILT_WRITE, (new_mask & KQ_WRITABLE) ? EV_ADD : EV_DELETE) < 0)
        return -1;
    return 0;
}

/* The fd is about to be closed.  Drop its queued changes (an add for a closed fd would fail
 * later, maybe after the number was reused) and delete its filters now, both the kernel's
 * and those a dropped change would have added or deleted: libkqueue, unlike the BSD kernels,
 * does not forget an fd when it is closed.  The other fds' changes keep waiting. */
static int remove_now(kq_poller *p, int fd, int mask) {
    struct kevent deletes[2];
    int kept = 0, n = 0;
    for (int i = 0; i < p->nchanges; i++) {
        if ((int)p->changes[i].ident != fd || p->changes[i].filter == EVFILT_USER)
            p->changes[kept++] = p->changes[i];
        else
            mask |= p->changes[i].filter == EVFILT_WRITE ? KQ_WRITABLE : KQ_READABLE;
    }
    p->nchanges = kept;
    if (mask & KQ_READABLE) EV_SET(&deletes[n++], fd, EVFILT_READ, EV_DELETE, 0, 0, DELETE_TAG);
    if (mask & KQ_WRITABLE) EV_SET(&deletes[n++], fd, EVFILT_WRITE, EV_DELETE, 0, 0, DELETE_TAG);
    return n ? apply_now(p, deletes, n, fd) : 0;
}

int kq_poller_set(kq_poller *p, int fd, int old_mask, int new_mask) {
    if (new_mask == 0) return remove_now(p, fd, old_mask);
    /* The add reaches the kernel only with the next wait: check the fd now, as epoll_ctl
     * would, so that a caller registering an fd it did not create learns at once. */
    if (old_mask == 0 && fcntl(fd, F_GETFD) < 0) return -1;
    return queue_interest(p, fd, old_mask, new_mask);
}

/* The fd was just created, so it is open: no fcntl() per connection.  Should the kernel
 * still refuse it, the wait reports that as a KQ_ERROR event (its udata is no DELETE_TAG). */
int kq_poller_add(kq_poller *p, int fd, int mask) { return queue_interest(p, fd, 0, mask); }

/* The timer fires: events[0] is a wake-up's entry (not the caller's). */
static int timer_fired(kq_poller *p) {
    p->deadline = INFINITY;
    EV_SET(&p->events[0], WAKE_IDENT, EVFILT_USER, 0, 0, 0, NULL);
    return 1;
}

/* The timer's part of a poll, out of line: 1 when the deadline has come (the poll returns
 * the timer's event without waiting: so the first poll after a busy wait sees it); else 0,
 * the wait's timeout *tsp made ts if the deadline is nearer (then *bounded is set). */
static int timer_due(kq_poller *p, struct timespec *ts, struct timespec **tsp, int *bounded) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double left = p->deadline - ((double)now.tv_sec + now.tv_nsec / 1e9);
    if (left <= 0) return 1;
    if (left < MAX_WAIT_MS / 1000 &&
        (*tsp == NULL || left < (double)(*tsp)->tv_sec + (*tsp)->tv_nsec / 1e9)) {
        /* Rounded up to the next microsecond: it ends no earlier than the deadline. */
        long us = (long)(left * 1e6) + 1;
        ts->tv_sec = us / 1000000;
        ts->tv_nsec = (us % 1000000) * 1000;
        *tsp = ts;
        *bounded = 1;
    }
    return 0;
}

static inline int kq_poller_poll(kq_poller *p, int cap, int timeout_ms) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ms >= 0) {
        if (timeout_ms > MAX_WAIT_MS) timeout_ms = MAX_WAIT_MS;
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tsp = &ts;
    }
    if (cap > KQUEUE_BATCH) cap = KQUEUE_BATCH;
    int bounded = 0;  /* the deadline is the wait's timeout */
    if (p->deadline < INFINITY && timer_due(p, &ts, &tsp, &bounded)) return timer_fired(p);
    /* Refusals kept by an early apply come first, and there is no waiting for them; with
     * no room left for the kernel's answers, the queued changes wait for the next poll. */
    int kept = p->nfailed < cap ? p->nfailed : cap;
    if (kept) {
        memcpy(p->events, p->failed, kept * sizeof(*p->failed));
        p->nfailed -= kept;
        memmove(p->failed, p->failed + kept, p->nfailed * sizeof(*p->failed));
        if (kept == cap) return kept;
        ts.tv_sec = ts.tv_nsec = 0;
        tsp = &ts;
        bounded = 0;
    }
    /* Never wait with an empty event list: kevent() would return at once. */
    int n = kevent(p->kq, p->changes, p->nchanges, p->events + kept, cap - kept, tsp);
    if (n < 0) {
        /* Keep the changes: applying them again is harmless (EV_ADD modifies, a repeated
         * EV_DELETE answers ENOENT). */
        return kept ? kept : -1;
    }
    p->nchanges = 0;
    if (n == 0 && bounded) return timer_fired(p);
    return n + kept;
}

/* Everything but plain readiness, decoded out of line: the hot path stays small. */
static kq_event unusual_event(const struct kevent *e) {
    kq_event ev = {(int)e->ident, e->filter == EVFILT_WRITE ? KQ_WRITABLE : KQ_READABLE, 0};
    /* Test EV_ERROR as a bit: macOS returns it OR-ed with the change's own flags.  Such an
     * entry answers a change; it is never readiness.  data 0 is a receipt's "applied": the
     * kernels send one only for EV_RECEIPT, but libkqueue sends such entries too under
     * signal load (test_reliability's item 6 meets them), and they are no failure. */
    if (e->flags & EV_ERROR) {
        ev.mask = KQ_ERROR;
        ev.err = (int)e->data;
        if (e->data == 0 || is_gone(e)) ev.fd = -1;
        return ev;
    }
    if (e->filter == EVFILT_USER) {
        ev.fd = -1;  /* a wake-up */
        return ev;
    }
    /* EV_EOF on a read filter may come with bytes still buffered ("data"): the loop reads to
     * the end first.  On a write filter EV_EOF also follows our own shutdown(SHUT_WR), so it
     * is no hang-up by itself.  Either way the socket error, if any, is in fflags (not data),
     * and it must be passed on: libkqueue fetches it with SO_ERROR, which clears it, so a
     * failed connect() would look like a success. */
    if (e->filter == EVFILT_READ) ev.mask |= KQ_HANGUP;
    ev.err = (int)e->fflags;
    return ev;
}

static inline kq_event kq_poller_event(const kq_poller *p, int i) {
    const struct kevent *e = &p->events[i];
    if ((e->flags & (EV_ERROR | EV_EOF)) || e->filter == EVFILT_USER) return unusual_event(e);
    return (kq_event){(int)e->ident, e->filter == EVFILT_WRITE ? KQ_WRITABLE : KQ_READABLE, 0};
}

int kq_poller_wake(kq_poller *p) {
    if (__atomic_exchange_n(&p->woken, 1, __ATOMIC_ACQ_REL)) return 0;
    struct kevent trigger;
    EV_SET(&trigger, WAKE_IDENT, EVFILT_USER, 0, NOTE_TRIGGER, 0, NULL);
    return kevent(p->kq, &trigger, 1, NULL, 0, NULL) < 0 ? -1 : 0;
}

void kq_poller_wake_seen(kq_poller *p) {
    /* EV_CLEAR consumes a trigger when it is reported.  A wake() that finds the flag set
     * skips its trigger: the one that set it triggered (or is about to), which the loop
     * sees (now, or in a later wait), and it looks for work after that.  So the flag may be
     * cleared at any event that is not the loop's; the exchange pairs with wake()'s, so the
     * work of a wake() that skipped is visible to the look that follows. */
    __atomic_exchange_n(&p->woken, 0, __ATOMIC_ACQ_REL);
}

int kq_poller_set_timer(kq_poller *p, double deadline) {
    p->deadline = deadline;
    return 0;
}

void kq_poller_disown(kq_poller *p) {
    /* Not closed: in the child the number no longer names our kqueue (see kq_poller_free). */
    p->kq = -1;
    p->nchanges = p->nfailed = 0;
}

void kq_poller_free(kq_poller *p) {
    if (p == NULL) return;
    /* In a forked child the number no longer names our kqueue and may name someone else's
     * file by now (CPython #110395): leave it alone. */
    if (p->kq >= 0 && getpid() == p->owner) close(p->kq);
    free(p);
}
