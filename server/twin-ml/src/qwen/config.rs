//! Qwen2.5-VL's configuration, read from a Hugging Face `config.json` in either layout it comes
//! in: the flat one of the hub's checkpoints (text keys at the top level, `rope_theta` and
//! `rope_scaling: {type: "mrope", mrope_section}`) and the nested one transformers 5 saves
//! (`text_config` with `rope_parameters`). Defaults are transformers 5.17's
//! `Qwen2_5_VLTextConfig` / `Qwen2_5_VLVisionConfig` defaults (the 7B shape), so a sparse config
//! means what it means to transformers.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::MlError;

/// The one class this module implements.
pub const ARCHITECTURE: &str = "Qwen2_5_VLForConditionalGeneration";

/// `Qwen2_5_VLVisionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QwenVisionConfig {
    pub depth: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_heads: i64,
    /// `in_chans` in the hub's files (renamed on reading).
    pub in_channels: i64,
    pub out_hidden_size: i64,
    pub patch_size: i64,
    pub spatial_merge_size: i64,
    pub temporal_patch_size: i64,
    pub window_size: i64,
    pub fullatt_block_indexes: Vec<i64>,
    pub hidden_act: String,
    pub tokens_per_second: i64,
    /// The 2-D rotary base; transformers keeps it in `rope_parameters.rope_theta` (10000).
    #[serde(skip)]
    pub rope_theta: f64,
}

impl Default for QwenVisionConfig {
    fn default() -> Self {
        QwenVisionConfig {
            depth: 32,
            hidden_size: 1280,
            intermediate_size: 3420,
            num_heads: 16,
            in_channels: 3,
            out_hidden_size: 3584,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            window_size: 112,
            fullatt_block_indexes: vec![7, 15, 23, 31],
            hidden_act: "silu".into(),
            tokens_per_second: 4,
            rope_theta: 10_000.0,
        }
    }
}

impl QwenVisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    /// Values per patch: channels × temporal patch × patch × patch (1,176 for Qwen2.5-VL).
    pub fn patch_dim(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Image side lengths must be multiples of this (28).
    pub fn factor(&self) -> i64 {
        self.patch_size * self.spatial_merge_size
    }

    fn validate(&self) -> Result<(), String> {
        positive(
            "vision_config",
            &[
                ("depth", self.depth),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_heads", self.num_heads),
                ("in_channels", self.in_channels),
                ("out_hidden_size", self.out_hidden_size),
                ("patch_size", self.patch_size),
                ("spatial_merge_size", self.spatial_merge_size),
                ("temporal_patch_size", self.temporal_patch_size),
                ("window_size", self.window_size),
            ],
        )?;
        if self.hidden_size % self.num_heads != 0 || self.head_dim() % 4 != 0 {
            return Err(format!(
                "vision_config: hidden_size {} must split into num_heads {} heads of a size \
                 divisible by 4 (the 2-D rotary halves each head twice)",
                self.hidden_size, self.num_heads
            ));
        }
        if self.window_size % self.factor() != 0 {
            return Err(format!(
                "vision_config: window_size {} is not a multiple of patch_size × \
                 spatial_merge_size = {}",
                self.window_size,
                self.factor()
            ));
        }
        if let Some(bad) = self
            .fullatt_block_indexes
            .iter()
            .find(|&&i| i < 0 || i >= self.depth)
        {
            return Err(format!(
                "vision_config: fullatt_block_indexes names block {bad}, but depth is {}",
                self.depth
            ));
        }
        activation_supported(&self.hidden_act, "vision_config")
    }
}

/// `Qwen2_5_VLTextConfig`: the Qwen2 decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QwenTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub hidden_act: String,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub use_sliding_window: bool,
    /// Read from `rope_parameters` or `rope_scaling` / `rope_theta`, whichever the layout has.
    #[serde(skip)]
    pub rope_theta: f64,
    /// How the rotary dimensions (half the head) split between time, height and width.
    #[serde(skip)]
    pub mrope_section: Vec<i64>,
}

