//! Exporting one split of a [`BuiltDataset`] in the TWIN/verl training layout, as JSONL (one
//! record a line) and as parquet with the same columns as nested arrow types.
//!
//! A record (verl's RL dataset layout, as TWIN's training set has it):
//!
//! ```text
//! data_source   "twin"
//! prompt        [{role: "user", content: "<image>\n<image>\n\n{question}"}]   no system message
//! images        [{image: <path>, resized_height, resized_width}]               longest side ≤ 512
//! reward_model  {ground_truth: <answer>, style: "rule"}
//! extra_info    {index, pair_id, image_files, split, question_type, sources}
//! answer, question
//! ```
//!
//! `image` is whatever the caller's mapping returns for an [`ImageRef`] (e.g.
//! `images/<hash>.png`); this module writes no image. [`records`] is the one place the layout is
//! decided; both writers serialise its output, so the two files cannot disagree.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, ListArray, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::build::{BuiltDataset, ImageRef, Row, RowKind, Split};
use crate::prompts;

/// The `data_source` column of TWIN records.
pub const DATA_SOURCE: &str = "twin";

/// Records per parquet record batch: bounds memory, and keeps each batch's string offsets far
/// from arrow's 2 GiB (i32) limit whatever the dataset's size.
const BATCH_ROWS: usize = 4096;

/// Which text follows the image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// The question alone, as in TWIN's training set.
    Training,
    /// The question followed by [`prompts::EVAL_ANSWER_INSTRUCTION`], as FGVQA evaluation asks.
    Eval,
}

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    pub split: Split,
    pub prompt: PromptStyle,
}

/// One chat message of a prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One image of a record, as verl's Qwen-VL image processing reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordImage {
    pub image: String,
    pub resized_height: u32,
    pub resized_width: u32,
}

/// What the rule reward compares the model's answer with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardModel {
    pub ground_truth: String,
    pub style: String,
}

/// Passed through to the reward function by verl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraInfo {
    /// Position of the record in its file.
    pub index: u64,
    /// The row's id in the dataset manifest.
    pub pair_id: String,
    /// The `image` of each entry of `images`, in order.
    pub image_files: Vec<String>,
    pub split: String,
    /// `pair` or `multi` (which reward applies).
    pub question_type: String,
    /// A pair: its source (`positive`, `hard`, `random`, `synthetic`); a multi question: each
    /// candidate's source in image order (`positive` = same instance as the reference).
    pub sources: Vec<String>,
}

/// One line of the JSONL export, one row of the parquet export. Field order is column order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerlRecord {
    pub data_source: String,
    pub prompt: Vec<Message>,
    pub images: Vec<RecordImage>,
    pub reward_model: RewardModel,
    pub extra_info: ExtraInfo,
    pub answer: String,
    /// The text after the image tokens (with the evaluation instruction in [`PromptStyle::Eval`]).
    pub question: String,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding a JSONL record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("building arrow arrays: {0}")]
    Arrow(#[from] ArrowError),
    #[error("writing parquet: {0}")]
    Parquet(#[from] ParquetError),
}

/// The records of one split, in dataset order. `image_path` maps each image to the path written
/// in the record.
pub fn records(
    dataset: &BuiltDataset,
    options: &ExportOptions,
    image_path: impl Fn(&ImageRef) -> String,
) -> Vec<VerlRecord> {
    dataset
        .rows(options.split)
        .enumerate()
        .map(|(index, row)| record(index, row, options.prompt, &image_path))
        .collect()
}

fn record(
    index: usize,
    row: &Row,
    style: PromptStyle,
    image_path: &impl Fn(&ImageRef) -> String,
) -> VerlRecord {
    let question = match style {
        PromptStyle::Training => row.question.clone(),
        PromptStyle::Eval => prompts::eval_text(&row.question),
    };
    let images: Vec<RecordImage> = row
        .images
        .iter()
        .map(|image| RecordImage {
            image: image_path(image),
            resized_height: image.resized_height,
            resized_width: image.resized_width,
        })
        .collect();
    let (question_type, sources) = match &row.kind {
        RowKind::Pair { source } => ("pair", vec![source.as_str().to_owned()]),
        RowKind::Multi { candidates } => (
            "multi",
            candidates.iter().map(|s| s.as_str().to_owned()).collect(),
        ),
    };
    VerlRecord {
        data_source: DATA_SOURCE.to_owned(),
        prompt: vec![Message {
            role: "user".to_owned(),
            content: prompts::training_prompt(&question, images.len()),
        }],
        extra_info: ExtraInfo {
            index: index as u64,
            pair_id: row.id.clone(),
            image_files: images.iter().map(|i| i.image.clone()).collect(),
            split: row.split.as_str().to_owned(),
            question_type: question_type.to_owned(),
            sources,
        },
        images,
        reward_model: RewardModel {
            ground_truth: row.answer.clone(),
            style: "rule".to_owned(),
        },
        answer: row.answer.clone(),
        question,
    }
}

/// One compact JSON object per line, `\n`-terminated.
pub fn write_jsonl(records: &[VerlRecord], mut out: impl Write) -> Result<(), ExportError> {
    for record in records {
        serde_json::to_writer(&mut out, record)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// The parquet schema: verl's columns as nested arrow types. Every field is nullable, as in
/// files written by pandas / Hugging Face `datasets`, though no value is ever null.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("data_source", DataType::Utf8, true),
        Field::new_list("prompt", item(DataType::Struct(message_fields())), true),
        Field::new_list("images", item(DataType::Struct(image_fields())), true),
        Field::new_struct("reward_model", reward_fields(), true),
        Field::new_struct("extra_info", extra_fields(), true),
        Field::new("answer", DataType::Utf8, true),
        Field::new("question", DataType::Utf8, true),
    ]))
}

