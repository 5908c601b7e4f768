//! Specification of `twin_data::build`: the instance-disjoint split, pair and multi sampling,
//! balancing, negatives modes, dropped and rejected inputs, determinism and the manifest — plus
//! the question texts of `twin_data::prompts`, pinned to the reference.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use twin_core::BlobHash;
use twin_core::event::ManifestEntry;
use twin_data::build::{
    Balance, BuildConfig, BuildError, BuildInputs, BuiltDataset, ManifestError, NegativeList,
    NegativePair, NegativesMode, PerSplit, Row, RowKind, Source, Split, build, resized_size,
};
use twin_data::prompts;

// ---- fixtures ---------------------------------------------------------------------------------

fn blob(category: &str, instance: &str, image: usize) -> BlobHash {
    BlobHash::of(format!("{category}/{instance}/{image}").as_bytes())
}

fn entry(category: &str, instance: &str, image: usize) -> ManifestEntry {
    ManifestEntry {
        blob: blob(category, instance, image),
        path: format!("{category}/{instance}/{image}.png"),
        category: category.to_owned(),
        instance: instance.to_owned(),
        width: 1024,
        height: 768,
        format: "png".to_owned(),
        phash: "0000000000000000".to_owned(),
    }
}

/// `categories` × `instances` instances (named `i0`, `i1`, …) × `images` images each.
fn images(categories: &[&str], instances: usize, images: usize) -> Vec<ManifestEntry> {
    let mut out = Vec::new();
    for category in categories {
        for i in 0..instances {
            for k in 0..images {
                out.push(entry(category, &format!("i{i}"), k));
            }
        }
    }
    out
}

/// Every pair of instances of a category, image `k` of one against image `k` of the other for
/// every `k`: many hard negatives, some of which cross the split.
fn hard_negatives(categories: &[&str], instances: usize, images: usize) -> Vec<NegativePair> {
    let mut out = Vec::new();
    for category in categories {
        for i in 0..instances {
            for j in i + 1..instances {
                for k in 0..images {
                    out.push(NegativePair {
                        a: blob(category, &format!("i{i}"), k),
                        b: blob(category, &format!("i{j}"), k),
                    });
                }
            }
        }
    }
    out
}

const CATEGORIES: &[&str] = &["bags", "mugs", "shoes"];

struct Fixture {
    images: Vec<ManifestEntry>,
    hard: Vec<NegativePair>,
    synthetic: Vec<NegativePair>,
}

impl Fixture {
    fn standard() -> Self {
        Fixture {
            images: images(CATEGORIES, 10, 5),
            hard: hard_negatives(CATEGORIES, 10, 5),
            synthetic: Vec::new(),
        }
    }

    fn inputs(&self) -> BuildInputs<'_> {
        BuildInputs {
            images: &self.images,
            hard_negatives: &self.hard,
            synthetic_negatives: &self.synthetic,
        }
    }

    fn build(&self, config: &BuildConfig) -> BuiltDataset {
        build(&self.inputs(), config).expect("fixture builds")
    }
}

fn config() -> BuildConfig {
    BuildConfig {
        seed: 7,
        eval_fraction: 0.3,
        ..BuildConfig::default()
    }
}

fn source(row: &Row) -> Option<Source> {
    match row.kind {
        RowKind::Pair { source } => Some(source),
        RowKind::Multi { .. } => None,
    }
}

fn instance_key(row: &Row, image: usize) -> (String, String) {
    let image = &row.images[image];
    (image.category.clone(), image.instance.clone())
}

/// The split each instance's rows are in; panics if an instance is in both.
fn instance_splits(dataset: &BuiltDataset) -> BTreeMap<(String, String), Split> {
    let mut splits = BTreeMap::new();
    for row in &dataset.rows {
        for image in 0..row.images.len() {
            let previous = splits.insert(instance_key(row, image), row.split);
            assert!(
                previous.is_none() || previous == Some(row.split),
                "instance {:?} is in both splits",
                instance_key(row, image)
            );
        }
    }
    splits
}

// ---- split ------------------------------------------------------------------------------------

