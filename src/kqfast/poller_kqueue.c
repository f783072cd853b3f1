/* kqueue backend (macOS, the BSDs; libkqueue on Linux).  Included by poller.c only. */
#include "poller.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/event.h>
#include <sys/time.h>
#include <unistd.h>

#define KQUEUE_BATCH 256
#define CHANGE_CAP 256
#define WAKE_IDENT 0          /* EVFILT_USER idents are their own namespace, not fds */
#define MAX_WAIT_MS 86400000  /* Darwin answers EINVAL for very large timeouts */

struct kq_poller {
    int kq;
    pid_t owner;         /* a kqueue is not inherited by fork(): see kq_poller_free */
    volatile int woken;  /* coalesces wake-ups: only the 0 -> 1 transition triggers */
    int nchanges, nfailed;
    /* Interest changes wait here and reach the kernel inside the kevent() call that waits:
     * one syscall per loop iteration, whatever the number of changes. */
    struct kevent changes[CHANGE_CAP];
    /* Changes for other fds that failed when a set() flushed the queue early: they are that
     * fd's errors, reported by the next wait as KQ_ERROR events, not the caller's. */
    kq_event failed[CHANGE_CAP];
    struct kevent events[KQUEUE_BATCH];
};

const char kq_poller_backend[] = "kqueue";

