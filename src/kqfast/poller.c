/* Picks the one poller backend this build compiles (Redis ae style).  setup.py defines
 * KQFAST_USE_KQUEUE or KQFAST_USE_EPOLL when KQFAST_BACKEND forces a choice; otherwise the
 * platform decides: kqueue on macOS and the BSDs, epoll on Linux.  This file is included
 * into the module that uses the poller (see poller.h), not compiled on its own. */
#if !defined(KQFAST_USE_KQUEUE) && !defined(KQFAST_USE_EPOLL)
#  if defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__) || \
      defined(__NetBSD__) || defined(__DragonFly__)
#    define KQFAST_USE_KQUEUE 1
#  elif defined(__linux__)
#    define KQFAST_USE_EPOLL 1
#  else
#    error "kqfast needs kqueue or epoll"
#  endif
#endif

#if defined(KQFAST_USE_KQUEUE)
#  include "poller_kqueue.c"
#else
#  include "poller_epoll.c"
#endif

/* What both backends share: the copying wait, for callers that keep their own event array. */
int kq_poller_wait(kq_poller *p, kq_event *out, int cap, int timeout_ms) {
    int n = kq_poller_poll(p, cap, timeout_ms), count = 0;
    for (int i = 0; i < n; i++) {
        kq_event ev = kq_poller_event(p, i);
        if (ev.fd >= 0)
            out[count++] = ev;
        else
            kq_poller_wake_seen(p);
    }
    return n < 0 ? -1 : count;
}