#[test]
fn split_is_instance_disjoint_and_covers_every_category() {
    let dataset = Fixture::standard().build(&config());
    let splits = instance_splits(&dataset);
    assert_eq!(splits.len(), 30, "every instance has rows");
    for category in CATEGORIES {
        let eval = splits
            .iter()
            .filter(|((c, _), s)| c == category && **s == Split::Eval)
            .count();
        // round(10 × 0.3) instances per category, not a share of images.
        assert_eq!(eval, 3, "category {category}");
    }
    assert_eq!(dataset.counts.eval.instances, 9);
    assert_eq!(dataset.counts.train.instances, 21);
    assert_eq!(dataset.counts.eval.images, 45);
    for row in &dataset.rows {
        assert!(row.id.starts_with(row.split.as_str()), "{}", row.id);
    }
}

#[test]
fn small_categories_still_get_an_eval_instance() {
    let mut images = images(&["bags"], 2, 3);
    images.extend(self::images(&["mugs"], 1, 3));
    // Whichever bags instance stays in train keeps a (cross-category) hard negative.
    let hard = ["i0", "i1"]
        .map(|bag| NegativePair {
            a: blob("bags", bag, 0),
            b: blob("mugs", "i0", 0),
        })
        .to_vec();
    let fixture = Fixture {
        images,
        hard,
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.01,
        ..config()
    };
    let dataset = fixture.build(&config);
    let splits = instance_splits(&dataset);
    // bags: 2 instances → one per split despite the 1 % fraction; mugs: 1 instance → train.
    let bags: BTreeSet<Split> = splits
        .iter()
        .filter(|((c, _), _)| c == "bags")
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(bags, BTreeSet::from([Split::Train, Split::Eval]));
    assert_eq!(splits[&("mugs".to_owned(), "i0".to_owned())], Split::Train);
}

#[test]
fn a_category_keeps_its_split_when_another_category_is_added() {
    let base = Fixture::standard();
    let mut bigger = Fixture::standard();
    bigger.images.extend(images(&["lamps"], 10, 5));
    let of = |dataset: &BuiltDataset| -> BTreeMap<(String, String), Split> {
        instance_splits(dataset)
            .into_iter()
            .filter(|((c, _), _)| c != "lamps")
            .collect()
    };
    assert_eq!(of(&base.build(&config())), of(&bigger.build(&config())));
}

// ---- pairs ------------------------------------------------------------------------------------

#[test]
fn positives_are_two_distinct_images_of_one_instance_capped_per_instance() {
    let dataset = Fixture::standard().build(&config());
    let mut per_instance: BTreeMap<(String, String), usize> = BTreeMap::new();
    for row in dataset
        .rows
        .iter()
        .filter(|r| source(r) == Some(Source::Positive))
    {
        assert_eq!(row.answer, "yes");
        assert_eq!(instance_key(row, 0), instance_key(row, 1));
        assert_ne!(row.images[0].blob, row.images[1].blob);
        *per_instance.entry(instance_key(row, 0)).or_default() += 1;
    }
    // 5 images → 10 possible pairs, 4 kept.
    assert_eq!(per_instance.len(), 30);
    assert!(per_instance.values().all(|&n| n == 4), "{per_instance:?}");
    assert_eq!(
        dataset.counts.train.positives_over_cap + dataset.counts.eval.positives_over_cap,
        30 * 6
    );
}

#[test]
fn cross_split_hard_pairs_are_dropped_and_counted() {
    let fixture = Fixture::standard();
    let dataset = fixture.build(&config());
    let splits = instance_splits(&dataset);
    let split_of_blob: BTreeMap<BlobHash, Split> = fixture
        .images
        .iter()
        .map(|e| (e.blob, splits[&(e.category.clone(), e.instance.clone())]))
        .collect();
    let crossing = fixture
        .hard
        .iter()
        .filter(|p| split_of_blob[&p.a] != split_of_blob[&p.b])
        .count() as u64;
    assert!(crossing > 0, "the fixture must have crossing pairs");
    assert_eq!(dataset.dropped.cross_split_hard, crossing);
    let hard_rows = dataset
        .rows
        .iter()
        .filter(|r| source(r) == Some(Source::Hard))
        .count() as u64;
    assert_eq!(hard_rows + crossing, fixture.hard.len() as u64);
    for row in dataset
        .rows
        .iter()
        .filter(|r| source(r) == Some(Source::Hard))
    {
        assert_eq!(row.answer, "no");
        assert_ne!(instance_key(row, 0), instance_key(row, 1));
    }
    assert_eq!(
        dataset.flat_counts()["dropped.cross_split"],
        crossing,
        "flat counts carry it too"
    );
}

