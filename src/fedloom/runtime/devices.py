"""Which torch device a site's code runs on.

The plan's ``training.device`` (or a collaborator's ``--device``) is ``auto``, ``cpu``,
``cuda``, ``cuda:N`` or ``mps``. ``auto`` takes the first CUDA device, else Apple's
``mps``, else the CPU, so one plan runs unchanged on a GPU server and on a laptop.
Torch is asked only when the task module already imported it: a NumPy task never
pays for importing torch, and runs on the CPU.
"""

from __future__ import annotations

import sys

from fedloom.core.errors import DeviceError


def resolve_device(name: str) -> str:
    """The device ``name`` stands for on this machine, as a torch device string.

    Raises :class:`DeviceError` for a CUDA or MPS device this machine lacks, naming
    what it has."""
    torch = sys.modules.get("torch")
    if name == "cpu":
        return "cpu"
    if torch is None:
        if name == "auto":
            return "cpu"
        raise DeviceError(
            f"device {name!r} asked for, but the task does not use torch",
            hint="use device cpu (or auto) for a task without torch",
        )
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return "cuda" if cuda else ("mps" if mps else "cpu")
    if name == "mps":
        if not mps:
            raise DeviceError(
                "device 'mps' asked for, but this machine has no Apple GPU", hint=_HINT
            )
        return "mps"
    index = int(name.partition(":")[2] or 0)
    if not cuda:
        raise DeviceError(
            f"device {name!r} asked for, but torch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} "
            "CUDA)",
            hint=_HINT,
        )
    if index >= count:
        raise DeviceError(
            f"device {name!r} asked for, but this machine has {count} CUDA GPU(s): "
            f"cuda:0..cuda:{count - 1}",
            hint=_HINT,
        )
    return name


_HINT = "set training.device to auto (or cpu) in the plan, or start the site with --device cpu"


def check_gpus(count: int) -> None:
    """Refuse ``simulate --gpus COUNT`` on a machine without that many CUDA GPUs, before
    any worker starts (imports torch: the workers will need it). Raises
    :class:`DeviceError`."""
    if count <= 0:
        return
    try:
        import torch
    except ImportError as err:
        raise DeviceError(
            f"--gpus {count} needs torch with CUDA, and torch is not installed",
            hint="install torch with CUDA support, or run without --gpus (on the CPU)",
        ) from err
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise DeviceError(
            f"--gpus {count} asked for, but torch sees no CUDA GPU on this machine (torch "
            f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)",
            hint="run without --gpus: the sites train on the plan's training.device (auto: "
            "the CPU here)",
        )
    if count > have:
        raise DeviceError(
            f"--gpus {count} asked for, but this machine has {have} CUDA GPU(s)",
            hint=f"use --gpus {have} or fewer; several workers may share one GPU",
        )


def release_memory(device: str) -> None:
    """Give the cached GPU memory of ``device`` back, between one site's work and the
    next (a simulation worker serves many sites)."""
    torch = sys.modules.get("torch")
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def limit_memory(device: str, fraction: float | None) -> None:
    """Cap this process's share of ``device``'s memory (several simulation workers on
    one GPU); nothing for the CPU."""
    torch = sys.modules.get("torch")
    if fraction is None or torch is None or not device.startswith("cuda"):
        return
    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
