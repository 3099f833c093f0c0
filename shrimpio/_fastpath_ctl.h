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
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <stdio.h>
#include <unistd.h>

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

/* A SOCK_SEQPACKET socket connected to the Unix socket at path[0..len):
 * its fd (close-on-exec), or -errno.  A Unix connect() waits only while
 * the listener's backlog is full: timeout_us < 0 waits as long as that
 * takes, 0 not at all (-EAGAIN), more that many microseconds (through
 * SO_SNDTIMEO, which connect() honours, reset afterwards).  -EINTR: a
 * signal came; the caller handles it and may dial again.  `nonblock`:
 * NULL, or where to say that the fd is left non-blocking (the caller then
 * makes it blocking itself, after what it wants done at once). */
static inline int shr_dial_unix(const char *path, size_t len, long long timeout_us,
                                int *nonblock) {
    struct sockaddr_un sa;
    int fd, err = 0;
    if (nonblock)
        *nonblock = 0;
    if (len == 0 || len >= sizeof sa.sun_path)
        return -ENAMETOOLONG;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, len);
    /* A Unix connect blocks only while the listener's backlog is full:
     * try without waiting first, and only if that says EAGAIN (full) do it
     * again with the timeout as SO_SNDTIMEO (two more system calls). */
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | (timeout_us >= 0 ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        return -errno;
    if (timeout_us > 0) {
        if (connect(fd, (struct sockaddr *)&sa, offsetof(struct sockaddr_un, sun_path) + len) == 0) {
            int off = 0;
            if (nonblock) {                         /* the caller makes it blocking */
                *nonblock = 1;
                return fd;
            }
            if (ioctl(fd, FIONBIO, &off) != 0) {    /* blocking, as the slow way leaves it */
                err = errno;
                close(fd);
                return -err;
            }
            return fd;
        }
        err = errno;
        close(fd);
        if (err != EAGAIN && err != EWOULDBLOCK)
            return -err;
        err = 0;
        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -errno;
    }
    if (timeout_us > 0) {
        struct timeval tv = {(time_t)(timeout_us / 1000000), (suseconds_t)(timeout_us % 1000000)};
        if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0)
            err = errno;
    }
    if (!err && connect(fd, (struct sockaddr *)&sa, offsetof(struct sockaddr_un, sun_path) + len) != 0)
        err = errno;
    if (!err && timeout_us > 0) {
        struct timeval zero = {0, 0};
        if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &zero, sizeof zero) != 0)
            err = errno;
    }
    if (!err && timeout_us == 0 && nonblock)
        *nonblock = 1;
    else if (!err && timeout_us == 0) {
        int off = 0;
        if (ioctl(fd, FIONBIO, &off) != 0)
            err = errno;
    }
    if (err) {
        close(fd);
        return -err;
    }
    return fd;
}

/* The uid of the peer of a connected Unix socket (SO_PEERCRED), or -1
 * with errno. */
static inline long long shr_peer_uid(int sock) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
        return -1;
    if (len < sizeof cred) {
        errno = EPROTO;
        return -1;
    }
    return (long long)cred.uid;
}

/* Is fd a connected Unix SOCK_SEQPACKET socket?  (1 yes, 0 no or not a socket.) */
static inline int shr_is_unix_seqpacket(int fd) {
    int type = 0;
    struct sockaddr_un peer;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_SEQPACKET)
        return 0;
    /* Connected (so not listening either: a listening socket has no peer,
     * and one with a connection pending is readable for ever while every
     * recv on it fails), and a Unix socket: the peer's address says its
     * family (so no SO_DOMAIN call). */
    memset(&peer, 0, sizeof peer);
    len = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0)
        return 0;
    return len >= sizeof peer.sun_family && peer.sun_family == AF_UNIX;
}

/* Local ports of this user's shared-memory connections (docs/control-plane.md,
 * "Local ports").  A connection's port is reserved by binding the user's
 * socket, but the kernel forgets it once that fd becomes the control socket:
 * the next bind may be given it again, and two live connections would show
 * the same address.  So each port a connection uses is also *claimed*: a bit
 * in this process's map (for our own connections) and an open-file-
 * description lock on byte `port` of the ports file of the registry (for
 * other processes' ones; the kernel drops a dead process's locks, so nothing
 * goes stale).  `lockfd < 0`: no ports file, this process's map only. */
