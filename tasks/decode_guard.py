"""Run one decode of untrusted pixel data in a child process, with a time and a memory limit.

A disc from outside can hold pixel data built to hurt the decoder: a codestream that makes a
C library loop for ever, ask for gigabytes, or crash. The scan already refuses what the header
betrays (a decompression bomb, pixel data longer than the file); what only the decoder can
find out is contained here, per instance:

* :func:`guarded` forks a child (``os.fork``: no pickling of the function or its arguments, and
  it works inside a Celery prefork worker, whose children ``multiprocessing`` would refuse to
  let have children of their own). The child lowers ``RLIMIT_AS`` to what it has mapped
  already plus ``memory_bytes``, arms its own ``alarm`` (so that it dies on its own even if
  the worker that forked it is killed), runs the function, sends back the pickled result or
  exception through a pipe and ends with ``os._exit``.
* The parent waits at most ``seconds`` (wall clock), then SIGKILLs the child.
* Errors come back as :class:`DecodeLimitError` (time, memory) or :class:`DecodeCrashError`
  (the child died: a signal, a C library abort), both :class:`DecodeGuardError`, with a
  message that starts with the ``label`` (the file name); any other exception the function
  raised is raised again in the parent, unchanged (a ``ConversionError`` stays one).

The memory limit counts address space *beyond what the worker had mapped when it forked*: a
worker with numpy, pydicom and the codecs loaded maps several hundred MB of address space
before it decodes anything, and that is not the decode's doing.

Cost: one fork per call, which grows with the resident memory of the worker (page tables,
then copy-on-write faults while the child works): 15-50 ms per call for a 120 MB process on
the (loaded, nested-virtualisation) VM where it was measured, ~0.25 ms per resident MB for a
bare fork there; ``test_guard_overhead_is_measured`` prints the figures on the machine at hand.

Many decodes in one child: :func:`guarded_each` runs one function over a list of calls in a
single forked child (one fork per batch instead of one per file), each call limited by the child's
own alarm, re-armed before it, to ``seconds``; the parent waits ``seconds`` x the number of calls at
most. A call's ordinary exception comes back as a small description (a string), the other calls
go on; a time or memory limit, a crash or a ``BaseException`` ends the child and is raised for the
whole, as :func:`guarded` raises it: the caller then redoes the calls one child each to learn which
one it was.

The child starts from the worker's memory as it is: call this from the thread that runs the
task, in a worker that runs one task per process (Celery's prefork pool), not from a threaded pool.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Result = TypeVar("Result")

_MB = 1 << 20
_CHUNK = 1 << 16


class DecodeGuardError(Exception):
    """A guarded decode did not finish normally; ``str(error)`` names the file and says why."""


class DecodeLimitError(DecodeGuardError):
    """The decode ran past its time limit or its memory limit."""


class DecodeCrashError(DecodeGuardError):
    """The process running the decode died (a signal, an abort in a C library)."""


def guarded(function: Callable[..., Result], *args: Any, seconds: float, memory_bytes: int, label: str,
            **kwargs: Any) -> Result:
    """``function(*args, **kwargs)`` run in a forked child limited to ``seconds`` of wall-clock
    time and ``memory_bytes`` of address space (beyond what this process maps already).

    Returns what the function returned (it must pickle); raises what it raised, or
    :class:`DecodeLimitError` / :class:`DecodeCrashError` naming ``label``.
    """
    if seconds <= 0 or memory_bytes <= 0:
        raise ValueError("guarded() needs a positive time limit and a positive memory limit")
    megabytes = f"{memory_bytes / _MB:g}"
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    try:
        pid = os.fork()
    except OSError:  # EAGAIN, ENOMEM: the caller reports it like any other failure of this file
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child(write_fd, function, args, kwargs, seconds, memory_bytes)
    os.close(write_fd)
    try:
        payload, finished = _collect(read_fd, pid, started + seconds)
    except BaseException:  # e.g. Celery's SoftTimeLimitExceeded raised in the parent: no orphan decode
        _kill(pid)
        raise
    finally:
        os.close(read_fd)
    if not finished:
        _kill(pid)
        raise DecodeLimitError(f"{label}: decoding exceeded {seconds:g} s; stopped")
    status = _reap(pid, started + seconds + 5.0)
    if payload:
        try:
            kind, value = pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - a message cut short by a dying child
            raise DecodeCrashError(f"{label}: the decoding process sent back an unreadable result "
                                   f"({type(exc).__name__})") from None
        if kind == "ok":
            return value
        if kind == "memory":
            raise DecodeLimitError(f"{label}: decoding exceeded the {megabytes} MB memory limit ({value})")
        raise value
    if status is not None and os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGALRM:
            raise DecodeLimitError(f"{label}: decoding exceeded {seconds:g} s; stopped")
        raise DecodeCrashError(f"{label}: the decoding process died of {_signal_name(number)} "
                               f"(memory limit {megabytes} MB)")
    code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    # e.g. 127: glibc's "cannot allocate memory for thread-local data" once the limit is reached
    raise DecodeCrashError(f"{label}: the decoding process ended (exit status {code}) without a result "
                           f"(memory limit {megabytes} MB)")


def guarded_each(function: Callable[..., Result], calls: Sequence[Sequence[Any]], *, seconds: float,
                 memory_bytes: int, label: str,
                 describe: Callable[[Exception], Any] | None = None) -> list[tuple[bool, Any]]:
    """``function(*args)`` for each ``args`` in ``calls``, all in ONE forked child: each call limited
    to ``seconds`` (the child's alarm, re-armed before each call), all of them to ``seconds`` x
    ``len(calls)`` of wall-clock time and ``memory_bytes`` of address space (as :func:`guarded`).

    Returns, in order, ``(True, result)`` or, for a call that raised an :class:`Exception` not
    caused by running out of memory, ``(False, describe(error))`` (default ``"Type: message"``),
    made in the child: results and descriptions must pickle and should be small. Raises, for the
    whole, what :func:`guarded` raises when a call exceeds its time or the memory limit, crashes
    the child or raises a ``BaseException`` (a ``RuntimeError``): which call it was is not known.
    """
    calls = [tuple(args) for args in calls]
    if not calls:
        return []
    return guarded(_each, function, calls, seconds, describe or _described, seconds=seconds * len(calls),
                   memory_bytes=memory_bytes, label=label)


# --- the child ------------------------------------------------------------------------------

def _each(function: Callable[..., Any], calls: list[tuple], seconds: float,
          describe: Callable[[Exception], Any]) -> list[tuple[bool, Any]]:
    """Run in the child of :func:`guarded_each`."""
    results: list[tuple[bool, Any]] = []
    for args in calls:
        signal.setitimer(signal.ITIMER_REAL, seconds)  # SIGALRM (default action) ends the child
        try:
            results.append((True, function(*args)))
        except Exception as error:  # noqa: BLE001 - one call's failure, unless it is the memory limit
            if _memory_error_in(error) is not None:
                raise
            traceback.clear_frames(error.__traceback__)  # let go of what the call allocated
            results.append((False, describe(error)))
    return results


def _described(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _child(write_fd: int, function: Callable[..., Any], args: tuple, kwargs: dict, seconds: float,
           memory_bytes: int) -> None:
    code = 0
    try:
        # Default actions: the worker's own handlers (Celery's SIGTERM, a test's SIGALRM) must
        # not run here; SIGALRM then ends this process even if the parent is gone.
        for number in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            try:
                signal.signal(number, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.setitimer(signal.ITIMER_REAL, 0)  # an inherited interval timer (pytest-timeout)
        faulthandler.disable()  # a crash here is reported by the parent, not as a worker traceback
        # Made before the limit: at the limit there may be no memory left to describe it.
        out_of_memory = pickle.dumps(("memory", "MemoryError"))
        signal.alarm(max(1, int(seconds + 1.999)))
        limit = _mapped_bytes() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            payload = pickle.dumps(_run(function, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            payload = out_of_memory
        except BaseException as exc:  # noqa: BLE001 - an unpicklable result or exception
            payload = pickle.dumps(("raise", RuntimeError(f"the decode's outcome could not be sent back: "
                                                          f"{type(exc).__name__}: {exc}")))
        signal.alarm(0)  # the result is ready; sending it is not decoding
        _write_all(write_fd, payload)
    except BaseException:  # noqa: BLE001
        code = 70
    finally:
        os._exit(code)


def _run(function: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[str, Any]:
    """``("ok", result)``, ``("memory", description)`` or ``("raise", exception)``."""
    try:
        return "ok", function(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        traceback.clear_frames(exc.__traceback__)  # let go of what the decode allocated
        exc.__traceback__ = None
        memory = _memory_error_in(exc)
        if memory is not None:
            return "memory", f"{type(memory).__name__}: {memory}"
        if isinstance(exc, Exception):
            return "raise", exc
        # SystemExit, KeyboardInterrupt ... must not stop the worker that asked
        return "raise", RuntimeError(f"{type(exc).__name__} while decoding: {exc}")


def _mapped_bytes() -> int:
    """Address space this process maps now (VmSize)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 * 4


def _memory_error_in(exc: BaseException) -> BaseException | None:
    """The MemoryError that caused ``exc`` (decoders wrap it: ConversionError from MemoryError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.close(fd)


# --- the parent -----------------------------------------------------------------------------

def _collect(fd: int, pid: int, deadline: float) -> tuple[bytes, bool]:
    """Read the child's message until end of file or the deadline: ``(bytes, finished)``."""
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), False
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def _reap(pid: int, deadline: float) -> int | None:
    """Wait for the child that closed its end of the pipe; kill it if it lingers."""
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() > deadline:
            return _kill(pid)
        time.sleep(0.0005)


def _kill(pid: int) -> int | None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
