"""Nothing a pipeline run started outlives it: a watcher process ends them when the run's process dies.

`lmline run` starts child processes that would otherwise survive a kill -9 of it: Prefect's temporary
API server, `dvc repro` (holding DVC's repo lock) and the `lmline stage` that DVC runs. Killing them
by process group or tree is not possible once their parent is gone (they are re-parented), so
`watch_children()` marks this process's environment with a token that every process it starts
inherits, and starts a small watcher (`python -m lmline.guard PID TOKEN`). Linux's PR_SET_PDEATHSIG
signals the watcher when PID dies, however it dies (a SIGKILL cannot be caught by PID itself); the
watcher then SIGTERMs every process whose environment carries the token, and SIGKILLs those still
there after GRACE_S. DVC's locks die with their holders (.dvc/tmp/lock is an fcntl lock; rwlock
entries of dead pids are dropped), so the next run in the workspace needs no manual clean-up.
Kept free of heavy imports (the watcher starts before the flow does) and of lmline's own modules: the
stage shell and the flows alike use it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import uuid

import psutil

TOKEN_ENV = "LMLINE_RUN_TOKEN"  # inherited by every process a watched run starts
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_DIED = signal.SIGUSR1  # what the kernel sends the watcher when its parent ends
GRACE_S = 5.0  # from SIGTERM to SIGKILL for the processes left behind


def watch_children() -> bool:
    """Make every process this one starts from now on die with it (Linux). Idempotent within a
    process. A token inherited from an ancestor's run is replaced: that watcher ends this process
    (started with its token), this one's watcher then ends what this process started. Returns
    whether a watcher runs."""
    if os.environ.get(TOKEN_ENV, "").startswith(f"{os.getpid()}:"):
        return True
    if not sys.platform.startswith("linux"):
        return False  # PR_SET_PDEATHSIG is Linux's
    token = f"{os.getpid()}:{uuid.uuid4().hex}"
    # Its own session: a Ctrl-C in the terminal is for the run, not for the watcher.
    subprocess.Popen(
        [sys.executable, "-m", "lmline.guard", str(os.getpid()), token],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    os.environ[TOKEN_ENV] = token
    return True


def marked(token: str) -> list:
    """This user's processes (the watcher aside) started with `token` in their environment."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(TOKEN_ENV) == token:
                found.append(process)
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    return found


def end_marked(token: str, grace_s: float = GRACE_S) -> None:
    left = marked(token)
    for process in left:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for process in alive + marked(token):  # and any started while the first ones were stopping
        try:
            process.kill()
        except psutil.Error:
            pass


def die_with_parent(sig: int, parent: int | None = None) -> None:
    """Have Linux send this process `sig` when its parent ends. With `parent` (the pid it was started
    by): a parent that ended before prctl took effect sends nothing, so exit now, as the signal would."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if parent is not None and os.getppid() != parent:
        os._exit(0)


def main(argv: list[str]) -> int:
    parent, token = int(argv[0]), argv[1]
    signal.pthread_sigmask(signal.SIG_BLOCK, {PARENT_DIED})
    die_with_parent(PARENT_DIED)
    # Wait until the parent is gone: the kernel also signals when only the parent's thread that
    # started the watcher ends, while the process lives on; then the parent pid is unchanged.
    while os.getppid() == parent:
        signal.sigtimedwait({PARENT_DIED}, 5.0)  # the timeout: a parent that died before prctl
    end_marked(token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
