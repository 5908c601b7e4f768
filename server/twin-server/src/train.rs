//! The train job's server side: pinning what a training run reads.
//!
//! The built dataset resolves to its manifest, the starting model to its manifest hash and the
//! reward modules to hashes, all before the submission is logged: a re-leased run must train on
//! exactly what was submitted, whatever was built, registered or aliased since. A dataset whose
//! train split lacks one of the labels is refused here, where the counts are at hand, rather than
//! after an executor has loaded a model.

use twin_core::model::ModelRef;
use twin_core::train::TrainSpec;

use crate::error::ApiError;
use crate::mining::invalid;
use crate::service::Service;

impl Service {
    /// Pins the dataset, the starting model and the reward; checks the labels and the device.
    pub(crate) fn resolve_train(&self, spec: &mut TrainSpec) -> Result<(), ApiError> {
        if let ModelRef::Path(path) = ModelRef::parse(&spec.model) {
            return Err(invalid(
                "spec.model",
                format!(
                    "a training run starts from a registered model, so its checkpoints' lineage \
                     names it; register `{path}` with `twin models add {path} --name NAME`"
                ),
            ));
        }
        spec.model_manifest = self.pin_model("spec.model", &spec.model)?;
        let reference = spec.dataset.clone();
        let built = self
            .read(|p| p.resolve_built(&reference).cloned())
            .ok_or_else(|| {
                invalid(
                    "spec.dataset",
                    format!(
                        "no built dataset `{reference}`; build one with a build-dataset job \
                         (`twin dataset ls` lists them)"
                    ),
                )
            })?;
        let count = |key: &str| built.counts.get(key).copied().unwrap_or(0);
        let (yes, no) = (count("train.pair.yes"), count("train.pair.no"));
        if yes == 0 || no == 0 {
            return Err(invalid(
                "spec.dataset",
                format!(
                    "built dataset `{reference}` ({}) has {yes} \"yes\" and {no} \"no\" pair \
                     questions in its train split; balanced batches need both labels",
                    built.hash
                ),
            ));
        }
        spec.manifest = Some(built.hash);
        spec.dataset_name = Some(built.name);
        if spec.device == twin_core::mine::ComputeDevice::Cuda {
            self.require_gpu_executor("spec.device")?;
        }
        let grants = spec.grants.clone();
        self.resolve_reward(&mut spec.reward, &grants)
    }
}
