/*
 * System calls of the control plane's per-connection path, in C: passing fds
 * with SCM_RIGHTS.  Python's socket.sendmsg/recvmsg build and parse lists of
 * tuples of bytes for the ancillary data, which costs more than the system
 * call for a message sent once per connection.  No protocol knowledge here:
 * the caller builds and checks the bytes (shrimpio/_control.py).
 */
#ifndef SHRIMPIO_FASTPATH_CTL_H
#define SHRIMPIO_FASTPATH_CTL_H

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define SHR_CTL_MAX_FDS 16

/* One datagram with `nfds` fds (0..SHR_CTL_MAX_FDS); MSG_NOSIGNAL.
 * Returns the bytes sent, or -1 with errno. */
static inline ssize_t shr_sendmsg_fds(int sock, const char *buf, size_t len, const int *fds,
                                      int nfds) {
    union {
        char raw[CMSG_SPACE(SHR_CTL_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {(void *)buf, len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds < 0 || nfds > SHR_CTL_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    if (nfds > 0) {
        struct cmsghdr *c;
        memset(&control, 0, sizeof control);
        msg.msg_control = control.raw;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

/* One datagram into buf (at most len bytes), with room for `maxfds` fds
 * (at most SHR_CTL_MAX_FDS): the fds of every SCM_RIGHTS message go to
 * fds[0..*nfds) (the kernel closes those that did not fit and sets
 * MSG_CTRUNC).  Returns the bytes received, or -1 with errno. */
static inline ssize_t shr_recvmsg_fds(int sock, char *buf, size_t len, int *fds, int maxfds,
                                      int *nfds, int *msg_flags, int flags) {
    union {
        char raw[CMSG_SPACE(SHR_CTL_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {buf, len};
    struct msghdr msg;
    struct cmsghdr *c;
    ssize_t r;
    *nfds = 0;
    *msg_flags = 0;
    if (maxfds < 0 || maxfds > SHR_CTL_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.raw;
    msg.msg_controllen = CMSG_SPACE(maxfds * sizeof(int));
    r = recvmsg(sock, &msg, flags);
    if (r < 0)
        return -1;
    *msg_flags = msg.msg_flags;
    for (c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        size_t n, i;
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
            continue;
        n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (i = 0; i < n && *nfds < maxfds; i++)
            memcpy(&fds[(*nfds)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    return r;
}

#endif
