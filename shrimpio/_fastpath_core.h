/*
 * shrimpio data plane, the part that must be C: the shared ring header with
 * C11 atomics, the doorbell system calls and the spin-then-sleep wait.
 *
 * Theory of operation
 * -------------------
 * A ring is a single-producer/single-consumer byte queue in shared memory.
 * The producer owns `head` (bytes ever written), the consumer owns `tail`
 * (bytes ever consumed); both only grow.  Each side keeps its own index in
 * private memory and only *stores* it to the shared header, so a peer that
 * scribbles over the header can never make us trust a wrong value of our own
 * index.  The peer's index is loaded, then validated (0 <= head - tail <= cap,
 * never going backwards) before use.
 *
 * Wake-ups follow the Dekker pattern with sequentially consistent operations:
 *
 *   producer:  head = h (seq_cst);  if xchg(reader_sleeping, 0): ring doorbell
 *   consumer:  reader_sleeping = 1 (seq_cst);  if head != tail: don't sleep
 *
 * One of the two always sees the other's store, so the consumer never sleeps
 * with data in the ring (no lost wake-up), and the producer only makes a
 * system call when the consumer is actually asleep (notification
 * suppression).  The same holds for space, with writer_sleeping.
 *
 * The doorbell is an fd: a Unix socket (one byte per ring, EOF = the peer is
 * gone) or an eventfd (8-byte counter, no liveness).  docs/data-plane.md says
 * why sockets are the default.
 */
#ifndef SHRIMPIO_FASTPATH_CORE_H
#define SHRIMPIO_FASTPATH_CORE_H

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SHR_RING_MAGIC 0x52524853u /* "SHRR" */
#define SHR_RING_VERSION 1u
#define SHR_RING_HEADER 256

typedef struct {
    /* line 0: written once by the creator */
    uint32_t magic;
    uint32_t version;
    uint64_t capacity;                /* version 2: the large area's */
    uint32_t small;                   /* version 2: the small area's capacity */
    char pad0[44];
    /* line 1: the producer's */
    _Atomic uint64_t head;
    _Atomic uint32_t write_shut;      /* producer will write no more */
    _Atomic uint32_t producer_cpu;    /* CPU of its last publish, + 1 (0: unknown) */
    /* version 2: the area the bytes from stream position `base` on are in
     * (0 small, 1 large), each at ((pos - base) & (its capacity - 1));
     * changed while the ring is empty, or from small to large ahead of
     * the consumer (see shr_store_chain), before the next head. */
    _Atomic uint64_t base;
    _Atomic uint32_t area;
    uint32_t pad1a;
    /* version 2, with area 1 from `base` on: the small area's bytes before
     * `base` are at ((pos - sbase) & (small - 1)) (see shr_store_chain). */
    _Atomic uint64_t sbase;
    char pad1[24];
    /* line 2: the consumer's */
    _Atomic uint64_t tail;
    _Atomic uint32_t consumer_cpu;    /* CPU of its last release, + 1 (0: unknown) */
    char pad2[52];
    /* line 3: flags written only on the way to sleep, to ring, or to shut,
     * so in the steady state both sides read them from their own cache and
     * publishing an index costs one line transfer. */
    _Atomic uint32_t reader_sleeping; /* set by consumer, cleared by producer */
    _Atomic uint32_t writer_sleeping; /* set by producer, cleared by consumer */
    _Atomic uint32_t read_shut;       /* consumer will read no more */
    char pad3[52];
} shr_ring_hdr;

_Static_assert(sizeof(shr_ring_hdr) == SHR_RING_HEADER, "ring header size");

static inline uint64_t shr_load_head(shr_ring_hdr *h) {
    return atomic_load_explicit(&h->head, memory_order_acquire);
}
static inline uint64_t shr_load_tail(shr_ring_hdr *h) {
    return atomic_load_explicit(&h->tail, memory_order_acquire);
}
static inline uint32_t shr_load_wshut(shr_ring_hdr *h) {
    return atomic_load_explicit(&h->write_shut, memory_order_acquire);
}
static inline uint32_t shr_load_rshut(shr_ring_hdr *h) {
    return atomic_load_explicit(&h->read_shut, memory_order_acquire);
}
/* An empty ring: version 1 (one area of `cap` bytes after the header), or,
 * with `small`, version 2 (a small area of `small` bytes after the header,
 * where it starts, and a large one of `cap` bytes elsewhere). */
