//! Specification of `twin_data::export`: the verl record layout, exact prompt contents, and a
//! parquet file that reads back (through the parquet crate's own arrow reader, decoded by a
//! schema-agnostic walk) to exactly the JSONL records.
//!
//! Set `TWIN_DATA_KEEP_EXPORT=<dir>` to keep the written `train.parquet` / `train.jsonl` for a
//! look with other readers (e.g. `pyarrow.parquet.read_table(...).to_pylist()[0]`).

use std::fs::File;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value, json};
use twin_core::BlobHash;
use twin_core::event::ManifestEntry;
use twin_data::build::{
    Balance, BuildConfig, BuildInputs, BuiltDataset, ImageRef, NegativePair, PerSplit, Split, build,
};
use twin_data::export::{
    ExportOptions, PromptStyle, VerlRecord, records, schema, write_jsonl, write_parquet,
};
use twin_data::prompts;

const PAIR: &str = "Are these images of the same or identical products? For two products to be considered identical, minor changes such as those that can be explained context, backgrounds or photography conditions are allowed, but characteristic features of the product (color, shape, size, etc.) should remain consistent. For images with multiple products, compare only the primary product. Explain your reasoning and then conclude with a yes or no answer in <answer> tags as <answer>yes</answer> or <answer>no</answer>.";
const MULTI: &str = "The first image is a reference image. How many of the other images depict the same or identical products as the reference image? For two products to be considered identical, minor changes such as those that can be explained by context, backgrounds or photography conditions are allowed, but characteristic features of the product (color, shape, size, etc.) should remain consistent. For images with multiple products, compare only the primary product. Explain your reasoning and then answer with a number from 0 to 3 in <answer> tags as <answer>n</answer>.";
const EVAL_SUFFIX: &str =
    "You MUST include an explanation AND use the answer tags <answer></answer>.";

fn blob(category: &str, instance: usize, image: usize) -> BlobHash {
    BlobHash::of(format!("{category}/{instance}/{image}").as_bytes())
}

/// Two categories × 6 instances × 4 images; image sizes vary so resizing shows; hard negatives
/// between neighbouring instances.
fn dataset() -> BuiltDataset {
    let sizes = [(1024, 768), (300, 200), (640, 1280), (512, 512)];
    let mut images = Vec::new();
    let mut hard = Vec::new();
    for category in ["bags", "mugs"] {
        for instance in 0..6 {
            for (image, &(width, height)) in sizes.iter().enumerate() {
                images.push(ManifestEntry {
                    blob: blob(category, instance, image),
                    path: format!("{category}/{instance}/{image}.jpg"),
                    category: category.into(),
                    instance: instance.to_string(),
                    width,
                    height,
                    format: "jpeg".into(),
                    phash: "0".repeat(16),
                });
                for other in instance + 1..6 {
                    hard.push(NegativePair {
                        a: blob(category, instance, image),
                        b: blob(category, other, (image + 1) % 4),
                    });
                }
            }
        }
    }
    let config = BuildConfig {
        seed: 11,
        eval_fraction: 0.34,
        multi_questions: PerSplit { train: 8, eval: 4 },
        balance: Balance::Downsample,
        ..BuildConfig::default()
    };
    build(
        &BuildInputs {
            images: &images,
            hard_negatives: &hard,
            synthetic_negatives: &[],
        },
        &config,
    )
    .expect("fixture builds")
}

fn image_path(image: &ImageRef) -> String {
    format!("images/{}.png", image.blob)
}

fn options(split: Split, prompt: PromptStyle) -> ExportOptions {
    ExportOptions { split, prompt }
}

