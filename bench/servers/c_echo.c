/* The practical limit: a minimal raw echo server in C on epoll, level-triggered like kqfast.
 * One read buffer; bytes the socket does not take wait per fd, and reading pauses meanwhile.
 * Usage: c_echo [PORT]; prints kqfast-echo's ready line (port 0 picks a free port). */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 65536
static char *unsent[MAX_FD];
static size_t unsent_len[MAX_FD];

static void watch(int ep, int op, int fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, op, fd, &ev);
}

int main(int argc, char **argv) {
    static char buf[65536];
    struct epoll_event events[256];
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                             .sin_port = htons(argc > 1 ? atoi(argv[1]) : 0)};
    socklen_t len = sizeof(sa);
    int one = 1, lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), ep = epoll_create1(0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *)&sa, len) < 0 || listen(lfd, 1024) < 0) {
        perror("c_echo");
        return 1;
    }
    getsockname(lfd, (struct sockaddr *)&sa, &len);
    fprintf(stderr, "c_echo: listening on 127.0.0.1:%d\n", ntohs(sa.sin_port));
    watch(ep, EPOLL_CTL_ADD, lfd, EPOLLIN);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd, c;
            ssize_t got, put;
            if (fd == lfd) {
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAX_FD) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    watch(ep, EPOLL_CTL_ADD, c, EPOLLIN);
                }
                continue;
            }
            if (unsent_len[fd]) {  /* writable again: flush what waits */
                put = send(fd, unsent[fd], unsent_len[fd], MSG_NOSIGNAL);
                if (put < 0 && errno != EAGAIN) goto drop;
                if (put > 0) memmove(unsent[fd], unsent[fd] + put, unsent_len[fd] -= put);
                if (!unsent_len[fd]) watch(ep, EPOLL_CTL_MOD, fd, EPOLLIN);
                continue;
            }
            got = recv(fd, buf, sizeof(buf), 0);
            if (got < 0 && errno == EAGAIN) continue;
            if (got <= 0) goto drop;
            put = send(fd, buf, got, MSG_NOSIGNAL);
            if (put < 0 && errno != EAGAIN) goto drop;
            if (put < 0) put = 0;
            if (put < got) {
                unsent[fd] = realloc(unsent[fd], got - put);
                memcpy(unsent[fd], buf + put, unsent_len[fd] = got - put);
                watch(ep, EPOLL_CTL_MOD, fd, EPOLLOUT);
            }
            continue;
        drop:
            unsent_len[fd] = 0;
            close(fd);
        }
    }
}
