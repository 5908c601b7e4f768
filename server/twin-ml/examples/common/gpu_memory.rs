//! Peak GPU memory for the benchmark examples, since tch binds none of libtorch's CUDA allocator
//! statistics (no `max_memory_allocated`). Included by the examples with `#[path]`; the Python
//! references measure the same two ways (`bench/gpu_memory.py`), so the two sides' numbers
//! compare:
//!
//! - NVML (the driver's management library), sampled every 10 ms by a thread: the device's used
//!   memory, minus the baseline sampled before this process touched CUDA. Unavailable where the
//!   driver's NVML is not (some sandboxes): the RESULT then says why.
//! - At the end, the device's total minus free memory (`cuMemGetInfo`, the CUDA driver's, on the
//!   thread that ran the work): the CUDA context plus everything libtorch's caching allocator
//!   reserved, which it keeps until exit. Neither side empties the cache, so this is the run's
//!   peak reserved memory plus the context, with no sampling to miss anything.
//!
//! Device 0 of NVML is taken to be CUDA device 0 (one GPU, no `CUDA_VISIBLE_DEVICES`
//! reordering).

use std::ffi::{c_int, c_uint, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// `nvmlMemory_t`: bytes.
#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

type Init = unsafe extern "C" fn() -> c_int;
type CuMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
type HandleByIndex = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type MemoryInfo = unsafe extern "C" fn(*mut c_void, *mut NvmlMemory) -> c_int;

/// NVML opened on device 0.
struct Nvml {
    // Kept so the symbols below stay valid while the sampler runs.
    _library: libloading::Library,
    memory_info: MemoryInfo,
    device: *mut c_void,
}

// SAFETY: NVML is thread-safe, and the device handle is an opaque id valid in any thread.
#[allow(unsafe_code)]
unsafe impl Send for Nvml {}

impl Nvml {
    #[allow(unsafe_code)]
    fn open() -> Result<Nvml, String> {
        // SAFETY: libnvidia-ml's initialisers have no preconditions; its functions are called
        // with the signatures of nvml.h (v2 entry points, as the driver has exported since 2013).
        unsafe {
            let library = libloading::Library::new("libnvidia-ml.so.1")
                .map_err(|e| format!("libnvidia-ml.so.1: {e}"))?;
            let init: Init = *library
                .get(b"nvmlInit_v2\0")
                .map_err(|e| format!("nvmlInit_v2: {e}"))?;
            let by_index: HandleByIndex = *library
                .get(b"nvmlDeviceGetHandleByIndex_v2\0")
                .map_err(|e| format!("nvmlDeviceGetHandleByIndex_v2: {e}"))?;
            let memory_info: MemoryInfo = *library
                .get(b"nvmlDeviceGetMemoryInfo\0")
                .map_err(|e| format!("nvmlDeviceGetMemoryInfo: {e}"))?;
            let status = init();
            if status != 0 {
                return Err(format!("nvmlInit_v2 returned {status}"));
            }
            let mut device = std::ptr::null_mut();
            let status = by_index(0, &mut device);
            if status != 0 {
                return Err(format!(
                    "nvmlDeviceGetHandleByIndex_v2(0) returned {status}"
                ));
            }
            Ok(Nvml {
                _library: library,
                memory_info,
                device,
            })
        }
    }

    #[allow(unsafe_code)]
    fn used_bytes(&self) -> Option<u64> {
        let mut memory = NvmlMemory::default();
        // SAFETY: `device` came from NVML and `memory` is a valid nvmlMemory_t to write.
        let status = unsafe { (self.memory_info)(self.device, &mut memory) };
        (status == 0).then_some(memory.used)
    }
}

/// Samples device 0's used memory every 10 ms until [`GpuMemory::finish`].
pub struct GpuMemory {
    baseline: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl GpuMemory {
    /// Starts sampling; call it before the process first touches CUDA so the baseline is
    /// other processes' memory only. Errors say why NVML is not usable here.
    pub fn start() -> Result<GpuMemory, String> {
        let nvml = Nvml::open()?;
        let baseline = nvml.used_bytes().ok_or("nvmlDeviceGetMemoryInfo failed")?;
        let peak = Arc::new(AtomicU64::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_peak, thread_stop) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                if let Some(used) = nvml.used_bytes() {
                    thread_peak.fetch_max(used, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Ok(GpuMemory {
            baseline,
            peak,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sampling and returns the RESULT fields: the device's peak used MiB, the baseline
    /// before this process, and their difference.
    pub fn finish(mut self) -> serde_json::Value {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let peak = self.peak.load(Ordering::Relaxed);
        serde_json::json!({
            "gpu_device_peak_used_mib": peak as f64 / MIB,
            "gpu_baseline_used_mib": self.baseline as f64 / MIB,
            "gpu_process_peak_mib": peak.saturating_sub(self.baseline) as f64 / MIB,
        })
    }
}

/// Total minus free memory of the device whose CUDA context is current on this thread (the one
/// libtorch made current when it ran the work here), in bytes.
#[allow(unsafe_code)]
fn device_used_bytes() -> Result<u64, String> {
    // SAFETY: libcuda is already loaded by libtorch_cuda; cuMemGetInfo_v2 is called with the
    // signature of cuda.h and two valid size_t out-pointers.
    unsafe {
        let library =
            libloading::Library::new("libcuda.so.1").map_err(|e| format!("libcuda.so.1: {e}"))?;
        let get: CuMemGetInfo = *library
            .get(b"cuMemGetInfo_v2\0")
            .map_err(|e| format!("cuMemGetInfo_v2: {e}"))?;
        let (mut free, mut total) = (0usize, 0usize);
        let status = get(&mut free, &mut total);
        if status != 0 {
            return Err(format!("cuMemGetInfo_v2 returned {status}"));
        }
        Ok(total.saturating_sub(free) as u64)
    }
}

/// The RESULT's GPU memory fields: on the CPU (`None`) only libtorch's allocator peak as null;
/// on CUDA NVML's sampled peak (or why there is none) and the memory in use at the end, beside
/// the allocator peak, still null, since tch cannot read it. Call it on the thread that ran the
/// work, after the last synchronisation.
pub fn fields(sampler: Option<Result<GpuMemory, String>>) -> serde_json::Value {
    let mut fields = match sampler {
        None => return serde_json::json!({"peak_gpu_allocated_mib": null}),
        Some(Ok(sampler)) => sampler.finish(),
        Some(Err(why)) => serde_json::json!({
            "gpu_device_peak_used_mib": null,
            "gpu_process_peak_mib": null,
            "gpu_nvml_unavailable": why,
        }),
    };
    match device_used_bytes() {
        Ok(used) => fields["gpu_used_at_end_mib"] = (used as f64 / MIB).into(),
        Err(why) => {
            fields["gpu_used_at_end_mib"] = serde_json::Value::Null;
            fields["gpu_used_at_end_unavailable"] = why.into();
        }
    }
    fields["peak_gpu_allocated_mib"] = serde_json::Value::Null;
    fields["peak_gpu_allocated_note"] =
        "tch exposes no CUDA allocator statistics; see gpu_used_at_end_mib and gpu_process_peak_mib"
            .into();
    fields
}
