"""Several processes, one sweep: starting JAX's distributed runtime, and ending every process in
bounded time, with one line, when one of them fails or dies. An edge module: the engine
(nstjax/run.py, batch.py, programs.py) only asks :func:`active` and uses JAX's process index.

Starting (:func:`start`, before anything touches a JAX backend): the coordinator, the process
count and this process's id come from the command line (``--coordinator=HOST:PORT
--num_processes=N --process_id=I``, a :class:`Launch`) or, with ``sweep.distributed=True`` alone,
from the cluster's environment as JAX detects it (SLURM, Open MPI, Cloud TPU, Kubernetes). The
processes first meet on the coordinator's address through nstjax's own rendezvous (process 0
listens, the others connect and say who they are), then call ``jax.distributed.initialize`` with
the same address. The rendezvous is there because JAX's client, when it cannot register within its
timeout (no coordinator, or a process that never comes), aborts the process with a fatal log and a
C++ stack trace (exit -6, measured with jax 0.10.2) instead of raising; ours gives up after
``timeout_s`` with a one-line :class:`UserError`, and once every process has met, JAX's
registration waits for no one. On CPU, collectives across processes go through gloo (set here
before the backend starts; older jax had none by default).

Ending: JAX's own failure detection is its coordination service's heartbeat (100 s by default),
after which it aborts the surviving processes with a multi-line fatal log; and a process blocked in
a collective whose peer is gone may wait on it for longer. So the rendezvous's connections stay
open as *lifelines* between process 0 and every other process. The kernel closes a killed
process's socket at once, so the other side learns of a SIGKILL at once (measured on localhost,
tests/test_multihost.py: process 0 printed its line 0.45 s after process 1 was killed, mid-batch);
a host that vanishes without closing it (power, network) is noticed after :data:`SILENCE_S`
seconds without its pings. (When process 0 dies, JAX's client in the others, whose coordination
service died with it, notices at the same instant and may log its own fatal lines first: 2 of 6
tries on localhost; docs/multihost.md.) A watcher thread then prints
``nstjax: error: lost process I of N ...`` and ends the process with exit code 2 (``os._exit``: the
main thread may be blocked inside a collective that would never return, and JAX's exit handler would
wait in a shutdown barrier for the dead peer). A process that ends by itself says so first
(:func:`finish`): after a clean end its peers carry on to JAX's shutdown barrier; after a failure (a
refused workdir on process 0, say) they end, within :data:`GRACE_S` seconds, with a line naming it,
unless they end by themselves first (a SIGTERM reaching every process stops each at the same chunk,
each with its own line).
"""

from __future__ import annotations

import dataclasses
import os
import re
import select
import socket
import sys
import threading
import time

from nstjax.errors import UserError

DEFAULT_TIMEOUT_S = 120  # to reach the coordinator and for every process to turn up
PING_S = 5.0  # a lifeline ping every 5 s ...
SILENCE_S = 60.0  # ... and a peer silent for 60 s is lost (a host gone without closing its socket)
GRACE_S = 5.0  # a peer that ended with an error: time for this process to end on its own first

LAUNCH_FLAGS = ("coordinator", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class Launch:
    """The command line's ``--coordinator --num_processes --process_id`` (all or none)."""

    coordinator: str
    num_processes: int
    process_id: int


_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d+)$")