/// An arrow value as JSON, by walking its type: independent of `VerlRecord`, so a column
/// written under the wrong name, type or nesting shows up as a difference from the JSONL.
fn to_json(array: &dyn Array, row: usize) -> Value {
    assert!(!array.is_null(row), "no value is null");
    match array.data_type() {
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_owned()),
        DataType::Int64 => json!(array.as_primitive::<Int64Type>().value(row)),
        DataType::List(_) => {
            let items = array.as_list::<i32>().value(row);
            Value::Array((0..items.len()).map(|i| to_json(&items, i)).collect())
        }
        DataType::Struct(fields) => {
            let columns = array.as_struct();
            let object: Map<String, Value> = fields
                .iter()
                .zip(columns.columns())
                .map(|(field, column)| (field.name().clone(), to_json(column, row)))
                .collect();
            Value::Object(object)
        }
        other => panic!("unexpected arrow type {other}"),
    }
}

fn read_parquet(file: File) -> Vec<Value> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet footer");
    assert_eq!(
        builder.schema().as_ref(),
        schema().as_ref(),
        "stored schema"
    );
    let mut rows = Vec::new();
    for batch in builder.build().expect("reader") {
        let batch = batch.expect("batch");
        for row in 0..batch.num_rows() {
            let object: Map<String, Value> = batch
                .schema()
                .fields()
                .iter()
                .zip(batch.columns())
                .map(|(field, column)| (field.name().clone(), to_json(column, row)))
                .collect();
            rows.push(Value::Object(object));
        }
    }
    rows
}

