//! The procedural sample generator: reproducible, laid out for ingest, and hard in the intended
//! way (siblings differ a little, views of one instance a lot).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use twin_data::synth::{
    self, DifferenceKind, InstanceRecord, SheetLayout, SynthConfig, category_name, plan, render,
};

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        categories: 3,
        instances: 3,
        views: 2,
        size: 40,
        seed,
    }
}

/// Every file under `root`, relative path → bytes.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.insert(
                    path.strip_prefix(root).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    out
}

/// Mean absolute difference per channel, on the 0–255 scale.
fn mean_difference(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.as_raw().len() as f64
}

#[test]
fn the_same_seed_writes_byte_identical_files_and_another_seed_does_not() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    synth::generate(&small(7), a.path(), 1).unwrap();
    synth::generate(&small(7), b.path(), 1).unwrap();
    synth::generate(&small(8), c.path(), 1).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    assert_eq!(
        fa.len(),
        3 * 3 * 2 + 1 + 2,
        "images, a corrupt file, two JSONL files"
    );
    assert!(fa == fb, "two runs with one seed differ");
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fc.keys().collect::<Vec<_>>(),
        "the layout does not depend on the seed"
    );
    let differing = fa
        .iter()
        .filter(|(path, bytes)| {
            path.extension().is_some_and(|e| e == "png") && fc[*path] != **bytes
        })
        .count();
    assert!(
        differing >= 3 * 3 * 2,
        "only {differing} images changed with the seed"
    );
}

#[test]
fn an_image_does_not_depend_on_what_else_is_generated() {
    let few = plan(&small(11)).unwrap();
    let more = plan(&SynthConfig {
        categories: 4,
        instances: 5,
        views: 3,
        ..small(11)
    })
    .unwrap();
    let find = |p: &[synth::PlannedInstance], name: &str| {
        p.iter()
            .find(|i| i.record.instance == name)
            .cloned()
            .unwrap()
    };
    for name in ["mug-00", "sneaker-02", "lamp-01"] {
        let (a, b) = (find(&few, name), find(&more, name));
        assert_eq!(a.record.design, b.record.design, "{name}");
        assert_eq!(
            render(&a.design, &a.views[1], 32),
            render(&b.design, &b.views[1], 32),
            "{name}"
        );
    }
}

