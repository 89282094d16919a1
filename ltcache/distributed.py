"""Many processes and machines: a sweep's configurations split across ``torchrun`` ranks.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank loads the whole cache,
plans the same sweep, trains its share of the configurations and all-gathers the trained heads,
so every rank holds every head (as DINOv2's linear evaluation holds the whole feature matrix
on each rank). A configuration's result does not depend on which process trained it, so the
results equal a one-process run's. Only rank 0 prints and writes files (the CLI's part).

Without torchrun (no ``WORLD_SIZE``) every function here is a no-op for one process.

Environment: ``LTCACHE_DIST_TIMEOUT`` (minutes, default 30): how long a rank waits for the
others at a collective before it gives up with an error instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from typing import Any, Optional, Union

import torch

from ltcache.errors import LtcacheError

_BACKEND: Optional[str] = None
_PEERS: list = []            # every rank's {"pid", "host"} (rank order), gathered when the group is joined
_KEPT: dict = {}             # the rendezvous store's client, kept past the group's shutdown
_CALLS = 0                   # collectives entered so far (the test hook LTCACHE_TEST_KILL counts them)


def env_world() -> int:
    """``WORLD_SIZE`` from the environment (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise LtcacheError(f"WORLD_SIZE must be an integer (got '{os.environ.get('WORLD_SIZE')}')") from None


def _dist():
    import torch.distributed as dist
    return dist


def active() -> bool:
    """True when a process group of several ranks is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    if active():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0") or 0) if env_world() > 1 else 0


def world() -> int:
    """Number of ranks (1 without torchrun)."""
    return _dist().get_world_size() if active() else env_world()


def is_main() -> bool:
    """True on rank 0 (the one that prints and writes files), and always without torchrun."""
    return rank() == 0


def timeout() -> datetime.timedelta:
    """The collective timeout: ``LTCACHE_DIST_TIMEOUT`` minutes (default 30)."""
    raw = os.environ.get("LTCACHE_DIST_TIMEOUT", "30")
    try:
        minutes = float(raw)
    except ValueError:
        raise LtcacheError(f"LTCACHE_DIST_TIMEOUT must be a number of minutes (got '{raw}')") from None
    if minutes <= 0:
        raise LtcacheError(f"LTCACHE_DIST_TIMEOUT must be > 0 minutes (got {raw})")
    return datetime.timedelta(minutes=minutes)


def init_from_env(device: Union[str, torch.device, None] = "auto") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); idempotent.

    Backend: NCCL when ``device`` is (or ``auto`` resolves to) CUDA, each rank on GPU
    ``LOCAL_RANK``; gloo on CPU. Returns True when several ranks take part."""
    global _BACKEND
    if env_world() <= 1:
        return False
    dist = _dist()
    if not dist.is_available():
        raise LtcacheError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return dist.get_world_size() > 1
    name = str(device or "auto").lower()
    cuda = torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if local >= torch.cuda.device_count():
            raise LtcacheError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                               "give --nproc_per_node at most the GPU count")
        torch.cuda.set_device(local)
    _BACKEND = "nccl" if cuda else "gloo"
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if key not in os.environ:
            raise LtcacheError(f"WORLD_SIZE > 1 but {key} is not set; start with torchrun "
                               "(e.g. torchrun --nproc_per_node 2 -m ltcache bench ...)")
    try:
        dist.init_process_group(_BACKEND, timeout=timeout())
    except (RuntimeError, ValueError) as exc:
        raise LtcacheError(f"rank {os.environ.get('RANK')}: could not join the other ranks: "
                           f"{_first_line(exc)}") from None
    _PEERS[:] = all_gather_objects({"pid": os.getpid(), "host": _host()}, "joining the other ranks")
    _KEPT["store"] = _store()                # for naming and clean-up after the group is gone
    return True


def _host() -> str:
    import socket
    return socket.gethostname()