#[test]
fn duplicate_pairs_are_kept_once_and_hard_wins_over_synthetic() {
    let mut fixture = Fixture::standard();
    let first = fixture.hard[0];
    // The same pair reversed, and again as a synthetic pair.
    fixture.hard.push(NegativePair {
        a: first.b,
        b: first.a,
    });
    fixture.synthetic.push(first);
    let synthetic_only = NegativePair {
        a: blob("mugs", "i0", 4),
        b: blob("shoes", "i0", 4),
    };
    fixture.synthetic.push(synthetic_only);
    let config = BuildConfig {
        eval_fraction: 0.0,
        ..config()
    };
    let dataset = fixture.build(&config);
    assert_eq!(dataset.dropped.duplicate_pairs, 2);
    let pairs_with = |a: BlobHash, b: BlobHash| -> Vec<Source> {
        dataset
            .rows
            .iter()
            .filter(|r| {
                let set: BTreeSet<BlobHash> = r.images.iter().map(|i| i.blob).collect();
                r.images.len() == 2 && set == BTreeSet::from([a, b])
            })
            .filter_map(source)
            .collect()
    };
    assert_eq!(pairs_with(first.a, first.b), vec![Source::Hard]);
    assert_eq!(
        pairs_with(synthetic_only.a, synthetic_only.b),
        vec![Source::Synthetic]
    );
    assert_eq!(dataset.counts.train.pairs.synthetic, 1);
}

#[test]
fn random_ablation_uses_no_hard_pair_anywhere() {
    let fixture = Fixture::standard();
    let config = BuildConfig {
        negatives: NegativesMode::Random,
        random_negatives_per_instance: 3,
        multi_questions: PerSplit { train: 40, eval: 8 },
        ..config()
    };
    let dataset = fixture.build(&config);
    let hard: HashSet<BTreeSet<BlobHash>> = fixture
        .hard
        .iter()
        .map(|p| BTreeSet::from([p.a, p.b]))
        .collect();
    let mut random = 0;
    for row in &dataset.rows {
        match &row.kind {
            RowKind::Pair { source } => {
                assert!(
                    matches!(source, Source::Positive | Source::Random),
                    "{source:?}"
                );
                let set: BTreeSet<BlobHash> = row.images.iter().map(|i| i.blob).collect();
                assert!(!hard.contains(&set), "row {} repeats a hard pair", row.id);
                if *source == Source::Random {
                    random += 1;
                    assert_eq!(row.images[0].category, row.images[1].category);
                    assert_ne!(row.images[0].instance, row.images[1].instance);
                    assert_eq!(row.answer, "no");
                }
            }
            RowKind::Multi { candidates } => {
                assert!(
                    candidates
                        .iter()
                        .all(|s| matches!(s, Source::Positive | Source::Random)),
                    "{candidates:?}"
                );
            }
        }
    }
    // 3 per instance, 30 instances, every category has ≥ 2 instances in each split.
    assert_eq!(random, 90);
    assert_eq!(dataset.counts.train.random_shortfall, 0);
    assert_eq!(dataset.counts.train.pairs.hard, 0);
    assert_eq!(
        dataset.dropped.unused_by_mode,
        fixture.hard.len() as u64 - dataset.dropped.cross_split_hard
    );
}

#[test]
fn random_negatives_that_cannot_be_found_are_reported() {
    // One category, two instances of one image each in train: a single possible random pair.
    let fixture = Fixture {
        images: {
            let mut images = images(&["bags"], 2, 1);
            images.push(entry("bags", "i0", 1));
            images
        },
        hard: Vec::new(),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.0,
        negatives: NegativesMode::Random,
        random_negatives_per_instance: 5,
        ..config()
    };
    let dataset = fixture.build(&config);
    // i0 has 2 images, i1 has 1: two distinct random pairs exist, 10 were asked for.
    assert_eq!(dataset.counts.train.pairs.random, 2);
    assert_eq!(dataset.counts.train.random_shortfall, 8);
}