static inline void shr_init(shr_ring_hdr *h, uint64_t cap, uint32_t small) {
    memset((void *)h, 0, sizeof(*h));
    h->capacity = cap;
    h->small = small;
    h->version = small ? 2u : SHR_RING_VERSION;
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = SHR_RING_MAGIC;
    atomic_thread_fence(memory_order_seq_cst);
}
/* A new connection's reader counts as asleep (see prepare_rings). */
static inline void shr_reader_asleep(shr_ring_hdr *h) {
    atomic_store_explicit(&h->reader_sleeping, 1, memory_order_seq_cst);
}
static inline int shr_header_ok(shr_ring_hdr *h, uint32_t small) {
    return h->magic == SHR_RING_MAGIC && h->version == (small ? 2u : SHR_RING_VERSION)
           && (!small || h->small == small);
}
static inline uint64_t shr_header_cap(shr_ring_hdr *h) { return h->capacity; }
static inline uint64_t shr_load_base(shr_ring_hdr *h) {
    return atomic_load_explicit(&h->base, memory_order_relaxed);
}
static inline uint32_t shr_load_area(shr_ring_hdr *h) {
    return atomic_load_explicit(&h->area, memory_order_acquire);
}
/* The producer, while the ring is empty: the next bytes go to `area` from
 * stream position `base` on (published by the next head, a seq_cst store). */
/* (area last, with release: a consumer that sees it sees base and sbase;
 * one that sees a new base with an old area reads it as a chain under way.) */
static inline void shr_store_area(shr_ring_hdr *h, uint32_t area, uint64_t base) {
    atomic_store_explicit(&h->sbase, base, memory_order_relaxed);
    atomic_store_explicit(&h->base, base, memory_order_relaxed);
    atomic_store_explicit(&h->area, area, memory_order_release);
}
/* The producer, in the small area (addressed from `sbase`) with bytes
 * unread: the bytes from stream position `base` on go to the large area. */
static inline void shr_store_chain(shr_ring_hdr *h, uint64_t base, uint64_t sbase) {
    atomic_store_explicit(&h->sbase, sbase, memory_order_relaxed);
    atomic_store_explicit(&h->base, base, memory_order_relaxed);
    atomic_store_explicit(&h->area, 1, memory_order_release);
}
static inline uint64_t shr_load_sbase(shr_ring_hdr *h) {
    return atomic_load_explicit(&h->sbase, memory_order_relaxed);
}

static inline void shr_set_wshut(shr_ring_hdr *h) {
    atomic_store_explicit(&h->write_shut, 1, memory_order_seq_cst);
}
static inline void shr_set_rshut(shr_ring_hdr *h) {
    atomic_store_explicit(&h->read_shut, 1, memory_order_seq_cst);
}
static inline void shr_release_fence(void) {
    atomic_thread_fence(memory_order_release);
}

static inline int64_t shr_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
/* Jiffy-resolution clock from the vDSO: cheap enough for every call. */
static inline int64_t shr_coarse_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void shr_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#else
    atomic_signal_fence(memory_order_seq_cst);
#endif
}

/* ---- doorbells ---------------------------------------------------------- */

#define SHR_BELL_SOCKET 0
#define SHR_BELL_EVENTFD 1

/* Ring: 0 sent (or already pending), -2 peer gone, -1 other error. */
static inline int shr_bell_ring(int fd, int kind) {
    if (fd < 0) return 0;
    for (;;) {
        ssize_t r;
        if (kind == SHR_BELL_SOCKET) {
            static const char one = 1;
            r = send(fd, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            uint64_t one = 1;
            r = write(fd, &one, sizeof one);
        }
        if (r >= 0) return 0;
        if (errno == EINTR) continue;
        /* A full socket buffer already holds a wake for the peer. */
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN) return -2;
        return -1;
    }
}

/* ---- a listener's refusal, kept for its client ---------------------------
 * A data doorbell carries one-byte rings.  The only longer datagram that
 * comes on one is a listener's refusal of a client whose hello it could not
 * take (out of fds: shrimpio/_accept.py), a control message ("SHRM"...) sent
 * just before it closes the client's control socket.  Whichever drain
 * swallows it (a ring wait, a poller, the loop) keeps it here, by fd, for
 * the client's socket layer, which asks (shr_refusal_take) when it finds its
 * peer gone: it then goes on by TCP instead of reading end of file.  Rare,
 * so a few slots and a spin lock suffice; the one-byte path never comes here. */
