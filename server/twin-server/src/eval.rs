//! The eval job's server side: pinning what an eval submission reads.
//!
//! A built dataset named by name resolves to its manifest (and the name its questions are
//! reported under), the scorer modules to hashes, and a CUDA request is refused unless an
//! executor has reported a GPU. Once logged, the job's inputs are exact: a later build of the
//! same name or an alias switch cannot change what a queued job evaluates or how it scores.

use twin_core::eval::{EvalData, EvalSpec};
use twin_core::mine::ComputeDevice;

use crate::error::ApiError;
use crate::mining::invalid;
use crate::service::Service;

impl Service {
    /// Pins the built dataset and the scorer modules, and checks the device.
    pub(crate) fn resolve_eval(&self, spec: &mut EvalSpec) -> Result<(), ApiError> {
        spec.model_manifest = self.pin_model("spec.model", &spec.model)?;
        if let EvalData::Built(reference) = &spec.data {
            let built = self
                .read(|p| p.resolve_built(reference).cloned())
                .ok_or_else(|| {
                    invalid(
                        "spec.data.built",
                        format!(
                            "no built dataset `{reference}`; build one with a build-dataset job \
                             (`twin dataset ls` lists them)"
                        ),
                    )
                })?;
            let questions: u64 = ["eval.pair", "eval.multi"]
                .iter()
                .filter_map(|k| built.counts.get(*k))
                .sum();
            if questions == 0 {
                return Err(invalid(
                    "spec.data.built",
                    format!(
                        "built dataset `{reference}` ({}) has no eval questions (built with \
                         eval_fraction 0?)",
                        built.hash
                    ),
                ));
            }
            spec.manifest = Some(built.hash);
            spec.dataset_name = Some(built.name);
        }
        if spec.device == ComputeDevice::Cuda {
            self.require_gpu_executor("spec.device")?;
        }
        let grants = spec.grants.clone();
        for (kind, scorer) in [
            ("pair", &mut spec.scorers.pair),
            ("multi", &mut spec.scorers.multi),
        ] {
            let field = format!("spec.scorers.{kind}.module");
            let hash = self
                .resolve_module_ref(&scorer.module, &field, "reward", &grants)
                .map_err(|e| match e {
                    ApiError::InvalidSpec(twin_core::SpecError::Invalid { field, message })
                        if message.starts_with("no module") =>
                    {
                        invalid(
                            &field,
                            format!(
                                "{message}; register the catalogue's scorer, e.g. `twin modules \
                                 add target/wasm32-wasip2/guest/{}.wasm --name {}`",
                                scorer.module.replace('-', "_"),
                                scorer.module
                            ),
                        )
                    }
                    other => other,
                })?;
            scorer.module_hash = Some(hash);
        }
        Ok(())
    }
}
