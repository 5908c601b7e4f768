//! Import of the public TWIN and FGVQA layouts (Hugging Face parquet) into what ingest reads.
//!
//! Readers turn parquet rows into typed rows ([`TwinRow`], [`FgvqaRow`]). The schema is checked
//! before any row is read, so a missing or mistyped column is named with its file; a bad value
//! is named with its file, row (counted from 0, as the `datasets` library does) and column.
//! Converters then write, under an output directory:
//! - the images;
//! - `manifest.jsonl`: ingest's `{"path","instance","category"}` lines ([`ManifestLine`]),
//!   paths relative to the manifest;
//! - `questions.jsonl`: one [`QuestionLine`] per imported row, image paths relative to it.
//!
//! Layouts:
//! - TWIN (`glab-caltech/TWIN`): rows `question`, `answer` (`yes`/`no`), `image_1`, `image_2`,
//!   the images being paths into a separate `images.zip`, given as the zip or its extracted
//!   directory. A path is looked up as written, then by file name alone when exactly one file
//!   in the source has that name: the dataset names shards (`images_00001/x.jpg`) that the
//!   published zip flattens into `images/`. Instances are the connected components of the
//!   `yes` pairs; an instance's category is the first directory of its first image's path
//!   unless that is a shard directory (`images`, `images_<digits>`) or absent, then `twin`.
//! - FGVQA (`glab-caltech/FGVQA`): rows `dataset_source` (the subset), `images` (a list of
//!   `{bytes, path}` structs, the Hugging Face Image feature, or a list of paths relative to
//!   the parquet's directory), `question`, `answer`, `question_type` and `extra` (a JSON string
//!   with `product_ids`, `instance_ids`, `source_paths`, `target_count`). Images go to
//!   `<out>/<subset>/`; identical embedded images are written once. Instances come from
//!   `extra.instance_ids` (one per image) when present, else each image is its own instance;
//!   the category is the subset.
//!
//! Missing images: [`MissingImages::Fail`] (the default of the CLI) stops at the first image a
//! row names that the source lacks, with an error naming the image and the row;
//! [`MissingImages::Skip`] drops every row that needs a missing image from `questions.jsonl`
//! and lists the images in the summary; the row's other images are still imported.
//!
//! Nothing read from a file is trusted as a path: image paths must be relative and free of
//! `..`, and names are cleaned, so an import writes only under its output directory.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use arrow::array::{
    Array, ArrayRef, AsArray, GenericBinaryArray, GenericListArray, GenericStringArray, RecordBatch,
};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde::{Deserialize, Serialize};

/// One line of ingest's JSONL manifest: exactly these three keys (ingest denies others); a
/// relative `path` is resolved against the manifest's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLine {
    pub path: String,
    pub instance: String,
    pub category: String,
}

/// One line of `questions.jsonl`: a parquet row's question with its images' paths relative to
/// the output directory. `subset` and `question_type` are FGVQA's and absent for TWIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_type: Option<String>,
    pub question: String,
    pub answer: String,
    pub images: Vec<String>,
}

/// What to do about an image a row names that the source does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingImages {
    /// Stop with [`ImportError::ImageNotFound`].
    #[default]
    Fail,
    /// Drop the rows that need it; list it in [`ImportSummary::missing`].
    Skip,
}

/// Why an import failed. The underlying error is part of the message (`cause`) rather than a
/// `source()`, so a caller printing the chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}: cannot read: {cause}", file.display())]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: not a readable parquet file: {cause}", file.display())]
    Parquet {
        file: PathBuf,
        cause: parquet::errors::ParquetError,
    },
    #[error("{}: cannot decode rows: {cause}", file.display())]
    Arrow {
        file: PathBuf,
        cause: arrow::error::ArrowError,
    },
    #[error("{}: missing column `{column}` (columns: {found})", file.display())]
    MissingColumn {
        file: PathBuf,
        column: String,
        found: String,
    },
    #[error("{}: column `{column}` is {found}, expected {expected}", file.display())]
    ColumnType {
        file: PathBuf,
        column: String,
        expected: &'static str,
        found: String,
    },
    #[error("{}: row {row}: column `{column}`: {message}", file.display())]
    BadValue {
        file: PathBuf,
        row: usize,
        column: String,
        message: String,
    },
    #[error("{}: row {row}: image `{image}` not found in {}", file.display(), searched.display())]
    ImageNotFound {
        file: PathBuf,
        row: usize,
        image: String,
        searched: PathBuf,
    },
    #[error("{}: not a readable zip archive: {cause}", file.display())]
    Zip {
        file: PathBuf,
        cause: zip::result::ZipError,
    },
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// Columns