#define SHR_REFUSALS 256
#define SHR_REFUSAL_MAX 64
typedef struct { int fd; int len; char msg[SHR_REFUSAL_MAX]; } shr_refusal;
static shr_refusal shr_refusals[SHR_REFUSALS];
static atomic_flag shr_refusals_lock = ATOMIC_FLAG_INIT;
static unsigned shr_refusals_next;
static atomic_int shr_refusals_kept;   /* slots in use: 0 spares closers the lock */

static inline void shr_refusals_hold(void) {
    while (atomic_flag_test_and_set_explicit(&shr_refusals_lock, memory_order_acquire))
        sched_yield();
}

static inline void shr_refusals_release(void) {
    atomic_flag_clear_explicit(&shr_refusals_lock, memory_order_release);
}

static inline void shr_refusal_note(int fd, const char *buf, ssize_t n) {
    int i, slot = -1;
    if (n < 4 || memcmp(buf, "SHRM", 4) != 0) return;
    if (n > SHR_REFUSAL_MAX) n = SHR_REFUSAL_MAX;
    shr_refusals_hold();
    for (i = 0; i < SHR_REFUSALS; i++)
        if (shr_refusals[i].len > 0 && shr_refusals[i].fd == fd) slot = i;
    if (slot < 0) {
        slot = (int)(shr_refusals_next++ % SHR_REFUSALS);
        if (shr_refusals[slot].len == 0) atomic_fetch_add(&shr_refusals_kept, 1);
    }
    shr_refusals[slot].fd = fd;
    shr_refusals[slot].len = (int)n;
    memcpy(shr_refusals[slot].msg, buf, (size_t)n);
    shr_refusals_release();
}

/* The refusal kept for `fd` (copied to out, its length returned; 0: none),
 * forgotten once taken.  out holds SHR_REFUSAL_MAX bytes, or is NULL (a
 * connection closing forgets its own: the fd number will be reused). */
static inline int shr_refusal_take(int fd, char *out) {
    int i, n = 0;
    if (atomic_load_explicit(&shr_refusals_kept, memory_order_relaxed) == 0) return 0;
    shr_refusals_hold();
    for (i = 0; i < SHR_REFUSALS; i++)
        if (shr_refusals[i].len > 0 && shr_refusals[i].fd == fd) {
            n = shr_refusals[i].len;
            if (out != NULL) memcpy(out, shr_refusals[i].msg, (size_t)n);
            shr_refusals[i].len = 0;
            atomic_fetch_sub(&shr_refusals_kept, 1);
        }
    shr_refusals_release();
    return n;
}

/* Drain pending rings. 0 ok, -2 the peer is gone (EOF), -1 error (which
 * callers also take as the peer's death: see shr_wait_any_in).
 * Bounded: a peer flooding the doorbell must not keep us here (past our
 * deadline, deaf to signals); whatever is left just wakes the next ppoll(). */
static inline int shr_bell_drain(int fd, int kind) {
    char buf[256];
    int reads = 0;
    for (;;) {
        ssize_t r;
        if (kind == SHR_BELL_SOCKET)
            r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        else
            r = read(fd, buf, 8);
        if (r > 0) {
            if (r > 1 && kind == SHR_BELL_SOCKET) shr_refusal_note(fd, buf, r);
            if (kind != SHR_BELL_SOCKET || ++reads >= 16) return 0;
            continue;
        }
        if (r == 0) return -2;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno == ECONNRESET) return -2;
        return -1;
    }
}

/* Is the peer behind a socket doorbell gone?  One poll(0), no blocking. */
static inline int shr_bell_peer_gone(int fd) {
    struct pollfd p = {fd, POLLIN, 0};
    int r = poll(&p, 1, 0);
    if (r <= 0) return 0;
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL)) return 1;
    if (p.revents & POLLIN) {
        char c;
        ssize_t n = recv(fd, &c, 1, MSG_DONTWAIT | MSG_PEEK);
        if (n == 0) return 1;
        /* Any error but "nothing yet" is death too (see shr_bell_drain). */
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return 1;
    }
    return 0;
}

/* ---- waiting ------------------------------------------------------------ */

