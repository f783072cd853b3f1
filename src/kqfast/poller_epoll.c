/* epoll backend (Linux).  Included by poller.c only. */
#include "poller.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define EPOLL_BATCH 256

struct kq_poller {
    int epfd;
    int wakefd;          /* eventfd: a cross-thread wake is a write to it */
    volatile int woken;  /* coalesces wake-ups: only the 0 -> 1 transition writes */
    struct epoll_event events[EPOLL_BATCH];
};

const char kq_poller_backend[] = "epoll";

kq_poller *kq_poller_create(void) {
    kq_poller *p = calloc(1, sizeof(*p));
    if (p == NULL) return NULL;
    p->wakefd = -1;
    /* CLOEXEC: a forked-and-exec'd child must not keep our interest list alive. */
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = p->wakefd};
    if (p->epfd < 0 || p->wakefd < 0 || epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->wakefd, &ev) < 0) {
        int saved = errno;
        kq_poller_free(p);
        errno = saved;
        return NULL;
    }
    return p;
}

int kq_poller_set(kq_poller *p, int fd, int old_mask, int new_mask) {
    struct epoll_event ev = {0};
    ev.data.fd = fd;
    /* EPOLLRDHUP reports the peer's FIN together with any data still buffered: the loop
     * reads to the end before it acts on the hang-up. */
    if (new_mask & KQ_READABLE) ev.events |= EPOLLIN | EPOLLRDHUP;
    if (new_mask & KQ_WRITABLE) ev.events |= EPOLLOUT;
    if (new_mask == 0) {
        /* Deregister before close: if the file description lives on in a dup() or a forked
         * child, epoll would keep reporting it under this fd number. */
        if (epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, &ev) < 0 && errno != ENOENT && errno != EBADF)
            return -1;
        return 0;
    }
    return epoll_ctl(p->epfd, old_mask ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev);
}

int kq_poller_wait(kq_poller *p, kq_event *out, int cap, int timeout_ms) {
    if (cap > EPOLL_BATCH) cap = EPOLL_BATCH;
    int n = epoll_wait(p->epfd, p->events, cap, timeout_ms);
    if (n < 0) return -1;
    int count = 0;
    for (int i = 0; i < n; i++) {
        struct epoll_event *e = &p->events[i];
        if (e->data.fd == p->wakefd) {
            uint64_t drained;
            while (read(p->wakefd, &drained, sizeof(drained)) > 0) {}
            /* Clear only after draining: a wake() in between sees the flag still set and
             * skips its write, which is fine because the loop checks for work after this
             * wait.  Cleared before draining, the flag could stay set over an empty eventfd
             * and every later wake() would be skipped. */
            __atomic_store_n(&p->woken, 0, __ATOMIC_SEQ_CST);
            continue;
        }
        int mask = 0;
        if (e->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) mask |= KQ_READABLE;
        if (e->events & EPOLLOUT) mask |= KQ_WRITABLE;
        if (e->events & (EPOLLRDHUP | EPOLLHUP)) mask |= KQ_HANGUP;
        /* EPOLLERR: the socket error is fetched by the read or write that follows. */
        if (e->events & EPOLLERR) mask |= KQ_WRITABLE;
        out[count].fd = e->data.fd;
        out[count].mask = mask;
        out[count].err = 0;
        count++;
    }
    return count;
}

int kq_poller_wake(kq_poller *p) {
    if (__atomic_exchange_n(&p->woken, 1, __ATOMIC_ACQ_REL)) return 0;
    uint64_t one = 1;
    return write(p->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN ? -1 : 0;
}

void kq_poller_free(kq_poller *p) {
    if (p == NULL) return;
    if (p->wakefd >= 0) close(p->wakefd);
    if (p->epfd >= 0) close(p->epfd);
    free(p);
}