fn jsonl_lines(records: &[VerlRecord]) -> String {
    let mut out = Vec::new();
    write_jsonl(records, &mut out).expect("jsonl");
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn parquet_reads_back_to_the_jsonl_records() {
    let dataset = dataset();
    let dir = tempfile::tempdir().expect("temp dir");
    for split in Split::ALL {
        let records = records(&dataset, &options(split, PromptStyle::Training), image_path);
        assert_eq!(records.len(), dataset.rows(split).count());
        assert!(!records.is_empty(), "{split} has rows");

        let jsonl = jsonl_lines(&records);
        let from_jsonl: Vec<Value> = jsonl
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON object per line"))
            .collect();
        assert_eq!(from_jsonl.len(), records.len());

        let path = dir.path().join(format!("{split}.parquet"));
        write_parquet(&records, File::create(&path).expect("create")).expect("parquet");
        let from_parquet = read_parquet(File::open(&path).expect("open"));
        assert_eq!(from_parquet.len(), from_jsonl.len());
        for (parquet, jsonl) in from_parquet.iter().zip(&from_jsonl) {
            assert_eq!(parquet, jsonl);
        }
        if let Some(keep) = std::env::var_os("TWIN_DATA_KEEP_EXPORT") {
            std::fs::create_dir_all(&keep).expect("keep dir");
            let keep = std::path::Path::new(&keep);
            std::fs::copy(&path, keep.join(format!("{split}.parquet"))).expect("copy parquet");
            std::fs::write(keep.join(format!("{split}.jsonl")), &jsonl).expect("write jsonl");
        }
    }
}

#[test]
fn parquet_batches_many_records() {
    // More records than one record batch holds (4096), to cover the chunking.
    let dataset = dataset();
    let one = records(
        &dataset,
        &options(Split::Train, PromptStyle::Training),
        image_path,
    );
    let many: Vec<VerlRecord> = one.iter().cycle().take(9000).cloned().collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("many.parquet");
    write_parquet(&many, File::create(&path).expect("create")).expect("parquet");
    let back = read_parquet(File::open(&path).expect("open"));
    assert_eq!(back.len(), 9000);
    assert_eq!(back[8999], serde_json::to_value(&many[8999]).expect("json"));
}

#[test]
fn records_have_the_verl_layout_and_exact_prompts() {
    let dataset = dataset();
    let records = records(
        &dataset,
        &options(Split::Train, PromptStyle::Training),
        image_path,
    );
    let jsonl = jsonl_lines(&records);
    let pair_line = jsonl
        .lines()
        .find(|line| line.contains(r#""question_type":"pair""#))
        .expect("a pair record");
    let pair_prefix = format!(
        "{{\"data_source\":\"twin\",\"prompt\":[{{\"role\":\"user\",\"content\":{}}}],\"images\":[{{\"image\":\"images/",
        serde_json::to_string(&format!("<image>\n<image>\n\n{PAIR}")).expect("json string")
    );
    assert!(pair_line.starts_with(&pair_prefix), "{pair_line}");

    for (index, (record, row)) in records.iter().zip(dataset.rows(Split::Train)).enumerate() {
        assert_eq!(
            record.prompt.len(),
            1,
            "one user message, no system message"
        );
        assert_eq!(record.prompt[0].role, "user");
        let expected = match row.images.len() {
            2 => format!("<image>\n<image>\n\n{PAIR}"),
            4 => format!("<image>\n<image>\n<image>\n<image>\n\n{MULTI}"),
            n => panic!("{n} images"),
        };
        assert_eq!(record.prompt[0].content, expected);
        assert_eq!(record.reward_model.ground_truth, row.answer);
        assert_eq!(record.reward_model.style, "rule");
        assert_eq!(record.answer, row.answer);
        assert_eq!(record.data_source, "twin");
        assert_eq!(record.extra_info.index, index as u64);
        assert_eq!(record.extra_info.pair_id, row.id);
        assert_eq!(record.extra_info.split, "train");
        let files: Vec<String> = row.images.iter().map(image_path).collect();
        assert_eq!(record.extra_info.image_files, files);
        for (image, source) in record.images.iter().zip(&row.images) {
            assert_eq!(image.image, image_path(source));
            let size = (image.resized_width, image.resized_height);
            let expected = match (source.width, source.height) {
                (1024, 768) => (512, 384),
                (300, 200) => (300, 200),
                (640, 1280) => (256, 512),
                (512, 512) => (512, 512),
                other => panic!("unexpected size {other:?}"),
            };
            assert_eq!(size, expected);
        }
        match row.images.len() {
            2 => assert_eq!(record.extra_info.question_type, "pair"),
            _ => {
                assert_eq!(record.extra_info.question_type, "multi");
                let positives = record
                    .extra_info
                    .sources
                    .iter()
                    .filter(|s| *s == "positive")
                    .count();
                assert_eq!(record.answer, positives.to_string());
            }
        }
    }
}

#[test]
fn eval_style_appends_the_answer_instruction_without_a_separator() {
    let dataset = dataset();
    let records = records(
        &dataset,
        &options(Split::Eval, PromptStyle::Eval),
        image_path,
    );
    assert!(records.iter().all(|r| r.extra_info.split == "eval"));
    let pair = records
        .iter()
        .find(|r| r.extra_info.question_type == "pair")
        .expect("an eval pair");
    assert_eq!(
        pair.prompt[0].content,
        format!("<image>\n<image>\n\n{PAIR}{EVAL_SUFFIX}")
    );
    assert_eq!(pair.question, format!("{PAIR}{EVAL_SUFFIX}"));
    assert!(
        pair.question
            .contains("<answer>no</answer>.You MUST include an explanation")
    );
    assert_eq!(pair.question, prompts::eval_text(prompts::PAIR_QUESTION));
    let multi = records
        .iter()
        .find(|r| r.extra_info.question_type == "multi")
        .expect("an eval multi question");
    assert_eq!(
        multi.prompt[0].content,
        format!("<image>\n<image>\n<image>\n<image>\n\n{MULTI}{EVAL_SUFFIX}")
    );
}

#[test]
fn an_empty_split_exports_empty_files() {
    let mut dataset = dataset();
    dataset.rows.retain(|row| row.split == Split::Train);
    let records = records(
        &dataset,
        &options(Split::Eval, PromptStyle::Training),
        image_path,
    );
    assert!(records.is_empty());
    assert_eq!(jsonl_lines(&records), "");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("empty.parquet");
    write_parquet(&records, File::create(&path).expect("create")).expect("parquet");
    assert!(read_parquet(File::open(&path).expect("open")).is_empty());
}