/* What a waiter waits for, on one ring.  `pos` is the waiter's own index. */
typedef struct {
    shr_ring_hdr *h;
    uint64_t pos;
    uint64_t need; /* bytes of room (writable) or of data (readable) */
    uint64_t cap;
    int writable;
} shr_cond;

static inline int shr_cond_ready(const shr_cond *c) {
    shr_ring_hdr *h = c->h;
    if (c->writable) {
        uint64_t used = c->pos - atomic_load_explicit(&h->tail, memory_order_acquire);
        /* Impossible values count as "ready": the caller validates and raises. */
        if (used > c->cap || c->cap - used >= c->need) return 1;
        return atomic_load_explicit(&h->read_shut, memory_order_relaxed) != 0;
    } else {
        uint64_t avail = atomic_load_explicit(&h->head, memory_order_acquire) - c->pos;
        if (avail >= c->need) return 1; /* includes impossible (huge) values */
        return atomic_load_explicit(&h->write_shut, memory_order_relaxed) != 0;
    }
}

static inline void shr_cond_arm(const shr_cond *c, uint32_t v) {
    if (c->writable)
        atomic_store_explicit(&c->h->writer_sleeping, v, memory_order_seq_cst);
    else
        atomic_store_explicit(&c->h->reader_sleeping, v, memory_order_seq_cst);
    /* Arming is the waiter's half of Dekker, and the re-check after it loads
     * with acquire, not seq_cst: a seq_cst store followed by an acquire load
     * of another location may be reordered (e.g. STLR then LDAPR on arm64).
     * The full fence orders store(flag) -> load(index). */
    if (v) atomic_thread_fence(memory_order_seq_cst);
}

/* Preemptions seen by this process's waiters: a thread whose wait on a ring
 * took longer than its spin budget looks (one getrusage) whether the
 * scheduler gave its CPU to another task since its last such wait.  If so,
 * its CPU is shared with busy tasks, and the waits' spins are bounded for a
 * while after (CONTENDED_NS, see _adapt_wait_spin). */
static _Atomic uint64_t shr_preempts;
static _Atomic int64_t shr_preempted_ns = INT64_MIN / 2;

static inline void shr_note_preempted(int64_t now) {
    atomic_fetch_add_explicit(&shr_preempts, 1, memory_order_relaxed);
    atomic_store_explicit(&shr_preempted_ns, now, memory_order_relaxed);
}
static inline void shr_forget_preempted(void) {
    atomic_store_explicit(&shr_preempted_ns, INT64_MIN / 2, memory_order_relaxed);
}
static inline uint64_t shr_preempt_count(void) {
    return atomic_load_explicit(&shr_preempts, memory_order_relaxed);
}
static inline int64_t shr_preempted_at(void) {
    return atomic_load_explicit(&shr_preempted_ns, memory_order_relaxed);
}
/* Involuntary context switches of the calling thread so far. */
static inline long shr_thread_nivcsw(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0) return 0;
    return ru.ru_nivcsw;
}

/* How many times a waiter of this process stopped sleeping on a ring (and
 * cleared its sleeping flag, maybe after draining the doorbell).  A patched
 * epoll keeps idle rings armed between its polls; when this count moved, a
 * flag it set may have been cleared, or a ring meant for it drained, and it
 * arms them all again (see _epoll.py). */
static _Atomic uint64_t shr_unarmed;

static inline void shr_note_unarmed(void) {
    atomic_fetch_add_explicit(&shr_unarmed, 1, memory_order_relaxed);
}
static inline uint64_t shr_unarmed_count(void) {
    return atomic_load_explicit(&shr_unarmed, memory_order_relaxed);
}

/* After publishing: wake the other side if (and only if) it sleeps. */
static inline int shr_wake_reader(shr_ring_hdr *h, int fd, int kind) {
    if (atomic_load_explicit(&h->reader_sleeping, memory_order_seq_cst) &&
        atomic_exchange_explicit(&h->reader_sleeping, 0, memory_order_seq_cst))
        return shr_bell_ring(fd, kind);
    return 0;
}
static inline int shr_wake_writer(shr_ring_hdr *h, int fd, int kind) {
    if (atomic_load_explicit(&h->writer_sleeping, memory_order_seq_cst) &&
        atomic_exchange_explicit(&h->writer_sleeping, 0, memory_order_seq_cst))
        return shr_bell_ring(fd, kind);
    return 0;
}
/* The CPU this thread runs on, plus one (0: unknown).  glibc reads it from
 * rseq: a load, no system call. */