#[test]
fn both_mode_adds_random_pairs_to_reach_the_hard_share() {
    let fixture = Fixture::standard();
    let config = BuildConfig {
        negatives: NegativesMode::Both,
        hard_share: 0.75,
        ..config()
    };
    let dataset = fixture.build(&config);
    for split in Split::ALL {
        let counts = dataset.counts.get(split);
        assert!(counts.pairs.hard > 0);
        // hard / (hard + random) = 0.75 → random = round(hard / 3).
        let expected = (counts.pairs.hard as f64 / 3.0).round() as u64;
        assert_eq!(counts.pairs.random, expected, "{split}");
    }
}

// ---- balance ----------------------------------------------------------------------------------

#[test]
fn downsampling_balances_yes_and_no_in_each_split() {
    let fixture = Fixture::standard();
    let unbalanced = fixture.build(&config());
    assert_ne!(unbalanced.counts.train.yes, unbalanced.counts.train.no);
    let dataset = fixture.build(&BuildConfig {
        balance: Balance::Downsample,
        ..config()
    });
    for split in Split::ALL {
        let before = unbalanced.counts.get(split);
        let after = dataset.counts.get(split);
        let minority = before.yes.min(before.no);
        assert_eq!((after.yes, after.no), (minority, minority), "{split}");
        assert_eq!(after.balance_removed, before.yes.max(before.no) - minority);
        let rows: Vec<&Row> = dataset
            .rows(split)
            .filter(|r| source(r).is_some())
            .collect();
        let yes = rows.iter().filter(|r| r.answer == "yes").count() as u64;
        assert_eq!(yes * 2, rows.len() as u64, "{split} rows");
    }
}

#[test]
fn oversampling_balances_by_repeating_the_minority() {
    let fixture = Fixture::standard();
    let unbalanced = fixture.build(&config());
    let dataset = fixture.build(&BuildConfig {
        balance: Balance::Oversample,
        ..config()
    });
    for split in Split::ALL {
        let before = unbalanced.counts.get(split);
        let after = dataset.counts.get(split);
        let majority = before.yes.max(before.no);
        assert_eq!((after.yes, after.no), (majority, majority), "{split}");
        assert_eq!(after.balance_added, majority - before.yes.min(before.no));
    }
    let ids: HashSet<&str> = dataset.rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), dataset.rows.len(), "copies get their own ids");
}

#[test]
fn balancing_a_split_without_one_answer_is_an_error() {
    // One eval instance out of four: its hard pairs all cross the split, so eval has one positive
    // and no negative, while train balances (three yes, three no).
    let fixture = Fixture {
        images: images(&["bags"], 4, 2),
        hard: hard_negatives(&["bags"], 4, 1),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.25,
        balance: Balance::Downsample,
        ..config()
    };
    let error = build(&fixture.inputs(), &config).expect_err("eval cannot be balanced");
    assert_eq!(
        error,
        BuildError::CannotBalance {
            split: Split::Eval,
            yes: 1,
            no: 0
        }
    );
    assert_eq!(
        error.to_string(),
        "cannot balance the eval split: it has 1 yes and 0 no pairs"
    );
}

// ---- multi questions --------------------------------------------------------------------------

#[test]
fn multi_answers_are_exactly_uniform_and_match_their_candidates() {
    let fixture = Fixture::standard();
    let config = BuildConfig {
        multi_questions: PerSplit {
            train: 40,
            eval: 12,
        },
        ..config()
    };
    let dataset = fixture.build(&config);
    assert_eq!(dataset.counts.train.multi_answers, [10; 4]);
    assert_eq!(dataset.counts.eval.multi_answers, [3; 4]);
    assert_eq!(dataset.counts.train.multi_shortfall, [0; 4]);
    let reference_blobs = |(category, instance): &(String, String)| -> HashSet<BlobHash> {
        fixture
            .images
            .iter()
            .filter(|e| &e.category == category && &e.instance == instance)
            .map(|e| e.blob)
            .collect()
    };
    let mut first_candidate_positive = 0;
    let mut single_positive_at = BTreeSet::new();
    let mut answers: BTreeMap<(Split, String), usize> = BTreeMap::new();
    let multi: Vec<&Row> = dataset
        .rows
        .iter()
        .filter(|r| source(r).is_none())
        .collect();
    assert_eq!(multi.len(), 52);
    for row in multi {
        assert_eq!(row.question, prompts::MULTI_QUESTION);
        assert_eq!(row.images.len(), 4);
        let positives = row.positive_candidates();
        let n = positives.iter().filter(|&&p| p).count();
        assert_eq!(row.answer, n.to_string(), "{}", row.id);
        *answers.entry((row.split, row.answer.clone())).or_default() += 1;
        let reference = instance_key(row, 0);
        let blobs: BTreeSet<BlobHash> = row.images.iter().map(|i| i.blob).collect();
        assert_eq!(blobs.len(), 4, "four distinct images");
        for (candidate, positive) in positives.iter().enumerate() {
            let same = instance_key(row, candidate + 1) == reference;
            assert_eq!(same, *positive, "{} candidate {candidate}", row.id);
            if !positive {
                // Hard mode: negatives are hard partners of the reference's instance.
                let image = row.images[candidate + 1].blob;
                let partner_of_reference = |own: BlobHash, other: BlobHash| {
                    own == image && reference_blobs(&reference).contains(&other)
                };
                assert!(
                    fixture
                        .hard
                        .iter()
                        .any(|p| partner_of_reference(p.a, p.b) || partner_of_reference(p.b, p.a)),
                    "{} candidate {candidate} is not a hard negative of the reference",
                    row.id
                );
            }
        }
        if positives[0] {
            first_candidate_positive += 1;
        }
        if n == 1 {
            single_positive_at.insert(positives.iter().position(|&p| p));
        }
    }
    // Candidates are shuffled: positives are not always first. Answers 1–3 have 78 positives
    // over 3 × 39 slots; a fixed order would put one first every time.
    assert!(first_candidate_positive > 0 && first_candidate_positive < 39);
    assert!(single_positive_at.len() > 1, "{single_positive_at:?}");
    assert_eq!(answers[&(Split::Train, "0".to_owned())], 10);
}

#[test]
fn infeasible_multi_answers_are_reported_as_shortfall() {
    // Two images per instance: a reference has one other image, so answers 2 and 3 are
    // impossible.
    let fixture = Fixture {
        images: images(CATEGORIES, 10, 2),
        hard: hard_negatives(CATEGORIES, 10, 2),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.0,
        multi_questions: PerSplit { train: 16, eval: 0 },
        ..config()
    };
    let dataset = fixture.build(&config);
    assert_eq!(dataset.counts.train.multi_answers, [4, 4, 0, 0]);
    assert_eq!(dataset.counts.train.multi_shortfall, [0, 0, 4, 4]);
    assert_eq!(dataset.flat_counts()["train.multi.3.shortfall"], 4);
}

// ---- determinism and the manifest -------------------------------------------------------------

#[test]
fn same_inputs_and_seed_give_the_same_manifest_whatever_the_input_order() {
    let fixture = Fixture::standard();
    let config = BuildConfig {
        multi_questions: PerSplit { train: 8, eval: 4 },
        balance: Balance::Oversample,
        ..config()
    };
    let first = fixture.build(&config).manifest();
    let mut reordered = Fixture::standard();
    reordered.images.reverse();
    reordered.hard.reverse();
    for pair in &mut reordered.hard {
        std::mem::swap(&mut pair.a, &mut pair.b);
    }
    assert_eq!(reordered.build(&config).manifest(), first);
    let other_seed = fixture
        .build(&BuildConfig {
            seed: 8,
            ..config.clone()
        })
        .manifest();
    assert_ne!(other_seed.id, first.id);
    assert_eq!(first.id, BlobHash::of(&first.bytes));
}

#[test]
fn manifest_reads_back_to_the_same_dataset_and_bytes() {
    let dataset = Fixture::standard().build(&BuildConfig {
        multi_questions: PerSplit { train: 4, eval: 4 },
        ..config()
    });
    let manifest = dataset.manifest();
    let read = BuiltDataset::from_manifest(&manifest.bytes).expect("reads back");
    assert_eq!(read, dataset);
    assert_eq!(read.manifest(), manifest);
    let text = String::from_utf8(manifest.bytes.clone()).expect("json is utf-8");
    assert!(
        text.starts_with(r#"{"format":"twin-dataset/1","config":{"seed":7,"#),
        "{}",
        &text[..80]
    );

    let other = text.replacen("twin-dataset/1", "twin-dataset/9", 1);
    assert!(matches!(
        BuiltDataset::from_manifest(other.as_bytes()),
        Err(ManifestError::Format { found }) if found == "twin-dataset/9"
    ));
}

#[test]
fn inputs_are_identified_by_hash() {
    let fixture = Fixture::standard();
    let dataset = fixture.build(&config());
    assert_eq!(dataset.inputs.images.count, 150);
    assert_eq!(
        dataset.inputs.hard_negatives.count,
        fixture.hard.len() as u64
    );
    assert_eq!(dataset.inputs.synthetic_negatives.count, 0);
    let mut fewer = Fixture::standard();
    fewer.hard.pop();
    assert_ne!(
        fewer.build(&config()).inputs.hard_negatives.hash,
        dataset.inputs.hard_negatives.hash
    );
}

// ---- sizes ------------------------------------------------------------------------------------

#[test]
fn resized_sizes_keep_the_aspect_with_the_longest_side_at_most_512() {
    assert_eq!(resized_size(1024, 768, 512), (512, 384));
    assert_eq!(resized_size(768, 1024, 512), (384, 512));
    assert_eq!(resized_size(300, 200, 512), (300, 200));
    assert_eq!(resized_size(512, 512, 512), (512, 512));
    assert_eq!(resized_size(1000, 333, 512), (512, 170)); // 333 × 512 / 1000 = 170.496
    assert_eq!(resized_size(5000, 1, 512), (512, 1)); // never 0
    let dataset = Fixture::standard().build(&config());
    for image in dataset.rows.iter().flat_map(|r| &r.images) {
        assert_eq!((image.width, image.height), (1024, 768));
        assert_eq!((image.resized_width, image.resized_height), (512, 384));
    }
}

// ---- errors -----------------------------------------------------------------------------------

fn build_error(fixture: &Fixture, config: &BuildConfig) -> BuildError {
    build(&fixture.inputs(), config).expect_err("the build must fail")
}

#[test]
fn a_single_instance_is_an_error() {
    let fixture = Fixture {
        images: images(&["bags"], 1, 4),
        hard: Vec::new(),
        synthetic: Vec::new(),
    };
    let error = build_error(&fixture, &config());
    assert_eq!(
        error,
        BuildError::SingleInstance {
            instance: "bags/i0".into()
        }
    );
    assert!(error.to_string().contains("single instance (`bags/i0`)"));
}

#[test]
fn no_images_is_an_error() {
    let fixture = Fixture {
        images: Vec::new(),
        hard: Vec::new(),
        synthetic: Vec::new(),
    };
    assert_eq!(build_error(&fixture, &config()), BuildError::NoImages);
}

#[test]
fn an_empty_category_or_instance_label_is_an_error() {
    let mut fixture = Fixture::standard();
    fixture.images[3].category = " ".into();
    let error = build_error(&fixture, &config());
    assert!(
        matches!(&error, BuildError::EmptyLabel { label: "category", path, .. } if path == "bags/i0/3.png"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "image `bags/i0/3.png` ({}) has an empty category label",
            blob("bags", "i0", 3)
        )
    );
    let mut fixture = Fixture::standard();
    fixture.images[0].instance = String::new();
    assert!(matches!(
        build_error(&fixture, &config()),
        BuildError::EmptyLabel {
            label: "instance",
            ..
        }
    ));
}

#[test]
fn a_negative_naming_an_unknown_image_is_an_error() {
    let mut fixture = Fixture::standard();
    let unknown = BlobHash::of(b"not ingested");
    fixture.synthetic.push(NegativePair {
        a: blob("bags", "i0", 0),
        b: unknown,
    });
    let error = build_error(&fixture, &config());
    assert_eq!(
        error,
        BuildError::UnknownImage {
            list: NegativeList::Synthetic,
            index: 0,
            blob: unknown
        }
    );
    assert_eq!(
        error.to_string(),
        format!("synthetic-negative pair #0 names image {unknown}, which is not in the dataset")
    );
}

#[test]
fn a_same_instance_negative_is_an_error() {
    let mut fixture = Fixture::standard();
    fixture.hard.insert(
        2,
        NegativePair {
            a: blob("mugs", "i4", 0),
            b: blob("mugs", "i4", 3),
        },
    );
    let error = build_error(&fixture, &config());
    assert!(
        matches!(&error, BuildError::SameInstanceNegative { list: NegativeList::Hard, index: 2, instance, .. } if instance == "mugs/i4"),
        "{error:?}"
    );
    assert!(error.to_string().starts_with("hard-negative pair #2 ("));
}

#[test]
fn an_image_listed_under_two_instances_is_an_error_and_exact_duplicates_are_dropped() {
    let mut fixture = Fixture::standard();
    fixture.images.push(fixture.images[0].clone());
    assert_eq!(fixture.build(&config()).dropped.duplicate_images, 1);
    let mut moved = fixture.images[0].clone();
    moved.instance = "i9".into();
    fixture.images.push(moved);
    assert!(matches!(
        build_error(&fixture, &config()),
        BuildError::ConflictingImage { first, second, .. } if first == "bags/i0" && second == "bags/i9"
    ));
}

#[test]
fn no_positive_or_no_negative_is_an_error() {
    let fixture = Fixture {
        images: images(CATEGORIES, 3, 1),
        hard: hard_negatives(CATEGORIES, 3, 1),
        synthetic: Vec::new(),
    };
    assert_eq!(build_error(&fixture, &config()), BuildError::NoPositives);

    let fixture = Fixture {
        hard: Vec::new(),
        ..Fixture::standard()
    };
    let error = build_error(&fixture, &config());
    assert_eq!(
        error.to_string(),
        "no negative pair in the dataset (negatives mode `hard`): no hard-negative or synthetic pair was given"
    );

    // Two instances, one per split: their hard pairs all cross the split. Reported as such, even
    // with balancing on (which would otherwise fail first).
    let fixture = Fixture {
        images: images(&["bags"], 2, 2),
        hard: hard_negatives(&["bags"], 2, 2),
        synthetic: Vec::new(),
    };
    let balanced = BuildConfig {
        eval_fraction: 0.5,
        balance: Balance::Downsample,
        ..config()
    };
    assert_eq!(
        build_error(&fixture, &balanced).to_string(),
        "no negative pair in the dataset (negatives mode `hard`): every given pair was dropped (2 cross-split, 0 duplicate)"
    );

    // Random pairs stay inside a category: one instance per category gives none.
    let fixture = Fixture {
        images: images(CATEGORIES, 1, 2),
        hard: Vec::new(),
        synthetic: Vec::new(),
    };
    let random = BuildConfig {
        negatives: NegativesMode::Random,
        ..config()
    };
    assert!(matches!(
        build_error(&fixture, &random),
        BuildError::NoNegatives { mode: "random", .. }
    ));
}

#[test]
fn config_errors_name_the_field() {
    let check = |options: serde_json::Value, field: &str, message: &str| {
        let error = BuildConfig::from_json(&options).expect_err("invalid options");
        let BuildError::Config {
            field: got,
            message: got_message,
        } = &error
        else {
            panic!("not a config error: {error:?}");
        };
        assert_eq!(got, field, "{options}");
        assert!(
            got_message.contains(message),
            "{options}: `{got_message}` lacks `{message}`"
        );
        assert!(
            error
                .to_string()
                .starts_with(&format!("invalid build option `{field}`"))
        );
    };
    use serde_json::json;
    check(json!({"eval_fraction": 1.0}), "eval_fraction", "[0, 1)");
    check(
        json!({"eval_fraction": "x"}),
        "eval_fraction",
        "invalid type",
    );
    check(
        json!({"positives_per_instance": 0}),
        "positives_per_instance",
        "at least 1",
    );
    check(
        json!({"negatives": "mined"}),
        "negatives",
        "unknown variant",
    );
    check(
        json!({"negatives": "both", "hard_share": 1.0}),
        "hard_share",
        "(0, 1)",
    );
    check(
        json!({"negatives": "random", "random_negatives_per_instance": 0}),
        "random_negatives_per_instance",
        "at least 1",
    );
    check(
        json!({"multi_questions": {"train": 6}}),
        "multi_questions.train",
        "multiple of 4",
    );
    check(
        json!({"multi_questions": {"eval": 4}, "eval_fraction": 0.0}),
        "multi_questions.eval",
        "eval_fraction is 0",
    );
    check(json!({"balance": "upsample"}), "balance", "unknown variant");
    check(json!({"max_side": 0}), "max_side", "at least 1");
    check(json!({"seeed": 1}), "seeed", "unknown option");
    check(json!([]), "options", "JSON object");

    let config = BuildConfig::from_json(&json!({})).expect("defaults are valid");
    assert_eq!(config, BuildConfig::default());
    assert_eq!(config.max_side, 512);
    let config = BuildConfig::from_json(&json!({
        "seed": 3, "negatives": "both", "hard_share": 0.25, "balance": "oversample",
        "multi_questions": {"train": 8}
    }))
    .expect("valid");
    assert_eq!(config.negatives, NegativesMode::Both);
    assert_eq!(config.multi_questions, PerSplit { train: 8, eval: 0 });
    assert_eq!(config.balance, Balance::Oversample);
}

// ---- prompts ----------------------------------------------------------------------------------

/// The reference texts, typed out again so a change to a constant fails here.
const PAIR: &str = "Are these images of the same or identical products? For two products to be considered identical, minor changes such as those that can be explained context, backgrounds or photography conditions are allowed, but characteristic features of the product (color, shape, size, etc.) should remain consistent. For images with multiple products, compare only the primary product. Explain your reasoning and then conclude with a yes or no answer in <answer> tags as <answer>yes</answer> or <answer>no</answer>.";
const MULTI: &str = "The first image is a reference image. How many of the other images depict the same or identical products as the reference image? For two products to be considered identical, minor changes such as those that can be explained by context, backgrounds or photography conditions are allowed, but characteristic features of the product (color, shape, size, etc.) should remain consistent. For images with multiple products, compare only the primary product. Explain your reasoning and then answer with a number from 0 to 3 in <answer> tags as <answer>n</answer>.";

#[test]
fn prompt_texts_are_the_reference_texts() {
    assert_eq!(prompts::PAIR_QUESTION, PAIR);
    assert_eq!(prompts::MULTI_QUESTION, MULTI);
    assert_eq!(
        prompts::training_prompt(PAIR, 2),
        format!("<image>\n<image>\n\n{PAIR}")
    );
    assert_eq!(
        prompts::training_prompt(MULTI, 4),
        format!("<image>\n<image>\n<image>\n<image>\n\n{MULTI}")
    );
    assert_eq!(
        prompts::eval_text("Do these images depict the same instance?"),
        "Do these images depict the same instance?You MUST include an explanation AND use the answer tags <answer></answer>."
    );
    let defaults = [
        (
            "CUB",
            "Do these two images show a bird of the same species?",
        ),
        ("met", "Do these two images contain the same piece of art?"),
        (
            "landmarks",
            "Do these two images contain the same landmark?",
        ),
        ("ilias", "Do these images depict the same instance?"),
        (
            "inquire",
            "Do these images show an animal of the same scientific species?",
        ),
        ("twin", PAIR),
    ];
    for (subset, question) in defaults {
        assert_eq!(
            prompts::default_pair_question(subset),
            Some(question),
            "{subset}"
        );
    }
    assert_eq!(prompts::default_pair_question("imagenet"), None);
}