impl Default for QwenTextConfig {
    fn default() -> Self {
        QwenTextConfig {
            vocab_size: 152_064,
            hidden_size: 8192,
            intermediate_size: 29_568,
            num_hidden_layers: 80,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            hidden_act: "silu".into(),
            max_position_embeddings: 32_768,
            rms_norm_eps: 1e-5,
            use_sliding_window: false,
            rope_theta: 1_000_000.0,
            mrope_section: vec![16, 24, 24],
        }
    }
}

impl QwenTextConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self) -> Result<(), String> {
        positive(
            "text config",
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.num_key_value_heads),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        let section: i64 = self.mrope_section.iter().sum();
        if self.mrope_section.len() != 3
            || self.mrope_section.iter().any(|&s| s < 0)
            || section * 2 != self.head_dim()
        {
            return Err(format!(
                "mrope_section {:?} must be three sizes summing to half the head size ({})",
                self.mrope_section,
                self.head_dim() / 2
            ));
        }
        if self.use_sliding_window {
            return Err(
                "use_sliding_window is true: sliding-window attention is not \
                        implemented (Qwen2.5-VL's released checkpoints do not use it)"
                    .into(),
            );
        }
        activation_supported(&self.hidden_act, "text config")
    }
}

/// A whole `Qwen2_5_VLForConditionalGeneration` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlConfig {
    pub text: QwenTextConfig,
    pub vision: QwenVisionConfig,
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub vision_start_token_id: i64,
    pub tie_word_embeddings: bool,
    /// `eos_token_id` of the config (one id or several), if it names any.
    pub eos_token_ids: Vec<i64>,
}

/// Why a config was refused: another model entirely, or a Qwen2.5-VL config that is wrong.
#[derive(Debug)]
pub enum ConfigError {
    Unsupported(String),
    Invalid(String),
}

