/* The poller: the only code that knows which kernel readiness API this build calls.
 *
 * One backend file per kernel API (poller_kqueue.c, poller_epoll.c) implements these few
 * functions; poller.c includes exactly one of them, chosen by the preprocessor.  The loop
 * above sees level-triggered readiness per fd, merged into a mask. */
#ifndef KQFAST_POLLER_H
#define KQFAST_POLLER_H

#define KQ_READABLE 1
#define KQ_WRITABLE 2
#define KQ_HANGUP 4 /* peer finished sending (EV_EOF, EPOLLRDHUP/HUP): data may still be buffered */
#define KQ_ERROR 8  /* the kernel refused a change for this fd or reports a socket error in err */

typedef struct kq_event {
    int fd;
    int mask;
    int err; /* errno for KQ_ERROR, else 0 */
} kq_event;

typedef struct kq_poller kq_poller;

/* Returns NULL with errno set. */
kq_poller *kq_poller_create(void);
/* Moves fd's interest from old_mask to new_mask (KQ_READABLE|KQ_WRITABLE). Leaving 0 removes
 * the fd at once, so it may be closed right after.  Returns 0, or -1 with errno set. */
int kq_poller_set(kq_poller *p, int fd, int old_mask, int new_mask);
/* Waits up to timeout_ms (-1: forever) and fills at most cap events.  Returns the count (0 on
 * timeout or wake-up), or -1 with errno set; EINTR is benign: no event was lost. */
int kq_poller_wait(kq_poller *p, kq_event *out, int cap, int timeout_ms);
/* Wakes a wait from any thread; wake-ups that arrive before the wait drains them coalesce. */
int kq_poller_wake(kq_poller *p);
void kq_poller_free(kq_poller *p);
/* "kqueue" or "epoll": what this build really calls. */
extern const char kq_poller_backend[];

#endif