static inline uint32_t shr_cpu_tag(void) {
    int c = sched_getcpu();
    return c < 0 ? 0u : (uint32_t)c + 1u;
}
/* Publishing an index also says where its writer runs (same cache line). */
static inline void shr_publish_head(shr_ring_hdr *h, uint64_t v) {
    atomic_store_explicit(&h->producer_cpu, shr_cpu_tag(), memory_order_relaxed);
    atomic_store_explicit(&h->head, v, memory_order_seq_cst);
}
static inline void shr_publish_tail(shr_ring_hdr *h, uint64_t v) {
    atomic_store_explicit(&h->consumer_cpu, shr_cpu_tag(), memory_order_relaxed);
    atomic_store_explicit(&h->tail, v, memory_order_seq_cst);
}
/* Was the peer that `writable` waits for (the consumer for room, the
 * producer for data) last seen on the CPU `me` (shr_cpu_tag) runs on?  Then
 * it is not running while we spin (asleep, or queued behind us): spinning
 * only delays it.  A hint from the peer, trusted for nothing else. */
static inline uint32_t shr_peer_cpu(shr_ring_hdr *h, int writable) {
    return atomic_load_explicit(writable ? &h->consumer_cpu : &h->producer_cpu,
                                memory_order_relaxed);
}
static inline int shr_peer_here(shr_ring_hdr *h, int writable, uint32_t me) {
    return me != 0 && shr_peer_cpu(h, writable) == me;
}

#define SHR_READY 1
#define SHR_TIMEOUT 0
#define SHR_ERROR -1
#define SHR_GONE -2
#define SHR_EINTR -3
#define SHR_LOCAL -4

/*
 * Wait until any of `conds` is ready.
 *   spin_ns:  spin budget (the GIL is released by the caller);
 *   timeout_ns: < 0 means no limit;
 *   bells[i], kinds[i]: doorbell fds to sleep on, one per cond (-1 = none);
 *   local_fd: an eventfd for wake-ups from this process (-1 = none).
 * Returns SHR_READY (with *which = index), SHR_TIMEOUT, SHR_GONE (*which =
 * the cond whose doorbell reported the peer gone and which is not ready),
 * SHR_LOCAL (local_fd fired), SHR_EINTR, or SHR_ERROR (errno set).
 * *spun is set to 1 if readiness was found while spinning.
 */
#define SHR_MAX_WAIT 64     /* conds waited on with no allocation */
static int shr_wait_any_in(const shr_cond *conds, int n, const int *bells, const int *kinds,
                           int local_fd, int64_t spin_ns, int64_t timeout_ns, int *which,
                           int *spun, struct pollfd *pfd, int *owner);

static int shr_wait_any(const shr_cond *conds, int n, const int *bells, const int *kinds,
                        int local_fd, int64_t spin_ns, int64_t timeout_ns, int *which,
                        int *spun) {
    struct pollfd pfd[SHR_MAX_WAIT + 1];
    int owner[SHR_MAX_WAIT + 1], rc;
    struct pollfd *hpfd;
    int *howner;
    if (n < 0) { errno = EINVAL; return SHR_ERROR; }
    if (n <= SHR_MAX_WAIT)
        return shr_wait_any_in(conds, n, bells, kinds, local_fd, spin_ns, timeout_ns, which,
                               spun, pfd, owner);
    /* More (an exporter with many importers): every doorbell is watched. */
    hpfd = (struct pollfd *)malloc(sizeof *hpfd * (size_t)(n + 1));
    howner = (int *)malloc(sizeof *howner * (size_t)(n + 1));
    if (hpfd == NULL || howner == NULL) {
        free(hpfd);
        free(howner);
        errno = ENOMEM;
        return SHR_ERROR;
    }
    rc = shr_wait_any_in(conds, n, bells, kinds, local_fd, spin_ns, timeout_ns, which, spun,
                         hpfd, howner);
    free(hpfd);
    free(howner);
    return rc;
}