fn item(data_type: DataType) -> FieldRef {
    Arc::new(Field::new_list_field(data_type, true))
}

fn message_fields() -> Fields {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ])
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("image", DataType::Utf8, true),
        Field::new("resized_height", DataType::Int64, true),
        Field::new("resized_width", DataType::Int64, true),
    ])
}

fn reward_fields() -> Fields {
    Fields::from(vec![
        Field::new("ground_truth", DataType::Utf8, true),
        Field::new("style", DataType::Utf8, true),
    ])
}

fn extra_fields() -> Fields {
    Fields::from(vec![
        Field::new("index", DataType::Int64, true),
        Field::new("pair_id", DataType::Utf8, true),
        Field::new_list("image_files", item(DataType::Utf8), true),
        Field::new("split", DataType::Utf8, true),
        Field::new("question_type", DataType::Utf8, true),
        Field::new_list("sources", item(DataType::Utf8), true),
    ])
}

/// Parquet (snappy) with [`schema`]'s columns, in record batches of at most 4096 records.
pub fn write_parquet<W: Write + Send>(records: &[VerlRecord], out: W) -> Result<(), ExportError> {
    let schema = schema();
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(out, schema.clone(), Some(properties))?;
    for chunk in records.chunks(BATCH_ROWS) {
        writer.write(&record_batch(&schema, chunk)?)?;
    }
    writer.close()?;
    Ok(())
}

fn record_batch(schema: &SchemaRef, records: &[VerlRecord]) -> Result<RecordBatch, ExportError> {
    let messages: Vec<&Message> = records.iter().flat_map(|r| &r.prompt).collect();
    let prompt = list(
        DataType::Struct(message_fields()),
        records.iter().map(|r| r.prompt.len()),
        structure(
            message_fields(),
            vec![
                strings(messages.iter().map(|m| m.role.as_str())),
                strings(messages.iter().map(|m| m.content.as_str())),
            ],
        )?,
    )?;

    let images: Vec<&RecordImage> = records.iter().flat_map(|r| &r.images).collect();
    let images = list(
        DataType::Struct(image_fields()),
        records.iter().map(|r| r.images.len()),
        structure(
            image_fields(),
            vec![
                strings(images.iter().map(|i| i.image.as_str())),
                integers(images.iter().map(|i| i64::from(i.resized_height))),
                integers(images.iter().map(|i| i64::from(i.resized_width))),
            ],
        )?,
    )?;

    let reward_model = structure(
        reward_fields(),
        vec![
            strings(records.iter().map(|r| r.reward_model.ground_truth.as_str())),
            strings(records.iter().map(|r| r.reward_model.style.as_str())),
        ],
    )?;

    let extra: Vec<&ExtraInfo> = records.iter().map(|r| &r.extra_info).collect();
    let extra_info = structure(
        extra_fields(),
        vec![
            integers(extra.iter().map(|e| e.index as i64)),
            strings(extra.iter().map(|e| e.pair_id.as_str())),
            string_lists(extra.iter().map(|e| e.image_files.as_slice()))?,
            strings(extra.iter().map(|e| e.split.as_str())),
            strings(extra.iter().map(|e| e.question_type.as_str())),
            string_lists(extra.iter().map(|e| e.sources.as_slice()))?,
        ],
    )?;

    let columns = vec![
        strings(records.iter().map(|r| r.data_source.as_str())),
        prompt,
        images,
        reward_model,
        extra_info,
        strings(records.iter().map(|r| r.answer.as_str())),
        strings(records.iter().map(|r| r.question.as_str())),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn integers(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(values))
}

fn structure(fields: Fields, columns: Vec<ArrayRef>) -> Result<ArrayRef, ExportError> {
    Ok(Arc::new(StructArray::try_new(fields, columns, None)?))
}

/// A list column: row `i` holds the next `lengths[i]` elements of `values`.
fn list(
    item_type: DataType,
    lengths: impl Iterator<Item = usize>,
    values: ArrayRef,
) -> Result<ArrayRef, ExportError> {
    let offsets = OffsetBuffer::<i32>::try_from_lengths(lengths)
        .map_err(|e| ArrowError::InvalidArgumentError(e.to_string()))?;
    Ok(Arc::new(ListArray::try_new(
        item(item_type),
        offsets,
        values,
        None,
    )?))
}

fn string_lists<'a>(
    lists: impl Iterator<Item = &'a [String]> + Clone,
) -> Result<ArrayRef, ExportError> {
    list(
        DataType::Utf8,
        lists.clone().map(<[String]>::len),
        strings(lists.flatten().map(String::as_str)),
    )
}