#ifndef F_OFD_SETLK
#define F_OFD_SETLK 37
#endif

typedef union {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} shr_inet_addr;

static uint64_t shr_ports_mine[65536 / 64];
static int shr_ports_fd = -1;

static int shr_port_lock(int lockfd, int port, short type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = port;
    fl.l_len = 1;
    return fcntl(lockfd, F_OFD_SETLK, &fl);
}

/* Claim `port`: 1 ours now, 0 another connection has it, -1 (errno) the
 * ports file failed (the port is not claimed).  `locked`: in the ports file
 * too, else in this process's map only. */
static inline int shr_port_take(int port, int locked) {
    uint64_t bit = 1ULL << (port & 63);
    int lockfd;
    if (port <= 0 || port > 65535)
        return 0;
    lockfd = locked ? __atomic_load_n(&shr_ports_fd, __ATOMIC_ACQUIRE) : -1;
    if (__atomic_fetch_or(&shr_ports_mine[port >> 6], bit, __ATOMIC_ACQ_REL) & bit)
        return 0;
    if (lockfd >= 0 && shr_port_lock(lockfd, port, F_WRLCK) != 0) {
        int err = errno;
        __atomic_fetch_and(&shr_ports_mine[port >> 6], ~bit, __ATOMIC_ACQ_REL);
        if (err == EAGAIN || err == EACCES)
            return 0;
        errno = err;
        return -1;
    }
    return 1;
}

/* Give back a port shr_port_take gave us (unlocking a byte this process
 * does not hold, after a claim in its map only, does nothing). */
static inline void shr_port_give(int port) {
    int lockfd = __atomic_load_n(&shr_ports_fd, __ATOMIC_ACQUIRE);
    if (port <= 0 || port > 65535)
        return;
    if (lockfd >= 0)
        shr_port_lock(lockfd, port, F_UNLCK);
    __atomic_fetch_and(&shr_ports_mine[port >> 6], ~(1ULL << (port & 63)), __ATOMIC_ACQ_REL);
}

/* How many ports the kernel may offer before we give up looking (only a
 * peer that holds every port's lock, or a range nearly all in use, gets
 * there). */
#define SHR_PORT_TRIES 16

/* `want`'s port is claimed by another connection: bind spare sockets to
 * `want` (port 0) until the kernel offers one nobody claimed; each stays
 * bound until then, so that it is not offered twice.  Returns the port
 * claimed, or 0. */
static int shr_port_other(const struct sockaddr *want, socklen_t len, int locked) {
    int spare[SHR_PORT_TRIES];
    int n = 0, found = 0;
    shr_inet_addr got;
    while (n < SHR_PORT_TRIES && !found) {
        socklen_t glen = sizeof got;
        int s = socket(want->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0)
            break;
        spare[n++] = s;
        if (bind(s, want, len) != 0 || getsockname(s, &got.sa, &glen) != 0)
            break;
        int p = ntohs(want->sa_family == AF_INET ? got.v4.sin_port : got.v6.sin6_port);
        if (shr_port_take(p, locked) == 1)
            found = p;
    }
    while (n > 0)
        close(spare[--n]);
    return found;
}

/* Claim `port`, which a socket of ours has bound at `want`'s address; if
 * another connection has it and `other`, claim one the kernel offers
 * instead.  Where the ports file refuses them all (a peer holds every lock,
 * or the file fails), the claim is made in this process's map alone: our
 * own connections at least never share a port.  1: *out is the port
 * claimed; 0: none claimed (*out = port). */
static inline int shr_claim_bound(int port, const struct sockaddr *want, socklen_t len, int *out,
                                  int other) {
    int locked, got;
    *out = port;
    for (locked = 1; locked >= 0; locked--) {
        got = shr_port_take(port, locked);
        if (got == 1)
            return 1;
        if (got == 0 && other) {
            got = shr_port_other(want, len, locked);
            if (got > 0) {
                *out = got;
                return 1;
            }
        }
    }
    return 0;
}