/// Text in any of arrow's string layouts (and integers, which some exports use for answers).
enum TextColumn<'a> {
    Utf8(&'a GenericStringArray<i32>),
    LargeUtf8(&'a GenericStringArray<i64>),
    View(&'a arrow::array::StringViewArray),
    Int64(&'a arrow::array::Int64Array),
    Int32(&'a arrow::array::Int32Array),
}

impl<'a> TextColumn<'a> {
    fn of(array: &'a dyn Array, integers: Integers) -> Option<TextColumn<'a>> {
        if let Some(a) = array.as_string_opt::<i32>() {
            Some(TextColumn::Utf8(a))
        } else if let Some(a) = array.as_string_opt::<i64>() {
            Some(TextColumn::LargeUtf8(a))
        } else if let Some(a) = array.as_string_view_opt() {
            Some(TextColumn::View(a))
        } else if integers == Integers::Accepted {
            if let Some(a) = array.as_primitive_opt::<Int64Type>() {
                Some(TextColumn::Int64(a))
            } else {
                array.as_primitive_opt::<Int32Type>().map(TextColumn::Int32)
            }
        } else {
            None
        }
    }

    /// `None` for a null.
    fn get(&self, i: usize) -> Option<Cow<'a, str>> {
        let (valid, value) = match self {
            TextColumn::Utf8(a) => (a.is_valid(i), Cow::Borrowed(a.value(i))),
            TextColumn::LargeUtf8(a) => (a.is_valid(i), Cow::Borrowed(a.value(i))),
            TextColumn::View(a) => (a.is_valid(i), Cow::Borrowed(a.value(i))),
            TextColumn::Int64(a) => (a.is_valid(i), Cow::Owned(a.value(i).to_string())),
            TextColumn::Int32(a) => (a.is_valid(i), Cow::Owned(a.value(i).to_string())),
        };
        valid.then_some(value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Integers {
    Accepted,
    Refused,
}

enum BinaryColumn<'a> {
    Binary(&'a GenericBinaryArray<i32>),
    Large(&'a GenericBinaryArray<i64>),
    View(&'a arrow::array::BinaryViewArray),
}

impl<'a> BinaryColumn<'a> {
    fn of(array: &'a dyn Array) -> Option<BinaryColumn<'a>> {
        if let Some(a) = array.as_binary_opt::<i32>() {
            Some(BinaryColumn::Binary(a))
        } else if let Some(a) = array.as_binary_opt::<i64>() {
            Some(BinaryColumn::Large(a))
        } else {
            array.as_binary_view_opt().map(BinaryColumn::View)
        }
    }

    fn get(&self, i: usize) -> Option<&'a [u8]> {
        match self {
            BinaryColumn::Binary(a) => a.is_valid(i).then(|| a.value(i)),
            BinaryColumn::Large(a) => a.is_valid(i).then(|| a.value(i)),
            BinaryColumn::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

enum ListColumn<'a> {
    List(&'a GenericListArray<i32>),
    Large(&'a GenericListArray<i64>),
}

impl<'a> ListColumn<'a> {
    fn of(array: &'a dyn Array) -> Option<ListColumn<'a>> {
        if let Some(a) = array.as_list_opt::<i32>() {
            Some(ListColumn::List(a))
        } else {
            array.as_list_opt::<i64>().map(ListColumn::Large)
        }
    }

    fn get(&self, i: usize) -> Option<ArrayRef> {
        match self {
            ListColumn::List(a) => a.is_valid(i).then(|| a.value(i)),
            ListColumn::Large(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

/// Whether an `images` column holds paths or Image structs, and so whether it is usable.
fn image_list_item(t: &DataType) -> Option<ImageEncoding> {
    let item = match t {
        DataType::List(f) | DataType::LargeList(f) => f.data_type(),
        _ => return None,
    };
    match item {
        t if is_text(t) => Some(ImageEncoding::Paths),
        DataType::Struct(fields) => {
            let bytes = fields.iter().find(|f| f.name() == "bytes")?;
            let path_ok = fields
                .iter()
                .find(|f| f.name() == "path")
                .is_none_or(|f| is_text(f.data_type()));
            (is_binary(bytes.data_type()) && path_ok).then_some(ImageEncoding::Structs)
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageEncoding {
    Paths,
    Structs,
}

/// What type a column must have.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Text,
    /// Text or integers.
    Answer,
    ImageList,
}

impl Expect {
    fn accepts(self, t: &DataType) -> bool {
        match self {
            Expect::Text => is_text(t),
            Expect::Answer => is_text(t) || matches!(t, DataType::Int32 | DataType::Int64),
            Expect::ImageList => image_list_item(t).is_some(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Expect::Text => "a string column",
            Expect::Answer => "a string or integer column",
            Expect::ImageList => {
                "a list of strings or of {bytes: binary, path: string} structs (the Image feature)"
            }
        }
    }
}

/// Opens `file`, checks it has `columns` with the expected types, and reads only those.
fn open_parquet(
    file: &Path,
    columns: &[(&str, Expect)],
    batch_size: usize,
) -> Result<ParquetRecordBatchReader, ImportError> {
    let handle = File::open(file).map_err(|cause| ImportError::Read {
        file: file.to_owned(),
        cause,
    })?;
    let parquet_error = |cause| ImportError::Parquet {
        file: file.to_owned(),
        cause,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle).map_err(parquet_error)?;
    let schema = builder.schema().clone();
    let mut indices = Vec::new();
    for (name, expect) in columns {
        let Some((index, field)) = schema.column_with_name(name) else {
            let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(ImportError::MissingColumn {
                file: file.to_owned(),
                column: (*name).to_owned(),
                found: found.join(", "),
            });
        };
        if !expect.accepts(field.data_type()) {
            return Err(ImportError::ColumnType {
                file: file.to_owned(),
                column: (*name).to_owned(),
                expected: expect.describe(),
                found: format!("{}", field.data_type()),
            });
        }
        indices.push(index);
    }
    // Arrow's top-level fields are the parquet schema's root columns, in order.
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    builder
        .with_projection(mask)
        .with_batch_size(batch_size)
        .build()
        .map_err(parquet_error)
}

/// Rows of a parquet file decoded one at a time by `decode(file, batch, index in batch, row)`.
struct Rows<T> {
    file: PathBuf,
    batches: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    position: usize,
    row: usize,
    decode: fn(&Path, &RecordBatch, usize, usize) -> Result<T, ImportError>,
}

impl<T> Iterator for Rows<T> {
    type Item = Result<T, ImportError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(batch) = &self.batch
                && self.position < batch.num_rows()
            {
                let item = (self.decode)(&self.file, batch, self.position, self.row);
                self.position += 1;
                self.row += 1;
                return Some(item);
            }
            match self.batches.next()? {
                Ok(batch) => {
                    self.batch = Some(batch);
                    self.position = 0;
                }
                Err(cause) => {
                    return Some(Err(ImportError::Arrow {
                        file: self.file.clone(),
                        cause,
                    }));
                }
            }
        }
    }
}

fn column<'b>(batch: &'b RecordBatch, name: &str) -> &'b ArrayRef {
    batch
        .column_by_name(name)
        .expect("open_parquet checked and projected every column decode reads")
}

fn bad_value(file: &Path, row: usize, column: &str, message: impl Into<String>) -> ImportError {
    ImportError::BadValue {
        file: file.to_owned(),
        row,
        column: column.to_owned(),
        message: message.into(),
    }
}

/// A required text value of `name` at `i`.
fn text(
    file: &Path,
    batch: &RecordBatch,
    name: &str,
    i: usize,
    row: usize,
    integers: Integers,
) -> Result<String, ImportError> {
    let col = TextColumn::of(column(batch, name).as_ref(), integers)
        .expect("open_parquet checked the column's type");
    col.get(i)
        .map(Cow::into_owned)
        .ok_or_else(|| bad_value(file, row, name, "is null"))
}

// ---------------------------------------------------------------------------------------------
// TWIN

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum YesNo {
    Yes,
    No,
}

impl YesNo {
    pub fn as_str(self) -> &'static str {
        match self {
            YesNo::Yes => "yes",
            YesNo::No => "no",
        }
    }
}

/// One row of the TWIN training set: are `image_1` and `image_2` the same instance?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinRow {
    pub row: usize,
    pub question: String,
    pub answer: YesNo,
    /// Paths into `images.zip`, as the dataset writes them.
    pub image_1: String,
    pub image_2: String,
}

const TWIN_COLUMNS: [(&str, Expect); 4] = [
    ("question", Expect::Text),
    ("answer", Expect::Text),
    ("image_1", Expect::Text),
    ("image_2", Expect::Text),
];

fn decode_twin(
    file: &Path,
    batch: &RecordBatch,
    i: usize,
    row: usize,
) -> Result<TwinRow, ImportError> {
    let answer = text(file, batch, "answer", i, row, Integers::Refused)?;
    let answer = match answer.trim().to_ascii_lowercase().as_str() {
        "yes" => YesNo::Yes,
        "no" => YesNo::No,
        _ => {
            return Err(bad_value(
                file,
                row,
                "answer",
                format!("expected \"yes\" or \"no\", found {answer:?}"),
            ));
        }
    };
    Ok(TwinRow {
        row,
        question: text(file, batch, "question", i, row, Integers::Refused)?,
        answer,
        image_1: text(file, batch, "image_1", i, row, Integers::Refused)?,
        image_2: text(file, batch, "image_2", i, row, Integers::Refused)?,
    })
}

/// The rows of a TWIN parquet file, read lazily, batch by batch.
pub fn twin_rows(
    file: &Path,
) -> Result<impl Iterator<Item = Result<TwinRow, ImportError>> + use<>, ImportError> {
    Ok(Rows {
        file: file.to_owned(),
        batches: open_parquet(file, &TWIN_COLUMNS, 4096)?,
        batch: None,
        position: 0,
        row: 0,
        decode: decode_twin,
    })
}

/// Every row of a TWIN parquet file.
pub fn read_twin(file: &Path) -> Result<Vec<TwinRow>, ImportError> {
    twin_rows(file)?.collect()
}

// ---------------------------------------------------------------------------------------------
// FGVQA

/// One image of an FGVQA row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FgvqaImage {
    /// The Image feature's bytes, with the file name it was stored under, if any.
    Embedded {
        bytes: Vec<u8>,
        path: Option<String>,
    },
    /// A path relative to the parquet file's directory.
    Path(String),
}

/// The parsed `extra` column. Ids are kept as strings whatever JSON scalar carried them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FgvqaExtra {
    pub product_ids: Vec<String>,
    /// One per image when present.
    pub instance_ids: Vec<String>,
    pub source_paths: Vec<String>,
    pub target_count: Option<u64>,
}

/// One row of the FGVQA benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FgvqaRow {
    pub row: usize,
    /// `dataset_source`: TWIN-Eval, ILIAS, INQUIRE, CUB, LANDMARKS, MET, …
    pub subset: String,
    /// `pairwise` or a multi-image type.
    pub question_type: String,
    pub question: String,
    pub answer: String,
    pub images: Vec<FgvqaImage>,
    pub extra: FgvqaExtra,
}

const FGVQA_COLUMNS: [(&str, Expect); 6] = [
    ("dataset_source", Expect::Text),
    ("images", Expect::ImageList),
    ("question", Expect::Text),
    ("answer", Expect::Answer),
    ("question_type", Expect::Text),
    ("extra", Expect::Text),
];

fn json_ids(
    file: &Path,
    row: usize,
    extra: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Vec<String>, ImportError> {
    match extra.get(key) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                other => Err(bad_value(
                    file,
                    row,
                    "extra",
                    format!("{key}: expected strings or numbers, found {other}"),
                )),
            })
            .collect(),
        Some(other) => Err(bad_value(
            file,
            row,
            "extra",
            format!("{key}: expected a list, found {other}"),
        )),
    }
}

fn parse_extra(file: &Path, row: usize, raw: Option<&str>) -> Result<FgvqaExtra, ImportError> {
    let raw = raw.unwrap_or_default().trim();
    if raw.is_empty() {
        return Ok(FgvqaExtra::default());
    }
    let value: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| bad_value(file, row, "extra", format!("not JSON: {e}")))?;
    let map = match value {
        serde_json::Value::Object(map) => map,
        serde_json::Value::Null => return Ok(FgvqaExtra::default()),
        other => {
            return Err(bad_value(
                file,
                row,
                "extra",
                format!("expected a JSON object, found {other}"),
            ));
        }
    };
    let target_count = match map.get("target_count") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(count) => Some(count),
            // Exports through pandas turn integer columns with gaps into floats (2.0).
            None => n
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
                .map(Some)
                .ok_or_else(|| {
                    bad_value(
                        file,
                        row,
                        "extra",
                        format!("target_count: not a count: {n}"),
                    )
                })?,
        },
        Some(other) => {
            return Err(bad_value(
                file,
                row,
                "extra",
                format!("target_count: expected a number, found {other}"),
            ));
        }
    };
    Ok(FgvqaExtra {
        product_ids: json_ids(file, row, &map, "product_ids")?,
        instance_ids: json_ids(file, row, &map, "instance_ids")?,
        source_paths: json_ids(file, row, &map, "source_paths")?,
        target_count,
    })
}

fn decode_images(
    file: &Path,
    batch: &RecordBatch,
    i: usize,
    row: usize,
) -> Result<Vec<FgvqaImage>, ImportError> {
    let list = ListColumn::of(column(batch, "images").as_ref())
        .expect("open_parquet checked the column's type");
    let Some(items) = list.get(i) else {
        return Err(bad_value(file, row, "images", "is null"));
    };
    if let Some(paths) = TextColumn::of(items.as_ref(), Integers::Refused) {
        return (0..items.len())
            .map(|k| {
                paths
                    .get(k)
                    .map(|p| FgvqaImage::Path(p.into_owned()))
                    .ok_or_else(|| bad_value(file, row, "images", format!("image {k} is null")))
            })
            .collect();
    }
    let structs = items
        .as_struct_opt()
        .expect("open_parquet checked the list's items are strings or structs");
    let bytes = structs
        .column_by_name("bytes")
        .and_then(|c| BinaryColumn::of(c.as_ref()))
        .expect("open_parquet checked the structs have binary `bytes`");
    let paths = structs
        .column_by_name("path")
        .and_then(|c| TextColumn::of(c.as_ref(), Integers::Refused));
    (0..structs.len())
        .map(|k| {
            let path = paths.as_ref().and_then(|p| p.get(k)).map(Cow::into_owned);
            match (structs.is_valid(k).then(|| bytes.get(k)).flatten(), path) {
                (Some(b), path) => Ok(FgvqaImage::Embedded {
                    bytes: b.to_vec(),
                    path,
                }),
                // The Image feature may store a path without bytes: a file beside the parquet.
                (None, Some(path)) => Ok(FgvqaImage::Path(path)),
                (None, None) => Err(bad_value(
                    file,
                    row,
                    "images",
                    format!("image {k} has neither bytes nor a path"),
                )),
            }
        })
        .collect()
}

fn decode_fgvqa(
    file: &Path,
    batch: &RecordBatch,
    i: usize,
    row: usize,
) -> Result<FgvqaRow, ImportError> {
    let extra = TextColumn::of(column(batch, "extra").as_ref(), Integers::Refused)
        .expect("open_parquet checked the column's type");
    Ok(FgvqaRow {
        row,
        subset: text(file, batch, "dataset_source", i, row, Integers::Refused)?,
        question_type: text(file, batch, "question_type", i, row, Integers::Refused)?,
        question: text(file, batch, "question", i, row, Integers::Refused)?,
        answer: text(file, batch, "answer", i, row, Integers::Accepted)?,
        images: decode_images(file, batch, i, row)?,
        extra: parse_extra(file, row, extra.get(i).as_deref())?,
    })
}

/// The rows of an FGVQA parquet file, read lazily in small batches (rows carry image bytes).
pub fn fgvqa_rows(
    file: &Path,
) -> Result<impl Iterator<Item = Result<FgvqaRow, ImportError>> + use<>, ImportError> {
    Ok(Rows {
        file: file.to_owned(),
        batches: open_parquet(file, &FGVQA_COLUMNS, 64)?,
        batch: None,
        position: 0,
        row: 0,
        decode: decode_fgvqa,
    })
}

/// Every row of an FGVQA parquet file.
pub fn read_fgvqa(file: &Path) -> Result<Vec<FgvqaRow>, ImportError> {
    fgvqa_rows(file)?.collect()
}

// ---------------------------------------------------------------------------------------------
// Writing

/// `p` as a clean relative path (`a/b.jpg`), or `None` if it is absolute, empty or climbs out.
pub fn safe_relative(p: &str) -> Option<String> {
    let p = p.replace('\\', "/");
    if p.starts_with('/') || p.get(1..2) == Some(":") {
        return None;
    }
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(parts.join("/"))
}

/// `name` usable as one path component: other characters than `[A-Za-z0-9._-]` become `_`.
fn clean_component(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.trim_matches('.') {
        "" => "_".to_owned(),
        _ => cleaned,
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ImportError> {
    let error = |cause| ImportError::Write {
        path: path.to_owned(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    std::fs::write(path, bytes).map_err(error)
}

fn write_jsonl<T: Serialize>(path: &Path, lines: &[T]) -> Result<(), ImportError> {
    let mut out = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut out, line).expect("plain records always serialise");
        out.write_all(b"\n").expect("writing to a Vec cannot fail");
    }
    write_file(path, &out)
}

/// `a/b.jpg` → `a_b`: an instance name from an image path.
fn instance_from_path(rel: &str) -> String {
    let stem = match rel.rsplit_once('.') {
        Some((stem, ext)) if !ext.contains('/') => stem,
        _ => rel,
    };
    stem.replace('/', "_")
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Rows read, and of those the ones written to `questions.jsonl`.
    pub rows: usize,
    pub rows_written: usize,
    pub images: usize,
    pub instances: usize,
    pub categories: usize,
    /// Images rows named that the source lacked ([`MissingImages::Skip`] only).
    pub missing: Vec<String>,
    /// TWIN: `no` pairs whose images the `yes` pairs put in one instance. FGVQA: images given
    /// different instance ids by different rows (the first id is kept).
    pub conflicts: usize,
    pub manifest: PathBuf,
    pub questions: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// TWIN import

/// Where TWIN's images are: `images.zip` or the directory it was extracted to.
enum ImageSource {
    Dir {
        root: PathBuf,
        /// File name → the relative paths having it; built on the first miss.
        by_name: Option<HashMap<String, Vec<PathBuf>>>,
    },
    Zip {
        file: PathBuf,
        archive: zip::ZipArchive<File>,
        by_name: HashMap<String, Vec<String>>,
    },
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn index_dir(root: &Path) -> HashMap<String, Vec<PathBuf>> {
    let mut index: HashMap<String, Vec<PathBuf>> = HashMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                index.entry(name.to_owned()).or_default().push(path);
            }
        }
    }
    index
}

impl ImageSource {
    fn open(path: &Path) -> Result<ImageSource, ImportError> {
        if path.is_dir() {
            return Ok(ImageSource::Dir {
                root: path.to_owned(),
                by_name: None,
            });
        }
        let handle = File::open(path).map_err(|cause| ImportError::Read {
            file: path.to_owned(),
            cause,
        })?;
        let archive = zip::ZipArchive::new(handle).map_err(|cause| ImportError::Zip {
            file: path.to_owned(),
            cause,
        })?;
        let mut by_name: HashMap<String, Vec<String>> = HashMap::new();
        for name in archive.file_names().filter(|n| !n.ends_with('/')) {
            by_name
                .entry(file_name(name).to_owned())
                .or_default()
                .push(name.to_owned());
        }
        Ok(ImageSource::Zip {
            file: path.to_owned(),
            archive,
            by_name,
        })
    }

    fn location(&self) -> &Path {
        match self {
            ImageSource::Dir { root, .. } => root,
            ImageSource::Zip { file, .. } => file,
        }
    }

    /// The bytes of dataset path `rel` (already made safe), or `None` if the source lacks it.
    fn read(&mut self, rel: &str) -> Result<Option<Vec<u8>>, ImportError> {
        match self {
            ImageSource::Dir { root, by_name } => {
                let mut path = root.join(rel);
                if !path.is_file() {
                    let index = by_name.get_or_insert_with(|| index_dir(root));
                    match index.get(file_name(rel)).map(Vec::as_slice) {
                        Some([only]) => path = only.clone(),
                        _ => return Ok(None),
                    }
                }
                std::fs::read(&path)
                    .map(Some)
                    .map_err(|cause| ImportError::Read { file: path, cause })
            }
            ImageSource::Zip {
                file,
                archive,
                by_name,
            } => {
                let same_name = by_name.get(file_name(rel)).map_or(&[][..], Vec::as_slice);
                let entry = if same_name.iter().any(|n| n == rel) {
                    rel.to_owned()
                } else {
                    match same_name {
                        [only] => only.clone(),
                        _ => return Ok(None),
                    }
                };
                let zip_error = |cause| ImportError::Zip {
                    file: file.clone(),
                    cause,
                };
                let mut found = archive.by_name(&entry).map_err(zip_error)?;
                let mut bytes = Vec::with_capacity(found.size() as usize);
                found
                    .read_to_end(&mut bytes)
                    .map_err(|cause| ImportError::Read {
                        file: file.join(&entry),
                        cause,
                    })?;
                Ok(Some(bytes))
            }
        }
    }
}

/// Union-find over image indices, smallest index as the root so roots are deterministic.
struct Components(Vec<usize>);

impl Components {
    fn root(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }

    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.root(a), self.root(b));
        let (low, high) = (a.min(b), a.max(b));
        self.0[high] = low;
    }
}

/// The category of a TWIN image path: its first directory, unless that is one of the
/// dataset's shard directories or there is none.
fn twin_category(rel: &str) -> String {
    let is_shard = |dir: &str| {
        dir == "images"
            || dir
                .strip_prefix("images_")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match rel.split_once('/') {
        Some((dir, _)) if !is_shard(dir) => dir.to_owned(),
        _ => "twin".to_owned(),
    }
}

/// A TWIN import: the parquet file, the images (zip or directory) and where to write.
#[derive(Debug, Clone)]
pub struct TwinImport {
    pub parquet: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    pub missing: MissingImages,
}

/// Imports TWIN pairs; see the module doc for the layout and how instances are derived.
pub fn import_twin(import: &TwinImport) -> Result<ImportSummary, ImportError> {
    let file = &import.parquet;
    let rows = read_twin(file)?;
    let mut source = ImageSource::open(&import.images)?;
    // Image path → index, in first-seen order; written images are kept sorted for output.
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut paths: Vec<String> = Vec::new();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    let mut kept: Vec<(&TwinRow, [usize; 2])> = Vec::new();
    for row in &rows {
        let mut pair = [0usize; 2];
        let mut complete = true;
        for (k, (name, image)) in [("image_1", &row.image_1), ("image_2", &row.image_2)]
            .into_iter()
            .enumerate()
        {
            let rel = safe_relative(image).ok_or_else(|| {
                bad_value(
                    file,
                    row.row,
                    name,
                    format!("{image:?} is not a relative path inside the images"),
                )
            })?;
            if missing.contains(&rel) {
                complete = false;
                continue;
            }
            if let Some(&id) = ids.get(&rel) {
                pair[k] = id;
                continue;
            }
            match source.read(&rel)? {
                Some(bytes) => {
                    write_file(&import.out.join(&rel), &bytes)?;
                    ids.insert(rel.clone(), paths.len());
                    pair[k] = paths.len();
                    paths.push(rel);
                }
                None if import.missing == MissingImages::Skip => {
                    missing.insert(rel);
                    complete = false;
                }
                None => {
                    return Err(ImportError::ImageNotFound {
                        file: file.clone(),
                        row: row.row,
                        image: image.clone(),
                        searched: source.location().to_owned(),
                    });
                }
            }
        }
        if complete {
            kept.push((row, pair));
        }
    }

    // Roots are the smallest index, so order the indices by path first: the root of each
    // component is then its smallest path, whatever order the rows came in.
    let mut order: Vec<usize> = (0..paths.len()).collect();
    order.sort_by(|&a, &b| paths[a].cmp(&paths[b]));
    let mut rank = vec![0; paths.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    let mut components = Components((0..paths.len()).collect());
    for (row, [a, b]) in &kept {
        if row.answer == YesNo::Yes {
            components.join(rank[*a], rank[*b]);
        }
    }
    let conflicts = kept
        .iter()
        .filter(|(row, [a, b])| {
            row.answer == YesNo::No && components.root(rank[*a]) == components.root(rank[*b])
        })
        .count();
    let mut instances: BTreeSet<(String, String)> = BTreeSet::new();
    let manifest: Vec<ManifestLine> = order
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            let representative = &paths[order[components.root(r)]];
            let line = ManifestLine {
                path: paths[i].clone(),
                instance: instance_from_path(representative),
                category: twin_category(representative),
            };
            instances.insert((line.category.clone(), line.instance.clone()));
            line
        })
        .collect();
    let questions: Vec<QuestionLine> = kept
        .iter()
        .map(|(row, [a, b])| QuestionLine {
            subset: None,
            question_type: None,
            question: row.question.clone(),
            answer: row.answer.as_str().to_owned(),
            images: vec![paths[*a].clone(), paths[*b].clone()],
        })
        .collect();
    finish(
        &import.out,
        rows.len(),
        manifest,
        questions,
        instances,
        missing,
        conflicts,
    )
}

fn finish(
    out: &Path,
    rows: usize,
    manifest: Vec<ManifestLine>,
    questions: Vec<QuestionLine>,
    instances: BTreeSet<(String, String)>,
    missing: BTreeSet<String>,
    conflicts: usize,
) -> Result<ImportSummary, ImportError> {
    std::fs::create_dir_all(out).map_err(|cause| ImportError::Write {
        path: out.to_owned(),
        cause,
    })?;
    let manifest_path = out.join("manifest.jsonl");
    write_jsonl(&manifest_path, &manifest)?;
    let questions_path = out.join("questions.jsonl");
    write_jsonl(&questions_path, &questions)?;
    let categories: BTreeSet<&String> = instances.iter().map(|(c, _)| c).collect();
    Ok(ImportSummary {
        rows,
        rows_written: questions.len(),
        images: manifest.len(),
        instances: instances.len(),
        categories: categories.len(),
        missing: missing.into_iter().collect(),
        conflicts,
        manifest: manifest_path,
        questions: questions_path,
    })
}

// ---------------------------------------------------------------------------------------------
// FGVQA import

/// An FGVQA import: the parquet file and where to write.
#[derive(Debug, Clone)]
pub struct FgvqaImport {
    pub parquet: PathBuf,
    pub out: PathBuf,
    pub missing: MissingImages,
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The images written so far: by output path, and by content for embedded ones.
#[derive(Default)]
struct Written {
    /// Output path → (hash, length) of its content.
    paths: HashMap<String, (u64, usize)>,
    /// (subset, hash, length) → output path.
    contents: HashMap<(String, u64, usize), String>,
    /// Output path → (category, instance), in path order.
    labels: BTreeMap<String, (String, String)>,
}

impl Written {
    /// Writes embedded `bytes` under `dir`, once per distinct content; returns the path used.
    fn embedded(
        &mut self,
        out: &Path,
        dir: &str,
        bytes: &[u8],
        name: Option<&str>,
        row: usize,
        k: usize,
    ) -> Result<String, ImportError> {
        let key = (dir.to_owned(), content_hash(bytes), bytes.len());
        if let Some(existing) = self.contents.get(&key)
            && std::fs::read(out.join(existing)).is_ok_and(|b| b == bytes)
        {
            return Ok(existing.clone());
        }
        let ext = image::guess_format(bytes)
            .ok()
            .and_then(|f| f.extensions_str().first().copied())
            .unwrap_or("bin");
        let fallback = format!("r{row:06}-{k}.{ext}");
        let name = name
            .map(file_name)
            .filter(|n| !n.is_empty())
            .map_or(fallback, clean_component);
        let mut rel = format!("{dir}/{name}");
        if self.paths.contains_key(&rel) {
            // Another image already has this name: keep both, telling them apart by row.
            let (stem, ext) = name.rsplit_once('.').unwrap_or((&name, ext));
            rel = format!("{dir}/{stem}-r{row:06}-{k}.{ext}");
        }
        write_file(&out.join(&rel), bytes)?;
        self.paths.insert(rel.clone(), (key.1, key.2));
        self.contents.insert(key, rel.clone());
        Ok(rel)
    }
}

/// Imports FGVQA rows; see the module doc for the layout.
pub fn import_fgvqa(import: &FgvqaImport) -> Result<ImportSummary, ImportError> {
    let file = &import.parquet;
    let base = file.parent().unwrap_or(Path::new("."));
    let out = &import.out;
    let mut written = Written::default();
    let mut missing = BTreeSet::new();
    let mut questions = Vec::new();
    let mut conflicts = 0;
    let mut rows = 0;
    for row in fgvqa_rows(file)? {
        let row = row?;
        rows += 1;
        let dir = clean_component(&row.subset);
        let ids = &row.extra.instance_ids;
        if !ids.is_empty() && ids.len() != row.images.len() {
            return Err(bad_value(
                file,
                row.row,
                "extra",
                format!(
                    "instance_ids has {} ids for {} images",
                    ids.len(),
                    row.images.len()
                ),
            ));
        }
        let mut images = Vec::with_capacity(row.images.len());
        let mut complete = true;
        for (k, image) in row.images.iter().enumerate() {
            let rel = match image {
                FgvqaImage::Embedded { bytes, path } => {
                    written.embedded(out, &dir, bytes, path.as_deref(), row.row, k)?
                }
                FgvqaImage::Path(p) => {
                    let clean = safe_relative(p).ok_or_else(|| {
                        bad_value(
                            file,
                            row.row,
                            "images",
                            format!("{p:?} is not a relative path"),
                        )
                    })?;
                    let rel = format!("{dir}/{clean}");
                    if !written.paths.contains_key(&rel) {
                        let from = base.join(&clean);
                        if !from.is_file() {
                            if import.missing == MissingImages::Skip {
                                missing.insert(p.clone());
                                complete = false;
                                continue;
                            }
                            return Err(ImportError::ImageNotFound {
                                file: file.clone(),
                                row: row.row,
                                image: p.clone(),
                                searched: base.to_owned(),
                            });
                        }
                        let bytes = std::fs::read(&from)
                            .map_err(|cause| ImportError::Read { file: from, cause })?;
                        write_file(&out.join(&rel), &bytes)?;
                        written
                            .paths
                            .insert(rel.clone(), (content_hash(&bytes), bytes.len()));
                    }
                    rel
                }
            };
            images.push((k, rel));
        }
        // Images of a dropped row that do exist are still imported, as TWIN's are.
        for (k, rel) in &images {
            let instance = match ids.get(*k).filter(|id| !id.is_empty()) {
                Some(id) => id.clone(),
                None => instance_from_path(rel.strip_prefix(&format!("{dir}/")).unwrap_or(rel)),
            };
            let label = (row.subset.clone(), instance);
            match written.labels.get(rel) {
                Some(existing) if *existing != label => conflicts += 1,
                Some(_) => {}
                None => {
                    written.labels.insert(rel.clone(), label);
                }
            }
        }
        if !complete {
            continue;
        }
        questions.push(QuestionLine {
            subset: Some(row.subset),
            question_type: Some(row.question_type),
            question: row.question,
            answer: row.answer,
            images: images.into_iter().map(|(_, rel)| rel).collect(),
        });
    }
    let instances: BTreeSet<(String, String)> = written.labels.values().cloned().collect();
    let manifest = written
        .labels
        .into_iter()
        .map(|(path, (category, instance))| ManifestLine {
            path,
            instance,
            category,
        })
        .collect();
    finish(
        out, rows, manifest, questions, instances, missing, conflicts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_relative_paths_inside_are_accepted() {
        assert_eq!(
            safe_relative("images/a.jpg").as_deref(),
            Some("images/a.jpg")
        );
        assert_eq!(safe_relative("./a//b.jpg").as_deref(), Some("a/b.jpg"));
        assert_eq!(safe_relative("a\\b.jpg").as_deref(), Some("a/b.jpg"));
        for bad in ["/etc/passwd", "../x.jpg", "a/../../x", "", ".", "C:/x.jpg"] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
        assert_eq!(clean_component("TWIN-Eval"), "TWIN-Eval");
        assert_eq!(clean_component("a/b c"), "a_b_c");
        assert_eq!(clean_component(".."), "_");
    }

    #[test]
    fn twin_categories_skip_shard_directories() {
        assert_eq!(twin_category("images/x.jpg"), "twin");
        assert_eq!(twin_category("images_00001/x.jpg"), "twin");
        assert_eq!(twin_category("x.jpg"), "twin");
        assert_eq!(twin_category("mugs/x.jpg"), "mugs");
        assert_eq!(twin_category("images_extra/x.jpg"), "images_extra");
        assert_eq!(instance_from_path("mugs/a.b/x.jpg"), "mugs_a.b_x");
        assert_eq!(instance_from_path("mugs/x"), "mugs_x");
    }

    #[test]
    fn extra_is_parsed_leniently_but_typed() {
        let f = Path::new("f.parquet");
        let e = parse_extra(
            f,
            0,
            Some(r#"{"instance_ids": [1, "b"], "target_count": 2.0, "other": true}"#),
        )
        .expect("valid");
        assert_eq!(e.instance_ids, ["1", "b"]);
        assert_eq!(e.target_count, Some(2));
        assert_eq!(
            parse_extra(f, 0, None).expect("null"),
            FgvqaExtra::default()
        );
        let err = parse_extra(f, 7, Some(r#"{"instance_ids": 3}"#)).expect_err("not a list");
        assert!(err.to_string().contains("row 7") && err.to_string().contains("extra"));
        assert!(parse_extra(f, 0, Some("{")).is_err());
    }
}
