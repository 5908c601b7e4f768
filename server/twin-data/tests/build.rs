//! Specification of `twin_data::build`: the instance-disjoint split, pair and multi sampling,
//! balancing, negatives modes, dropped and rejected inputs, determinism and the manifest — plus
//! the question texts of `twin_data::prompts`, pinned to the reference.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use twin_core::BlobHash;
use twin_core::event::ManifestEntry;
use twin_data::build::{
    Balance, BuildConfig, BuildError, BuildInputs, BuiltDataset, ManifestError, MultiShortfall,
    NegativeList, NegativePair, NegativesMode, PerSplit, Row, RowKind, Source, Split, build,
    resized_size,
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

/// The README demo's categories (`twin sample-data`: 6 categories × 4 instances × 4 views).
const DEMO_CATEGORIES: &[&str] = &[
    "backpacks",
    "bottles",
    "kettles",
    "lamps",
    "mugs",
    "sneakers",
];

/// What a per-category mining with k = 5 accepts on the demo's shape: image `v` of instance `i`
/// has as neighbours, all in its own category, view `v` of instances i+1, i+2 and i+3 and views
/// v+1 of i+1 and v+2 of i+3 (indices mod 4); each pair once. Neighbouring instances (i, i+1)
/// share 12 pairs, opposite ones (i, i+2) only the 4 same-view ones: 56 per category, 336 in all.
fn demo_hard_negatives() -> Vec<NegativePair> {
    let mut pairs = BTreeSet::new();
    for category in DEMO_CATEGORIES {
        for i in 0..4 {
            for v in 0..4 {
                for (di, dv) in [(1, 0), (1, 1), (2, 0), (3, 0), (3, 2)] {
                    let a = blob(category, &format!("i{i}"), v);
                    let b = blob(category, &format!("i{}", (i + di) % 4), (v + dv) % 4);
                    pairs.insert((a.min(b), a.max(b)));
                }
            }
        }
    }
    pairs
        .into_iter()
        .map(|(a, b)| NegativePair { a, b })
        .collect()
}

/// The README demo's build options (`deploy/demo.sh`): negatives `hard`, balance `none`.
fn demo_config() -> BuildConfig {
    BuildConfig {
        seed: 7,
        eval_fraction: 0.25,
        multi_questions: PerSplit { train: 8, eval: 4 },
        ..BuildConfig::default()
    }
}

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

    fn demo() -> Self {
        Fixture {
            images: images(DEMO_CATEGORIES, 4, 4),
            hard: demo_hard_negatives(),
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

/// Instances per (category, split).
fn split_sizes(dataset: &BuiltDataset) -> BTreeMap<(String, Split), usize> {
    let mut sizes = BTreeMap::new();
    for ((category, _), split) in instance_splits(dataset) {
        *sizes.entry((category, split)).or_default() += 1;
    }
    sizes
}

#[test]
fn a_category_contributing_to_eval_gives_it_two_instances_so_its_negatives_stay_inside() {
    // The demo's shape: round(4 × 0.25) = 1 eval instance per category would leave no negative
    // inside eval. Instead 3 of the 6 categories send 2 instances each: 6 of 24, the 25 % asked.
    let dataset = Fixture::demo().build(&demo_config());
    let sizes = split_sizes(&dataset);
    let eval: BTreeMap<&str, usize> = sizes
        .iter()
        .filter(|((_, split), _)| *split == Split::Eval)
        .map(|((category, _), n)| (category.as_str(), *n))
        .collect();
    assert_eq!(
        eval,
        BTreeMap::from([("backpacks", 2), ("kettles", 2), ("sneakers", 2)])
    );
    for category in DEMO_CATEGORIES {
        let train = sizes[&(category.to_string(), Split::Train)];
        assert_eq!(train + eval.get(category).copied().unwrap_or(0), 4);
    }
    assert_eq!(
        (
            dataset.counts.train.instances,
            dataset.counts.eval.instances
        ),
        (18, 6)
    );
}

#[test]
fn small_categories_send_two_instances_to_eval_or_none() {
    // A 1 % share rounds to no instance anywhere; eval still gets one group of two, from a
    // category of three (which keeps one in train) before one of two (which would go whole).
    let mut images = images(&["bags"], 2, 4);
    images.extend(self::images(&["mugs"], 3, 3));
    images.extend(self::images(&["lamps"], 1, 3));
    let mut hard = hard_negatives(&["bags"], 2, 4);
    hard.extend(hard_negatives(&["mugs"], 3, 3));
    let fixture = Fixture {
        images,
        hard,
        synthetic: Vec::new(),
    };
    let dataset = fixture.build(&BuildConfig {
        eval_fraction: 0.01,
        ..config()
    });
    // Train: 4 + 4 + 3 + 3 positives; the bags' 4 hard pairs and 10 of their 12 other pairs.
    let train = &dataset.counts.train;
    assert_eq!(
        (train.yes, train.pairs.hard, train.random_fill),
        (14, 4, 10)
    );
    let sizes = split_sizes(&dataset);
    assert_eq!(
        sizes,
        BTreeMap::from([
            (("bags".to_owned(), Split::Train), 2),
            (("lamps".to_owned(), Split::Train), 1),
            (("mugs".to_owned(), Split::Eval), 2),
            (("mugs".to_owned(), Split::Train), 1),
        ])
    );

    // Bags (2 instances) could only go to eval whole, which would leave train without two
    // instances of one category: no eval split at all, and the eval questions asked for are a
    // shortfall with that reason. Train is filled: 9 positives (3 per instance), 1 hard pair and
    // the 8 other cross-instance pairs of the bags.
    let mut images = self::images(&["bags"], 2, 3);
    images.extend(self::images(&["mugs"], 1, 3));
    let fixture = Fixture {
        images,
        hard: hard_negatives(&["bags"], 2, 1),
        synthetic: Vec::new(),
    };
    let dataset = fixture.build(&BuildConfig {
        eval_fraction: 0.5,
        multi_questions: PerSplit { train: 0, eval: 4 },
        ..config()
    });
    assert!(
        instance_splits(&dataset)
            .values()
            .all(|s| *s == Split::Train)
    );
    let (train, eval) = (&dataset.counts.train, &dataset.counts.eval);
    assert_eq!((eval.instances, eval.pair_rows, eval.multi_rows), (0, 0, 0));
    assert_eq!(eval.multi_shortfall, [1; 4]);
    assert_eq!(
        eval.multi_shortfall_reasons,
        [const { Some(MultiShortfall::NoInstances) }; 4]
    );
    assert_eq!(
        (train.yes, train.pairs.hard, train.random_fill, train.no),
        (9, 1, 8, 9)
    );
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
    // 3 per instance (21 train and 9 eval instances, every category has ≥ 2 in each split) gives
    // 63 and 27, then filling tops each split up to its positives (4 per instance): 84 and 36.
    assert_eq!(random, 120);
    let (train, eval) = (&dataset.counts.train, &dataset.counts.eval);
    assert_eq!((train.random_fill, eval.random_fill), (21, 9));
    assert_eq!((train.yes, train.no, eval.yes, eval.no), (84, 84, 36, 36));
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

// ---- filling and the README demo -------------------------------------------------------------

/// The (category, instance) of both images of every `no` pair row of a split.
fn negative_rows(dataset: &BuiltDataset, split: Split) -> Vec<(Source, [(String, String); 2])> {
    dataset
        .rows(split)
        .filter(|r| r.answer == "no")
        .map(|r| {
            let source = source(r).expect("a no pair");
            (source, [instance_key(r, 0), instance_key(r, 1)])
        })
        .collect()
}

#[test]
fn the_demo_builds_a_balanced_eval_split_with_its_multi_questions() {
    // Before: one eval instance per category, so all 24 eval positives and not one negative (every
    // hard pair crossed the split), and 1 of the 4 eval multi questions. Now eval holds
    // backpacks i0+i2, kettles i1+i2 and sneakers i0+i2: 4 + 12 + 4 = 20 hard pairs stay inside
    // it, and filling adds 4 random pairs of those instances to match the 24 positives.
    let fixture = Fixture::demo();
    let dataset = fixture.build(&demo_config());
    let eval = &dataset.counts.eval;
    assert_eq!((eval.yes, eval.no), (24, 24));
    assert_eq!(
        (eval.pairs.hard, eval.pairs.random, eval.random_fill),
        (20, 4, 4)
    );
    assert_eq!((eval.multi_rows, eval.multi_answers), (4, [1; 4]));
    assert_eq!(eval.multi_shortfall, [0; 4]);
    // Train keeps 336 − 128 crossing − 20 eval = 188 hard pairs, more than its 72 positives:
    // nothing to fill, and `balance = none` keeps the surplus.
    let train = &dataset.counts.train;
    assert_eq!(
        (train.yes, train.no, train.pairs.hard, train.random_fill),
        (72, 188, 188, 0)
    );
    assert_eq!(train.multi_answers, [2; 4]);
    assert_eq!(dataset.dropped.cross_split_hard, 128);
    assert!(
        dataset.shortfalls().is_empty(),
        "{:?}",
        dataset.shortfalls()
    );

    // Every eval negative pairs two eval instances of one category; the filled ones repeat no
    // hard pair.
    let hard: HashSet<BTreeSet<BlobHash>> = fixture
        .hard
        .iter()
        .map(|p| BTreeSet::from([p.a, p.b]))
        .collect();
    let eval_instances: BTreeSet<(String, String)> = instance_splits(&dataset)
        .into_iter()
        .filter(|(_, s)| *s == Split::Eval)
        .map(|(k, _)| k)
        .collect();
    for (source, [a, b]) in negative_rows(&dataset, Split::Eval) {
        assert!(eval_instances.contains(&a) && eval_instances.contains(&b));
        assert_eq!(a.0, b.0, "one category");
        assert_ne!(a.1, b.1, "two instances");
        assert!(matches!(source, Source::Hard | Source::Random));
    }
    for row in dataset
        .rows(Split::Eval)
        .filter(|r| source(r) == Some(Source::Random))
    {
        let set: BTreeSet<BlobHash> = row.images.iter().map(|i| i.blob).collect();
        assert!(!hard.contains(&set), "{} repeats a hard pair", row.id);
    }

    let flat = dataset.flat_counts();
    for (key, value) in [
        ("eval.pair", 48),
        ("eval.pair.yes", 24),
        ("eval.pair.no", 24),
        ("eval.pair.random", 4),
        ("eval.random_fill", 4),
        ("eval.fill_shortfall", 0),
        ("eval.multi", 4),
        ("train.pair", 260),
    ] {
        assert_eq!(flat[key], value, "{key}");
    }

    // `downsample` makes train exact too and leaves eval as it was.
    let downsampled = fixture.build(&BuildConfig {
        balance: Balance::Downsample,
        ..demo_config()
    });
    let (train, eval) = (&downsampled.counts.train, &downsampled.counts.eval);
    assert_eq!((train.yes, train.no, train.balance_removed), (72, 72, 116));
    assert_eq!((eval.yes, eval.no, eval.balance_removed), (24, 24, 0));

    // The same demo given in another order is the same dataset.
    let mut reordered = Fixture::demo();
    reordered.images.reverse();
    reordered.hard.reverse();
    for pair in &mut reordered.hard {
        std::mem::swap(&mut pair.a, &mut pair.b);
    }
    assert_eq!(
        reordered.build(&demo_config()).manifest(),
        dataset.manifest()
    );
}

#[test]
fn without_filling_a_split_keeps_the_modes_negatives() {
    let dataset = Fixture::demo().build(&BuildConfig {
        fill_negatives: false,
        ..demo_config()
    });
    let eval = &dataset.counts.eval;
    assert_eq!(
        (eval.yes, eval.no, eval.pairs.random, eval.random_fill),
        (24, 20, 0, 0)
    );
    // Filling uses its own random stream: the positives and hard pairs are the same rows.
    let filled = Fixture::demo().build(&demo_config());
    let without_fill = |dataset: &BuiltDataset| -> BTreeSet<Vec<BlobHash>> {
        dataset
            .rows(Split::Eval)
            .filter(|r| matches!(source(r), Some(Source::Positive | Source::Hard)))
            .map(|r| r.images.iter().map(|i| i.blob).collect())
            .collect()
    };
    assert_eq!(without_fill(&dataset), without_fill(&filled));
}

/// 3 categories × 3 instances × 2 images, hard negatives inside each category, 60 % in eval:
/// round(3 × 0.6) = 2 instances of each category in eval, so train holds one instance per
/// category and every train instance's hard pairs cross the split.
fn lonely_train() -> (Fixture, BuildConfig) {
    let fixture = Fixture {
        images: images(CATEGORIES, 3, 2),
        hard: hard_negatives(CATEGORIES, 3, 2),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.6,
        ..config()
    };
    (fixture, config)
}

#[test]
fn a_split_that_cannot_be_balanced_is_refused_with_the_reason() {
    let (fixture, config) = lonely_train();
    let error = build_error(&fixture, &config);
    let reason = "no hard or synthetic pair lies inside it, and it holds 3 instances in 3 \
                  categories, none with a second instance in the split, so no random negative \
                  can be drawn";
    assert_eq!(
        error,
        BuildError::CannotBalance {
            split: Split::Train,
            yes: 3,
            no: 0,
            reason: reason.to_owned(),
        }
    );
    assert_eq!(
        error.to_string(),
        format!("cannot balance the train split: it has 3 yes and 0 no pairs: {reason}")
    );
    // Balancing alone refuses it too.
    let balanced = BuildConfig {
        fill_negatives: false,
        balance: Balance::Oversample,
        ..config.clone()
    };
    assert!(matches!(
        build_error(&fixture, &balanced),
        BuildError::CannotBalance {
            split: Split::Train,
            yes: 3,
            no: 0,
            ..
        }
    ));
    // With neither, the split is built as it is.
    let dataset = fixture.build(&BuildConfig {
        fill_negatives: false,
        ..config
    });
    assert_eq!((dataset.counts.train.yes, dataset.counts.train.no), (3, 0));
}

#[test]
fn a_split_whose_negatives_stay_hard_only_is_filled_or_refused() {
    // Bags, 4 instances of 2 images, half in eval; the only hard pairs are in train. Without
    // filling and with balancing, eval (2 positives, no negative) is refused, saying filling
    // would help; with filling (the default) it gets 2 random negatives.
    let all = Fixture {
        images: images(&["bags"], 4, 2),
        hard: hard_negatives(&["bags"], 4, 2),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.5,
        balance: Balance::Downsample,
        ..config()
    };
    let splits = instance_splits(&all.build(&config));
    let in_train = |b: BlobHash| {
        all.images.iter().any(|e| {
            e.blob == b && splits[&(e.category.clone(), e.instance.clone())] == Split::Train
        })
    };
    let fixture = Fixture {
        hard: all
            .hard
            .iter()
            .copied()
            .filter(|p| in_train(p.a) && in_train(p.b))
            .collect(),
        ..all
    };
    assert_eq!(fixture.hard.len(), 2);
    let error = build_error(
        &fixture,
        &BuildConfig {
            fill_negatives: false,
            ..config.clone()
        },
    );
    assert_eq!(
        error.to_string(),
        "cannot balance the eval split: it has 2 yes and 0 no pairs: no hard or synthetic pair \
         lies inside it, and fill_negatives is off (it holds 2 instances in 1 category, 1 with \
         two or more in the split, which could give random ones)"
    );
    let dataset = fixture.build(&config);
    let eval = &dataset.counts.eval;
    assert_eq!((eval.yes, eval.no, eval.random_fill), (2, 2, 2));
}

#[test]
fn negatives_filling_cannot_draw_are_an_error_unless_balancing_evens_them() {
    // One category: i0 with 6 images (15 positives), i1 with one. Random mode anchors one pair
    // at each instance; filling wants 13 more, but only 6 cross-instance pairs exist.
    let mut images = images(&["bags"], 1, 6);
    images.push(entry("bags", "i1", 0));
    let fixture = Fixture {
        images,
        hard: Vec::new(),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.0,
        negatives: NegativesMode::Random,
        random_negatives_per_instance: 1,
        positives_per_instance: 15,
        ..config()
    };
    let error = build_error(&fixture, &config);
    assert_eq!(
        error.to_string(),
        "cannot balance the train split: it has 15 yes and 6 no pairs: filling drew only 4 \
         random negatives from its 2 instances in 1 category, 1 with two or more in the split (9 \
         short of the positives); set balance = \"downsample\" or \"oversample\" to even the \
         rest, or fill_negatives = false to keep the split unbalanced"
    );
    let dataset = fixture.build(&BuildConfig {
        balance: Balance::Downsample,
        ..config
    });
    let train = &dataset.counts.train;
    assert_eq!(
        (train.random_fill, train.fill_shortfall, train.yes, train.no),
        (4, 9, 6, 6)
    );
    assert_eq!(train.balance_removed, 9);
    assert_eq!(dataset.flat_counts()["train.fill_shortfall"], 9);
    assert_eq!(
        dataset.shortfalls(),
        vec![
            "train: 9 negatives short of the positives after filling; balance = downsample evened them"
        ]
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
    assert_eq!(
        dataset.counts.train.multi_shortfall_reasons,
        [
            None,
            None,
            Some(MultiShortfall::TooFewImages { needed: 3, most: 2 }),
            Some(MultiShortfall::TooFewImages { needed: 4, most: 2 }),
        ]
    );
    assert_eq!(dataset.flat_counts()["train.multi.3.shortfall"], 4);
    assert_eq!(
        dataset.shortfalls(),
        vec![
            "train: 4 of 4 multi questions with answer 2 not made: no instance in the split has 3 images (the most is 2)",
            "train: 4 of 4 multi questions with answer 3 not made: no instance in the split has 4 images (the most is 2)",
        ]
    );
}

#[test]
fn multi_negatives_are_filled_from_the_category_when_hard_partners_are_few() {
    // Two bags of 4 images and a single hard pair: each instance has one hard partner image.
    let fixture = Fixture {
        images: images(&["bags"], 2, 4),
        hard: hard_negatives(&["bags"], 2, 1),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.0,
        multi_questions: PerSplit { train: 8, eval: 0 },
        ..config()
    };
    // Without filling, answers 0 and 1 need 3 and 2 negatives: none can be made.
    let dataset = fixture.build(&BuildConfig {
        fill_negatives: false,
        ..config.clone()
    });
    let train = &dataset.counts.train;
    assert_eq!(train.multi_answers, [0, 0, 2, 2]);
    assert_eq!(train.multi_shortfall, [2, 2, 0, 0]);
    assert_eq!(
        train.multi_shortfall_reasons[..2],
        [
            Some(MultiShortfall::TooFewNegatives { needed: 3, most: 1 }),
            Some(MultiShortfall::TooFewNegatives { needed: 2, most: 1 }),
        ]
    );
    // With it, the other images of the other bag make up the rest; the hard partner is always
    // among a question's negatives, as hard ones come first.
    let dataset = fixture.build(&config);
    assert_eq!(dataset.counts.train.multi_answers, [2; 4]);
    assert_eq!(dataset.counts.train.multi_shortfall, [0; 4]);
    let partner = |own: BlobHash| {
        let p = fixture.hard[0];
        if own == p.a { p.b } else { p.a }
    };
    let mut random = 0;
    for row in dataset.rows(Split::Train).filter(|r| source(r).is_none()) {
        let RowKind::Multi { candidates } = &row.kind else {
            unreachable!()
        };
        let negatives = candidates
            .iter()
            .filter(|s| **s != Source::Positive)
            .count();
        random += candidates.iter().filter(|s| **s == Source::Random).count();
        if negatives > 0 {
            let reference_instance = &row.images[0].instance;
            let hard_partner = partner(
                fixture
                    .images
                    .iter()
                    .find(|e| &e.instance == reference_instance && e.path.ends_with("/0.png"))
                    .expect("image 0")
                    .blob,
            );
            assert!(
                row.images[1..].iter().any(|i| i.blob == hard_partner),
                "{}",
                row.id
            );
        }
    }
    // Answers 0, 1 and 2 have 3, 2 and 1 negatives of which one is hard: (2 + 1 + 0) × 2.
    assert_eq!(random, 6);
}

#[test]
fn multi_questions_short_of_the_request_say_why_per_answer() {
    // Two bags of 2 images: answer 0 needs 3 negatives (2 exist), 2 and 3 need 3 and 4 images,
    // and answer 1 has only 4 distinct questions (a reference, its other image, both images of
    // the other bag).
    let fixture = Fixture {
        images: images(&["bags"], 2, 2),
        hard: hard_negatives(&["bags"], 2, 1),
        synthetic: Vec::new(),
    };
    let config = BuildConfig {
        eval_fraction: 0.0,
        multi_questions: PerSplit { train: 40, eval: 0 },
        ..config()
    };
    let train = fixture.build(&config).counts.train;
    assert_eq!(train.multi_answers, [0, 4, 0, 0]);
    assert_eq!(train.multi_shortfall, [10, 6, 10, 10]);
    assert_eq!(
        train.multi_shortfall_reasons,
        [
            Some(MultiShortfall::TooFewNegatives { needed: 3, most: 2 }),
            Some(MultiShortfall::Exhausted {
                made: 4,
                draws: 700
            }),
            Some(MultiShortfall::TooFewImages { needed: 3, most: 2 }),
            Some(MultiShortfall::TooFewImages { needed: 4, most: 2 }),
        ]
    );
    assert_eq!(
        MultiShortfall::Exhausted {
            made: 4,
            draws: 700
        }
        .to_string(),
        "700 draws found only 4 distinct questions (too few instances and images)"
    );
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

    // A manifest written before filling existed reads back as built without it.
    let mut older: serde_json::Value = serde_json::from_slice(&manifest.bytes).expect("json");
    older["config"]
        .as_object_mut()
        .expect("config")
        .remove("fill_negatives");
    for split in ["train", "eval"] {
        let counts = older["counts"][split].as_object_mut().expect("counts");
        for key in ["random_fill", "fill_shortfall", "multi_shortfall_reasons"] {
            counts.remove(key).expect("a newer count");
        }
    }
    let read = BuiltDataset::from_manifest(&serde_json::to_vec(&older).expect("json"))
        .expect("an older manifest reads");
    assert!(!read.config.fill_negatives);
    assert_eq!(read.counts.eval.random_fill, 0);

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

    // Four instances, two per split, and only the hard pairs that cross the split. Reported as
    // such, even with balancing on (which would otherwise fail first).
    let all = Fixture {
        images: images(&["bags"], 4, 2),
        hard: hard_negatives(&["bags"], 4, 2),
        synthetic: Vec::new(),
    };
    let balanced = BuildConfig {
        eval_fraction: 0.5,
        balance: Balance::Downsample,
        ..config()
    };
    let splits = instance_splits(&all.build(&balanced));
    let split_of = |b: BlobHash| {
        let e = all.images.iter().find(|e| e.blob == b).expect("an image");
        splits[&(e.category.clone(), e.instance.clone())]
    };
    let fixture = Fixture {
        hard: all
            .hard
            .iter()
            .copied()
            .filter(|p| split_of(p.a) != split_of(p.b))
            .collect(),
        ..all
    };
    assert_eq!(
        build_error(&fixture, &balanced).to_string(),
        "no negative pair in the dataset (negatives mode `hard`): every given pair was dropped (8 cross-split, 0 duplicate)"
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
        // The options are checked in twin-core; the build reports the same error as its own.
        let error =
            BuildError::from(BuildConfig::from_json(&options).expect_err("invalid options"));
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
    check(
        json!({"multi_questions": {"eval": 1_000_004}}),
        "multi_questions.eval",
        "at most 1000000",
    );
    check(
        json!({"random_negatives_per_instance": 1_000_001}),
        "random_negatives_per_instance",
        "at most 1000000",
    );
    check(
        json!({"fill_negatives": "yes"}),
        "fill_negatives",
        "invalid type",
    );
    check(json!({"balance": "upsample"}), "balance", "unknown variant");
    check(json!({"max_side": 0}), "max_side", "at least 1");
    check(json!({"seeed": 1}), "seeed", "unknown option");
    check(json!([]), "options", "JSON object");

    let config = BuildConfig::from_json(&json!({})).expect("defaults are valid");
    assert_eq!(config, BuildConfig::default());
    assert_eq!(config.max_side, 512);
    assert!(config.fill_negatives, "filling is on by default");
    BuildConfig::from_json(&json!({"multi_questions": {"train": 1_000_000}}))
        .expect("the maximum itself is allowed");
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