/* `*want` = (ip, 0), `ip` being `iplen` packed bytes of `family` (4 for
 * AF_INET, 16 for AF_INET6): its length, or 0 if `ip` is not of `family`. */
static inline socklen_t shr_inet_any_port(shr_inet_addr *want, int family, const char *ip,
                                          size_t iplen) {
    memset(want, 0, sizeof *want);
    if (family == AF_INET && iplen == 4) {
        want->v4.sin_family = AF_INET;
        memcpy(&want->v4.sin_addr, ip, 4);
        return sizeof want->v4;
    }
    if (family == AF_INET6 && iplen == 16) {
        want->v6.sin6_family = AF_INET6;
        memcpy(&want->v6.sin6_addr, ip, 16);
        return sizeof want->v6;
    }
    return 0;
}

/* shr_claim_bound for a packed address `ip` of `family`; -2: not one. */
static inline int shr_claim_ip(int family, const char *ip, size_t iplen, int port, int *out,
                               int other) {
    shr_inet_addr want;
    socklen_t len = shr_inet_any_port(&want, family, ip, iplen);
    *out = port;
    if (len == 0)
        return -2;
    return shr_claim_bound(port, &want.sa, len, out, other);
}

/* Claim ports by locks on `fd` from now on; returns the fd used before. */
static inline int shr_ports_use(int fd) {
    return __atomic_exchange_n(&shr_ports_fd, fd, __ATOMIC_ACQ_REL);
}

/* The client's local address for a stream hello: bind the user's TCP
 * socket `user` to (ip, 0) (see shr_inet_any_port), read back its port
 * and claim it (see above).  Returns 1 (bound: *port is the port the peer
 * is told, *claimed whether it is ours), 0 (the socket was bound already,
 * or elsewhere, or `ip` is not of `family`: the caller takes the general
 * way), -1 errno. */
static inline int shr_bind_local(int user, int family, const char *ip, size_t iplen, int *port,
                                 int *claimed) {
    shr_inet_addr want, got;
    socklen_t len = shr_inet_any_port(&want, family, ip, iplen), glen = sizeof got;
    *port = 0;
    *claimed = 0;
    if (len == 0)
        return 0;
    if (bind(user, &want.sa, len) != 0)
        return errno == EINVAL ? 0 : -1;      /* EINVAL: bound behind our back */
    if (getsockname(user, &got.sa, &glen) != 0)
        return -1;
    if (family == AF_INET) {
        if (glen < sizeof got.v4 || memcmp(&got.v4.sin_addr, ip, 4) != 0)
            return 0;
        *port = ntohs(got.v4.sin_port);
    } else {
        if (glen < sizeof got.v6 || memcmp(&got.v6.sin6_addr, ip, 16) != 0
                || got.v6.sin6_scope_id != 0)
            return 0;
        *port = ntohs(got.v6.sin6_port);
    }
    *claimed = shr_claim_bound(*port, &want.sa, len, port, 1);
    return 1;
}

/* Send over `ctl` the stream hello pre[0..8) + length + head + port +
 * tail with the fds fds[0..2).  `pre` is the message header without its
 * length field (the caller knows the protocol; this only does the
 * arithmetic).  Returns 1 (sent), -1 errno. */
static inline int shr_send_hello(int ctl, const char *pre, const char *head, size_t headlen,
                                 const char *tail, size_t taillen, int port, const int *fds) {
    char msg[4096 + 64];
    char digits[8];
    size_t n, total;
    uint32_t be;
    n = (size_t)snprintf(digits, sizeof digits, "%d", port);
    total = 12 + headlen + n + taillen;
    if (total > sizeof msg) {
        errno = EMSGSIZE;
        return -1;
    }
    memcpy(msg, pre, 8);
    be = htonl((uint32_t)(total - 12));
    memcpy(msg + 8, &be, 4);
    memcpy(msg + 12, head, headlen);
    memcpy(msg + 12 + headlen, digits, n);
    memcpy(msg + 12 + headlen + n, tail, taillen);
    for (;;) {
        ssize_t r = shr_sendmsg_fds(ctl, msg, total, fds, 2);
        if (r >= 0)
            break;
        if (errno != EINTR)
            return -1;
    }
    return 1;
}

#endif
