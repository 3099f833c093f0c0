/*
 * Registry entries removed when a terminating signal kills the process.
 *
 * A listener's registry entry is a file; Python's exit handlers remove the
 * entries of listeners still open, but SIGTERM or SIGHUP with their
 * default action end the process without them.  Where the program leaves
 * those signals at their default, a handler installed here (in C, so it
 * runs whatever the interpreter is doing, even inside a long C call)
 * unlinks the entries this process bound and then dies of the signal as it
 * would have.  Only unlink(), getpid(), sigaction() and raise() run in the
 * handler: all async-signal-safe.  A program that installs its own handler
 * (signal.signal) replaces this one; its exit then runs Python's handlers.
 */
#ifndef SHRIMPIO_FASTPATH_EXIT_H
#define SHRIMPIO_FASTPATH_EXIT_H

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SHR_EXIT_MAX 256
#define SHR_EXIT_PATH 128

typedef struct {
    volatile sig_atomic_t used;
    pid_t owner;                 /* the process that bound it: only it unlinks */
    char path[SHR_EXIT_PATH];
} shr_exit_entry;

static shr_exit_entry shr_exit_entries[SHR_EXIT_MAX];
static volatile sig_atomic_t shr_exit_installed[65];

static void shr_exit_handler(int sig) {
    int i;
    pid_t me = getpid();
    struct sigaction dfl;
    for (i = 0; i < SHR_EXIT_MAX; i++)
        if (shr_exit_entries[i].used && shr_exit_entries[i].owner == me)
            unlink(shr_exit_entries[i].path);
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig);                  /* blocked while we run: delivered on return */
}

/* Install the handler for `sig` if its action is the default one. */
static int shr_exit_hook(int sig) {
    struct sigaction old, act;
    if (sig <= 0 || sig > 64) return -1;
    if (shr_exit_installed[sig]) return 0;
    if (sigaction(sig, NULL, &old) != 0) return -1;
    if (old.sa_handler != SIG_DFL || (old.sa_flags & SA_SIGINFO)) return 0;
    memset(&act, 0, sizeof act);
    act.sa_handler = shr_exit_handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESETHAND;
    if (sigaction(sig, &act, NULL) != 0) return -1;
    shr_exit_installed[sig] = 1;
    return 0;
}

/* Remember `path` (bound by this process); -1 if it does not fit. */
static int shr_exit_add(const char *path, size_t n) {
    int i;
    if (n >= SHR_EXIT_PATH) return -1;
    for (i = 0; i < SHR_EXIT_MAX; i++) {
        if (!shr_exit_entries[i].used) {
            memcpy(shr_exit_entries[i].path, path, n);
            shr_exit_entries[i].path[n] = 0;
            shr_exit_entries[i].owner = getpid();
            shr_exit_entries[i].used = 1;     /* last: the handler never sees half an entry */
            return 0;
        }
    }
    return -1;
}

static void shr_exit_remove(const char *path) {
    int i;
    for (i = 0; i < SHR_EXIT_MAX; i++)
        if (shr_exit_entries[i].used && strcmp(shr_exit_entries[i].path, path) == 0)
            shr_exit_entries[i].used = 0;
}

#endif
