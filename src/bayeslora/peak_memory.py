"""Peak memory of a stretch of work: CUDA's allocator peak on a GPU, the process's peak RSS on CPU.

On Linux the resident-set high-water mark (``VmHWM``) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so each training epoch or evaluation reports its own peak even when many run
in one process (a benchmark). Elsewhere, and where the kernel refuses the reset, the CPU figure is
None rather than a process-lifetime peak that would be mistaken for this work's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["PeakMemory"]

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _hwm_bytes() -> Optional[int]:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """``start()`` resets the peak for ``device``; ``bytes()`` reads it (None where it cannot be measured)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cpu_ok = False

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                _CLEAR.write_text("5")
                self._cpu_ok = _hwm_bytes() is not None
            except OSError:
                self._cpu_ok = False
        return self

    def bytes(self) -> Optional[int]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _hwm_bytes() if self._cpu_ok else None
