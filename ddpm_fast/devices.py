"""The --device and --threads arguments, shared by every command."""

from __future__ import annotations

import os

import torch

from ddpm_fast.checks import is_int
from ddpm_fast.errors import BadValue, Unavailable


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Torch CPU threads for one process: the cores it may use, divided among torchrun's local processes.

    Two processes with two threads each on two cores thrash (one forward measured 3.8 s instead of 0.10 s),
    so under torchrun each process gets cores // LOCAL_WORLD_SIZE (at least 1).
    """
    cores = usable_cores()
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as e:
        raise BadValue(f"LOCAL_WORLD_SIZE must be an integer ({e})") from e
    return max(1, cores // max(1, local_world))


def set_threads(threads: int | None, name: str = "--threads") -> int:
    """Set torch's CPU thread count and return it. None: `default_threads()` under torchrun, else torch's own
    default (one thread per core) is left as it is. Errors name `name`."""
    if threads is None:
        if "LOCAL_WORLD_SIZE" not in os.environ:
            return torch.get_num_threads()
        threads = default_threads()
    elif not is_int(threads) or threads < 1:
        raise BadValue(f"{name} must be a positive int; got {threads!r}")
    elif threads > (cores := usable_cores()):
        # more threads than cores only slows torch down, and far more fail inside OpenMP (or crash it)
        raise BadValue(f"{name} must be at most {cores}, the CPU cores this process may use; got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def resolve_device(
    arg: str | None, local_rank: int = 0, world: int = 1, name: str = "--device"
) -> torch.device:
    """None or "auto": cuda when available, else cpu. A bare "cuda" under torchrun is cuda:LOCAL_RANK.

    A malformed name is a ValueError, a CUDA device this machine lacks is `Unavailable`; both name `name`.
    """
    if arg in (None, "auto"):
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, TypeError) as e:
        raise BadValue(f"{name} must name a torch device such as cpu or cuda:0; got {arg!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise BadValue(f"{name} must be a cpu or cuda device; got {arg!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Unavailable(f"{name} {arg} was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise Unavailable(f"{name} {dev} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev
