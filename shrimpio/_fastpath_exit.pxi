# Included by _fastpath.pyx: registry entries unlinked when SIGTERM or SIGHUP
# (left at their default action) kill the process (_fastpath_exit.h says how).

cdef extern from "_fastpath_exit.h" nogil:
    int shr_exit_hook(int sig)
    int shr_exit_add(const char *path, size_t n)
    void shr_exit_remove(const char *path)


def exit_unlink_add(bytes path):
    """Unlink ``path`` if a terminating signal left at its default action
    (SIGTERM, SIGHUP) kills this process; the handlers are installed on the
    first call.  False if the path could not be remembered."""
    import signal as _signal
    for sig in (_signal.SIGTERM, _signal.SIGHUP):
        shr_exit_hook(sig)
    return shr_exit_add(path, len(path)) == 0


def exit_unlink_remove(bytes path):
    """Forget ``path`` (its entry was removed)."""
    shr_exit_remove(path)
