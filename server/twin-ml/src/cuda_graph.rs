//! CUDA graphs and the TF32 switches, through twin-ml's C++ shim (csrc/cuda_graph.cpp).
//!
//! tch binds neither `at::cuda::CUDAGraph` nor libtorch's global TF32 flags, so a small C++
//! library does: build.rs compiles it against the wheel's headers and links it to
//! libtorch_cuda, and this module embeds it. It is written to a fresh private directory and
//! opened only once CUDA is usable ([`crate::device::cuda_available`] has loaded libtorch_cuda,
//! which the shim's own symbols resolve against); on a machine without CUDA, or in a build
//! without the shim (see build.rs), nothing is opened and callers decode eagerly.
//!
//! A graph is captured from a closure that issues the work (see [`CudaGraph::capture`]) and
//! replays that exact sequence of kernels on the same memory: inputs change by writing into
//! the tensors the closure read, outputs appear in the tensors it returned.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::NonNull;
use std::sync::OnceLock;

/// The shim's interface version this crate was written against (csrc/cuda_graph.cpp).
#[cfg(twin_cuda_shim)]
const SHIM_VERSION: c_int = 1;

#[cfg(twin_cuda_shim)]
static SHIM_LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libtwin_cuda_graph.so"));

type ErrBuf = *mut c_char;
type Status = unsafe extern "C" fn(*mut c_void, ErrBuf, usize) -> c_int;

/// The shim's entry points, resolved once; the library is never unloaded.
struct Shim {
    set_tf32: unsafe extern "C" fn(c_int, c_int, ErrBuf, usize) -> c_int,
    new: unsafe extern "C" fn(c_int, ErrBuf, usize) -> *mut c_void,
    enter: Status,
    leave: Status,
    capture_begin: Status,
    capture_end: Status,
    replay: Status,
    free: unsafe extern "C" fn(*mut c_void),
}

/// The shim, or why it cannot be used here (no CUDA, a build without it, a failed load).
fn shim() -> Result<&'static Shim, String> {
    static SHIM: OnceLock<Result<Shim, String>> = OnceLock::new();
    SHIM.get_or_init(|| {
        let loaded = load();
        if let Err(why) = &loaded {
            tracing::info!(reason = %why, "CUDA graphs are unavailable");
        }
        loaded
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Whether CUDA graphs can be captured in this process, or why not.
pub fn available() -> Result<(), String> {
    shim().map(|_| ())
}

#[cfg(not(twin_cuda_shim))]
fn load() -> Result<Shim, String> {
    Err(
        "this build of twin-ml has no CUDA shim (libtorch without CUDA, or no CUDA headers at \
         build time: see server/twin-ml/build.rs)"
            .to_owned(),
    )
}

#[cfg(twin_cuda_shim)]
fn load() -> Result<Shim, String> {
    if !crate::device::cuda_available() {
        return Err(format!("no CUDA device: {}", crate::device::describe()));
    }
    open_shim()
}

/// Writes the embedded shim out and opens it; libtorch_cuda must already be loaded.
#[cfg(twin_cuda_shim)]
#[allow(unsafe_code)]
fn open_shim() -> Result<Shim, String> {
    // A fresh directory only this user can enter, so nobody can swap the file between the
    // write and the open; the file can go once it is mapped.
    let dir = tempfile::Builder::new()
        .prefix("twin-cuda-shim-")
        .tempdir()
        .map_err(|e| format!("creating a directory for the CUDA shim: {e}"))?;
    let path = dir.path().join("libtwin_cuda_graph.so");
    std::fs::write(&path, SHIM_LIBRARY)
        .map_err(|e| format!("writing the CUDA shim to {}: {e}", path.display()))?;
    // SAFETY: the library is the shim build.rs compiled for this crate, linked against the
    // libtorch_cuda already loaded in this process (device.rs); its initialisers only set up
    // C++ statics. The handle is leaked, so the functions taken from it stay valid for the
    // life of the process, and each is declared with the signature csrc/cuda_graph.cpp gives
    // it (checked by version below).
    unsafe {
        let lib = libloading::os::unix::Library::open(
            Some(&path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
        .map_err(|e| format!("opening the CUDA shim: {e}"))?;
        let lib = libloading::Library::from(lib);
        let version: libloading::Symbol<unsafe extern "C" fn() -> c_int> =
            lib.get(b"twin_cg_version\0").map_err(|e| e.to_string())?;
        let found = version();
        if found != SHIM_VERSION {
            return Err(format!(
                "the CUDA shim has interface version {found}, this crate expects {SHIM_VERSION}"
            ));
        }
        macro_rules! symbol {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes())
                    .map_err(|e| format!("the CUDA shim lacks {}: {e}", $name))?
            };
        }
        let shim = Shim {
            set_tf32: symbol!("twin_cg_set_tf32"),
            new: symbol!("twin_cg_new"),
            enter: symbol!("twin_cg_enter"),
            leave: symbol!("twin_cg_leave"),
            capture_begin: symbol!("twin_cg_capture_begin"),
            capture_end: symbol!("twin_cg_capture_end"),
            replay: symbol!("twin_cg_replay"),
            free: symbol!("twin_cg_free"),
        };
        std::mem::forget(lib);
        Ok(shim)
    }
}

/// Calls a shim function that reports failure as a non-zero status and a message.
#[allow(unsafe_code)]
fn call(f: impl FnOnce(ErrBuf, usize) -> c_int) -> Result<(), String> {
    let mut buf = vec![0 as c_char; 1024];
    let status = f(buf.as_mut_ptr(), buf.len());
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated string of at most `len` bytes (snprintf), and
    // the buffer starts zeroed.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Err(text.to_string_lossy().into_owned())
}

/// Turns TF32 on or off for cuBLAS matmuls and cuDNN convolutions in this process (libtorch
/// allows it for cuDNN by default, so f32 convolutions on an Ampere or later GPU round their
/// inputs to 10 mantissa bits unless this turns it off). Parity runs in f32 need it off.
#[allow(unsafe_code)]
pub fn set_tf32(enabled: bool) -> Result<(), String> {
    let shim = shim()?;
    let flag = c_int::from(enabled);
    // SAFETY: a plain call into the loaded shim with a valid error buffer.
    call(|buf, len| unsafe { (shim.set_tf32)(flag, flag, buf, len) })
}

/// A captured CUDA graph. Replaying it runs the captured kernels on the memory they used at
/// capture, so every tensor the capture read or wrote must outlive the graph (the engine keeps
/// them side by side).
pub struct CudaGraph {
    shim: &'static Shim,
    graph: NonNull<c_void>,
}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph").finish_non_exhaustive()
    }
}

