//! Hugging Face checkpoints: `config.json` plus one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`, loaded into a tch `VarStore` whose variable paths are the
//! checkpoint's key names. Shared by every model of this crate (CLIP now, Qwen2.5-VL next).
//!
//! Loading runs in two phases, so a bad checkpoint fails before any weight is copied and long
//! before any forward pass:
//!
//! 1. [`Checkpoint::open`] reads only the safetensors headers (names, dtypes, shapes, offsets)
//!    and checks that each file holds all the bytes its header describes and that every shard
//!    holds what the index says it does;
//! 2. [`Checkpoint::load_into`] checks every variable of the store against those headers
//!    (present, same shape: `copy_` would silently broadcast a wrong shape), then reads the files
//!    one at a time, hashing them as it goes, and copies each tensor into its variable, which
//!    converts dtype (bf16 checkpoint → f32 on CPU) and device on the way.
//!
//! The safetensors format is parsed by twin-core (`twin_core::safetensors`, where it is fuzzed
//! without libtorch) rather than through the `safetensors` crate: only the header is needed up
//! front, and each failure can then name the file and the tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use twin_core::safetensors::{self, Dtype};

use crate::MlError;

/// The model's configuration inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// A checkpoint in one file.
pub const SINGLE_FILE: &str = "model.safetensors";
/// A sharded checkpoint's index: `{"weight_map": {tensor name: shard file name}}`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where a tensor lives and what it is, from its file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: Kind,
    pub shape: Vec<i64>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Byte range of the data inside the file (header included in the count).
    start: usize,
    end: usize,
}

/// What [`Checkpoint::load_into`] did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Variables filled.
    pub loaded: usize,
    /// Checkpoint tensors no variable asked for (buffers such as `position_ids`, the other
    /// tower of a model loaded in part).
    pub unused: Vec<String>,
    /// SHA-256 of the weights files' bytes, concatenated in [`Checkpoint::files`] order.
    pub weights_hash: String,
}