def _test_kill() -> None:
    """Tests only: ``LTCACHE_TEST_KILL=RANK:N`` kills this process (SIGKILL) when rank RANK enters
    its N-th collective, as ``kill -9`` would at that point."""
    global _CALLS
    _CALLS += 1
    spec = os.environ.get("LTCACHE_TEST_KILL")
    if spec:
        r, n = (int(v) for v in spec.split(":"))
        if r == rank() and n == _CALLS:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` (on this host) has ended: absent, or a zombie not yet reaped."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
        return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def dead_peers() -> list:
    """The ranks on this host whose process has ended (a rank killed, crashed or stopped); the ranks
    on other hosts cannot be seen from here and are never listed."""
    me, host = rank(), _host()
    return [r for r, p in enumerate(_PEERS) if r != me and p.get("host") == host and _gone(int(p["pid"]))]


def announce_lock(path) -> None:
    """Record in the rendezvous store that this rank holds the output lock ``path``, so that the
    survivors release it if this rank is killed (torchrun's store outlives the ranks)."""
    store = _store() if active() else None
    if store is None:
        return
    key = f"ltcache/locks/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank()}"
    try:
        held = json.loads(store.get(key).decode()) if store.check([key]) else []
        store.set(key, json.dumps(held + [str(path)]))
    except Exception:                        # noqa: BLE001 -- best effort: a stale lock is also taken over later
        pass


def release_locks_of(dead: list) -> None:
    """Remove the output locks that the ended ranks ``dead`` held (each still naming that rank's
    process), so that the same command can start again at once, from any host."""
    store = _store() or _KEPT.get("store")
    if store is None or not dead or not _store_up():    # the store went with its host: nothing to read
        return
    for r in dead:
        key = f"ltcache/locks/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{r}"
        try:
            paths = json.loads(store.get(key).decode()) if store.check([key]) else []
        except Exception:                    # noqa: BLE001 -- the store went with that rank
            return
        for path in paths:
            try:
                held = json.loads(open(path).read() or "{}")
                if int(held.get("pid", -1)) == int(_PEERS[r]["pid"]) and held.get("host") == _PEERS[r]["host"]:
                    os.unlink(path)
            except (OSError, ValueError, IndexError, KeyError):
                pass


def wait_dead_peers(seconds: float = 2.0) -> list:
    """:func:`dead_peers`, waiting up to ``seconds`` for one to show: a killed process's sockets close
    (and its peers' collectives fail) a moment before the process itself is seen to have ended."""
    deadline = time.monotonic() + seconds
    dead = dead_peers()
    while not dead and _PEERS and time.monotonic() < deadline:
        time.sleep(0.05)
        dead = dead_peers()
    release_locks_of(dead)
    return dead


def remote_peers() -> list:
    """The ranks on other hosts (their processes cannot be checked from here)."""
    host = _host()
    return [r for r, p in enumerate(_PEERS) if p.get("host") != host]


def _named(ranks: list) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(str(r) for r in ranks)}"


def lost_on_stop(what: str, note: str) -> LtcacheError:
    """The one line for a rank stopped by SIGTERM under torchrun, which stops every rank once one has
    ended: the ended rank named (on this host; its process is gone), or where it may be."""
    me = rank()
    dead = wait_dead_peers()                 # torchrun saw it end first: it is gone or going
    if dead:
        return _ended(dead, what, note)
    elsewhere = remote_peers()
    where = (f"it is not on this host ({_named(elsewhere)} run on other hosts): torchrun's summary names it"
             if elsewhere else "torchrun's summary names it")
    return LtcacheError(f"rank {me}: stopped by SIGTERM during {what} (torchrun stops every rank when one ends; "
                        f"{where}); {note}")


def _first_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return lines[0] if lines else type(exc).__name__


def _ended(dead: list, what: str, fix: str = "") -> LtcacheError:
    """The one line naming the ranks on this host whose process ended (``fix``: what to do next)."""
    return LtcacheError(f"rank {rank()}: lost {_named(dead)} during {what} (its process ended: killed, crashed or "
                        f"stopped){f'; {fix}' if fix else ''}")


def _lost(exc: BaseException, what: str) -> LtcacheError:
    dead = wait_dead_peers()
    if dead:
        return _ended(dead, what)
    return LtcacheError(f"rank {rank()}: lost the other ranks during {what} (a rank died, was stopped or "
                        f"timed out after {timeout()}): {_cause(exc)}")


def barrier(what: str = "a barrier") -> None:
    """Wait for every rank. On gloo a rank that does not arrive is named (monitored barrier)."""
    if not active():
        return
    _test_kill()
    dist = _dist()
    try:
        if _BACKEND == "gloo" or dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout(), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as exc:
        raise _lost(exc, what) from None


def all_gather_objects(obj: Any, what: str = "a gather") -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for one process."""
    if not active():
        return [obj]
    _test_kill()
    dist = _dist()
    out: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as exc:
        raise _lost(exc, what) from None
    return out


def gather_objects(obj: Any, what: str = "a gather") -> Optional[list]:
    """Every rank's ``obj`` in rank order on rank 0 (None on the other ranks)."""
    if not active():
        return [obj]
    _test_kill()
    dist = _dist()
    out: Optional[list] = [None] * dist.get_world_size() if is_main() else None
    try:
        dist.gather_object(obj, out, dst=0)
    except RuntimeError as exc:
        raise _lost(exc, what) from None
    return out


def fingerprint(obj: Any) -> str:
    """A short hash of ``repr(obj)`` (plain values: the same plan gives the same hash on every rank)."""
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def check_same(obj: Any, what: str) -> None:
    """Refuse (on every rank, one line) when ``obj``'s fingerprint differs between ranks."""
    if not active():
        return
    hashes = all_gather_objects(fingerprint(obj), what=f"the check of {what}")
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        ranks = ", ".join(str(r) for r in bad)
        raise LtcacheError(f"rank{'s' if len(bad) > 1 else ''} {ranks} planned a different {what} than rank 0 "
                           "(different options, seeds or cache on that rank?); give every rank the same arguments")


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    global _BACKEND
    dist = _dist()                           # _PEERS stay: a SIGTERM after this still names the rank that ended
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:
            pass
    _BACKEND = None


# -- one rank decides, every rank learns; a lost rank named ---------------------------------------------
def broadcast_object(obj: Any, what: str = "a broadcast", src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself for one process."""
    if not active():
        return obj
    _test_kill()
    box = [obj if rank() == src else None]
    try:
        _dist().broadcast_object_list(box, src=src)
    except RuntimeError as exc:
        raise _lost(exc, what) from None
    return box[0]


def on_main(fn, what: str, undo=None) -> Any:
    """Run ``fn()`` on rank 0 only (e.g. the output checks and lock: the other ranks must not race
    on them) and return its result on every rank; its one-line LtcacheError is raised on every rank.
    ``undo``: called on rank 0 when the others cannot be told (a rank lost), e.g. to release the lock
    ``fn`` took."""
    if not active():
        return fn()
    outcome: Any = None
    done = False
    if is_main():
        try:
            outcome, done = ("ok", fn()), True
        except LtcacheError as exc:
            outcome = ("error", str(exc))
        except BaseException as exc:
            broadcast_object(("error", f"rank 0 failed during {what} ({type(exc).__name__}: {_first_line(exc)}); "
                                       "see rank 0's log"), what)
            raise
    try:
        kind, value = broadcast_object(outcome, what)
    except BaseException:
        if done and undo is not None:
            undo()
        raise
    if kind == "error":
        raise LtcacheError(value)
    return value


def broadcast_(tensors, src: int = 0, what: str = "a broadcast") -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s (e.g. BatchNorm buffers); no-op for one process."""
    if not active():
        return
    _test_kill()
    try:
        for t in tensors:
            _dist().broadcast(t, src=src)
    except RuntimeError as exc:
        raise _lost(exc, what) from None


def all_reduce_sum_(tensor: torch.Tensor, what: str = "a reduction") -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returned unchanged for one process."""
    if active():
        _test_kill()
        try:
            _dist().all_reduce(tensor)
        except RuntimeError as exc:
            raise _lost(exc, what) from None
    return tensor


def _comm_failure(exc: BaseException) -> Optional[BaseException]:
    """The communication error behind ``exc`` (a peer gone, a collective timed out), or None."""
    for e in (exc, exc.__context__):
        if e is None:
            continue
        if isinstance(e, getattr(_dist(), "DistError", ())):
            return e
        text = str(e)
        if isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection", "monitoredBarrier",
                                                                  "Timed out", "timed out")):
            return e
    return None


def _store():
    try:
        return _dist().distributed_c10d._get_default_store()
    except Exception:                        # noqa: BLE001 -- a private API: without it, no names
        return None


def _store_up() -> bool:
    """Whether the rendezvous store still answers at MASTER_ADDR:MASTER_PORT (a plain TCP connect, so
    that a store gone with its host is seen without the store client's own noisy retries)."""
    import socket
    try:
        with socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=2):
            return True
    except (KeyError, ValueError, OSError):
        return False


def _status_key(r: int) -> str:
    return f"ltcache/status/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{r}"


def _post_status(status: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.set(_status_key(rank()), status)
        except Exception:                    # noqa: BLE001 -- the store left with its host
            pass


def _cause(exc: BaseException) -> str:
    """The first sentence of an error, without a source location such as ``[.../pair.cc:561]``."""
    line = _first_line(exc)
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ", 1)[0].rstrip(".")


def grace_seconds() -> float:
    """How long a rank that lost a peer waits for the other survivors to check in: a tenth of the
    collective timeout, between 1 and 10 s."""
    return min(10.0, max(1.0, timeout().total_seconds() / 10))


def lost_ranks(exc: BaseException, what: str, fix: str = "") -> LtcacheError:
    """One line naming the ranks that are gone after a collective failed with ``exc``.

    Every surviving rank checks in at the rendezvous store and waits :func:`grace_seconds` for the
    others: a rank that posted an error is named with it, one that never checks in is named as lost."""
    me, n = rank(), world()
    tail = f"; {fix}" if fix else ""
    dead = wait_dead_peers()
    if dead:                                 # on this host: seen at once, no need to wait for check-ins
        return _ended(dead, what, fix)
    if me != 0 and not _store_up():          # the store went with its host: rank 0 (or torchrun's agent on its node)
        return LtcacheError(f"rank {me}: lost rank 0 during {what} (it hosted the rendezvous store, which is "
                            f"gone: {_cause(exc)}){f'; {fix}' if fix else ''}")
    _post_status("alive")
    store, errors = _store(), {}
    missing = set(range(n)) - {me} if store is not None else set()      # without the store: no names
    deadline = time.monotonic() + grace_seconds()
    try:
        while missing and store is not None:
            for r in sorted(missing):
                if store.check([_status_key(r)]):
                    missing.discard(r)
                    status = store.get(_status_key(r)).decode(errors="replace")
                    if status != "alive":
                        errors[r] = status
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:                        # noqa: BLE001 -- the store is gone: with rank 0 when it hosted it
        store, missing = None, ({0} if me != 0 else set())
    if errors:
        r, status = sorted(errors.items())[0]
        return LtcacheError(f"rank {me}: rank {r} stopped during {what} with an error ({status}); "
                            f"see rank {r}'s log{tail}")
    if missing:
        ranks = ", ".join(str(r) for r in sorted(missing))
        s = "s" if len(missing) > 1 else ""
        return LtcacheError(f"rank {me}: lost rank{s} {ranks} during {what} (died, was stopped or did not answer "
                            f"within {grace_seconds():g} s of the failure: {_cause(exc)}){tail}")
    return LtcacheError(f"rank {me}: lost the other ranks during {what}: {_cause(exc)}{tail}")


@contextlib.contextmanager
def watch(what, fix: str = ""):
    """Run collective work; when a peer is lost, end with one line naming it (:func:`lost_ranks`).

    ``what``: a string or a callable giving one (e.g. the current epoch). An error of this rank's
    own is posted for the others to name, then raised as it is. No-op for one process."""
    if not active():
        yield
        return
    try:
        yield
    except BaseException as exc:
        comm = _comm_failure(exc) if isinstance(exc, Exception) else None
        if comm is None:
            _post_status(f"{type(exc).__name__}: {_first_line(exc)}" if not isinstance(exc, LtcacheError)
                         else f"error: {_first_line(exc)}")
            raise
        raise lost_ranks(comm, what() if callable(what) else what, fix) from None
