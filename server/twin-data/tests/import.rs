//! TWIN and FGVQA import: parquet fixtures written here with arrow, imported, and checked
//! against what ingest reads; and every way a file can be wrong, named.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int64Array, ListArray, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructArray,
};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Fields};
use parquet::arrow::ArrowWriter;
use twin_data::import::{
    self, FgvqaImage, FgvqaImport, ImportError, ManifestLine, MissingImages, QuestionLine,
    TwinImport, YesNo,
};

/// A small PNG of one colour, distinct per `seed`.
fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 6, image::Rgb([seed, 255 - seed, seed / 2]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn strings(values: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every manifest line has exactly ingest's three keys and names a decodable image.
fn check_manifest(out: &Path) -> Vec<ManifestLine> {
    let text = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let keys: BTreeSet<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["path", "instance", "category"]),
            "{line}"
        );
    }
    let lines: Vec<ManifestLine> = read_jsonl(&out.join("manifest.jsonl"));
    for l in &lines {
        image::open(out.join(&l.path)).unwrap_or_else(|e| panic!("{}: {e}", l.path));
    }
    lines
}

/// The dataset's paths, the bytes behind them, and its rows.
struct TwinFixture {
    images: Vec<(&'static str, Vec<u8>)>,
    rows: Vec<[&'static str; 3]>,
}

fn twin_fixture() -> TwinFixture {
    let names = [
        "images_00001/a1.png",
        "images_00001/a2.png",
        "images_00002/a3.png",
        "images_00001/b1.png",
        "images_00002/b2.png",
        "images_00002/c1.png",
        "mugs/m1.png",
        "mugs/m2.png",
    ];
    TwinFixture {
        images: names
            .iter()
            .zip(1u8..)
            .map(|(n, i)| (*n, png(i * 20)))
            .collect(),
        rows: vec![
            ["images_00001/a1.png", "images_00001/a2.png", "yes"],
            ["images_00002/a3.png", "images_00001/a2.png", "Yes"],
            ["images_00001/a1.png", "images_00001/b1.png", "no"],
            ["images_00001/b1.png", "images_00002/b2.png", "yes"],
            ["images_00002/b2.png", "images_00002/c1.png", "no"],
            ["mugs/m1.png", "mugs/m2.png", "yes"],
        ],
    }
}

fn write_twin_parquet(path: &Path, rows: &[[&str; 3]]) {
    let question = "Do these two images show the same object?";
    write_parquet(
        path,
        vec![
            ("question", strings(&vec![question; rows.len()])),
            (
                "answer",
                strings(&rows.iter().map(|r| r[2]).collect::<Vec<_>>()),
            ),
            (
                "image_1",
                strings(&rows.iter().map(|r| r[0]).collect::<Vec<_>>()),
            ),
            (
                "image_2",
                strings(&rows.iter().map(|r| r[1]).collect::<Vec<_>>()),
            ),
        ],
    );
}

/// The published zip flattens the shards into `images/`; the mugs keep their directory.
fn write_zip(path: &Path, images: &[(&str, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in images {
        let entry = match name.strip_prefix("mugs/") {
            Some(_) => (*name).to_owned(),
            None => format!("images/{}", name.rsplit('/').next().unwrap()),
        };
        zip.start_file(entry, zip::write::FileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn check_twin_output(fixture: &TwinFixture, out: &Path, summary: &import::ImportSummary) {
    assert_eq!(
        (
            summary.rows,
            summary.rows_written,
            summary.images,
            summary.conflicts
        ),
        (6, 6, 8, 0)
    );
    let manifest = check_manifest(out);
    let by_path: BTreeMap<&str, &ManifestLine> =
        manifest.iter().map(|l| (l.path.as_str(), l)).collect();
    for (name, bytes) in &fixture.images {
        assert_eq!(&std::fs::read(out.join(name)).unwrap(), bytes, "{name}");
    }
    let instance = |p: &str| (by_path[p].category.as_str(), by_path[p].instance.as_str());
    // The yes pairs chain a1–a2–a3 and b1–b2; c1 is alone; the mugs are their own category.
    assert_eq!(instance("images_00001/a1.png"), ("twin", "images_00001_a1"));
    assert_eq!(
        instance("images_00001/a2.png"),
        instance("images_00001/a1.png")
    );
    assert_eq!(
        instance("images_00002/a3.png"),
        instance("images_00001/a1.png")
    );
    assert_eq!(instance("images_00002/b2.png"), ("twin", "images_00001_b1"));
    assert_eq!(instance("images_00002/c1.png"), ("twin", "images_00002_c1"));
    assert_eq!(instance("mugs/m2.png"), ("mugs", "mugs_m1"));
    assert_eq!((summary.instances, summary.categories), (4, 2));

    let questions: Vec<QuestionLine> = read_jsonl(&out.join("questions.jsonl"));
    assert_eq!(questions.len(), 6);
    assert_eq!(questions[1].answer, "yes", "answers are normalised");
    assert_eq!(
        questions[1].images,
        ["images_00002/a3.png", "images_00001/a2.png"]
    );
    assert!(questions.iter().all(|q| q.subset.is_none()));
    let raw = std::fs::read_to_string(out.join("questions.jsonl")).unwrap();
    assert!(!raw.contains("subset"), "TWIN lines carry no FGVQA fields");
}

#[test]
fn twin_imports_from_the_zip_and_from_its_extracted_directory_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = twin_fixture();
    let parquet = tmp.path().join("train.parquet");
    write_twin_parquet(&parquet, &fixture.rows);

    let rows = import::read_twin(&parquet).unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!((rows[2].row, rows[2].answer), (2, YesNo::No));

    let zip = tmp.path().join("images.zip");
    write_zip(&zip, &fixture.images);
    let from_zip = tmp.path().join("from-zip");
    let summary = import::import_twin(&TwinImport {
        parquet: parquet.clone(),
        images: zip,
        out: from_zip.clone(),
        missing: MissingImages::Fail,
    })
    .unwrap();
    check_twin_output(&fixture, &from_zip, &summary);

    let extracted = tmp.path().join("extracted");
    for (name, bytes) in &fixture.images {
        let path = extracted.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let from_dir = tmp.path().join("from-dir");
    let summary = import::import_twin(&TwinImport {
        parquet,
        images: extracted,
        out: from_dir.clone(),
        missing: MissingImages::Fail,
    })
    .unwrap();
    check_twin_output(&fixture, &from_dir, &summary);
    assert_eq!(
        std::fs::read(from_zip.join("manifest.jsonl")).unwrap(),
        std::fs::read(from_dir.join("manifest.jsonl")).unwrap()
    );
}

#[test]
fn a_missing_twin_image_fails_by_name_or_drops_its_rows_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fixture = twin_fixture();
    let parquet = tmp.path().join("train.parquet");
    write_twin_parquet(&parquet, &fixture.rows);
    fixture.images.retain(|(n, _)| *n != "images_00002/b2.png");
    let zip = tmp.path().join("images.zip");
    write_zip(&zip, &fixture.images);
    let import = |missing| {
        import::import_twin(&TwinImport {
            parquet: parquet.clone(),
            images: zip.clone(),
            out: tmp.path().join("out"),
            missing,
        })
    };
    let e = import(MissingImages::Fail).unwrap_err();
    assert!(
        matches!(e, ImportError::ImageNotFound { row: 3, .. }),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(
        message.contains("images_00002/b2.png") && message.contains("row 3"),
        "{message}"
    );

    let summary = import(MissingImages::Skip).unwrap();
    assert_eq!(summary.missing, ["images_00002/b2.png"]);
    assert_eq!((summary.rows, summary.rows_written), (6, 4));
    let manifest = check_manifest(&tmp.path().join("out"));
    assert!(manifest.iter().all(|l| l.path != "images_00002/b2.png"));
}

#[test]
fn twin_column_and_value_errors_name_the_file_column_and_row() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("no-answer.parquet");
    write_parquet(
        &path,
        vec![
            ("question", strings(&["q"])),
            ("image_1", strings(&["a.png"])),
            ("image_2", strings(&["b.png"])),
        ],
    );
    let e = import::read_twin(&path).unwrap_err();
    assert!(matches!(&e, ImportError::MissingColumn { column, .. } if column == "answer"));
    let message = e.to_string();
    assert!(
        message.contains("no-answer.parquet") && message.contains("`answer`"),
        "{message}"
    );

    let path = tmp.path().join("int-answer.parquet");
    write_parquet(
        &path,
        vec![
            ("question", strings(&["q"])),
            ("answer", Arc::new(Int64Array::from(vec![1]))),
            ("image_1", strings(&["a.png"])),
            ("image_2", strings(&["b.png"])),
        ],
    );
    let message = import::read_twin(&path).unwrap_err().to_string();
    assert!(message.contains("`answer` is Int64"), "{message}");

    let path = tmp.path().join("maybe.parquet");
    write_twin_parquet(
        &path,
        &[["a.png", "b.png", "yes"], ["a.png", "c.png", "maybe"]],
    );
    let message = import::read_twin(&path).unwrap_err().to_string();
    assert!(
        message.contains("row 1") && message.contains("`answer`") && message.contains("maybe"),
        "{message}"
    );

    let path = tmp.path().join("escape.parquet");
    write_twin_parquet(&path, &[["../../etc/passwd", "b.png", "yes"]]);
    let e = import::import_twin(&TwinImport {
        parquet: path,
        images: tmp.path().to_owned(),
        out: tmp.path().join("out"),
        missing: MissingImages::Fail,
    })
    .unwrap_err();
    assert!(e.to_string().contains("`image_1`"), "{e}");
}

#[test]
fn a_truncated_or_foreign_file_is_refused_as_not_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cut.parquet");
    write_twin_parquet(&path, &twin_fixture().rows);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = import::read_twin(&path).unwrap_err();
    assert!(matches!(e, ImportError::Parquet { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.contains("cut.parquet") && message.contains("not a readable parquet file"),
        "{message}"
    );
    let e = import::read_fgvqa(&tmp.path().join("absent.parquet")).unwrap_err();
    assert!(e.to_string().contains("absent.parquet"), "{e}");

    let not_zip = tmp.path().join("images.zip");
    std::fs::write(&not_zip, b"PK but not really").unwrap();
    let parquet = tmp.path().join("ok.parquet");
    write_twin_parquet(&parquet, &twin_fixture().rows);
    let e = import::import_twin(&TwinImport {
        parquet,
        images: not_zip,
        out: tmp.path().join("out"),
        missing: MissingImages::Fail,
    })
    .unwrap_err();
    assert!(e.to_string().contains("not a readable zip archive"), "{e}");
}

/// One Image feature value: bytes and the file name, either possibly null.
type ImageStruct<'a> = (Option<Vec<u8>>, Option<&'a str>);

/// `images` as the Image feature: a list of `{bytes, path}` structs.
fn image_structs(rows: &[Vec<ImageStruct>]) -> ArrayRef {
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let mut bytes = BinaryBuilder::new();
    let mut paths = StringBuilder::new();
    let mut offsets = vec![0i32];
    for row in rows {
        for (b, p) in row {
            bytes.append_option(b.as_deref());
            paths.append_option(*p);
        }
        offsets.push(offsets.last().unwrap() + row.len() as i32);
    }
    let values = StructArray::new(
        fields.clone(),
        vec![Arc::new(bytes.finish()), Arc::new(paths.finish())],
        None,
    );
    Arc::new(ListArray::new(
        Arc::new(Field::new("item", DataType::Struct(fields), true)),
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Arc::new(values),
        None,
    ))
}

fn image_paths(rows: &[Vec<&str>]) -> ArrayRef {
    let mut list = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for p in row {
            list.values().append_value(p);
        }
        list.append(true);
    }
    Arc::new(list.finish())
}

fn fgvqa_columns(images: ArrayRef, extras: &[&str]) -> Vec<(&'static str, ArrayRef)> {
    let n = extras.len();
    let pick = |v: &[&'static str]| strings(&v[..n]);
    vec![
        ("dataset_source", pick(&["CUB", "ILIAS", "CUB"])),
        ("images", images),
        (
            "question",
            pick(&["Same bird?", "Which one matches?", "Same bird again?"]),
        ),
        ("answer", pick(&["yes", "2", "no"])),
        ("question_type", pick(&["pairwise", "multi", "pairwise"])),
        ("extra", strings(extras)),
    ]
}

#[test]
fn fgvqa_embedded_images_are_written_once_per_subset_with_their_instances() {
    let tmp = tempfile::tempdir().unwrap();
    let parquet = tmp.path().join("test.parquet");
    let (bird, other_bird, x, y, z) = (png(1), png(2), png(3), png(4), png(5));
    let images = image_structs(&[
        vec![
            (Some(bird.clone()), Some("bird.png")),
            (Some(other_bird.clone()), None),
        ],
        vec![
            (Some(x.clone()), Some("q.png")),
            (Some(y), Some("q.png")),
            (Some(z), None),
        ],
        vec![(Some(bird.clone()), None), (Some(x.clone()), Some("x.png"))],
    ]);
    let extras = [
        r#"{"product_ids": [], "instance_ids": ["sparrow-1", "sparrow-1"], "source_paths": ["a", "b"], "target_count": 1}"#,
        "",
        r#"{"instance_ids": [7, 8]}"#,
    ];
    write_parquet(&parquet, fgvqa_columns(images, &extras));

    let rows = import::read_fgvqa(&parquet).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].extra.instance_ids, ["sparrow-1", "sparrow-1"]);
    assert_eq!(rows[0].extra.target_count, Some(1));
    assert_eq!(
        rows[0].images[0],
        FgvqaImage::Embedded {
            bytes: bird.clone(),
            path: Some("bird.png".into())
        }
    );

    let out = tmp.path().join("out");
    let summary = import::import_fgvqa(&FgvqaImport {
        parquet,
        out: out.clone(),
        missing: MissingImages::Fail,
    })
    .unwrap();
    let manifest = check_manifest(&out);
    let by_path: BTreeMap<&str, (&str, &str)> = manifest
        .iter()
        .map(|l| (l.path.as_str(), (l.category.as_str(), l.instance.as_str())))
        .collect();
    assert_eq!(
        by_path,
        BTreeMap::from([
            ("CUB/bird.png", ("CUB", "sparrow-1")),
            ("CUB/r000000-1.png", ("CUB", "sparrow-1")),
            ("CUB/x.png", ("CUB", "8")),
            ("ILIAS/q.png", ("ILIAS", "q")),
            ("ILIAS/q-r000001-1.png", ("ILIAS", "q-r000001-1")),
            ("ILIAS/r000001-2.png", ("ILIAS", "r000001-2")),
        ]),
        "identical bytes are written once per subset; clashing names are kept apart"
    );
    assert_eq!(std::fs::read(out.join("CUB/x.png")).unwrap(), x);
    assert_eq!(
        summary.conflicts, 1,
        "bird.png was sparrow-1 in row 0 and 7 in row 2; the first id stays"
    );
    assert_eq!(
        (summary.images, summary.instances, summary.categories),
        (6, 5, 2)
    );

    let questions: Vec<QuestionLine> = read_jsonl(&out.join("questions.jsonl"));
    assert_eq!(questions.len(), 3);
    assert_eq!(questions[1].subset.as_deref(), Some("ILIAS"));
    assert_eq!(questions[1].question_type.as_deref(), Some("multi"));
    assert_eq!(questions[1].answer, "2");
    assert_eq!(questions[2].images, ["CUB/bird.png", "CUB/x.png"]);
}

#[test]
fn fgvqa_path_images_are_copied_from_beside_the_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("imgs")).unwrap();
    std::fs::write(tmp.path().join("imgs/a.png"), png(10)).unwrap();
    std::fs::write(tmp.path().join("imgs/b.png"), png(11)).unwrap();
    let parquet = tmp.path().join("test.parquet");
    write_parquet(
        &parquet,
        fgvqa_columns(
            image_paths(&[vec!["imgs/a.png", "imgs/b.png"]]),
            &[r#"{"instance_ids": ["p", "q"]}"#],
        ),
    );
    let out = tmp.path().join("out");
    let summary = import::import_fgvqa(&FgvqaImport {
        parquet: parquet.clone(),
        out: out.clone(),
        missing: MissingImages::Fail,
    })
    .unwrap();
    assert_eq!((summary.images, summary.instances), (2, 2));
    assert_eq!(std::fs::read(out.join("CUB/imgs/b.png")).unwrap(), png(11));
    let manifest = check_manifest(&out);
    assert_eq!(manifest[0].instance, "p");

    std::fs::remove_file(tmp.path().join("imgs/b.png")).unwrap();
    let e = import::import_fgvqa(&FgvqaImport {
        parquet: parquet.clone(),
        out: tmp.path().join("again"),
        missing: MissingImages::Fail,
    })
    .unwrap_err();
    let message = e.to_string();
    assert!(
        message.contains("imgs/b.png") && message.contains("row 0"),
        "{message}"
    );
    let summary = import::import_fgvqa(&FgvqaImport {
        parquet,
        out: tmp.path().join("skipped"),
        missing: MissingImages::Skip,
    })
    .unwrap();
    assert_eq!(
        (summary.rows_written, summary.missing.len(), summary.images),
        (0, 1, 1)
    );
}

#[test]
fn fgvqa_schema_and_value_errors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("no-images.parquet");
    let mut columns = fgvqa_columns(image_paths(&[vec!["a.png"]]), &[""]);
    columns.retain(|(name, _)| *name != "images");
    write_parquet(&path, columns);
    let message = import::read_fgvqa(&path).unwrap_err().to_string();
    assert!(
        message.contains("no-images.parquet") && message.contains("missing column `images`"),
        "{message}"
    );

    let path = tmp.path().join("flat-images.parquet");
    let mut columns = fgvqa_columns(image_paths(&[vec!["a.png"]]), &[""]);
    columns[1].1 = strings(&["a.png"]);
    write_parquet(&path, columns);
    let message = import::read_fgvqa(&path).unwrap_err().to_string();
    assert!(message.contains("`images` is Utf8"), "{message}");

    let path = tmp.path().join("ids.parquet");
    write_parquet(
        &path,
        fgvqa_columns(
            image_structs(&[vec![(Some(png(1)), None), (Some(png(2)), None)]]),
            &[r#"{"instance_ids": ["only-one"]}"#],
        ),
    );
    let message = import::import_fgvqa(&FgvqaImport {
        parquet: path,
        out: tmp.path().join("out"),
        missing: MissingImages::Fail,
    })
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("row 0")
            && message.contains("`extra`")
            && message.contains("1 ids for 2 images"),
        "{message}"
    );

    let path = tmp.path().join("bad-extra.parquet");
    write_parquet(
        &path,
        fgvqa_columns(image_structs(&[vec![(Some(png(1)), None)]]), &["{not json"]),
    );
    let message = import::read_fgvqa(&path).unwrap_err().to_string();
    assert!(message.contains("`extra`: not JSON"), "{message}");

    let path = tmp.path().join("empty-image.parquet");
    write_parquet(
        &path,
        fgvqa_columns(image_structs(&[vec![(None, None)]]), &[""]),
    );
    let message = import::read_fgvqa(&path).unwrap_err().to_string();
    assert!(message.contains("neither bytes nor a path"), "{message}");
}