impl QwenVlConfig {
    /// Reads `config.json`, refusing another architecture by name.
    pub fn from_file(path: &Path) -> Result<QwenVlConfig, MlError> {
        let value = crate::weights::read_json(path)?;
        QwenVlConfig::from_json(&value).map_err(|e| match e {
            ConfigError::Unsupported(found) => MlError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found,
                supported: ARCHITECTURE.to_owned(),
            },
            ConfigError::Invalid(message) => MlError::config(path, message),
        })
    }

    /// Parses a `config.json` value in either layout.
    pub fn from_json(value: &Value) -> Result<QwenVlConfig, ConfigError> {
        let object = value
            .as_object()
            .ok_or_else(|| ConfigError::Invalid("config is not a JSON object".into()))?;
        check_architecture(object)?;
        let invalid =
            |what: &str, e: serde_json::Error| ConfigError::Invalid(format!("{what}: {e}"));

        // transformers 5 nests the decoder under `text_config`; the hub's files keep its keys
        // at the top level. A nested section wins where both exist, as it does in transformers.
        let nested = object.get("text_config").and_then(Value::as_object);
        let text_source: &Map<String, Value> = nested.unwrap_or(object);
        let mut text: QwenTextConfig = serde_json::from_value(Value::Object(text_source.clone()))
            .map_err(|e| invalid("text config", e))?;
        let rope = text_source
            .get("rope_parameters")
            .or_else(|| text_source.get("rope_scaling"))
            .or_else(|| object.get("rope_parameters"))
            .or_else(|| object.get("rope_scaling"))
            .and_then(Value::as_object);
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        // The hub's configs say "mrope"; transformers maps that to the default (unscaled)
        // rotary with M-RoPE sections. Any scaled variant would change the frequencies.
        if !matches!(rope_type, "default" | "mrope") {
            return Err(ConfigError::Invalid(format!(
                "rope type {rope_type:?} is not supported (only unscaled M-RoPE)"
            )));
        }
        text.rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| text_source.get("rope_theta"))
            .or_else(|| object.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(text.rope_theta);
        if let Some(section) = rope.and_then(|r| r.get("mrope_section")) {
            text.mrope_section =
                serde_json::from_value(section.clone()).map_err(|e| invalid("mrope_section", e))?;
        }

        let mut vision_value = object
            .get("vision_config")
            .cloned()
            .unwrap_or_else(|| json!({}));
        // The hub's files say `in_chans`; transformers renames it `in_channels`.
        if let Some(v) = vision_value.as_object_mut()
            && let Some(chans) = v.remove("in_chans")
        {
            v.entry("in_channels").or_insert(chans);
        }
        let mut vision: QwenVisionConfig = serde_json::from_value(vision_value.clone())
            .map_err(|e| invalid("vision_config", e))?;
        if let Some(theta) = vision_value
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            vision.rope_theta = theta;
        }

        let int = |key: &str, default: i64| -> Result<i64, ConfigError> {
            match object.get(key).or_else(|| text_source.get(key)) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_i64()
                    .ok_or_else(|| ConfigError::Invalid(format!("{key} is not an integer: {v}"))),
            }
        };
        let tie_word_embeddings = object
            .get("tie_word_embeddings")
            .or_else(|| text_source.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let eos_token_ids = match object
            .get("eos_token_id")
            .or_else(|| text_source.get("eos_token_id"))
        {
            Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_i64).collect(),
            _ => Vec::new(),
        };
        let config = QwenVlConfig {
            text,
            vision,
            image_token_id: int("image_token_id", 151_655)?,
            video_token_id: int("video_token_id", 151_656)?,
            vision_start_token_id: int("vision_start_token_id", 151_652)?,
            tie_word_embeddings,
            eos_token_ids,
        };
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.text.validate()?;
        self.vision.validate()?;
        if self.vision.out_hidden_size != self.text.hidden_size {
            return Err(format!(
                "vision_config.out_hidden_size {} differs from the decoder's hidden_size {}",
                self.vision.out_hidden_size, self.text.hidden_size
            ));
        }
        for (name, id) in [
            ("image_token_id", self.image_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
        ] {
            if !(0..self.text.vocab_size).contains(&id) {
                return Err(format!(
                    "{name} {id} is outside the vocabulary (vocab_size {})",
                    self.text.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// The shape of Qwen2.5-VL-3B-Instruct (3.75 B parameters), for benchmarks with random
    /// weights.
    pub fn qwen2_5_vl_3b() -> QwenVlConfig {
        QwenVlConfig {
            text: QwenTextConfig {
                vocab_size: 151_936,
                hidden_size: 2048,
                intermediate_size: 11_008,
                num_hidden_layers: 36,
                num_attention_heads: 16,
                num_key_value_heads: 2,
                max_position_embeddings: 128_000,
                rms_norm_eps: 1e-6,
                ..QwenTextConfig::default()
            },
            vision: QwenVisionConfig {
                out_hidden_size: 2048,
                ..QwenVisionConfig::default()
            },
            image_token_id: 151_655,
            video_token_id: 151_656,
            vision_start_token_id: 151_652,
            tie_word_embeddings: true,
            eos_token_ids: vec![151_645],
        }
    }

    /// The CPU benchmark's small shape: hidden 512, 8 layers, vision depth 4.
    pub fn bench_small() -> QwenVlConfig {
        let mut c = QwenVlConfig::qwen2_5_vl_3b();
        c.text.hidden_size = 512;
        c.text.intermediate_size = 1376;
        c.text.num_hidden_layers = 8;
        c.text.num_attention_heads = 8;
        c.text.num_key_value_heads = 2;
        c.text.mrope_section = vec![8, 12, 12];
        c.vision.depth = 4;
        c.vision.hidden_size = 256;
        c.vision.intermediate_size = 512;
        c.vision.num_heads = 4;
        c.vision.fullatt_block_indexes = vec![3];
        c.vision.out_hidden_size = 512;
        c
    }

    /// A tiny shape for tests: every mechanism (GQA, M-RoPE sections, windows and full blocks)
    /// at a size that runs in milliseconds.
    pub fn tiny() -> QwenVlConfig {
        let mut c = QwenVlConfig::bench_small();
        c.text.vocab_size = 151_680;
        c.text.hidden_size = 32;
        c.text.intermediate_size = 64;
        c.text.num_hidden_layers = 2;
        c.text.num_attention_heads = 2;
        c.text.num_key_value_heads = 1;
        c.text.mrope_section = vec![2, 3, 3];
        c.text.max_position_embeddings = 4096;
        c.vision.depth = 4;
        c.vision.hidden_size = 32;
        c.vision.intermediate_size = 64;
        c.vision.num_heads = 2;
        c.vision.fullatt_block_indexes = vec![1, 3];
        c.vision.out_hidden_size = 32;
        c
    }

    /// The `config.json` transformers 5 writes (nested layout).
    pub fn to_json(&self) -> Value {
        let mut text = serde_json::to_value(&self.text).unwrap_or_default();
        text["model_type"] = json!("qwen2_5_vl_text");
        text["rope_parameters"] = json!({
            "rope_type": "default",
            "rope_theta": self.text.rope_theta,
            "mrope_section": self.text.mrope_section,
        });
        text["tie_word_embeddings"] = json!(self.tie_word_embeddings);
        let mut vision = serde_json::to_value(&self.vision).unwrap_or_default();
        vision["model_type"] = json!("qwen2_5_vl");
        vision["rope_parameters"] =
            json!({"rope_type": "axial", "rope_theta": self.vision.rope_theta});
        json!({
            "architectures": [ARCHITECTURE],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": self.eos_token_ids,
        })
    }
}

fn check_architecture(object: &Map<String, Value>) -> Result<(), ConfigError> {
    let declared: Vec<&str> = object
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = object.get("model_type").and_then(Value::as_str);
    if declared.contains(&ARCHITECTURE) {
        return Ok(());
    }
    match (declared.first(), model_type) {
        (None, Some("qwen2_5_vl")) => Ok(()),
        (Some(other), _) => Err(ConfigError::Unsupported((*other).to_owned())),
        (None, other) => Err(ConfigError::Unsupported(format!(
            "model_type {}",
            other.unwrap_or("(none)")
        ))),
    }
}

fn activation_supported(name: &str, section: &str) -> Result<(), String> {
    match name {
        "silu" | "swish" => Ok(()),
        other => Err(format!(
            "{section}: hidden_act {other:?} is not supported (Qwen2.5-VL uses silu)"
        )),
    }
}

fn positive(section: &str, fields: &[(&str, i64)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| *v <= 0) {
        Some((name, v)) => Err(format!("{section}: {name} must be positive, got {v}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_hub_layout_and_the_nested_layout_read_the_same() {
        let nested = QwenVlConfig::tiny().to_json();
        let from_nested = QwenVlConfig::from_json(&nested).unwrap();
        assert_eq!(from_nested, QwenVlConfig::tiny());

        let mut flat = serde_json::to_value(&QwenVlConfig::tiny().text).unwrap();
        flat["architectures"] = json!([ARCHITECTURE]);
        flat["model_type"] = json!("qwen2_5_vl");
        flat["rope_theta"] = json!(1_000_000.0);
        flat["rope_scaling"] = json!({"type": "mrope", "mrope_section": [2, 3, 3]});
        flat["vision_config"] = nested["vision_config"].clone();
        flat["vision_config"]["in_chans"] = json!(3);
        flat["tie_word_embeddings"] = json!(true);
        flat["eos_token_id"] = json!(151_645);
        let from_flat = QwenVlConfig::from_json(&flat).unwrap();
        assert_eq!(from_flat, QwenVlConfig::tiny());
    }

    #[test]
    fn another_architecture_is_refused_by_name() {
        let err = QwenVlConfig::from_json(&json!({"architectures": ["LlamaForCausalLM"]}));
        assert!(matches!(err, Err(ConfigError::Unsupported(n)) if n == "LlamaForCausalLM"));
    }

    #[test]
    fn inconsistent_sizes_are_refused_with_the_reason() {
        let mut c = QwenVlConfig::tiny().to_json();
        c["text_config"]["rope_parameters"]["mrope_section"] = json!([2, 2, 2]);
        let Err(ConfigError::Invalid(m)) = QwenVlConfig::from_json(&c) else {
            panic!("accepted")
        };
        assert!(m.contains("mrope_section"), "{m}");
        let mut c = QwenVlConfig::tiny().to_json();
        c["vision_config"]["out_hidden_size"] = json!(48);
        let Err(ConfigError::Invalid(m)) = QwenVlConfig::from_json(&c) else {
            panic!("accepted")
        };
        assert!(m.contains("out_hidden_size"), "{m}");
    }
}
