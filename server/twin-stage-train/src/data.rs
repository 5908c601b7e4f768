//! Training and validation examples from a built dataset: its pair questions as the recipe
//! prompts them, images at the size the dataset's exports give the model.
//!
//! The prompt is the training record's one user turn, `"<image>\n<image>\n\n{question}"`, split as
//! verl splits it into parts (image, `"\n"`, image, `"\n\n{question}"`), with no system message,
//! so the checkpoint's chat template adds its default one, as it did for the paper's runs.
//! Images are fetched as blobs and resized (Pillow's bicubic) to the row's `resized_*` size as the
//! processor rounds it, which is what the eval stage shows the model too. Multi questions are not
//! trained on (the recipe trains on pairs); they are counted.

use std::collections::HashMap;

use bytes::Bytes;
use image::DynamicImage;
use twin_core::BlobHash;
use twin_data::build::{BuiltDataset, ImageRef, Row, RowKind, Split};
use twin_ml::qwen::{Message, Part, PreparedPrompt, QwenAssets, QwenPreprocessor};
use twin_stage::StageError;

/// One pair question ready for the model.
#[derive(Debug, Clone)]
pub struct Example {
    /// The row's id (`train-pair-000012`).
    pub id: String,
    pub question: String,
    /// `yes` or `no`.
    pub answer: String,
    pub prompt: PreparedPrompt,
}

/// The pair rows of a split, split by label, and the multi rows left out.
#[derive(Debug, Clone, Default)]
pub struct PairRows<'a> {
    pub yes: Vec<&'a Row>,
    pub no: Vec<&'a Row>,
    pub skipped_multi: u64,
}

/// The pair questions of `split`, by answer. A pair whose answer is neither yes nor no (a
/// hand-edited manifest) is refused, naming it.
pub fn pair_rows(dataset: &BuiltDataset, split: Split) -> Result<PairRows<'_>, StageError> {
    let mut out = PairRows::default();
    for row in dataset.rows(split) {
        match row.kind {
            RowKind::Multi { .. } => out.skipped_multi += 1,
            RowKind::Pair { .. } => match row.answer.trim().to_ascii_lowercase().as_str() {
                "yes" => out.yes.push(row),
                "no" => out.no.push(row),
                other => {
                    return Err(StageError::bad_input(format!(
                        "pair question {} has the answer {other:?}, not yes or no",
                        row.id
                    )));
                }
            },
        }
    }
    Ok(out)
}

/// The user turn of a training record with `images` images (verl's split of
/// `"<image>\n<image>\n\n{question}"`).
pub fn training_message(images: usize, question: &str) -> Message {
    let mut content = Vec::with_capacity(images * 2);
    for i in 0..images {
        content.push(Part::Image);
        let text = if i + 1 == images {
            format!("\n\n{question}")
        } else {
            "\n".to_owned()
        };
        content.push(Part::Text { text });
    }
    if images == 0 {
        content.push(Part::Text {
            text: question.to_owned(),
        });
    }
    Message {
        role: "user".into(),
        content,
    }
}

/// Makes examples from rows, fetching and decoding each image once (an image shared by rows is
/// read once per call).
pub struct Prompter<'a> {
    pub assets: &'a QwenAssets,
    pub fetch: &'a dyn Fn(&BlobHash) -> Result<Bytes, StageError>,
    pub max_prompt_tokens: usize,
    images: HashMap<BlobHash, DynamicImage>,
}

impl<'a> Prompter<'a> {
    pub fn new(
        assets: &'a QwenAssets,
        fetch: &'a dyn Fn(&BlobHash) -> Result<Bytes, StageError>,
        max_prompt_tokens: usize,
    ) -> Self {
        Prompter {
            assets,
            fetch,
            max_prompt_tokens,
            images: HashMap::new(),
        }
    }

    /// The example of `row`; a prompt longer than `max_prompt_tokens` is refused naming the row
    /// (dropping it would change what a run trains on without saying so).
    pub fn example(&mut self, row: &Row) -> Result<Example, StageError> {
        let mut images = Vec::with_capacity(row.images.len());
        for image in &row.images {
            images.push(self.image(image, &row.id)?);
        }
        let named: Vec<(&str, &DynamicImage)> = row
            .images
            .iter()
            .map(|i| i.path.as_str())
            .zip(&images)
            .collect();
        let messages = [training_message(images.len(), &row.question)];
        let prompt = self
            .assets
            .processor
            .prepare(&self.assets.tokenizer, &messages, &named, true)
            .map_err(|e| StageError::bad_input(format!("question {}: {e}", row.id)))?;
        if prompt.len() > self.max_prompt_tokens {
            return Err(StageError::bad_input(format!(
                "question {}: the prompt has {} tokens, more than spec.max_prompt_tokens ({})",
                row.id,
                prompt.len(),
                self.max_prompt_tokens
            )));
        }
        Ok(Example {
            id: row.id.clone(),
            question: row.question.clone(),
            answer: row.answer.trim().to_ascii_lowercase(),
            prompt,
        })
    }

    fn image(&mut self, image: &ImageRef, row: &str) -> Result<DynamicImage, StageError> {
        if let Some(decoded) = self.images.get(&image.blob) {
            return Ok(decoded.clone());
        }
        let bytes = (self.fetch)(&image.blob)?;
        let decoded = resized(
            &bytes,
            (image.resized_width, image.resized_height),
            &self.assets.processor.preprocessor,
        )
        .map_err(|m| {
            StageError::bad_input(format!("image {} (question {row}): {m}", image.path))
        })?;
        self.images.insert(image.blob, decoded.clone());
        Ok(decoded)
    }
}

/// Decodes an image and resizes it to `(width, height)` as the processor rounds it.
fn resized(
    bytes: &[u8],
    (w, h): (u32, u32),
    preprocessor: &QwenPreprocessor,
) -> Result<DynamicImage, String> {
    let image = image::load_from_memory(bytes).map_err(|e| format!("cannot decode: {e}"))?;
    preprocessor.resize_rounded(&image, w, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_turn_is_split_as_verl_splits_the_record() {
        let m = training_message(2, "Same?");
        assert_eq!(
            m.content,
            vec![
                Part::Image,
                Part::Text { text: "\n".into() },
                Part::Image,
                Part::Text {
                    text: "\n\nSame?".into()
                },
            ]
        );
        assert_eq!(
            twin_ml::qwen::chat::render_default(&[m], true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>\n<|vision_start|><|image_pad|>\
             <|vision_end|>\n\nSame?<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
