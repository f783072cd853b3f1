/* Picks the one poller backend this build compiles (Redis ae style).  setup.py defines
 * KQFAST_USE_KQUEUE or KQFAST_USE_EPOLL when KQFAST_BACKEND forces a choice; otherwise the
 * platform decides: kqueue on macOS and the BSDs, epoll on Linux. */
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