/// Ends a capture (or leaves the side stream) even when the closure panics, so the thread never
/// stays in capture mode or on the side stream.
struct Pending<'a> {
    graph: &'a CudaGraph,
    capturing: bool,
}

impl Pending<'_> {
    #[allow(unsafe_code)]
    fn finish(&mut self) -> Result<(), String> {
        let (shim, graph) = (self.graph.shim, self.graph.graph.as_ptr());
        let end = if self.capturing {
            shim.capture_end
        } else {
            shim.leave
        };
        self.capturing = false;
        // SAFETY: `graph` is a live graph from `twin_cg_new`; ending a capture that failed,
        // or leaving a stream not entered, is reported, not undefined.
        call(|buf, len| unsafe { end(graph, buf, len) })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl CudaGraph {
    /// Captures the work `step` issues on CUDA device `device`: `warmup` eager runs first on the
    /// capture's side stream (libraries allocate their per-stream workspaces there rather than
    /// during capture), then one run under capture, whose return value (the output tensors) is
    /// returned with the graph. `step` must not synchronise with the host (no reads of values,
    /// no copies from host memory): such a call fails the capture, which is reported here.
    pub fn capture<T>(
        device: usize,
        warmup: usize,
        mut step: impl FnMut() -> T,
    ) -> Result<(CudaGraph, T), String> {
        let shim = shim()?;
        let graph = CudaGraph::new(shim, device)?;
        let run = |step: &mut dyn FnMut() -> T| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).map_err(panic_text)
        };
        {
            let mut side = Pending {
                graph: &graph,
                capturing: false,
            };
            graph.status(shim.enter)?;
            for _ in 0..warmup {
                drop(run(&mut step)?);
            }
            side.finish()?;
        }
        let (outputs, ended) = {
            // Dropped before `graph` is returned; ends the capture even if `step` panics.
            let mut capture = Pending {
                graph: &graph,
                capturing: true,
            };
            graph.status(shim.capture_begin)?;
            let outputs = run(&mut step);
            (outputs, capture.finish())
        };
        let outputs = outputs?;
        ended?;
        Ok((graph, outputs))
    }

    #[allow(unsafe_code)]
    fn new(shim: &'static Shim, device: usize) -> Result<CudaGraph, String> {
        let device = c_int::try_from(device).map_err(|e| e.to_string())?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: a plain call into the loaded shim with a valid error buffer; it returns a
        // new graph, or null with the reason written.
        call(|buf, len| {
            ptr = unsafe { (shim.new)(device, buf, len) };
            c_int::from(ptr.is_null())
        })?;
        let graph = NonNull::new(ptr).ok_or("the CUDA shim returned no graph")?;
        Ok(CudaGraph { shim, graph })
    }

    #[allow(unsafe_code)]
    fn status(&self, f: Status) -> Result<(), String> {
        let graph = self.graph.as_ptr();
        // SAFETY: `graph` is live for as long as `self`.
        call(|buf, len| unsafe { f(graph, buf, len) })
    }

    /// Runs the captured kernels again, on the current stream.
    pub fn replay(&self) -> Result<(), String> {
        self.status(self.shim.replay)
    }
}

impl Drop for CudaGraph {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the graph came from `twin_cg_new` and is freed once, here.
        unsafe { (self.shim.free)(self.graph.as_ptr()) }
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the captured step panicked".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_graphs_are_unavailable_and_say_why() {
        if crate::device::cuda_available() {
            return;
        }
        let why = available().unwrap_err();
        assert!(
            why.contains("no CUDA device") || why.contains("no CUDA shim"),
            "{why}"
        );
        let err = CudaGraph::capture(0, 1, || ()).unwrap_err();
        assert_eq!(err, why);
        assert_eq!(set_tf32(false).unwrap_err(), why);
    }

    /// The shim builds, links and loads on a machine without a GPU, and a CUDA error inside it
    /// comes back as text instead of an exception crossing into Rust.
    #[cfg(twin_cuda_shim)]
    #[test]
    #[allow(unsafe_code)]
    fn the_shim_loads_without_a_gpu_and_reports_cuda_errors_as_text() {
        if crate::device::cuda_available() {
            return;
        }
        if let Err(why) = crate::device::load_cuda_backend() {
            panic!("libtorch_cuda did not load on this machine: {why}");
        }
        let shim: &'static Shim = Box::leak(Box::new(open_shim().unwrap()));
        let err = CudaGraph::new(shim, 0).unwrap_err();
        assert!(err.contains("CUDA"), "{err}");
        // The TF32 flags live in libtorch's global context, which needs no device.
        // SAFETY: a plain call into the loaded shim with a valid error buffer.
        call(|buf, len| unsafe { (shim.set_tf32)(0, 0, buf, len) }).unwrap();
    }
}