def parse_launch(coordinator: str | None, num_processes: int | None, process_id: int | None
                 ) -> Launch | None:
    """The validated launch flags, or None when none is given. Raises a one-line UserError."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
        return _refuse("a multi-process launch needs --coordinator=HOST:PORT, --num_processes=N "
                       f"and --process_id=I together ({' and '.join(missing)} missing)")
    m = _ADDRESS.match(coordinator.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        return _refuse(f"--coordinator={coordinator}: expected HOST:PORT, a host name or address "
                       "and a port from 1 to 65535 (e.g. 10.0.0.1:1234)")
    if num_processes < 1:
        return _refuse(f"--num_processes={num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
        return _refuse(f"--process_id={process_id} is out of range: with "
                       f"--num_processes={num_processes} the process ids are 0 to "
                       f"{num_processes - 1}")
    return Launch(coordinator.strip(), num_processes, process_id)


def _refuse(message: str):
    raise UserError(message)


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------------------------
# Starting


_session: _Lifeline | None = None
_started = False


def active() -> bool:
    """Whether this process is one of several of a distributed sweep started by :func:`start`."""
    return _session is not None


def start(launch: Launch | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Joins the other processes (see the module doc): first nstjax's own rendezvous on the
    coordinator's address, which opens the lifelines, then ``jax.distributed.initialize``.
    Idempotent; call before anything starts a JAX backend. Raises UserError.

    Why a rendezvous of our own first: JAX's client, when it cannot register with the coordinator
    within its timeout (none there, or not every process turned up), aborts the process with a
    fatal log and a C++ stack trace instead of raising (measured with jax 0.10.2: exit -6 after the
    timeout, also for process 0 waiting for a process that never comes). Once every process has
    met here, JAX's registration does not wait on anyone."""
    global _session, _started
    if _started:
        return
    import jax

    if jax.distributed.is_initialized():  # initialised by the caller: theirs to watch
        _started = True
        return
    local_ids = None
    if launch is None:
        launch, local_ids = _detect(timeout_s)
    host, _ = _split(launch.coordinator)
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise UserError(f"--coordinator={launch.coordinator}: cannot resolve the host {host!r} "
                        f"({e.strerror or e})") from None
    # From here on the others hear of this process's end (a failure to start included)
    _session = _Lifeline(launch, timeout_s) if launch.num_processes > 1 else None
    try:
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option: its CPU collectives are its own
        pass
    # JAX's preemption service (for training loops that checkpoint on a preemption notice) is of
    # no use here, and when process 0 dies it logs two more lines from C++ in the others.
    with _suppress(AttributeError, ValueError):
        jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                   local_device_ids=local_ids,
                                   initialization_timeout=int(timeout_s))
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise UserError("jax.distributed.initialize() must run before anything uses JAX: call "
                            "nstjax.run_sweep first in a fresh process (or initialize it yourself)"
                            ) from None
        raise UserError(f"process {launch.process_id} of {launch.num_processes} could not start "
                        f"JAX's distributed runtime at {launch.coordinator} "
                        f"({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 (jaxlib's errors: XlaRuntimeError, grpc statuses)
        raise UserError(f"process {launch.process_id} of {launch.num_processes} could not start "
                        f"JAX's distributed runtime at {launch.coordinator} "
                        f"({_first_line(e)})") from None
    _started = True


def _detect(timeout_s: float) -> tuple[Launch, list | None]:
    """The coordinator, process count, this process's id (and, on GPUs under SLURM or Open MPI, its
    device) that JAX reads from a cluster's environment."""
    try:
        from jax._src import clusters

        found = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            os.environ.get("JAX_COORDINATOR_ADDRESS"), None, None, None, None, int(timeout_s))
    except Exception as e:  # noqa: BLE001 (a cluster's metadata server may fail in many ways)
        raise UserError("sweep.distributed=True: detecting the cluster failed "
                        f"({_first_line(e)})") from None
    coordinator, n, pid, local_ids = found
    if coordinator is None or n is None or pid is None:
        raise UserError("sweep.distributed=True, but no cluster was detected (SLURM, Open MPI, "
                        "Cloud TPU, Kubernetes): launch each process with --coordinator=HOST:PORT "
                        "--num_processes=N --process_id=I (docs/multihost.md)")
    return Launch(str(coordinator), int(n), int(pid)), local_ids


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


# --------------------------------------------------------------------------------------------
# Ending


_error_message = ""


def note_error(message: str) -> None:
    """The one line this process is about to end with (told to its peers by :func:`finish`)."""
    global _error_message
    _error_message = message


