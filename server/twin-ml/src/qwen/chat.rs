//! Turning a chat with images into what the model reads — transformers'
//! `Qwen2_5_VLProcessor.apply_chat_template` + `__call__`: the checkpoint's own chat template
//! renders the messages (each image as `<|vision_start|><|image_pad|><|vision_end|>`, Qwen's
//! default system message when none is given), the checkpoint's `tokenizer.json` tokenizes the
//! text, each `<|image_pad|>` expands to its image's merged-token count
//! (`grid_t·grid_h·grid_w / merge²`), and the 3-D positions follow.
//!
//! The template is rendered with minijinja configured as transformers configures Jinja
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`). A checkpoint
//! without a template gets Qwen2.5-VL's format from [`render_default`].

use std::path::Path;

use image::DynamicImage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::QwenVlConfig;
use super::preprocess::{PreparedImage, QwenPreprocessor};
use super::rope::{PromptPositions, prompt_positions};
use crate::MlError;

/// Qwen2.5-VL's default system message, which its template inserts when the chat has none.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";
pub const IMAGE_PAD: &str = "<|image_pad|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// One part of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    /// An image; the images themselves are passed alongside the chat, in order.
    Image,
    Text {
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Vec<Part>,
}

impl Message {
    pub fn system(text: impl Into<String>) -> Message {
        Message {
            role: "system".into(),
            content: vec![Part::Text { text: text.into() }],
        }
    }

    /// A user turn: `images` image parts first, then the text (TWIN's and FGVQA's layout).
    pub fn user_with_images(images: usize, text: impl Into<String>) -> Message {
        let mut content = vec![Part::Image; images];
        content.push(Part::Text { text: text.into() });
        Message {
            role: "user".into(),
            content,
        }
    }

    fn image_count(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, Part::Image))
            .count()
    }
}

/// The checkpoint's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: Option<String>,
}

impl ChatTemplate {
    /// Finds the template where transformers keeps it: `chat_template.jinja`, then
    /// `chat_template.json`, then `tokenizer_config.json`'s `chat_template` (a string, or a list
    /// of named templates of which "default" is used).
    pub fn load(dir: &Path) -> Result<ChatTemplate, MlError> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| MlError::io(&jinja, e))?;
            return Ok(ChatTemplate { source: Some(text) });
        }
        for file in ["chat_template.json", "tokenizer_config.json"] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let value = crate::weights::read_json(&path)?;
            match value.get("chat_template") {
                Some(Value::String(s)) => {
                    return Ok(ChatTemplate {
                        source: Some(s.clone()),
                    });
                }
                Some(Value::Array(named)) => {
                    let default = named.iter().find(|t| t["name"] == "default");
                    if let Some(s) = default.and_then(|t| t["template"].as_str()) {
                        return Ok(ChatTemplate {
                            source: Some(s.to_owned()),
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(ChatTemplate { source: None })
    }

    /// The built-in Qwen2.5-VL format, for checkpoints without a template.
    pub fn builtin() -> ChatTemplate {
        ChatTemplate { source: None }
    }

    pub fn is_builtin(&self) -> bool {
        self.source.is_none()
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, MlError> {
        let Some(source) = &self.source else {
            return Ok(render_default(messages, add_generation_prompt));
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let template_error =
            |e: minijinja::Error| MlError::Invalid(format!("chat template: {e:#}"));
        let template = env.template_from_str(source).map_err(template_error)?;
        let messages: Vec<Value> = messages.iter().map(message_json).collect();
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                add_vision_id => false,
            })
            .map_err(template_error)
    }
}

/// A message as transformers hands it to the template.
fn message_json(m: &Message) -> Value {
    let content: Vec<Value> = m
        .content
        .iter()
        .map(|p| match p {
            Part::Image => json!({"type": "image"}),
            Part::Text { text } => json!({"type": "text", "text": text}),
        })
        .collect();
    json!({"role": m.role, "content": content})
}

/// Qwen2.5-VL's chat format: a default system turn unless the chat opens with one, each turn
/// `<|im_start|>{role}\n{content}<|im_end|>\n`, images as vision-start/pad/end, and
/// `<|im_start|>assistant\n` when a generation prompt is asked for.
pub fn render_default(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    if messages.first().is_none_or(|m| m.role != "system") {
        out.push_str(&format!("{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n"));
    }
    for m in messages {
        out.push_str(&format!("{IM_START}{}\n", m.role));
        for part in &m.content {
            match part {
                Part::Image => out.push_str(&format!("{VISION_START}{IMAGE_PAD}{VISION_END}")),
                Part::Text { text } => out.push_str(text),
            }
        }
        out.push_str(&format!("{IM_END}\n"));
    }
    if add_generation_prompt {
        out.push_str(&format!("{IM_START}assistant\n"));
    }
    out
}

/// `tokenizer.json` through the tokenizers crate.
pub struct QwenTokenizer {
    inner: tokenizers::Tokenizer,
    /// The `tokenizer.json` text this tokenizer was built from, when it was built here:
    /// written back as is, because re-serialising a vocabulary with gaps in its ids (ours jumps
    /// from 255 to Qwen's special ids) makes the tokenizers crate warn about every missing id.
    source: Option<String>,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl QwenTokenizer {
    pub fn load(dir: &Path) -> Result<QwenTokenizer, MlError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(MlError::io(
                &path,
                "missing: the checkpoint needs its tokenizer.json",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| MlError::config(&path, format!("not a tokenizer: {e}")))?;
        Ok(QwenTokenizer {
            inner,
            source: None,
        })
    }

    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> QwenTokenizer {
        QwenTokenizer {
            inner,
            source: None,
        }
    }

    /// A byte-level tokenizer with no merges (every byte one token, ids 0–255) and Qwen's
    /// special tokens at Qwen's ids: what `model init-qwen` saves with a random model, so the
    /// demo and tests can chat with it without a download. Real checkpoints bring their own.
    pub fn byte_level() -> Result<QwenTokenizer, MlError> {
        let vocab: serde_json::Map<String, Value> = byte_alphabet()
            .into_iter()
            .enumerate()
            .map(|(byte, ch)| (ch.to_string(), json!(byte)))
            .chain(
                QWEN_SPECIAL_TOKENS
                    .iter()
                    .map(|(id, t)| ((*t).to_owned(), json!(id))),
            )
            .collect();
        let added: Vec<Value> = QWEN_SPECIAL_TOKENS
            .iter()
            .map(|(id, t)| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": false, "use_regex": true});
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        let source = spec.to_string();
        let inner: tokenizers::Tokenizer = source
            .parse()
            .map_err(|e| MlError::Invalid(format!("building the byte-level tokenizer: {e}")))?;
        let tokenizer = QwenTokenizer {
            inner,
            source: Some(source),
        };
        for (id, token) in QWEN_SPECIAL_TOKENS {
            if tokenizer.token_id(token) != Some(*id) {
                return Err(MlError::Invalid(format!(
                    "byte-level tokenizer: {token} did not land at id {id}"
                )));
            }
        }
        Ok(tokenizer)
    }

    /// Writes `tokenizer.json` (and a `tokenizer_config.json` naming the end-of-turn token)
    /// into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), MlError> {
        let path = dir.join("tokenizer.json");
        match &self.source {
            Some(text) => std::fs::write(&path, text).map_err(|e| MlError::io(&path, e))?,
            None => self
                .inner
                .save(&path, true)
                .map_err(|e| MlError::io(&path, e))?,
        }
        let config = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&json!({
            "tokenizer_class": "Qwen2Tokenizer",
            "eos_token": IM_END,
            "pad_token": "<|endoftext|>",
            "model_max_length": 32768,
        }))
        .map_err(|e| MlError::io(&config, e))?;
        std::fs::write(&config, text + "\n").map_err(|e| MlError::io(&config, e))
    }

    /// Token ids of `text`, special tokens written in it matched as such; no BOS/EOS added
    /// (Qwen's tokenizer adds none).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, MlError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| MlError::Invalid(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Text of `ids`, special tokens dropped; ids the vocabulary lacks are skipped.
    pub fn decode(&self, ids: &[i64]) -> Result<String, MlError> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| MlError::Invalid(format!("decoding: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Qwen2's special tokens and their ids (the same in every Qwen2 / Qwen2.5 tokenizer).
pub const QWEN_SPECIAL_TOKENS: &[(i64, &str)] = &[
    (151_643, "<|endoftext|>"),
    (151_644, "<|im_start|>"),
    (151_645, "<|im_end|>"),
    (151_646, "<|object_ref_start|>"),
    (151_647, "<|object_ref_end|>"),
    (151_648, "<|box_start|>"),
    (151_649, "<|box_end|>"),
    (151_650, "<|quad_start|>"),
    (151_651, "<|quad_end|>"),
    (151_652, "<|vision_start|>"),
    (151_653, "<|vision_end|>"),
    (151_654, "<|vision_pad|>"),
    (151_655, "<|image_pad|>"),
    (151_656, "<|video_pad|>"),
];

/// GPT-2's byte-to-character table that byte-level BPE vocabularies are written in: printable
/// Latin-1 bytes stand for themselves, the others take code points from 256 up, in byte order.
fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..=255u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).expect("below the surrogate range")
        })
        .collect()
}

/// A prompt ready for the model: expanded token ids, the preprocessed images in placeholder
/// order, and the 3-D positions.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub input_ids: Vec<i64>,
    pub images: Vec<PreparedImage>,
    pub positions: PromptPositions,
    /// The rendered text before tokenization (with one `<|image_pad|>` per image).
    pub text: String,
}

impl PreparedPrompt {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Template + tokenizer + image preprocessing: transformers' `Qwen2_5_VLProcessor`.
#[derive(Debug, Clone)]
pub struct QwenProcessor {
    pub template: ChatTemplate,
    pub preprocessor: QwenPreprocessor,
    image_token_id: i64,
    merge: i64,
}

impl QwenProcessor {
    pub fn new(
        config: &QwenVlConfig,
        template: ChatTemplate,
        preprocessor: QwenPreprocessor,
    ) -> Self {
        QwenProcessor {
            template,
            preprocessor,
            image_token_id: config.image_token_id,
            merge: config.vision.spatial_merge_size,
        }
    }

    /// This processor with its images brought within other pixel bounds
    /// ([`QwenPreprocessor::with_pixel_bounds`]); the template and tokens are the same.
    pub fn with_pixel_bounds(
        &self,
        min_pixels: u64,
        max_pixels: u64,
    ) -> Result<QwenProcessor, MlError> {
        Ok(QwenProcessor {
            preprocessor: self
                .preprocessor
                .with_pixel_bounds(min_pixels, max_pixels)?,
            ..self.clone()
        })
    }

    /// Renders, tokenizes and expands `messages` with `images` (one per image part, in order).
    pub fn prepare(
        &self,
        tokenizer: &QwenTokenizer,
        messages: &[Message],
        images: &[(&str, &DynamicImage)],
        add_generation_prompt: bool,
    ) -> Result<PreparedPrompt, MlError> {
        let parts: usize = messages.iter().map(Message::image_count).sum();
        if parts != images.len() {
            return Err(MlError::Invalid(format!(
                "the chat has {parts} image placeholder(s) but {} image(s) were given",
                images.len()
            )));
        }
        let text = self.template.render(messages, add_generation_prompt)?;
        let ids = tokenizer.encode(&text)?;
        let pads = ids.iter().filter(|&&t| t == self.image_token_id).count();
        if pads != images.len() {
            return Err(MlError::Invalid(format!(
                "the rendered prompt holds {pads} {IMAGE_PAD} token(s) for {} image(s) (a \
                 message's text may contain the placeholder itself, or the template may not \
                 emit one per image)",
                images.len()
            )));
        }
        let prepared: Vec<PreparedImage> = images
            .iter()
            .map(|(name, image)| self.preprocessor.prepare(image, name))
            .collect::<Result<_, _>>()?;
        let mut input_ids = Vec::with_capacity(ids.len());
        let mut next_image = prepared.iter();
        for id in ids {
            if id == self.image_token_id {
                let image = next_image.next().expect("counted above");
                let n = image.grid.tokens(self.merge) as usize;
                input_ids.extend(std::iter::repeat_n(id, n));
            } else {
                input_ids.push(id);
            }
        }
        let grids: Vec<_> = prepared.iter().map(|p| p.grid).collect();
        let positions = prompt_positions(&input_ids, &grids, self.image_token_id, self.merge)
            .map_err(MlError::Invalid)?;
        Ok(PreparedPrompt {
            input_ids,
            images: prepared,
            positions,
            text,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_default_format_inserts_the_system_turn_and_image_markers() {
        let text = render_default(&[Message::user_with_images(2, "Same?")], true);
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>\
             <|vision_end|>Same?<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = render_default(
            &[
                Message::system("Be brief."),
                Message::user_with_images(0, "Hi"),
            ],
            false,
        );
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn the_byte_level_tokenizer_has_qwen_specials_and_round_trips() {
        let t = QwenTokenizer::byte_level().unwrap();
        let ids = t.encode("<|im_start|>user\nhé<|im_end|>").unwrap();
        assert_eq!(ids.first(), Some(&151_644));
        assert_eq!(ids.last(), Some(&151_645));
        // "user" 4 bytes, "\n" 1, "h" 1, "é" 2: one token per byte.
        assert_eq!(ids.len(), 2 + 8);
        assert_eq!(t.decode(&ids).unwrap(), "user\nhé");
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let back = QwenTokenizer::load(dir.path()).unwrap();
        assert_eq!(back.encode("<|image_pad|>x").unwrap(), vec![151_655, 120]);
    }
}