kq_poller *kq_poller_create(void) {
    kq_poller *p = calloc(1, sizeof(*p));
    if (p == NULL) return NULL;
    /* A kqueue is not inherited across fork(), so there is no CLOEXEC to ask for. */
    p->kq = kqueue();
    p->owner = getpid();
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

/* ENOENT or EBADF answering a delete: the filter is already gone, which is what a delete
 * wants.  FreeBSD does not echo the change's flags in an EV_ERROR entry, so the errno is all
 * there is to go by in a wait's answers (where adds for a closing fd were dropped first). */
static int is_gone(intptr_t err) { return err == ENOENT || err == EBADF; }

/* Submits the pending changes without draining events: EV_RECEIPT makes the kernel answer
 * every change with an EV_ERROR entry (data 0 on success) instead of stopping at the first
 * failure.  A failure is fd's own (-1, errno) or another fd's (kept for the next wait). */
static int submit_changes(kq_poller *p, int fd) {
    struct kevent receipts[CHANGE_CAP];
    int n = p->nchanges;
    if (n == 0) return 0;
    for (int i = 0; i < n; i++) p->changes[i].flags |= EV_RECEIPT;
    struct timespec zero = {0, 0};
    int got = kevent(p->kq, p->changes, n, receipts, n, &zero);
    p->nchanges = 0;
    if (got < 0) return -1;
    int own_err = 0;
    for (int i = 0; i < got; i++) {
        intptr_t err = receipts[i].data;
        /* One receipt per change, in order: here the change itself says whether it was a
         * delete (an add for an fd closed since it was queued fails with EBADF). */
        int was_delete = receipts[i].ident == p->changes[i].ident &&
                         (p->changes[i].flags & EV_DELETE);
        if (!(receipts[i].flags & EV_ERROR) || err == 0 || (was_delete && is_gone(err)))
            continue;
        if ((int)receipts[i].ident == fd) {
            own_err = (int)err;
        } else if (p->nfailed < CHANGE_CAP) {
            kq_event *f = &p->failed[p->nfailed++];
            f->fd = (int)receipts[i].ident;
            f->mask = KQ_ERROR;
            f->err = (int)err;
        }
    }
    if (own_err) {
        errno = own_err;
        return -1;
    }
    return 0;
}

static int queue_change(kq_poller *p, int fd, short filter, unsigned short flags) {
    if (p->nchanges == CHANGE_CAP && submit_changes(p, fd) < 0) return -1;
    EV_SET(&p->changes[p->nchanges++], fd, filter, flags, 0, 0, NULL);
    return 0;
}

int kq_poller_set(kq_poller *p, int fd, int old_mask, int new_mask) {
    if (new_mask == 0) {
        /* The fd is about to be closed.  Drop its queued adds (an add for a closed fd would
         * fail later, maybe after the number was reused) and delete its filters now:
         * libkqueue, unlike the BSD kernels, does not forget an fd when it is closed.  Its
         * queued deletes stay: old_mask no longer names a filter whose removal is still
         * queued, and libkqueue would keep that filter past the close and treat the next
         * socket with this number as already registered (never adding it to its epoll set,
         * so that client would never be read). */
        int kept = 0;
        for (int i = 0; i < p->nchanges; i++)
            if ((int)p->changes[i].ident != fd || p->changes[i].filter == EVFILT_USER ||
                (p->changes[i].flags & EV_DELETE))
                p->changes[kept++] = p->changes[i];
        p->nchanges = kept;
        if (old_mask & KQ_READABLE) queue_change(p, fd, EVFILT_READ, EV_DELETE);
        if (old_mask & KQ_WRITABLE) queue_change(p, fd, EVFILT_WRITE, EV_DELETE);
        return submit_changes(p, fd);
    }
    /* The add reaches the kernel only with the next wait, where an EBADF could no longer be
     * told from a delete's: check the fd now, as epoll_ctl would. */
    if (old_mask == 0 && fcntl(fd, F_GETFD) < 0) return -1;
    /* Two filters, never OR-ed: EVFILT_READ | EVFILT_WRITE == EVFILT_READ. */
    int changed = old_mask ^ new_mask;
    if ((changed & KQ_READABLE) &&
        queue_change(p, fd, EVFILT_READ, (new_mask & KQ_READABLE) ? EV_ADD : EV_DELETE) < 0)
        return -1;
    if ((changed & KQ_WRITABLE) &&
        queue_change(p, fd, EVFILT_WRITE, (new_mask & KQ_WRITABLE) ? EV_ADD : EV_DELETE) < 0)
        return -1;
    return 0;
}

int kq_poller_wait(kq_poller *p, kq_event *out, int cap, int timeout_ms) {
    struct timespec ts, *tsp = NULL;
    if (cap > KQUEUE_BATCH) cap = KQUEUE_BATCH;
    /* Failures kept by an early flush come first, and there is no waiting for them. */
    int count = p->nfailed < cap ? p->nfailed : cap;
    memcpy(out, p->failed, count * sizeof(*out));
    p->nfailed -= count;
    memmove(p->failed, p->failed + count, p->nfailed * sizeof(*p->failed));
    if (count) timeout_ms = 0;
    if (timeout_ms >= 0) {
        if (timeout_ms > MAX_WAIT_MS) timeout_ms = MAX_WAIT_MS;
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tsp = &ts;
    }
    /* Never wait with an empty event list: kevent() would return at once. */
    int n = kevent(p->kq, p->changes, p->nchanges, p->events, cap - count, tsp);
    if (n < 0) {
        /* Keep the changes: applying them again is harmless (EV_ADD modifies, a repeated
         * EV_DELETE answers ENOENT). */
        return -1;
    }
    p->nchanges = 0;
    for (int i = 0; i < n; i++) {
        struct kevent *e = &p->events[i];
        /* Test EV_ERROR as a bit: macOS returns it OR-ed with the change's own flags.  Such
         * an entry answers a failed change; it is never readiness. */
        if (e->flags & EV_ERROR) {
            if (is_gone(e->data)) continue;
            out[count].fd = (int)e->ident;
            out[count].mask = KQ_ERROR;
            out[count].err = (int)e->data;
            count++;
            continue;
        }
        if (e->filter == EVFILT_USER) {
            /* EV_CLEAR consumed the trigger; a wake() before this store is covered by the
             * loop's check for work after the wait (see poller_epoll.c). */
            __atomic_store_n(&p->woken, 0, __ATOMIC_SEQ_CST);
            continue;
        }
        int mask = e->filter == EVFILT_WRITE ? KQ_WRITABLE : KQ_READABLE;
        int err = 0;
        /* EV_EOF on a read filter may come with bytes still buffered ("data"): the loop
         * reads to the end first.  On a write filter EV_EOF also follows our own
         * shutdown(SHUT_WR), so it is no hang-up by itself.  Either way the socket error, if
         * any, is in fflags (not data), and it must be passed on: libkqueue fetches it with
         * SO_ERROR, which clears it, so a failed connect() would look like a success. */
        if (e->flags & EV_EOF) {
            if (e->filter == EVFILT_READ) mask |= KQ_HANGUP;
            err = (int)e->fflags;
        }
        out[count].fd = (int)e->ident;
        out[count].mask = mask;
        out[count].err = err;
        count++;
    }
    return count;
}

int kq_poller_wake(kq_poller *p) {
    if (__atomic_exchange_n(&p->woken, 1, __ATOMIC_ACQ_REL)) return 0;
    struct kevent trigger;
    EV_SET(&trigger, WAKE_IDENT, EVFILT_USER, 0, NOTE_TRIGGER, 0, NULL);
    return kevent(p->kq, &trigger, 1, NULL, 0, NULL) < 0 ? -1 : 0;
}

void kq_poller_free(kq_poller *p) {
    if (p == NULL) return;
    /* In a forked child the number no longer names our kqueue and may name someone else's
     * file by now (CPython #110395): leave it alone. */
    if (p->kq >= 0 && getpid() == p->owner) close(p->kq);
    free(p);
}