#[test]
fn the_output_is_laid_out_for_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let config = small(3);
    let summary = synth::generate(&config, dir.path(), 2).unwrap();
    assert_eq!(
        (
            summary.images,
            summary.instances,
            summary.categories,
            summary.corrupt
        ),
        (18, 9, 3, 2)
    );
    let manifest = std::fs::read_to_string(dir.path().join("manifest.jsonl")).unwrap();
    let lines: Vec<&str> = manifest.lines().collect();
    assert_eq!(lines.len(), 18 + 2);
    let mut instances = BTreeSet::new();
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let object = value.as_object().unwrap();
        let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["path", "instance", "category"]),
            "{line}"
        );
        let (path, instance, category) = (
            object["path"].as_str().unwrap(),
            object["instance"].as_str().unwrap(),
            object["category"].as_str().unwrap(),
        );
        let parts: Vec<&str> = path.split('/').collect();
        assert_eq!(parts.len(), 3, "{path}");
        assert_eq!((parts[0], parts[1]), (category, instance), "{path}");
        assert!(dir.path().join(path).is_file(), "{path}");
        instances.insert((category.to_owned(), instance.to_owned()));
    }
    assert!(instances.contains(&("mug".to_owned(), "broken".to_owned())));
    for c in 0..3 {
        let category = category_name(c);
        for i in 0..3 {
            for v in 0..2 {
                let path = dir
                    .path()
                    .join(&category)
                    .join(format!("{category}-{i:02}"))
                    .join(format!("view-{v}.png"));
                let image = image::open(&path).unwrap();
                assert_eq!((image.width(), image.height()), (40, 40));
            }
        }
    }
    let corrupt = std::fs::read(dir.path().join("mug/broken/corrupt-0.png")).unwrap();
    assert!(
        image::load_from_memory(&corrupt).is_err(),
        "corrupt files do not decode"
    );

    let records: Vec<InstanceRecord> = std::fs::read_to_string(dir.path().join("instances.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 9);
    for r in &records {
        assert_eq!(r.base, r.category, "one base design per category");
        assert_eq!(r.views.len(), 2);
        match (r.instance.ends_with("-00"), &r.differs) {
            (true, None) => {}
            (false, Some(d)) => {
                assert_ne!(d.from, d.to);
                assert_eq!(r.design[&d.property], d.to, "the design records the change");
                assert!(d.property.starts_with(&format!("{}.", d.part)));
            }
            _ => panic!("instance 0 is the base, the others change one thing: {r:?}"),
        }
    }
}

#[test]
fn siblings_differ_a_little_and_views_differ_a_lot() {
    let config = SynthConfig {
        categories: 7,
        instances: 4,
        views: 2,
        size: 64,
        seed: 42,
    };
    let planned = plan(&config).unwrap();
    let mut kinds = BTreeSet::new();
    for category in planned.chunks(config.instances) {
        let base = &category[0];
        let view = &base.views[0];
        let base_image = render(&base.design, view, config.size);
        let across_views = mean_difference(
            &base_image,
            &render(&base.design, &base.views[1], config.size),
        );
        for sibling in &category[1..] {
            let difference =
                mean_difference(&base_image, &render(&sibling.design, view, config.size));
            let what = sibling.record.differs.as_ref().unwrap();
            kinds.insert(what.kind);
            assert!(
                difference > 0.0,
                "{} looks exactly like its base ({what:?})",
                sibling.record.instance
            );
            assert!(
                difference < 12.0,
                "{} differs from its base by {difference:.2} ({what:?})",
                sibling.record.instance
            );
            assert!(
                across_views > difference,
                "{}: views differ by {across_views:.2}, the sibling by {difference:.2}",
                sibling.record.instance
            );
        }
    }
    assert_eq!(
        kinds,
        BTreeSet::from([
            DifferenceKind::Geometry,
            DifferenceKind::Colour,
            DifferenceKind::Marking
        ]),
        "the default seed exercises every kind of difference"
    );
}

#[test]
fn categories_past_the_built_in_kinds_get_new_base_designs() {
    let kinds = synth::category_kinds();
    assert!(kinds.len() >= 6);
    let config = SynthConfig {
        categories: kinds.len() + 1,
        instances: 1,
        views: 1,
        size: 32,
        seed: 1,
    };
    let planned = plan(&config).unwrap();
    let last = planned.last().unwrap();
    assert_eq!(last.record.category, format!("{}-2", kinds[0]));
    assert_ne!(planned[0].record.design, last.record.design);
}

#[test]
fn bad_configs_are_refused_by_name() {
    for (config, word) in [
        (
            SynthConfig {
                views: 0,
                ..small(1)
            },
            "views",
        ),
        (
            SynthConfig {
                size: 4,
                ..small(1)
            },
            "size",
        ),
    ] {
        let e = plan(&config).unwrap_err().to_string();
        assert!(e.contains(word), "{e}");
    }
}

#[test]
fn the_contact_sheet_is_a_grid_of_instances_by_views() {
    let config = small(5);
    let layout = SheetLayout {
        categories: 2,
        cell: 24,
    };
    let sheet = synth::contact_sheet(&config, layout).unwrap();
    // Two blocks side by side, each 2 views wide and 3 instances tall, 2 px between cells and
    // 14 px around blocks.
    assert_eq!(sheet.width(), 2 * (2 * 24 + 2) + 3 * 14);
    assert_eq!(sheet.height(), 3 * 24 + 2 * 2 + 2 * 14);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sheet.png");
    synth::write_contact_sheet(&config, layout, &path).unwrap();
    assert_eq!(image::open(&path).unwrap().to_rgb8(), sheet);
}

#[test]
fn the_documented_contact_sheet_is_what_the_default_seed_draws() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/sample-contact-sheet.png");
    let documented = image::open(&path).unwrap().to_rgb8();
    let drawn = synth::contact_sheet(&SynthConfig::default(), SheetLayout::default()).unwrap();
    assert!(
        documented == drawn,
        "docs/sample-contact-sheet.png is stale: regenerate it with \
         `twin sample /tmp/sample --contact-sheet docs/sample-contact-sheet.png`"
    );
}
