"""Peak GPU memory for the benchmark references, measured the two ways the Rust examples measure
it (examples/common/gpu_memory.rs), so the two sides' numbers compare:

- NVML's used memory of device 0, sampled every 10 ms by a thread, minus the baseline sampled
  before this process touched CUDA (null, with the reason, where NVML is unavailable);
- at the end, the device's total minus free memory (torch.cuda.mem_get_info, cudaMemGetInfo):
  the CUDA context plus everything the caching allocator reserved, which it keeps until exit, so
  the run's peak reserved memory plus the context.

PyTorch's own allocator peaks (max_memory_allocated / max_memory_reserved), which tch cannot
read on the Rust side, are reported beside them by `fields`. NVML is opened with ctypes
(libnvidia-ml.so.1 comes with the driver), so pynvml is not needed.
"""

import ctypes
import threading

import torch

MIB = 1024 * 1024


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class GpuMemory:
    """Samples device 0's used memory until finish(); start it before the first CUDA call."""

    def __init__(self):
        self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if self._nvml.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self._device = ctypes.c_void_p()
        if self._nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self._device)) != 0:
            raise RuntimeError("nvmlDeviceGetHandleByIndex_v2(0) failed")
        self.baseline = self._used()
        if self.baseline is None:
            raise RuntimeError("nvmlDeviceGetMemoryInfo failed")
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _used(self):
        memory = _Memory()
        if self._nvml.nvmlDeviceGetMemoryInfo(self._device, ctypes.byref(memory)) != 0:
            return None
        return memory.used

    def _run(self):
        while not self._stop.wait(0.01):
            used = self._used()
            if used is not None:
                self.peak = max(self.peak, used)

    def finish(self):
        self._stop.set()
        self._thread.join()
        return {
            "gpu_device_peak_used_mib": self.peak / MIB,
            "gpu_baseline_used_mib": self.baseline / MIB,
            "gpu_process_peak_mib": (self.peak - self.baseline) / MIB,
        }


def start(device):
    """A sampler for a run on `device` ("cpu": None), or the reason NVML is unusable."""
    if device != "cuda":
        return None
    try:
        return GpuMemory()
    except (OSError, AttributeError, RuntimeError) as e:
        return str(e)


def fields(sampler):
    """The RESULT's GPU memory fields (only a null allocator peak on the CPU); call it after the
    last synchronisation."""
    if sampler is None:
        return {"peak_gpu_allocated_mib": None}
    if isinstance(sampler, str):
        out = {"gpu_device_peak_used_mib": None, "gpu_process_peak_mib": None, "gpu_nvml_unavailable": sampler}
    else:
        out = sampler.finish()
    free, total = torch.cuda.mem_get_info()
    out["gpu_used_at_end_mib"] = (total - free) / MIB
    out["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    out["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
    return out
