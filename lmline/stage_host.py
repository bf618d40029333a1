"""A warm stage host: one process that imports the stages' libraries once, and forks each stage from it.

Every stage is a process of its own (`dvc repro` runs dvc.yaml's `lmline stage NAME`), and a new
interpreter spends seconds importing torch, transformers and MLflow before its stage can start: 18.4 s
of a default run, 4.3–5.2 s for each training stage (metrics' startup_seconds, one idle run).
`lmline run` starts this host beside the flow (flows/stage_task.py:warm_host); it imports those
modules, and DVC's, while the first stages run, one at a time between requests; once the data stages'
modules are in, it forks a second host, the training host, which goes on to torch and the training
stages' modules while the first forks every other request at once (Host.split). The flow starts
`dvc repro` through handing_command, and `lmline stage` (lmline/entry.py) finds $LMLINE_STAGE_HOST:
each hands its argv, working directory, environment and stdin/stdout/stderr (the descriptors
themselves, over the Unix socket) to the host, which forks a child that runs the command exactly as
that process would have, writing to the same pipe; the child answers with its exit status (the host,
for a child a signal ended), which the small process exits with. DVC still runs the stage, hashes its
outputs and writes dvc.lock; only the interpreters' start-up moves.

Fork safety: each host is one thread of Python and forks only between imports, never while one runs
(the native threads some libraries start at import, OpenBLAS's and pyarrow's jemalloc's, are theirs
to handle across a fork, as under multiprocessing's fork). It runs no torch op, so the child's
OpenMP pool starts fresh, as in a new process: tests/test_stage_host.py checks that the stages from
ingest to pretrain write the same bytes and metrics forked as in processes of their own. A child
ends the way a new process would (its atexit handlers, then exit), and dies with the host
(PR_SET_PDEATHSIG).

Nothing outlives the run: the host ends with the process that started it (PR_SET_PDEATHSIG), the
training host with the first host (which stops it, and whose death it is also told of), and each
stops a child's process group (SIGTERM, then SIGKILL) when the process that handed it over goes
away (DVC stopped, a Ctrl-C, a kill -9 of `lmline run` whose guard ends it), as
flows/stage_task.py:stop_group does for `dvc`. When no host answers, the command runs in its own
process as before: the host only saves time.

Base layer: the standard library, psutil and lmline.guard; what the host preloads is named, not imported.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from lmline import guard

ADDRESS_ENV = "LMLINE_STAGE_HOST"  # the host's socket; set for the `dvc repro` processes of a run
STARTED_ENV = "LMLINE_STAGE_STARTED"  # when the handing process started (epoch s): the stage's process start
# What the stages import, cheapest first: each is one step between requests, and a stage that asks while
# one runs waits for that step. The stage shell's own (MLflow, the CLI) first, then the data stages'.
PRELOAD = (
    "dvc.cli",
    "dvc.repo",
    # what every `dvc repro` imports after that: its argument parser, its Git (scmrepo, dulwich), ruamel
    "dvc.cli.parser",
    "dvc.scm",
    "ruamel.yaml",
    "lmline.cli",
    "tasks.ingest",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",  # the SQLite store's module: 1.3 s, on first use otherwise
    "mlflow.store.model_registry.sqlalchemy_store",
    # what a stage's MLflow run imports as it starts: its Git tags (GitPython), the SQLite dialect, tracing's metrics
    "git",
    "sqlalchemy.dialects.sqlite",
    "opentelemetry.sdk.metrics",
    "tasks.clean",
    "matplotlib.pyplot",  # the plots logged as images (lmline.tracking.plots); no display: Agg
    "tasks.tokenize",
)
# What only the training stages import, torch a step of seconds: the training host's (Host.split). A
# "module:function" step calls that function: one that fills a cache every training stage would fill.
TRAINING_PRELOAD = (
    "torch",
    "tasks.pretrain",
    "tasks.finetune",
    "tasks.evaluate",
    "mlflow.transformers",
    # the installed packages' module map (importlib_metadata.packages_distributions, 1.2 s here), which
    # logging a model builds to check its pip requirements: once here, not in pretrain and finetune each
    "mlflow.utils.requirements_utils:_init_modules_to_packages_map",
)
SPLIT = None  # the first host's step after PRELOAD: fork the training host
HEADER = struct.Struct("!I")  # the request's length, then its JSON
STATUS = struct.Struct("!i")  # the answer: the command's exit status (128 + N when signal N ended it)
START_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the handing side (`lmline stage`)
def hand_over(argv: list[str], address: str, entry: str, needs: str | None = None) -> int | None:
    """Run `argv` (this process's command line) in a child of the host at `address`, as the function
    `entry` ("module:function", the script's) would run it here; its exit status, or None when no host
    answers (the caller then runs the command itself). `needs`: the module the command's work is in
    (`tasks.pretrain`), by which the host picks the host that has it imported."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address)
    except OSError:
        return None
    request = {
        "argv": argv,
        "entry": entry,
        "needs": needs,
        "cwd": os.getcwd(),
        "env": {**os.environ, STARTED_ENV: repr(started_at())},
    }
    body = json.dumps(request).encode()
    with conn:
        socket.send_fds(conn, [HEADER.pack(len(body)) + body], [0, 1, 2])
        answer = receive(conn, STATUS.size)
    if answer is None:
        print("error: the stage host ended before the stage did", file=sys.stderr)
        return 1
    return STATUS.unpack(answer)[0]


def started_at() -> float:
    """When this process started, in epoch seconds, to a clock tick: its start in /proc/self/stat (ticks
    since boot) against CLOCK_BOOTTIME. Not psutil's create_time(), which adds that start to the boot
    time /proc/stat gives in whole seconds: early by the boot time's fraction, 0.45 s on one machine
    here, which every stage's startup_seconds and MB/s carried (tests/test_stage_host.py checks this)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # after the command name: fields 3, 4, ...
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        import psutil

        return psutil.Process().create_time()


def receive(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# ---------------------------------------------------------------- starting and stopping a host
@contextlib.contextmanager
def hosting(cwd: Path, env: dict[str, str]):
    """A host for the stages of one run, started with the environment and working directory the stage
    processes get (so it imports the code they would); yields its address, stops it on the way out."""
    folder = tempfile.mkdtemp(prefix="lmline-host-")
    address = os.path.join(folder, "socket")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmline.stage_host", address, str(os.getpid())],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C is the flow's to handle; the host is stopped below
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(address) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the socket is bound within the interpreter's start, ~0.1 s
        yield address  # a host that failed to start: `lmline stage` finds no socket and runs itself
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=guard.GRACE_S + 1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the host
class Host:
    def __init__(self, address: str) -> None:
        self.address: str | None = address  # its socket, for the first host to remove (close)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)  # in a 0700 temp folder: only this user can connect
        self.listener.listen()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.children: dict[int, dict] = {}  # pid -> {conn, pidfd, kill_at}
        self.preload = [*PRELOAD, SPLIT]
        self.training: socket.socket | None = None  # the first host's channel to the training host
        self.training_pid: int | None = None
        self.training_pidfd: int | None = None  # readable once the training host has exited
        self.channel: socket.socket | None = None  # the training host's, from the first host

    def serve(self) -> None:
        while True:
            # Import the next module only when no request waits: select with no timeout while preloading.
            timeout = 0 if self.preload else self.next_deadline()
            events = self.selector.select(timeout)
            for key, _ in events:
                kind, pid = key.data if isinstance(key.data, tuple) else (key.data, None)
                if kind == "accept":
                    self.take(self.listener.accept()[0])
                elif kind == "handed_on":
                    self.take(self.channel)
                elif kind == "hangup":
                    self.stop_child(pid)  # the handing process went away: its stage goes too
                elif kind == "exited":
                    self.reap(pid)
                elif kind == "training_exited":
                    self.training_exited()
            self.kill_overdue()
            if not events and self.preload:
                self.next_step()

    def next_step(self) -> None:
        name = self.preload.pop(0)
        if name is SPLIT:
            self.split()
            return
        module, _, function = name.partition(":")
        try:
            imported = importlib.import_module(module)
            if function:
                getattr(imported, function)()
        except Exception:  # the stage's own process will import it and report the error where it belongs
            log.debug("preloading %s failed", name, exc_info=True)

    def split(self) -> None:
        """Fork the training host, once the data stages' modules are in: it imports TRAINING_PRELOAD
        (torch alone takes seconds, one step) and serves the requests that need those modules, which
        this host hands on to it; this host, done importing, forks every other request at once. With
        one host, a data stage asking during the torch step waited for it (1.5–1.8 s, measured)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            theirs.close()
            self.training, self.training_pid, self.training_pidfd = ours, pid, os.pidfd_open(pid)
            self.selector.register(self.training_pidfd, selectors.EVENT_READ, "training_exited")
            return
        guard.die_with_parent(signal.SIGTERM, parent)  # with the first host, whose own stop_all ends it first
        self.close_inherited()
        ours.close()
        self.children, self.address, self.channel = {}, None, theirs
        self.selector = selectors.DefaultSelector()
        self.selector.register(theirs, selectors.EVENT_READ, "handed_on")
        self.preload = list(TRAINING_PRELOAD)

    def close_inherited(self) -> None:
        """In a fork: close what belongs to the host forked from (its socket, its children's handles)."""
        self.selector.close()
        self.listener.close()
        for sock in (self.training, self.channel):
            if sock is not None:
                sock.close()
        if self.training_pidfd is not None:
            os.close(self.training_pidfd)
        for child in self.children.values():
            if child["conn"] is not None:
                child["conn"].close()
            os.close(child["pidfd"])

    def training_exited(self) -> None:
        """The training host ended before this host (killed, or it crashed): reap it at once, not as a
        zombie at this host's end, and serve the training stages here from now on (hand_on: no host)."""
        self.selector.unregister(self.training_pidfd)
        os.close(self.training_pidfd)
        os.waitpid(self.training_pid, 0)
        if self.training is not None:  # hand_on closes it when a send to the dead host fails
            self.training.close()
        self.training = self.training_pid = self.training_pidfd = None

    def take(self, source: socket.socket) -> None:
        """One request: from the handing process's connection (`source`), or, in the training host, from
        the first host's channel with that connection as a fourth descriptor. Start its child here, or
        hand it on to the training host when its `needs` is one of that host's modules."""
        handed_on = source is self.channel
        descriptors = 4 if handed_on else 3
        header, fds, _, _ = socket.recv_fds(source, HEADER.size, descriptors)
        body = receive(source, HEADER.unpack(header)[0]) if len(header) == HEADER.size else None
        if body is None or len(fds) != descriptors:
            for fd in fds:
                os.close(fd)
            if handed_on:  # the first host has gone (it ends this one as it goes): nothing more will come
                raise SystemExit(0)
            source.close()
            return
        conn = socket.socket(fileno=fds.pop()) if handed_on else source
        request = json.loads(body)
        if request.get("needs") in TRAINING_PRELOAD and self.hand_on(HEADER.pack(len(body)) + body, fds, conn):
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.run_child(request, fds, conn)  # never returns
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = {"conn": conn, "pidfd": pidfd, "kill_at": None}
        self.selector.register(conn, selectors.EVENT_READ, ("hangup", pid))
        self.selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))

    def hand_on(self, message: bytes, fds: list[int], conn: socket.socket) -> bool:
        """Pass a request, its descriptors and its connection to the training host; False when there is
        none (not forked yet, or gone), and the request is served here (its child imports the rest)."""
        if self.training is None:
            return False
        try:
            sent = socket.send_fds(self.training, [message], [*fds, conn.fileno()])
            self.training.sendall(message[sent:])
        except OSError:
            self.training.close()
            self.training = None
            return False
        for fd in fds:
            os.close(fd)
        conn.close()
        return True

    def run_child(self, request: dict, fds: list[int], conn: socket.socket) -> None:
        """In the fork: become the handing process's command, run it, exit as that process would, and
        answer the handing process itself: the host, busy with an import for seconds, would answer late
        (2.8 s after DVC's ingest, measured). The host's own answer, when it reaps the child, then finds
        the handing process gone; it is the one that counts for a child a signal ended (128 + N)."""
        code = 1
        try:
            os.setpgid(0, 0)  # its own group: the host stops the stage and whatever the stage started
            guard.die_with_parent(signal.SIGKILL)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.close_inherited()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = list(request["argv"])
            code = run_command(request["entry"])
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                logging.shutdown()
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            with contextlib.suppress(BaseException):
                conn.sendall(STATUS.pack(code))
            os._exit(code)

    def reap(self, pid: int) -> None:
        child = self.children.pop(pid)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if child["conn"] is not None:
            with contextlib.suppress(OSError):
                child["conn"].sendall(STATUS.pack(128 - code if code < 0 else code))
            self.selector.unregister(child["conn"])
            child["conn"].close()
        self.selector.unregister(child["pidfd"])
        os.close(child["pidfd"])

    def stop_child(self, pid: int, grace_s: float = guard.GRACE_S) -> None:
        child = self.children.get(pid)
        if child is None or child["kill_at"] is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        child["kill_at"] = time.monotonic() + grace_s
        self.selector.unregister(child["conn"])  # nobody is left to answer
        child["conn"].close()
        child["conn"] = None

    def next_deadline(self) -> float | None:
        deadlines = [c["kill_at"] for c in self.children.values() if c["kill_at"] is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def kill_overdue(self) -> None:
        for pid, child in self.children.items():
            if child["kill_at"] is not None and time.monotonic() >= child["kill_at"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """At the host's end: SIGTERM every stage's group and the training host (which stops its own
        stages, within the grace), SIGKILL whatever is left after the grace."""
        ending = [(pid, os.killpg) for pid in self.children]
        if self.training_pid is not None:
            ending.append((self.training_pid, os.kill))
        for pid, kill in ending:
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + guard.GRACE_S + 1  # the training host's own grace, then its exit
        while ending and time.monotonic() < deadline:
            ending = [(pid, kill) for pid, kill in ending if not ended(pid)]
            time.sleep(0.05)
        for pid, kill in ending:
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """The first host's socket and its folder (hosting() made it for this host): hosting() removes
        them too, but not when the process that started the host was killed (kill -9 of `lmline run`)."""
        if self.address is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.address)
                os.rmdir(os.path.dirname(self.address))


def ended(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:  # reaped already
        return True


def run_command(entry: str) -> int:
    """Call `entry` ("module:function") as a console script would, with the command in sys.argv; its exit
    code (what it returned, as `sys.exit(main())` would make it, or raised with SystemExit)."""
    module, function = entry.split(":")
    try:
        returned = getattr(importlib.import_module(module), function)()
        return returned if isinstance(returned, int) else 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1


def handing_command(address: str, entry: str, argv: list[str]) -> list[str]:
    """A command line that runs `entry` with `argv` in a child of the host at `address` (or, with no
    host answering, in its own process): what the flow starts instead of `python -m dvc ...`, so DVC
    forks from the host with its modules imported. The process itself imports next to nothing."""
    return [sys.executable, "-m", "lmline.stage_host", "--hand-over", address, entry, *argv]


def main(argv: list[str]) -> None:
    address, parent = argv[0], int(argv[1])

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    # The host ends with the process that started it, however that one ends: a flow run of a deployment
    # has no guard watching it (lmline/guard.py), and a host nobody stops would wait forever.
    guard.die_with_parent(signal.SIGTERM, parent)
    host = Host(address)
    try:
        host.serve()
    finally:
        host.close()  # first: nothing more will be asked, and stopping the stages may outlast the guard's grace
        host.stop_all()
        # Nothing of the host's to flush or close: skip the interpreter's teardown of torch, transformers
        # and MLflow (seconds, which `lmline run` would wait for at its end).
        os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hand-over"]:  # handing_command's process
        address, entry, *command = sys.argv[2:]
        code = hand_over(command, address, entry)
        if code is None:
            sys.argv = command
            code = run_command(entry)
        sys.exit(code)
    main(sys.argv[1:])
