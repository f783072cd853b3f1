/* The poller: the only code that knows which kernel readiness API this build calls.
 *
 * One backend file per kernel API (poller_kqueue.c, poller_epoll.c) implements these few
 * functions; poller.c includes exactly one of them, chosen by the preprocessor, and is
 * compiled into the caller's own translation unit (sys.pxd includes it), so the loop's hot
 * path inlines the backend: it decodes the kernel's events where the kernel wrote them.
 * Readiness is level-triggered, per fd, merged into a mask. */
#ifndef KQFAST_POLLER_H
#define KQFAST_POLLER_H

#define KQ_READABLE 1
#define KQ_WRITABLE 2
#define KQ_HANGUP 4 /* peer finished sending (EV_EOF, EPOLLRDHUP/HUP): data may still be buffered */
#define KQ_ERROR 8  /* the kernel refused a change for this fd or reports a socket error in err */

typedef struct kq_event {
    int fd;   /* -1: an entry that is not the caller's (a wake-up, a filter already gone) */
    int mask;
    int err;  /* errno for KQ_ERROR, or the socket error a kqueue EV_EOF carried; else 0 */
} kq_event;

typedef struct kq_poller kq_poller;

/* Returns NULL with errno set. */
kq_poller *kq_poller_create(void);
/* Moves fd's interest from old_mask to new_mask (KQ_READABLE|KQ_WRITABLE).  Leaving 0 removes
 * the fd at once, so it may be closed right after.  An add (old_mask 0) of an fd that is not
 * open fails at once.  Other changes may be queued until the next wait, which applies them
 * first (changes to one fd in one iteration cost one system call, or none) and reports one
 * the kernel refuses as a KQ_ERROR event for its fd.  Returns 0, or -1 with errno set. */
int kq_poller_set(kq_poller *p, int fd, int old_mask, int new_mask);
/* kq_poller_set(p, fd, 0, mask) for an fd the caller has just created (accept, socket) and
 * so knows to be open: a backend that queues adds does not check it first. */
int kq_poller_add(kq_poller *p, int fd, int mask);
/* The wait, in two parts that each backend defines inline, so that they compile into the
 * loop: no call, and no copy between the kernel's events and the loop.
 *
 * kq_poller_poll applies the queued changes, waits up to timeout_ms (-1: forever) and keeps
 * at most cap of the kernel's events in the poller.  Returns their count (0 on timeout), or
 * -1 with errno set; EINTR is benign: no event was lost.  Refused changes are events of
 * their own; a backend that finds them before the kernel does returns them without waiting.
 * kq_poller_event decodes the i-th event (0 <= i < that count), valid until the next
 * poll; a wake-up's is not the caller's (fd -1). */
static inline int kq_poller_poll(kq_poller *p, int cap, int timeout_ms);
static inline kq_event kq_poller_event(const kq_poller *p, int i);
/* kq_poller_poll, then the caller's events (fd >= 0) copied into out; returns their count. */
int kq_poller_wait(kq_poller *p, kq_event *out, int cap, int timeout_ms);
/* Wakes a wait from any thread; wake-ups coalesce until the loop has seen one: it calls
 * kq_poller_wake_seen for each event that is not its own (a wake-up or not) before it
 * looks for the work a wake-up announces.  (Not after every wait: a wake of the loop's own
 * events costs nothing for wake-ups.) */
int kq_poller_wake(kq_poller *p);
void kq_poller_wake_seen(kq_poller *p);
/* The poller's one timer: it ends a wait (with an event that is not the caller's) once
 * CLOCK_MONOTONIC reaches deadline (seconds, as kq_monotonic() reads them), so a loop with a
 * deadline can wait without a timeout of its own.  Each call replaces the last; INFINITY
 * disarms it; it fires once.  The loop's thread only.  Returns 0, or -1 with errno set. */
int kq_poller_set_timer(kq_poller *p, double deadline);
void kq_poller_free(kq_poller *p);
/* In a forked child: the poller lets go of the kernel state it shares with the parent (an
 * epoll instance is shared; a kqueue is not inherited at all), so that nothing the child
 * does reaches it.  Every call after this fails with EBADF; free() is still owed. */
void kq_poller_disown(kq_poller *p);
/* "kqueue" or "epoll": what this build really calls. */
extern const char kq_poller_backend[];

#endif