/* shr_wait_any with room for n + 1 poll entries at pfd and owner. */
static int shr_wait_any_in(const shr_cond *conds, int n, const int *bells, const int *kinds,
                           int local_fd, int64_t spin_ns, int64_t timeout_ns, int *which,
                           int *spun, struct pollfd *pfd, int *owner) {
    int i;
    int64_t now = shr_now_ns();
    int64_t deadline = timeout_ns < 0 ? INT64_MAX : now + timeout_ns;
    *spun = 0;
    for (i = 0; i < n; i++)
        if (shr_cond_ready(&conds[i])) { *which = i; return SHR_READY; }

    /* Phase 1: spin.  Clock reads are amortised over 64 checks; at each, a
     * spin whose peers were all last seen on our own CPU stops (see
     * shr_peer_here: one thread waiting for another on the same core). */
    if (spin_ns > 0) {
        int64_t spin_end = now + spin_ns < deadline ? now + spin_ns : deadline;
        while (now < spin_end) {
            int k;
            uint32_t me = shr_cpu_tag();
            for (i = 0; i < n; i++)
                if (!shr_peer_here(conds[i].h, conds[i].writable, me)) break;
            if (i == n) break;
            for (k = 0; k < 64; k++) {
                for (i = 0; i < n; i++)
                    if (shr_cond_ready(&conds[i])) { *which = i; *spun = 1; return SHR_READY; }
                shr_cpu_relax();
            }
            now = shr_now_ns();
        }
    }

    /* Phase 2: arm, fence, re-check, sleep on the doorbells. */
    for (;;) {
        int np = 0, r, gone = -1;
        struct timespec ts, *tsp = NULL;

        for (i = 0; i < n; i++) shr_cond_arm(&conds[i], 1);   /* each with a full fence */
        for (i = 0; i < n; i++)
            if (shr_cond_ready(&conds[i])) {
                int j;
                for (j = 0; j < n; j++) shr_cond_arm(&conds[j], 0);
                shr_note_unarmed();
                *which = i;
                return SHR_READY;
            }
        for (i = 0; i < n; i++) {
            int dup = 0, j;
            if (bells[i] < 0) continue;
            for (j = 0; j < np; j++) if (pfd[j].fd == bells[i]) dup = 1;
            if (dup) continue;
            pfd[np].fd = bells[i]; pfd[np].events = POLLIN; pfd[np].revents = 0;
            owner[np++] = i;
        }
        if (local_fd >= 0) {
            pfd[np].fd = local_fd; pfd[np].events = POLLIN; pfd[np].revents = 0;
            owner[np++] = -1;
        }
        if (deadline != INT64_MAX) {
            int64_t left = deadline - shr_now_ns();
            if (left < 0) left = 0;
            ts.tv_sec = left / 1000000000LL;
            ts.tv_nsec = left % 1000000000LL;
            tsp = &ts;
        }
        r = ppoll(pfd, (nfds_t)np, tsp, NULL);
        for (i = 0; i < n; i++) shr_cond_arm(&conds[i], 0);
        shr_note_unarmed();
        if (r < 0) {
            if (errno == EINTR) return SHR_EINTR;
            return SHR_ERROR;
        }
        if (r == 0) {
            for (i = 0; i < n; i++)
                if (shr_cond_ready(&conds[i])) { *which = i; return SHR_READY; }
            return SHR_TIMEOUT;
        }
        for (i = 0; i < np; i++) {
            if (!pfd[i].revents) continue;
            if (pfd[i].revents & POLLNVAL) { errno = EBADF; return SHR_ERROR; }
            if (owner[i] < 0) {
                shr_bell_drain(pfd[i].fd, SHR_BELL_EVENTFD);
                return SHR_LOCAL;
            }
            r = shr_bell_drain(pfd[i].fd, kinds[owner[i]]);
            /* Any error on a doorbell (a reset, but also ENOTCONN, EINVAL...:
             * a socket the peer handed over that was never a doorbell) is
             * the peer's death: it can never ring again, and a doorbell that
             * is readable for ever must not make this wait return at once
             * for ever. */
            if (r != 0 || (pfd[i].revents & (POLLHUP | POLLERR))) gone = owner[i];
        }
        for (i = 0; i < n; i++)
            if (shr_cond_ready(&conds[i])) { *which = i; return SHR_READY; }
        if (gone >= 0) { *which = gone; return SHR_GONE; }
        /* A wake-up for nothing (a stale or flooded doorbell): the deadline
         * still holds, or a busy doorbell would keep us here for ever. */
        if (deadline != INT64_MAX && shr_now_ns() >= deadline) return SHR_TIMEOUT;
    }
}

#endif
