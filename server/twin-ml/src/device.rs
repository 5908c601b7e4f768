//! Which device a job runs on, and making sure libtorch's CUDA backend is actually loaded.
//!
//! A binary linked with default flags drops `libtorch_cuda.so` from its needed libraries (nothing
//! references it by symbol), and libtorch then reports no CUDA even on a GPU machine. So, once
//! per process and only where an NVIDIA driver is present, the library is opened by name: the
//! binary's rpath (or `LD_LIBRARY_PATH`) finds it next to libtorch_cpu, and its static
//! initialisers register the CUDA backend. On a machine without a driver nothing is loaded and
//! everything runs on the CPU.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::MlError;

/// What a job asks for. `Auto` takes the first GPU when there is one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceRequest {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Why CUDA is or is not usable, decided once per process.
#[derive(Debug, Clone)]
struct CudaState {
    devices: usize,
    reason: String,
}

static CUDA: OnceLock<CudaState> = OnceLock::new();

fn driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::env::var_os("TWIN_LOAD_CUDA").is_some()
}

#[allow(unsafe_code)]
pub(crate) fn load_cuda_backend() -> Result<(), String> {
    // SAFETY: libtorch_cuda's initialisers only register CUDA kernels and hooks with the libtorch
    // already loaded in this process; the handle is leaked so the library is never unloaded
    // while its registrations are live.
    let lib = unsafe { libloading::Library::new("libtorch_cuda.so") }.map_err(|e| e.to_string())?;
    std::mem::forget(lib);
    Ok(())
}

fn cuda_state() -> &'static CudaState {
    CUDA.get_or_init(|| {
        if !driver_present() {
            return CudaState {
                devices: 0,
                reason: "no NVIDIA driver (/proc/driver/nvidia/version is absent)".into(),
            };
        }
        if let Err(e) = load_cuda_backend() {
            tracing::warn!(error = %e, "libtorch_cuda could not be loaded; running on the CPU");
            return CudaState {
                devices: 0,
                reason: format!("libtorch_cuda.so could not be loaded: {e}"),
            };
        }
        let devices = tch::Cuda::device_count().max(0) as usize;
        let reason = if devices == 0 {
            "libtorch sees no CUDA device".to_owned()
        } else {
            format!("{devices} CUDA device(s)")
        };
        CudaState { devices, reason }
    })
}

/// Whether a CUDA device can be used (loads the CUDA backend on first call).
pub fn cuda_available() -> bool {
    cuda_state().devices > 0
}

/// A one-line description for logs and `model info`: "cuda (2 CUDA device(s))" or "cpu (...)".
pub fn describe() -> String {
    let s = cuda_state();
    if s.devices > 0 {
        format!("cuda ({})", s.reason)
    } else {
        format!("cpu ({})", s.reason)
    }
}

/// Resolves a request to a device, refusing `Cuda` where there is none.
pub fn select(request: DeviceRequest) -> Result<Device, MlError> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto if cuda_available() => Ok(Device::Cuda(0)),
        DeviceRequest::Auto => Ok(Device::Cpu),
        DeviceRequest::Cuda if cuda_available() => Ok(Device::Cuda(0)),
        DeviceRequest::Cuda => Err(MlError::CudaUnavailable(cuda_state().reason.clone())),
    }
}

impl From<twin_core::mine::ComputeDevice> for DeviceRequest {
    fn from(d: twin_core::mine::ComputeDevice) -> Self {
        use twin_core::mine::ComputeDevice;
        match d {
            ComputeDevice::Auto => DeviceRequest::Auto,
            ComputeDevice::Cpu => DeviceRequest::Cpu,
            ComputeDevice::Cuda => DeviceRequest::Cuda,
        }
    }
}

/// The device a job runs on, resolved on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDevice {
    pub device: Device,
    /// Its name in logs, job outputs and model-cache keys: `cpu`, `cuda:0`.
    pub name: String,
}

/// Resolves a job spec's device: the one place ML stages turn a request into a device, so a
/// model cached by one stage is found by another under the same device name.
pub fn for_job(request: twin_core::mine::ComputeDevice) -> Result<JobDevice, MlError> {
    let device = select(request.into())?;
    Ok(JobDevice {
        device,
        name: name(device),
    })
}

/// A device's name as PyTorch writes it: `cpu`, `cuda:0`.
pub fn name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The floating-point type models run in on a device: bf16 on GPU, f32 on CPU.
pub fn compute_kind(device: Device) -> tch::Kind {
    if device.is_cuda() {
        tch::Kind::BFloat16
    } else {
        tch::Kind::Float
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_cuda_is_refused_without_a_device() {
        assert_eq!(select(DeviceRequest::Cpu).unwrap(), Device::Cpu);
        if !cuda_available() {
            let err = select(DeviceRequest::Cuda).unwrap_err();
            assert!(err.to_string().contains("CUDA was requested"), "{err}");
            assert_eq!(select(DeviceRequest::Auto).unwrap(), Device::Cpu);
        }
    }

    #[test]
    fn a_jobs_device_is_named_as_pytorch_names_it() {
        let cpu = for_job(twin_core::mine::ComputeDevice::Cpu).unwrap();
        assert_eq!((cpu.device, cpu.name.as_str()), (Device::Cpu, "cpu"));
        assert_eq!(name(Device::Cuda(1)), "cuda:1");
        if !cuda_available() {
            let err = for_job(twin_core::mine::ComputeDevice::Cuda).unwrap_err();
            assert_eq!(err.failure_code(), twin_core::FailureCode::Unavailable);
        }
    }

    #[test]
    fn libtorch_runs_a_matmul() {
        let a = tch::Tensor::ones([2, 3], (tch::Kind::Float, Device::Cpu));
        let b = tch::Tensor::ones([3, 4], (tch::Kind::Float, Device::Cpu));
        let c = a.matmul(&b);
        assert_eq!(c.size(), vec![2, 4]);
        assert_eq!(c.double_value(&[1, 3]), 3.0);
    }
}