def finish(code: int) -> None:
    """Tells the peers how this process ends. With a non-zero ``code`` it ends the process at once
    (``os._exit``): JAX's exit handler would wait in its shutdown barrier for peers that may be
    blocked waiting for this one."""
    if _session is None:
        return
    _session.end(code, _error_message)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_for_peers(seconds: float = GRACE_S + 1.0) -> None:
    """Called with an unexpected exception in hand: a collective fails as soon as a peer dies, a
    moment before the watcher hears of it. Gives the watcher that moment to end the process with
    its line (it exits); returns if no peer was lost (the exception is then a real one)."""
    if _session is not None:
        _session.settled.wait(seconds)


class _Lifeline:
    def __init__(self, launch: Launch, timeout_s: float):
        self.index, self.count = launch.process_id, launch.num_processes
        self.socks: dict[int, socket.socket] = {}
        self.buffers: dict[int, bytes] = {}
        self.seen: dict[int, float] = {}
        self.ended: dict[int, tuple[int, str, float]] = {}  # peer -> (code, message, when)
        self.ending = False
        self.settled = threading.Event()  # never set: wait_for_peers waits on it with a timeout
        self.send_lock = threading.Lock()
        deadline = time.monotonic() + timeout_s
        me = f"process {self.index} of {self.count}"
        try:
            if self.index == 0:
                self._gather(launch, deadline, timeout_s)
            else:
                self._join(launch, deadline, timeout_s)
        except OSError as e:
            for s in self.socks.values():
                s.close()
            raise UserError(f"{me} could not meet the others at {launch.coordinator}: "
                            f"{e.strerror or e}") from None
        now = time.monotonic()
        self.seen = {p: now for p in self.socks}
        threading.Thread(target=self._watch, name="nstjax-lifeline", daemon=True).start()

    def _gather(self, launch: Launch, deadline: float, timeout_s: float) -> None:
        """Process 0: listens on the coordinator's address until every other process has said who
        it is, then tells them all to go on (and closes the port, for JAX's service to take)."""
        host, port = _split(launch.coordinator)
        try:
            server = socket.create_server((host, port), family=_family(host), reuse_port=False)
        except OSError:  # the coordinator's name is not an address of this host's: all of them
            try:
                server = socket.create_server(("", port))
            except OSError as e:
                raise OSError(e.errno,
                              f"cannot listen on port {port} ({e.strerror or e})") from None
        with server:
            while len(self.socks) < self.count - 1:
                server.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    missing = sorted(set(range(1, self.count)) - set(self.socks))
                    raise OSError(f"process{'es' * (len(missing) > 1)} "
                                  f"{', '.join(map(str, missing))} did not arrive within "
                                  f"{int(timeout_s)} s") from None
                conn.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    word, pid, n = (_readline(conn).split() + ["", "", ""])[:3]
                except OSError:
                    conn.close()
                    continue
                why = None
                if word != "hello" or not pid.isdigit() or not n.isdigit():
                    why = "not an nstjax process"
                elif int(n) != self.count:
                    why = (f"--num_processes={n} differs from process 0's "
                           f"--num_processes={self.count}")
                elif int(pid) in self.socks or not 0 < int(pid) < self.count:
                    why = f"process id {pid} is taken or out of range"
                if why:
                    with _suppress():
                        conn.sendall(f"refused {why}\n".encode())
                    conn.close()
                    continue
                conn.settimeout(None)
                self.socks[int(pid)] = conn
            for conn in self.socks.values():
                conn.sendall(b"go\n")

    def _join(self, launch: Launch, deadline: float, timeout_s: float) -> None:
        """Any other process: connects to process 0 (retrying while it is not up yet), says who it
        is and waits for every process to have arrived."""
        host, port = _split(launch.coordinator)
        why = "nothing listens there"
        while True:
            try:
                conn = socket.create_connection(
                    (host, port), timeout=max(0.05, min(5.0, deadline - time.monotonic())))
                break
            except OSError as e:
                why = e.strerror or str(e)
                if time.monotonic() > deadline:
                    raise OSError(f"no answer within {int(timeout_s)} s ({why}); is process 0 "
                                  "running, with this address?") from None
                time.sleep(0.2)
        try:
            conn.sendall(f"hello {self.index} {self.count}\n".encode())
            conn.settimeout(max(0.05, deadline - time.monotonic()))
            reply = _readline(conn)
        except TimeoutError:
            conn.close()
            raise OSError(f"not every process arrived within {int(timeout_s)} s") from None
        except OSError:
            conn.close()
            raise
        if reply.startswith("refused "):
            conn.close()
            raise OSError(f"process 0 refused this process: {reply[len('refused '):]}")
        if reply != "go":
            conn.close()
            raise OSError("something other than nstjax's process 0 answers there")
        conn.settimeout(None)
        self.socks[0] = conn

    def _send(self, peer: int, text: str) -> None:
        with self.send_lock:
            try:
                self.socks[peer].sendall(text.encode())
            except (OSError, KeyError):
                pass  # a closed connection shows up in _watch

    def end(self, code: int, message: str) -> None:
        self.ending = bool(code)
        for p in list(self.socks):
            self._send(p, f"end {code} {' '.join(message.split())}\n")

    def _die(self, message: str) -> None:
        if self.ending:  # this process is ending with its own line already
            return
        self.ending = True
        for p in list(self.socks):  # process 0 passes it on: the others see no other peer
            self._send(p, f"end 2 {message}\n")
        _last_words(f"nstjax: error: {message}\n")
        os._exit(2)

    def _lost(self, peer: int, why: str) -> None:
        self._die(f"lost process {peer} of {self.count} ({why}); the points' last checkpoints are "
                  "kept: run the same launch again on every host to resume")

    def _read(self, peer: int, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            sock.close()
            del self.socks[peer]
            if peer not in self.ended:
                self._lost(peer, "its connection closed: killed, or its host went down")
            return
        self.seen[peer] = time.monotonic()
        self.buffers[peer] = self.buffers.get(peer, b"") + data
        *lines, self.buffers[peer] = self.buffers[peer].split(b"\n")
        for line in lines:
            word, _, rest = line.decode(errors="replace").partition(" ")
            if word == "end":
                code, _, message = rest.partition(" ")
                self.ended[peer] = (int(code) if code.lstrip("-").isdigit() else 2, message,
                                    time.monotonic())

    def _watch(self) -> None:
        last_ping = 0.0
        while True:
            socks = dict(self.socks)
            try:
                ready, _, _ = select.select(list(socks.values()), [], [], 1.0)
            except (OSError, ValueError):
                ready = []
            for peer, sock in socks.items():
                if sock in ready:
                    self._read(peer, sock)
            now = time.monotonic()
            if now - last_ping >= PING_S:
                last_ping = now
                for p in list(self.socks):
                    self._send(p, "ping\n")
            for p, seen in list(self.seen.items()):
                if p in self.socks and p not in self.ended and now - seen > SILENCE_S:
                    self._lost(p, f"no sign of life from it for {SILENCE_S:.0f} s")
            for p, (code, message, when) in list(self.ended.items()):
                if code and now - when > GRACE_S:
                    self._die(f"process {p} of {self.count} ended with an error"
                              + (f": {message}" if message else f" (exit code {code})"))


def _last_words(line: str) -> None:
    """Writes ``line`` to stderr in one write, then points stderr at /dev/null: when process 0
    dies, JAX's coordination client in this process notices it at the same moment and logs an
    error line of its own from a C++ thread, which would land in the middle of or after ours (seen
    on localhost) before ``os._exit`` ends the process."""
    with _suppress():
        sys.stdout.flush()
    with _suppress():
        sys.stderr.flush()
    with _suppress():
        os.write(2, line.encode(errors="replace"))
    with _suppress():
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _readline(conn: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n") and len(line) < 1024:
        chunk = conn.recv(1)
        if not chunk:
            raise ConnectionError("the connection closed")
        line += chunk
    return line.decode(errors="replace").strip()


def _suppress(*errors):
    import contextlib

    return contextlib.suppress(*(errors or (OSError,)))
