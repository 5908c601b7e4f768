//! CLIP's configuration, read from a Hugging Face `config.json` in either layout it comes in:
//! the nested `CLIPModel` one (`vision_config`, `text_config`, top-level `projection_dim`) and
//! the flat vision one that `CLIPVisionModelWithProjection` / `CLIPVisionModel` save. Defaults
//! are transformers 5.17's `CLIPVisionConfig` / `CLIPTextConfig` defaults, so a sparse config
//! means what it means to transformers.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::MlError;

/// Which Hugging Face class a checkpoint was saved from; decides the key layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipArchitecture {
    /// `CLIPModel`: both towers, both projections, keys under `vision_model.` / `text_model.`.
    Clip,
    /// `CLIPVisionModelWithProjection`: vision tower under `vision_model.` plus
    /// `visual_projection`.
    VisionWithProjection,
    /// `CLIPVisionModel`: the bare vision tower, keys without a prefix, no projection.
    Vision,
}

impl ClipArchitecture {
    pub const SUPPORTED: &'static str = "CLIPModel, CLIPVisionModelWithProjection, CLIPVisionModel";

    pub fn hf_name(self) -> &'static str {
        match self {
            ClipArchitecture::Clip => "CLIPModel",
            ClipArchitecture::VisionWithProjection => "CLIPVisionModelWithProjection",
            ClipArchitecture::Vision => "CLIPVisionModel",
        }
    }

    fn from_hf_name(name: &str) -> Option<ClipArchitecture> {
        match name {
            "CLIPModel" => Some(ClipArchitecture::Clip),
            "CLIPVisionModelWithProjection" => Some(ClipArchitecture::VisionWithProjection),
            "CLIPVisionModel" => Some(ClipArchitecture::Vision),
            _ => None,
        }
    }
}

/// The MLP's activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI's CLIP checkpoints.
    QuickGelu,
    /// Exact (erf) GELU: LAION's OpenCLIP conversions.
    Gelu,
    /// tanh-approximated GELU, under either of transformers' names.
    GeluNew,
    GeluPytorchTanh,
    Relu,
}

/// `CLIPVisionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        ClipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Sequence length: one class token plus the patches.
    pub fn num_positions(&self) -> i64 {
        self.grid() * self.grid() + 1
    }

    fn validate(&self) -> Result<(), String> {
        positive(
            "vision_config",
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("projection_dim", self.projection_dim),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_channels", self.num_channels),
                ("patch_size", self.patch_size),
            ],
        )?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "vision hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.image_size < self.patch_size {
            return Err(format!(
                "vision image_size {} is smaller than patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        Ok(())
    }
}

/// `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// Pooling reads the hidden state at the first `eos_token_id`, except that the legacy value
    /// 2 means "at the highest token id" (transformers keeps that for old OpenAI configs).
    pub eos_token_id: Option<i64>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

impl ClipTextConfig {
    fn validate(&self) -> Result<(), String> {
        positive(
            "text_config",
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "text hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

fn positive(section: &str, fields: &[(&str, i64)]) -> Result<(), String> {
    for (name, value) in fields {
        if *value <= 0 {
            return Err(format!("{section}.{name} must be positive, got {value}"));
        }
    }
    Ok(())
}

/// A CLIP checkpoint's configuration: which towers it has and their sizes.
///
/// Invariant: `text` is `Some` exactly when `architecture` is [`ClipArchitecture::Clip`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub architecture: ClipArchitecture,
    pub vision: ClipVisionConfig,
    pub text: Option<ClipTextConfig>,
    /// Size of the projected embeddings (`CLIPModel.projection_dim`, or the vision config's
    /// for `CLIPVisionModelWithProjection`). For a bare `CLIPVisionModel`, which has no
    /// projection, the pooled output's size, `vision.hidden_size`.
    pub projection_dim: i64,
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    /// openai/clip-vit-base-patch32 (both towers; `.vision_only()` for the image tower).
    pub fn vit_b32() -> ClipConfig {
        ClipConfig::openai(
            ClipVisionConfig::default(),
            ClipTextConfig {
                eos_token_id: Some(2),
                bos_token_id: Some(0),
                ..ClipTextConfig::default()
            },
            512,
        )
    }

    /// openai/clip-vit-large-patch14 (both towers; `.vision_only()` for the image tower).
    pub fn vit_l14() -> ClipConfig {
        ClipConfig::openai(
            ClipVisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                patch_size: 14,
                projection_dim: 768,
                ..ClipVisionConfig::default()
            },
            ClipTextConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_attention_heads: 12,
                projection_dim: 768,
                eos_token_id: Some(2),
                bos_token_id: Some(0),
                ..ClipTextConfig::default()
            },
            768,
        )
    }

    /// A few-kilobyte model for tests: 32×32 images in 8×8 patches, 2 layers of width 32.
    pub fn tiny() -> ClipConfig {
        ClipConfig::openai(
            ClipVisionConfig {
                hidden_size: 32,
                intermediate_size: 64,
                projection_dim: 16,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                ..ClipVisionConfig::default()
            },
            ClipTextConfig {
                vocab_size: 99,
                hidden_size: 32,
                intermediate_size: 64,
                projection_dim: 16,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 16,
                pad_token_id: Some(1),
                bos_token_id: Some(97),
                eos_token_id: Some(98),
                ..ClipTextConfig::default()
            },
            16,
        )
    }

    fn openai(vision: ClipVisionConfig, text: ClipTextConfig, projection_dim: i64) -> ClipConfig {
        ClipConfig {
            architecture: ClipArchitecture::Clip,
            vision,
            text: Some(text),
            projection_dim,
            logit_scale_init_value: 2.6592,
        }
    }

    /// The same image tower and projection as a `CLIPVisionModelWithProjection`: what the
    /// mining stage needs, without the text tower's weights.
    pub fn vision_only(&self) -> ClipConfig {
        let projection_dim = match self.architecture {
            ClipArchitecture::Vision => self.vision.hidden_size,
            _ => self.projection_dim,
        };
        ClipConfig {
            architecture: match self.architecture {
                ClipArchitecture::Vision => ClipArchitecture::Vision,
                _ => ClipArchitecture::VisionWithProjection,
            },
            vision: ClipVisionConfig {
                projection_dim,
                ..self.vision.clone()
            },
            text: None,
            projection_dim,
            logit_scale_init_value: self.logit_scale_init_value,
        }
    }

    /// Reads `config.json`, refusing another architecture by name.
    pub fn from_file(path: &Path) -> Result<ClipConfig, MlError> {
        let value = crate::weights::read_json(path)?;
        ClipConfig::from_json(&value).map_err(|e| match e {
            ConfigError::Unsupported(found) => MlError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found,
                supported: ClipArchitecture::SUPPORTED.to_owned(),
            },
            ConfigError::Invalid(message) => MlError::config(path, message),
        })
    }

    /// Parses a `config.json` value in either layout.
    pub fn from_json(value: &Value) -> Result<ClipConfig, ConfigError> {
        let object = value
            .as_object()
            .ok_or_else(|| ConfigError::Invalid("config is not a JSON object".into()))?;
        let architecture = detect_architecture(object)?;
        let section = |name: &str, legacy: &str| -> Value {
            // transformers rebuilds a sub-config from `*_config_dict` when present and lets it
            // override `*_config` entirely, so the same is done here.
            object
                .get(legacy)
                .filter(|v| v.is_object())
                .or_else(|| object.get(name).filter(|v| v.is_object()))
                .cloned()
                .unwrap_or_else(|| json!({}))
        };
        let invalid =
            |what: &str, e: serde_json::Error| ConfigError::Invalid(format!("{what}: {e}"));
        let config = match architecture {
            ClipArchitecture::Clip => {
                let vision: ClipVisionConfig =
                    serde_json::from_value(section("vision_config", "vision_config_dict"))
                        .map_err(|e| invalid("vision_config", e))?;
                let text: ClipTextConfig =
                    serde_json::from_value(section("text_config", "text_config_dict"))
                        .map_err(|e| invalid("text_config", e))?;
                ClipConfig {
                    architecture,
                    vision,
                    text: Some(text),
                    projection_dim: int_field(object, "projection_dim")?.unwrap_or(512),
                    logit_scale_init_value: object
                        .get("logit_scale_init_value")
                        .and_then(Value::as_f64)
                        .unwrap_or(2.6592),
                }
            }
            ClipArchitecture::VisionWithProjection | ClipArchitecture::Vision => {
                let vision: ClipVisionConfig = serde_json::from_value(value.clone())
                    .map_err(|e| invalid("vision config", e))?;
                let projection_dim = if architecture == ClipArchitecture::Vision {
                    vision.hidden_size
                } else {
                    vision.projection_dim
                };
                ClipConfig {
                    architecture,
                    vision,
                    text: None,
                    projection_dim,
                    logit_scale_init_value: 2.6592,
                }
            }
        };
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.vision.validate()?;
        if let Some(text) = &self.text {
            text.validate()?;
        }
        if (self.architecture == ClipArchitecture::Clip) != self.text.is_some() {
            return Err("a CLIPModel config needs a text config and only it has one".into());
        }
        if self.projection_dim <= 0 {
            return Err(format!(
                "projection_dim must be positive, got {}",
                self.projection_dim
            ));
        }
        Ok(())
    }

    /// The `config.json` transformers would write for this configuration.
    pub fn to_json(&self) -> Value {
        let mut value = match self.architecture {
            ClipArchitecture::Clip => {
                let mut vision = serde_json::to_value(&self.vision).unwrap_or_default();
                vision["model_type"] = json!("clip_vision_model");
                let mut text = serde_json::to_value(&self.text).unwrap_or_default();
                text["model_type"] = json!("clip_text_model");
                json!({
                    "model_type": "clip",
                    "projection_dim": self.projection_dim,
                    "logit_scale_init_value": self.logit_scale_init_value,
                    "initializer_factor": 1.0,
                    "vision_config": vision,
                    "text_config": text,
                })
            }
            ClipArchitecture::VisionWithProjection | ClipArchitecture::Vision => {
                let mut vision = serde_json::to_value(ClipVisionConfig {
                    projection_dim: if self.architecture == ClipArchitecture::Vision {
                        self.vision.projection_dim
                    } else {
                        self.projection_dim
                    },
                    ..self.vision.clone()
                })
                .unwrap_or_default();
                vision["model_type"] = json!("clip_vision_model");
                vision
            }
        };
        value["architectures"] = json!([self.architecture.hf_name()]);
        value
    }
}

/// Why a `config.json` is not a CLIP configuration we can build.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    /// Another model's config; holds what was found (`architectures` or `model_type`).
    Unsupported(String),
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Unsupported(found) => write!(
                f,
                "unsupported architecture {found:?}: expected one of {}",
                ClipArchitecture::SUPPORTED
            ),
            ConfigError::Invalid(message) => f.write_str(message),
        }
    }
}

fn int_field(
    object: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<i64>, ConfigError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ConfigError::Invalid(format!("{name} must be an integer, got {v}"))),
    }
}

/// `architectures` decides when present; otherwise `model_type` (`clip` or
/// `clip_vision_model`, the latter read as the projected vision model).
fn detect_architecture(
    object: &serde_json::Map<String, Value>,
) -> Result<ClipArchitecture, ConfigError> {
    if let Some(list) = object.get("architectures").and_then(Value::as_array) {
        let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
        if !names.is_empty() {
            return names
                .iter()
                .find_map(|n| ClipArchitecture::from_hf_name(n))
                .ok_or_else(|| ConfigError::Unsupported(names.join(", ")));
        }
    }
    match object.get("model_type").and_then(Value::as_str) {
        Some("clip") => Ok(ClipArchitecture::Clip),
        Some("clip_vision_model") => Ok(ClipArchitecture::VisionWithProjection),
        Some(other) => Err(ConfigError::Unsupported(other.to_owned())),
        None => Err(ConfigError::Unsupported(
            "no `architectures` or `model_type`".to_owned(),
        )),
    }
}

impl Serialize for ClipConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ClipConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        ClipConfig::from_json(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn presets_round_trip_through_the_hf_layout() {
        for config in [
            ClipConfig::vit_b32(),
            ClipConfig::vit_l14(),
            ClipConfig::tiny(),
        ] {
            for c in [config.clone(), config.vision_only()] {
                let back: ClipConfig = serde_json::from_value(c.to_json()).unwrap();
                assert_eq!(back, c);
            }
        }
    }

    #[test]
    fn a_sparse_nested_config_takes_transformers_defaults() {
        let c = ClipConfig::from_json(
            &json!({"architectures": ["CLIPModel"], "vision_config": {"patch_size": 14}}),
        )
        .unwrap();
        assert_eq!(c.vision.patch_size, 14);
        assert_eq!(c.vision.hidden_size, 768);
        assert_eq!(c.text.unwrap().eos_token_id, Some(49407));
        assert_eq!(c.projection_dim, 512);
    }

    #[test]
    fn legacy_config_dicts_override_the_sub_configs() {
        let c = ClipConfig::from_json(&json!({
            "model_type": "clip",
            "vision_config": {"hidden_size": 64, "num_attention_heads": 4},
            "vision_config_dict": {"hidden_size": 128, "num_attention_heads": 4},
        }))
        .unwrap();
        assert_eq!(c.vision.hidden_size, 128);
    }

    #[test]
    fn another_architecture_is_named() {
        let err = ClipConfig::from_json(
            &json!({"architectures": ["SiglipModel"], "model_type": "siglip"}),
        )
        .unwrap_err();
        assert_eq!(err, ConfigError::Unsupported("SiglipModel".into()));
        let err = ClipConfig::from_json(&json!({"model_type": "qwen2_5_vl"})).unwrap_err();
        assert!(err.to_string().contains("qwen2_5_vl"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = ClipConfig::from_json(
            &json!({"architectures": ["CLIPVisionModelWithProjection"], "hidden_act": "swish"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("swish"), "{err}");
        let err = ClipConfig::from_json(&json!({"model_type": "clip_vision_model", "hidden_size": 30, "num_attention_heads": 4}))
            .unwrap_err();
        assert!(err.to_string().contains("num_attention_heads"), "{err}");
    }
}