/// A checkpoint directory whose headers have been read and checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, u64)>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl Checkpoint {
    /// Opens `dir`: requires `config.json`, then `model.safetensors.index.json` (sharded) or
    /// `model.safetensors`, and reads every weights file's header.
    pub fn open(dir: &Path) -> Result<Checkpoint, MlError> {
        let config = dir.join(CONFIG_FILE);
        if !config.is_file() {
            return Err(MlError::io(
                config,
                "missing: a checkpoint directory needs config.json",
            ));
        }
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (files, weight_map) = if index.is_file() {
            let weight_map = read_index(&index)?;
            let names: BTreeSet<&String> = weight_map.values().collect();
            // Shard names sort in shard order (model-00001-of-00003.safetensors, ...), which
            // makes the hash's file order the index's.
            let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
            (files, Some(weight_map))
        } else if single.is_file() {
            (vec![single], None)
        } else {
            return Err(MlError::io(
                dir,
                "no model.safetensors or model.safetensors.index.json (only safetensors \
                 checkpoints are supported)",
            ));
        };

        let mut tensors = BTreeMap::new();
        let mut sized_files = Vec::with_capacity(files.len());
        for (i, path) in files.into_iter().enumerate() {
            let (len, header) = read_header(&path, i)?;
            for (name, info) in header {
                if let Some(map) = &weight_map {
                    // A tensor the index places elsewhere is a stray copy; the index wins.
                    if map.get(&name).map(|f| dir.join(f)) != Some(path.clone()) {
                        continue;
                    }
                }
                tensors.insert(name, info);
            }
            sized_files.push((path, len));
        }
        if let Some(map) = &weight_map {
            for (name, file) in map {
                if !tensors.contains_key(name) {
                    return Err(MlError::corrupt(
                        dir.join(file),
                        format!(
                            "the index places tensor `{name}` in this shard but its header does not list it"
                        ),
                    ));
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files: sized_files,
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// `config.json` as JSON; errors name the file.
    pub fn config_json(&self) -> Result<serde_json::Value, MlError> {
        read_json(&self.config_path())
    }

    /// Bytes the tensors whose names pass `keep` would take loaded as `kind`: a model's size
    /// before it is loaded.
    pub fn bytes_as(&self, kind: Kind, keep: impl Fn(&str) -> bool) -> u64 {
        self.tensors
            .iter()
            .filter(|(name, _)| keep(name))
            .map(|(_, t)| t.shape.iter().product::<i64>().max(0) as u64)
            .sum::<u64>()
            * kind.elt_size_in_bytes() as u64
    }

    /// The weights files in hash order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Fills every variable of `vs` from the checkpoint. `source_key` maps a variable's path
    /// to the checkpoint key holding it (the identity where the layouts agree). All variables
    /// are checked (present, same shape) before any data is read.
    pub fn load_into(
        &self,
        vs: &VarStore,
        source_key: impl Fn(&str) -> String,
    ) -> Result<LoadReport, MlError> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut plan: Vec<Vec<(String, Tensor)>> =
            (0..self.files.len()).map(|_| Vec::new()).collect();
        let mut used = BTreeSet::new();
        for (name, var) in vars {
            let key = source_key(&name);
            let info = self
                .tensors
                .get(&key)
                .ok_or_else(|| MlError::MissingTensor {
                    dir: self.dir.clone(),
                    name: key.clone(),
                })?;
            if info.shape != var.size() {
                return Err(MlError::WrongShape {
                    dir: self.dir.clone(),
                    name: key,
                    expected: var.size(),
                    found: info.shape.clone(),
                });
            }
            used.insert(key.clone());
            plan[info.file].push((key, var));
        }

        let mut hasher = Sha256::new();
        let mut loaded = 0;
        for ((path, len), wanted) in self.files.iter().zip(plan) {
            let bytes = std::fs::read(path).map_err(|e| MlError::io(path, e))?;
            if bytes.len() as u64 != *len {
                return Err(MlError::corrupt(
                    path,
                    format!(
                        "changed while loading ({} bytes, {len} when its header was read)",
                        bytes.len()
                    ),
                ));
            }
            hasher.update(&bytes);
            for (key, mut var) in wanted {
                let info = &self.tensors[&key];
                // Allocation failures (a model too large for the device) are named as such.
                let src =
                    Tensor::f_from_data_size(&bytes[info.start..info.end], &info.shape, info.dtype)
                        .map_err(MlError::from_torch)?;
                tch::no_grad(|| var.f_copy_(&src)).map_err(MlError::from_torch)?;
                loaded += 1;
            }
        }
        let unused = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        Ok(LoadReport {
            loaded,
            unused,
            weights_hash: hex::encode(hasher.finalize()),
        })
    }

    /// SHA-256 of the weights files' bytes, concatenated in [`Checkpoint::files`] order: the
    /// same value [`LoadReport::weights_hash`] gives, without loading anything.
    pub fn weights_hash(&self) -> Result<String, MlError> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for (path, _) in &self.files {
            let mut f = File::open(path).map_err(|e| MlError::io(path, e))?;
            loop {
                let n = f.read(&mut buf).map_err(|e| MlError::io(path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Bytes a model's variables take on its device: what keeping the model loaded costs.
pub fn var_store_bytes(vs: &VarStore) -> u64 {
    vs.variables()
        .values()
        .map(|t| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64)
        .sum()
}

/// Fills `var` with seeded uniform values of standard deviation `std` (uniform on [-a, a] with
/// a = std·√3), for random-weight models; 24 random bits per value is plenty for weights nobody
/// trains. The same generator state gives the same values on every machine.
pub fn fill_uniform(
    var: &mut Tensor,
    std: f64,
    rng: &mut impl rand::RngCore,
) -> Result<(), MlError> {
    let bound = std * 3f64.sqrt();
    let values: Vec<f32> = (0..var.numel())
        .map(|_| {
            let unit = f64::from(rng.next_u32() >> 8) / f64::from(1u32 << 24);
            ((2.0 * unit - 1.0) * bound) as f32
        })
        .collect();
    let src = Tensor::from_slice(&values).view(var.size().as_slice());
    tch::no_grad(|| var.f_copy_(&src))?;
    Ok(())
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value, MlError> {
    let text = std::fs::read_to_string(path).map_err(|e| MlError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| MlError::config(path, format!("not valid JSON: {e}")))
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>, MlError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let value = read_json(path)?;
    let index: Index =
        serde_json::from_value(value).map_err(|e| MlError::config(path, e.to_string()))?;
    for file in index.weight_map.values() {
        // The index names files beside it; anything else (a path, `..`) is refused.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(MlError::config(
                path,
                format!("shard name {file:?} is not a plain file name"),
            ));
        }
    }
    Ok(index.weight_map)
}

fn kind_of(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::Bool => Kind::Bool,
    }
}

fn dtype_of(kind: Kind) -> Option<&'static str> {
    Some(
        match kind {
            Kind::Double => Dtype::F64,
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Int16 => Dtype::I16,
            Kind::Int8 => Dtype::I8,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::Bool,
            _ => return None,
        }
        .as_str(),
    )
}

/// Reads one file's header: its length and its tensors, each checked to lie inside the file.
/// The parsing is twin-core's (`twin_core::safetensors`, fuzzed); this reads the bytes.
fn read_header(path: &Path, file: usize) -> Result<(u64, BTreeMap<String, TensorInfo>), MlError> {
    let mut f = File::open(path).map_err(|e| MlError::io(path, e))?;
    let len = f.metadata().map_err(|e| MlError::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    if len >= 8 {
        f.read_exact(&mut prefix)
            .map_err(|e| MlError::io(path, e))?;
    }
    let header_len =
        safetensors::header_len(len, &prefix).map_err(|e| MlError::corrupt(path, e.0))?;
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| MlError::io(path, e))?;
    let entries =
        safetensors::parse_header(len, &header).map_err(|e| MlError::corrupt(path, e.0))?;
    let tensors = entries
        .into_iter()
        .map(|(name, entry)| {
            let info = TensorInfo {
                dtype: kind_of(entry.dtype),
                shape: entry.shape,
                file,
                // Inside a file of `len` bytes, which is in memory when the range is used.
                start: entry.range.start as usize,
                end: entry.range.end as usize,
            };
            (name, info)
        })
        .collect();
    Ok((len, tensors))
}

/// Reads every tensor of one safetensors file onto the CPU, in name order.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, MlError> {
    let (len, header) = read_header(path, 0)?;
    let bytes = std::fs::read(path).map_err(|e| MlError::io(path, e))?;
    if bytes.len() as u64 != len {
        return Err(MlError::corrupt(path, "changed while being read"));
    }
    header
        .into_iter()
        .map(|(name, info)| {
            let t =
                Tensor::f_from_data_size(&bytes[info.start..info.end], &info.shape, info.dtype)?;
            Ok((name, t))
        })
        .collect()
}

/// Writes tensors as one safetensors file with the `{"format": "pt"}` metadata transformers
/// expects. The file is written beside its final name and renamed into place.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), MlError> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data: Vec<u8> = Vec::new();
    for (name, tensor) in sorted {
        let dtype = dtype_of(tensor.kind()).ok_or_else(|| {
            MlError::Invalid(format!(
                "tensor `{name}` has kind {:?}, which safetensors cannot hold",
                tensor.kind()
            ))
        })?;
        let cpu = tensor.to_device(Device::Cpu).contiguous();
        let numel = cpu.numel();
        let mut bytes = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut bytes, numel)?;
        let begin = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": cpu.size(), "data_offsets": [begin, data.len()]}),
        );
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| MlError::Invalid(format!("safetensors header: {e}")))?;
    // The format pads the header with spaces so the data starts 8-byte aligned.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let tmp = path.with_extension("safetensors.partial");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| MlError::io(path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn store(shape: &[i64]) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let _ = vs
            .root()
            .sub("layer")
            .var("weight", shape, tch::nn::Init::Const(0.0));
        let _ = vs.root().var("scale", &[], tch::nn::Init::Const(0.0));
        vs
    }

    fn checkpoint(dir: &Path, weight: &Tensor) {
        std::fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        let tensors = vec![
            ("layer.weight".to_owned(), weight.shallow_clone()),
            ("scale".to_owned(), Tensor::from(2.5f32)),
            ("extra".to_owned(), Tensor::from_slice(&[1i64, 2])),
        ];
        write_safetensors(&dir.join(SINGLE_FILE), &tensors).unwrap();
    }

    #[test]
    fn round_trips_values_and_reports_unused_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let weight = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        checkpoint(dir.path(), &weight);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let vs = store(&[2, 3]);
        let report = ckpt.load_into(&vs, str::to_owned).unwrap();
        assert_eq!(report.loaded, 2);
        assert_eq!(report.unused, vec!["extra".to_owned()]);
        assert_eq!(report.weights_hash, ckpt.weights_hash().unwrap());
        let vars = vs.variables();
        assert_eq!(vars["layer.weight"], weight);
        assert_eq!(vars["scale"].double_value(&[]), 2.5);
    }

    #[test]
    fn a_broadcastable_wrong_shape_is_refused_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        checkpoint(
            dir.path(),
            &Tensor::ones([1, 3], (Kind::Float, Device::Cpu)),
        );
        let err = Checkpoint::open(dir.path())
            .unwrap()
            .load_into(&store(&[2, 3]), str::to_owned)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`layer.weight`") && msg.contains("[1, 3]") && msg.contains("[2, 3]"),
            "{msg}"
        );
    }

    #[test]
    fn a_header_longer_than_the_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "{}").unwrap();
        let path = dir.path().join(SINGLE_FILE);
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, bytes).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, MlError::CorruptWeights { ref path, .. } if path.ends_with(SINGLE_FILE)),
            "{err}"
        );
    }
}
