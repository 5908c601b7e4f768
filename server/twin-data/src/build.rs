//! Building a TWIN dataset from ingested images and accepted negative pairs: an instance-disjoint
//! train/eval split, positive pairs (two images of one instance), negative pairs (accepted hard
//! negatives, synthetic negatives, or random pairs of one category for the "without hard
//! negatives" ablation), multi questions (a reference and three candidates, answer 0–3) and
//! yes/no balancing.
//!
//! [`build`] is a pure function of its inputs and [`BuildConfig`]: every random choice comes from
//! [`StageRng`], a SplitMix64 stream derived from the seed and the stage's name, and every input is
//! put in canonical order first, so the same images, pairs and config give the same
//! [`BuiltDataset`] byte for byte, whatever order the inputs came in. The dataset is identified by
//! the hash of its canonical serialisation ([`BuiltDataset::manifest`]).
//!
//! Choices worth knowing:
//! - an instance is the pair (category, instance label): `shoes/001` and `bags/001` differ;
//! - a dataset with a single instance is an error, not a positives-only dataset: TWIN's task is
//!   telling instances apart, and a set without a single `no` answer would train a model to say
//!   `yes` (the same holds when no negative pair survives the build);
//! - every split must be able to hold negatives of its own: a negative pair never crosses the
//!   split, and random negatives pair instances of one category, so a category that sends
//!   instances to eval sends at least two (see [`BuildConfig::eval_fraction`]). Otherwise a small
//!   dataset puts one instance per category in eval, every hard negative crosses the split, and
//!   the eval split is all `yes`: an evaluation that "always yes" passes;
//! - each split's negatives are topped up to its positives with random negatives of its own
//!   instances ([`BuildConfig::fill_negatives`]), and a split that still cannot be balanced is an
//!   error naming the split and why ([`BuildError::CannotBalance`]);
//! - random negatives never repeat an accepted hard or synthetic pair, so the random ablation
//!   contains none of them, and multi questions in `random` mode draw their negatives at random
//!   too; in `hard` and `both` modes multi negatives are the reference instance's hard (and
//!   synthetic) negatives, as in the reference recipe, topped up with random images of its
//!   category in the split when it has too few and filling is on;
//! - what could not be made is counted, not hidden: multi questions short of the request carry a
//!   reason per answer ([`SplitCounts::multi_shortfall_reasons`], [`BuiltDataset::shortfalls`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use twin_core::BlobHash;
use twin_core::event::ManifestEntry;

use crate::prompts;

/// The `format` of a manifest this version writes and reads.
pub const MANIFEST_FORMAT: &str = "twin-dataset/1";

pub use twin_core::build_config::{
    Balance, BuildConfig, DEFAULT_MAX_SIDE, MAX_RANDOM_NEGATIVES_PER_SPLIT, NegativesMode,
    PerSplit, Split,
};

/// A negative pair of two images, by blob hash. Reads the lines of a hard-negative snapshot
/// (`{"pair","a","b","by"}`) and of a synthetic-negative blob (`{"a","b"}`); other fields are
/// ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NegativePair {
    pub a: BlobHash,
    pub b: BlobHash,
}

/// Which input list a negative pair came from (named in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegativeList {
    Hard,
    Synthetic,
}

impl std::fmt::Display for NegativeList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NegativeList::Hard => "hard-negative",
            NegativeList::Synthetic => "synthetic-negative",
        })
    }
}

/// What [`build`] reads.
#[derive(Debug, Clone, Copy)]
pub struct BuildInputs<'a> {
    /// The ingested images (one manifest line each).
    pub images: &'a [ManifestEntry],
    /// Accepted hard-negative pairs (mining + review).
    pub hard_negatives: &'a [NegativePair],
    /// Synthetic negative pairs; both images must be among `images`.
    pub synthetic_negatives: &'a [NegativePair],
}

/// Why a dataset could not be built. Every variant names the offending input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    #[error("invalid build option `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("the dataset has no images")]
    NoImages,
    #[error("image `{path}` ({blob}) has an empty {label} label")]
    EmptyLabel {
        path: String,
        blob: BlobHash,
        label: &'static str,
    },
    #[error("image {blob} is listed under two instances: `{first}` and `{second}`")]
    ConflictingImage {
        blob: BlobHash,
        first: String,
        second: String,
    },
    #[error(
        "the dataset has a single instance (`{instance}`): negative pairs need two instances, and a dataset of positives only would teach a model to always answer yes"
    )]
    SingleInstance { instance: String },
    #[error("no instance has two images, so there is no positive pair")]
    NoPositives,
    #[error("{list} pair #{index} names image {blob}, which is not in the dataset")]
    UnknownImage {
        list: NegativeList,
        index: usize,
        blob: BlobHash,
    },
    #[error(
        "{list} pair #{index} ({a}, {b}) shows one instance, `{instance}`: it is not a negative"
    )]
    SameInstanceNegative {
        list: NegativeList,
        index: usize,
        a: BlobHash,
        b: BlobHash,
        instance: String,
    },
    #[error("no negative pair in the dataset (negatives mode `{mode}`): {reason}")]
    NoNegatives { mode: &'static str, reason: String },
    /// A split whose yes and no pairs cannot be made equal (or, with `balance = none` and
    /// filling on, whose negatives stay below its positives). `yes` and `no` are its pairs
    /// before balancing; `reason` says what the split lacks.
    #[error("cannot balance the {split} split: it has {yes} yes and {no} no pairs: {reason}")]
    CannotBalance {
        split: Split,
        yes: u64,
        no: u64,
        reason: String,
    },
}

impl From<twin_core::build_config::ConfigError> for BuildError {
    fn from(e: twin_core::build_config::ConfigError) -> Self {
        BuildError::Config {
            field: e.field,
            message: e.message,
        }
    }
}

/// Where a pair row, or one candidate of a multi question, comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Two images of one instance (answer yes).
    Positive,
    /// An accepted hard negative.
    Hard,
    /// A random pair of two instances of one category.
    Random,
    /// A synthetic negative.
    Synthetic,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Positive => "positive",
            Source::Hard => "hard",
            Source::Random => "random",
            Source::Synthetic => "synthetic",
        }
    }
}

/// One image of a row: what it is, where it came from, and the size the model sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub blob: BlobHash,
    /// Path relative to the ingest source.
    pub path: String,
    pub category: String,
    pub instance: String,
    pub width: u32,
    pub height: u32,
    /// Longest side at most [`BuildConfig::max_side`], aspect ratio kept.
    pub resized_width: u32,
    pub resized_height: u32,
}

/// What a row asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RowKind {
    /// Two images; the answer is `yes` or `no`.
    Pair { source: Source },
    /// A reference image and three candidates; `candidates[i]` is where candidate `i` (image
    /// `i + 1`) comes from, [`Source::Positive`] for one of the reference's instance. The answer is
    /// the number of positives.
    Multi { candidates: Vec<Source> },
}

/// One question of the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// `{split}-pair-{n:06}` or `{split}-multi-{n:06}`, unique in the dataset.
    pub id: String,
    pub split: Split,
    pub kind: RowKind,
    /// The question text, without image tokens or evaluation instructions (see
    /// [`crate::prompts`]).
    pub question: String,
    /// `yes` / `no` for a pair, `0`–`3` for a multi question.
    pub answer: String,
    pub images: Vec<ImageRef>,
}

impl Row {
    /// Which candidates (images 1..=3) of a multi question show the reference's instance; empty
    /// for a pair.
    pub fn positive_candidates(&self) -> Vec<bool> {
        match &self.kind {
            RowKind::Pair { .. } => Vec::new(),
            RowKind::Multi { candidates } => candidates
                .iter()
                .map(|source| *source == Source::Positive)
                .collect(),
        }
    }
}

/// Pair rows by source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SourceCounts {
    pub positive: u64,
    pub hard: u64,
    pub random: u64,
    pub synthetic: u64,
}

impl SourceCounts {
    fn add(&mut self, source: Source, n: u64) {
        match source {
            Source::Positive => self.positive += n,
            Source::Hard => self.hard += n,
            Source::Random => self.random += n,
            Source::Synthetic => self.synthetic += n,
        }
    }
}

/// Why a split has fewer multi questions with some answer than were asked for. The answer `a`
/// needs a reference instance with `a + 1` images and `3 − a` negatives (hard or synthetic
/// partners in `hard` and `both` modes, plus, when filling is on or in `random` mode, images of
/// other instances of its category in the split).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum MultiShortfall {
    /// The split has no instance (no category could give it two; see
    /// [`BuildConfig::eval_fraction`]).
    NoInstances,
    /// No instance of the split has `needed` images; the most any has is `most`.
    TooFewImages { needed: u64, most: u64 },
    /// Every instance with enough images has fewer than `needed` negatives in the split; the
    /// most any has is `most`.
    TooFewNegatives { needed: u64, most: u64 },
    /// References and negatives exist, but `draws` random draws found only `made` distinct
    /// questions: the few feasible references keep giving the same ones.
    Exhausted { made: u64, draws: u64 },
}

impl std::fmt::Display for MultiShortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MultiShortfall::NoInstances => f.write_str("the split has no instances"),
            MultiShortfall::TooFewImages { needed, most } => write!(
                f,
                "no instance in the split has {needed} images (the most is {most})"
            ),
            MultiShortfall::TooFewNegatives { needed, most } => write!(
                f,
                "no instance with enough images has {needed} negatives in the split (the most is {most})"
            ),
            MultiShortfall::Exhausted { made, draws } => write!(
                f,
                "{draws} draws found only {made} distinct questions (too few instances and images)"
            ),
        }
    }
}

/// What one split holds, and what it could not get. Fields added after the first manifest
/// format read back as 0 (or none) from an older manifest, which is what those builds did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SplitCounts {
    pub instances: u64,
    pub images: u64,
    pub pair_rows: u64,
    pub multi_rows: u64,
    /// Pair rows by source, after balancing.
    pub pairs: SourceCounts,
    pub yes: u64,
    pub no: u64,
    /// Multi rows by answer (index = answer).
    pub multi_answers: [u64; 4],
    /// Multi questions asked for but not feasible, by answer.
    pub multi_shortfall: [u64; 4],
    /// Why, for each answer with a shortfall.
    #[serde(default)]
    pub multi_shortfall_reasons: [Option<MultiShortfall>; 4],
    /// Random negatives asked for but not found (too few instances or images), or beyond
    /// [`MAX_RANDOM_NEGATIVES_PER_SPLIT`].
    pub random_shortfall: u64,
    /// Random negatives added by [`BuildConfig::fill_negatives`] (before balancing; they are
    /// also among `pairs.random`).
    #[serde(default)]
    pub random_fill: u64,
    /// Negatives filling wanted but could not draw (only with `balance` on, which evens the
    /// rest; with `balance = none` that is an error).
    #[serde(default)]
    pub fill_shortfall: u64,
    /// Positive pairs left out by `positives_per_instance`.
    pub positives_over_cap: u64,
    /// Pair rows removed (`downsample`) or added (`oversample`) by balancing.
    pub balance_removed: u64,
    pub balance_added: u64,
}

/// Inputs left out of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dropped {
    /// Hard-negative pairs whose two instances fell in different splits.
    pub cross_split_hard: u64,
    /// Synthetic pairs whose two instances fell in different splits.
    pub cross_split_synthetic: u64,
    /// Negative pairs given more than once (in either order or in both lists; the hard one is
    /// kept).
    pub duplicate_pairs: u64,
    /// Images listed more than once under the same instance.
    pub duplicate_images: u64,
    /// Hard and synthetic pairs not used because `negatives` is `random`.
    pub unused_by_mode: u64,
}

/// A count and a hash of one input list, in canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigest {
    pub count: u64,
    /// SHA-256 of the list's canonical JSON (images sorted by blob and path; pairs as
    /// `[lower, higher]` hashes, sorted).
    pub hash: BlobHash,
}

/// What the dataset was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigests {
    pub images: InputDigest,
    pub hard_negatives: InputDigest,
    pub synthetic_negatives: InputDigest,
}

/// An immutable TWIN dataset: every row with its images, the counts, the config and the inputs.
/// Field order is the serialisation order, which [`BuiltDataset::manifest`] relies on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltDataset {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    pub config: BuildConfig,
    pub inputs: InputDigests,
    pub counts: PerSplit<SplitCounts>,
    pub dropped: Dropped,
    /// Train rows then eval rows, each split in a seeded random order.
    pub rows: Vec<Row>,
}

/// A dataset's serialisation and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// SHA-256 of `bytes`: the dataset's identity.
    pub id: BlobHash,
    /// Compact JSON, fields in declaration order, no maps with unordered keys.
    pub bytes: Vec<u8>,
}

/// Why manifest bytes could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not a twin dataset: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest format `{found}` is not `{MANIFEST_FORMAT}`")]
    Format { found: String },
}

impl BuiltDataset {
    /// The canonical bytes and their hash. Stable: struct fields serialise in declaration order,
    /// and nothing here is a hash map.
    pub fn manifest(&self) -> Manifest {
        let bytes = serde_json::to_vec(self)
            .expect("a dataset is strings, numbers and lists: serialising it cannot fail");
        Manifest {
            id: BlobHash::of(&bytes),
            bytes,
        }
    }

    /// Reads manifest bytes written by [`BuiltDataset::manifest`].
    pub fn from_manifest(bytes: &[u8]) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        struct Header {
            format: String,
        }
        let header: Header = serde_json::from_slice(bytes)?;
        if header.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format {
                found: header.format,
            });
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The rows of one split, in dataset order.
    pub fn rows(&self, split: Split) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(move |row| row.split == split)
    }

    /// What the build could not make, one line each (empty when nothing fell short): multi
    /// questions per split and answer with the reason, random negatives of `random` and `both`
    /// modes, and negatives filling could not draw. For a job to report beside its counts.
    pub fn shortfalls(&self) -> Vec<String> {
        let mut out = Vec::new();
        for split in Split::ALL {
            let c = self.counts.get(split);
            let asked = *self.config.multi_questions.get(split) / 4;
            for answer in 0..4 {
                if c.multi_shortfall[answer] == 0 {
                    continue;
                }
                let why = c.multi_shortfall_reasons[answer]
                    .as_ref()
                    .map_or_else(|| "no reason recorded".to_owned(), ToString::to_string);
                out.push(format!(
                    "{split}: {} of {asked} multi questions with answer {answer} not made: {why}",
                    c.multi_shortfall[answer]
                ));
            }
            if c.random_shortfall > 0 {
                out.push(format!(
                    "{split}: {} random negatives not found (too few instances or images, or \
                     past the {MAX_RANDOM_NEGATIVES_PER_SPLIT} a split draws at most)",
                    c.random_shortfall
                ));
            }
            if c.fill_shortfall > 0 {
                out.push(format!(
                    "{split}: {} negatives short of the positives after filling; balance = {} evened them",
                    c.fill_shortfall,
                    self.config.balance.as_str()
                ));
            }
        }
        out
    }

    /// Counts as flat `dotted.keys` (`train.pair.yes`, `eval.multi.2`, `dropped.cross_split`, …)
    /// for a job's output.
    pub fn flat_counts(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for split in Split::ALL {
            let c = self.counts.get(split);
            let mut put = |key: &str, value: u64| {
                out.insert(format!("{split}.{key}"), value);
            };
            put("instances", c.instances);
            put("images", c.images);
            put("pair", c.pair_rows);
            put("pair.yes", c.yes);
            put("pair.no", c.no);
            put("pair.positive", c.pairs.positive);
            put("pair.hard", c.pairs.hard);
            put("pair.random", c.pairs.random);
            put("pair.synthetic", c.pairs.synthetic);
            put("multi", c.multi_rows);
            for answer in 0..4 {
                put(&format!("multi.{answer}"), c.multi_answers[answer]);
                put(
                    &format!("multi.{answer}.shortfall"),
                    c.multi_shortfall[answer],
                );
            }
            put("random_shortfall", c.random_shortfall);
            put("random_fill", c.random_fill);
            put("fill_shortfall", c.fill_shortfall);
            put("positives_over_cap", c.positives_over_cap);
            put("balance_removed", c.balance_removed);
            put("balance_added", c.balance_added);
        }
        let d = &self.dropped;
        out.insert(
            "dropped.cross_split".into(),
            d.cross_split_hard + d.cross_split_synthetic,
        );
        out.insert("dropped.cross_split.hard".into(), d.cross_split_hard);
        out.insert(
            "dropped.cross_split.synthetic".into(),
            d.cross_split_synthetic,
        );
        out.insert("dropped.duplicate_pairs".into(), d.duplicate_pairs);
        out.insert("dropped.duplicate_images".into(), d.duplicate_images);
        out.insert("dropped.unused_by_mode".into(), d.unused_by_mode);
        out
    }
}

/// The size the model sees: the longest side at most `max_side`, aspect ratio kept (rounded to
/// the nearest pixel, never below 1); images already small enough are unchanged.
/// Returns `(width, height)`.
pub fn resized_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= max_side {
        return (width, height);
    }
    let scale = |side: u32| -> u32 {
        let scaled =
            (u64::from(side) * u64::from(max_side) + u64::from(long) / 2) / u64::from(long);
        u32::try_from(scaled)
            .expect("scaled side is at most max_side")
            .max(1)
    };
    if width >= height {
        (max_side, scale(height))
    } else {
        (scale(width), max_side)
    }
}

/// A deterministic random stream for one stage of the build.
///
/// SplitMix64 rather than `rand`'s `StdRng`: `StdRng`'s algorithm, and `rand`'s shuffling and
/// range sampling, may change between `rand` versions, and a dataset's identity is the hash of
/// what these choices produce. Seeding each stage from (seed, stage name) also keeps stages
/// independent: asking for more multi questions does not change the pairs.
#[derive(Debug, Clone)]
pub struct StageRng(u64);

impl StageRng {
    pub fn new(seed: u64, stage: &str) -> Self {
        let digest = BlobHash::of(format!("twin-data/{seed}/{stage}").as_bytes());
        let mut state = [0u8; 8];
        state.copy_from_slice(&digest.0[..8]);
        StageRng(u64::from_le_bytes(state))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-and-reject, unbiased). `n` must be above 0.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "StageRng::below(0) has no value to return");
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as usize;
            }
        }
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// `k` distinct elements of `items` in random order (`k` at most `items.len()`).
    fn sample<T: Copy>(&mut self, items: &[T], k: usize) -> Vec<T> {
        let mut pool = items.to_vec();
        let k = k.min(pool.len());
        for i in 0..k {
            let j = i + self.below(pool.len() - i);
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }
}

/// Builds a dataset. Pure: no I/O, no clock; deterministic for given inputs and config.
pub fn build(inputs: &BuildInputs<'_>, config: &BuildConfig) -> Result<BuiltDataset, BuildError> {
    config.validate()?;
    let mut dropped = Dropped::default();
    let catalog = Catalog::new(inputs.images, config, &mut dropped)?;
    let negatives = catalog.negatives(inputs, &mut dropped)?;
    // Checked before the splits are built, so this error, not a balancing one, says why.
    if config.negatives != NegativesMode::Random && negatives.is_empty() {
        let reason = if inputs.hard_negatives.is_empty() && inputs.synthetic_negatives.is_empty() {
            "no hard-negative or synthetic pair was given".to_owned()
        } else {
            format!(
                "every given pair was dropped ({} cross-split, {} duplicate)",
                dropped.cross_split_hard + dropped.cross_split_synthetic,
                dropped.duplicate_pairs
            )
        };
        return Err(BuildError::NoNegatives {
            mode: config.negatives.as_str(),
            reason,
        });
    }
    let pairable = Split::ALL.iter().any(|&split| {
        !catalog
            .pairable_instances(&catalog.split_instances(split))
            .is_empty()
    });
    if config.negatives == NegativesMode::Random && !pairable {
        return Err(BuildError::NoNegatives {
            mode: config.negatives.as_str(),
            reason: "no category has two instances in the same split to pair at random".to_owned(),
        });
    }

    let digests = InputDigests {
        images: digest_images(inputs.images),
        hard_negatives: digest_pairs(inputs.hard_negatives),
        synthetic_negatives: digest_pairs(inputs.synthetic_negatives),
    };

    let mut rows = Vec::new();
    let mut counts = PerSplit::<SplitCounts>::default();
    let mut total_negatives = 0u64;
    for split in Split::ALL {
        let built = catalog.build_split(split, &negatives, config)?;
        total_negatives += built.negatives;
        match split {
            Split::Train => counts.train = built.counts,
            Split::Eval => counts.eval = built.counts,
        }
        rows.extend(built.rows);
    }
    if config.negatives == NegativesMode::Random {
        dropped.unused_by_mode = negatives.len() as u64;
    }
    // Instances to pair were checked above; what is left is every possible random pair being a
    // given hard or synthetic one (which random pairs never repeat).
    if total_negatives == 0 {
        return Err(BuildError::NoNegatives {
            mode: config.negatives.as_str(),
            reason: "every random pair of two instances of one category is a given hard or \
                     synthetic pair"
                .to_owned(),
        });
    }

    Ok(BuiltDataset {
        format: MANIFEST_FORMAT.to_owned(),
        config: config.clone(),
        inputs: digests,
        counts,
        dropped,
        rows,
    })
}

/// Every given image (duplicates included), sorted by blob and path.
fn digest_images(images: &[ManifestEntry]) -> InputDigest {
    let mut sorted: Vec<&ManifestEntry> = images.iter().collect();
    sorted.sort_by(|x, y| (x.blob, &x.path).cmp(&(y.blob, &y.path)));
    let bytes = serde_json::to_vec(&sorted).expect("manifest entries serialise");
    InputDigest {
        count: sorted.len() as u64,
        hash: BlobHash::of(&bytes),
    }
}

fn digest_pairs(pairs: &[NegativePair]) -> InputDigest {
    let mut canonical: Vec<[BlobHash; 2]> =
        pairs.iter().map(|p| [p.a.min(p.b), p.a.max(p.b)]).collect();
    canonical.sort();
    let bytes = serde_json::to_vec(&canonical).expect("hashes serialise");
    InputDigest {
        count: pairs.len() as u64,
        hash: BlobHash::of(&bytes),
    }
}

/// The random negatives a split's mode asks for, before [`MAX_RANDOM_NEGATIVES_PER_SPLIT`]:
/// `random_negatives_per_instance` per pairable instance, or in `both` mode as many as make the
/// `hard` given pairs `hard_share` of the negatives. Saturating, since the options are only
/// bounded one by one: their product with the dataset's size is not.
fn random_target(config: &BuildConfig, pairable_instances: usize, hard: usize) -> u64 {
    match config.negatives {
        NegativesMode::Hard => 0,
        NegativesMode::Random => u64::from(config.random_negatives_per_instance)
            .saturating_mul(pairable_instances as u64),
        NegativesMode::Both => {
            let share = config.hard_share;
            // Validation keeps the share in [0.01, 0.99], so the ratio is at most 99 and the
            // product finite; a float-to-int `as` saturates (and maps NaN to 0) all the same.
            (hard as f64 * (1.0 - share) / share).round() as u64
        }
    }
}

/// How many instances of each category go to eval (`names` and `sizes` per category, in
/// canonical order); the rules are [`BuildConfig::eval_fraction`]'s. Every share is 0 or at least
/// 2, and below the category's size unless the category has exactly two instances.
fn eval_shares(names: &[String], sizes: &[usize], config: &BuildConfig) -> Vec<usize> {
    let mut eval = vec![0; sizes.len()];
    if config.eval_fraction == 0.0 {
        return eval;
    }
    let mut small = Vec::new();
    let mut small_target = 0.0;
    for (category, &n) in sizes.iter().enumerate() {
        if n < 2 {
            continue;
        }
        let share = n as f64 * config.eval_fraction;
        let rounded = share.round() as usize;
        if n >= 3 && rounded >= 2 {
            eval[category] = rounded.min(n - 1);
        } else {
            small.push(category);
            small_target += share;
        }
    }
    // Keyed by a hash of (seed, name) rather than a shuffle of the list, so a category's place
    // relative to another does not depend on which other categories exist.
    small.sort_by_cached_key(|&category| {
        let key =
            StageRng::new(config.seed, &format!("split-order/{}", names[category])).next_u64();
        (sizes[category] == 2, key, category)
    });
    // Train keeps two instances of one category, or it could hold no random negative at all.
    // Counted rather than rescanned per candidate: datasets can have many small categories.
    let mut train_pairable = sizes
        .iter()
        .zip(&eval)
        .filter(|&(&n, &e)| n - e >= 2)
        .count();
    // A small category is pairable in train until it gives two instances to eval, and after
    // that only if it had four or more.
    let stops_pairing = |category: usize| usize::from(sizes[category] < 4);
    let keeps_train_pairable =
        |category: usize, pairable: usize| pairable > stops_pairing(category);
    let mut taken = 0usize;
    for &category in &small {
        // Taking 2 more overshoots the share by at most what not taking them leaves short:
        // taken + 2 − target ≤ target − taken.
        if (taken + 1) as f64 > small_target {
            break;
        }
        if keeps_train_pairable(category, train_pairable) {
            eval[category] = 2;
            train_pairable -= stops_pairing(category);
            taken += 2;
        }
    }
    // An eval split was asked for: one group, even above the share, rather than none.
    if eval.iter().all(|&e| e == 0)
        && let Some(&category) = small
            .iter()
            .find(|&&category| keeps_train_pairable(category, train_pairable))
    {
        eval[category] = 2;
    }
    eval
}

/// One instance: a (category, instance) label pair and its images.
struct Instance {
    category: usize,
    label: String,
    /// Image indices, ascending (= by blob hash).
    images: Vec<usize>,
    split: Split,
}

/// A kept negative pair: image indices `a < b`.
#[derive(Clone, Copy)]
struct Negative {
    a: usize,
    b: usize,
    source: Source,
}

/// The images in canonical order, grouped by instance and category, with the split decided.
struct Catalog {
    /// Image index of each blob. Images are numbered in blob-hash order, so `a < b` for indices
    /// is `a < b` for hashes.
    by_blob: HashMap<BlobHash, usize>,
    /// Instance of each image.
    instance_of: Vec<usize>,
    /// Sorted by (category, label).
    instances: Vec<Instance>,
    categories: Vec<String>,
    refs: Vec<ImageRef>,
}

impl Catalog {
    fn new(
        images: &[ManifestEntry],
        config: &BuildConfig,
        dropped: &mut Dropped,
    ) -> Result<Self, BuildError> {
        if images.is_empty() {
            return Err(BuildError::NoImages);
        }
        for entry in images {
            for (label, value) in [("category", &entry.category), ("instance", &entry.instance)] {
                if value.trim().is_empty() {
                    return Err(BuildError::EmptyLabel {
                        path: entry.path.clone(),
                        blob: entry.blob,
                        label,
                    });
                }
            }
        }
        let mut sorted: Vec<&ManifestEntry> = images.iter().collect();
        sorted.sort_by(|x, y| (x.blob, &x.path).cmp(&(y.blob, &y.path)));
        let mut entries: Vec<&ManifestEntry> = Vec::with_capacity(sorted.len());
        for entry in sorted {
            if let Some(previous) = entries.last()
                && previous.blob == entry.blob
            {
                if (&previous.category, &previous.instance) != (&entry.category, &entry.instance) {
                    return Err(BuildError::ConflictingImage {
                        blob: entry.blob,
                        first: format!("{}/{}", previous.category, previous.instance),
                        second: format!("{}/{}", entry.category, entry.instance),
                    });
                }
                dropped.duplicate_images += 1;
                continue;
            }
            entries.push(entry);
        }

        let mut grouped: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        for (index, entry) in entries.iter().enumerate() {
            grouped
                .entry((entry.category.as_str(), entry.instance.as_str()))
                .or_default()
                .push(index);
        }
        if grouped.len() < 2 {
            let instance = grouped
                .keys()
                .next()
                .map(|(c, i)| format!("{c}/{i}"))
                .unwrap_or_default();
            return Err(BuildError::SingleInstance { instance });
        }
        if grouped.values().all(|images| images.len() < 2) {
            return Err(BuildError::NoPositives);
        }

        let mut categories: Vec<String> = Vec::new();
        let mut category_instances: Vec<Vec<usize>> = Vec::new();
        let mut instances = Vec::with_capacity(grouped.len());
        let mut instance_of = vec![0; entries.len()];
        for ((category, label), images) in grouped {
            if categories.last().map(String::as_str) != Some(category) {
                categories.push(category.to_owned());
                category_instances.push(Vec::new());
            }
            let category_index = categories.len() - 1;
            let instance_index = instances.len();
            for &image in &images {
                instance_of[image] = instance_index;
            }
            category_instances[category_index].push(instance_index);
            instances.push(Instance {
                category: category_index,
                label: label.to_owned(),
                images,
                split: Split::Train,
            });
        }

        // Instance-disjoint split: how many of each category's instances go to eval is decided
        // over all categories (`eval_shares`), which ones by the category's own shuffle, seeded
        // by its name, so nothing outside the category moves them.
        let sizes: Vec<usize> = category_instances.iter().map(Vec::len).collect();
        let shares = eval_shares(&categories, &sizes, config);
        for ((category, members), &eval) in categories.iter().zip(&category_instances).zip(&shares)
        {
            let mut order = members.clone();
            StageRng::new(config.seed, &format!("split/{category}")).shuffle(&mut order);
            for &instance in &order[..eval] {
                instances[instance].split = Split::Eval;
            }
        }

        let by_blob = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| (entry.blob, index))
            .collect();
        let refs = entries
            .iter()
            .map(|entry| {
                let (resized_width, resized_height) =
                    resized_size(entry.width, entry.height, config.max_side);
                ImageRef {
                    blob: entry.blob,
                    path: entry.path.clone(),
                    category: entry.category.clone(),
                    instance: entry.instance.clone(),
                    width: entry.width,
                    height: entry.height,
                    resized_width,
                    resized_height,
                }
            })
            .collect();
        Ok(Catalog {
            by_blob,
            instance_of,
            instances,
            categories,
            refs,
        })
    }

    /// The instances of one split, ascending.
    fn split_instances(&self, split: Split) -> Vec<usize> {
        (0..self.instances.len())
            .filter(|&i| self.instances[i].split == split)
            .collect()
    }

    fn split_of(&self, image: usize) -> Split {
        self.instances[self.instance_of[image]].split
    }

    fn instance_name(&self, instance: usize) -> String {
        let i = &self.instances[instance];
        format!("{}/{}", self.categories[i.category], i.label)
    }

    /// Validates the hard and synthetic pairs and keeps those inside one split, in canonical
    /// order, without duplicates (a pair in both lists counts as hard).
    fn negatives(
        &self,
        inputs: &BuildInputs<'_>,
        dropped: &mut Dropped,
    ) -> Result<Vec<Negative>, BuildError> {
        let mut all = Vec::new();
        for (list, pairs, source) in [
            (NegativeList::Hard, inputs.hard_negatives, Source::Hard),
            (
                NegativeList::Synthetic,
                inputs.synthetic_negatives,
                Source::Synthetic,
            ),
        ] {
            for (index, pair) in pairs.iter().enumerate() {
                let image = |blob: BlobHash| {
                    self.by_blob
                        .get(&blob)
                        .copied()
                        .ok_or(BuildError::UnknownImage { list, index, blob })
                };
                let (a, b) = (image(pair.a)?, image(pair.b)?);
                if self.instance_of[a] == self.instance_of[b] {
                    return Err(BuildError::SameInstanceNegative {
                        list,
                        index,
                        a: pair.a,
                        b: pair.b,
                        instance: self.instance_name(self.instance_of[a]),
                    });
                }
                all.push(Negative {
                    a: a.min(b),
                    b: a.max(b),
                    source,
                });
            }
        }
        // Source orders hard before synthetic, so the first of a duplicate run is the hard one.
        all.sort_by_key(|n| (n.a, n.b, n.source));
        let mut kept: Vec<Negative> = Vec::with_capacity(all.len());
        for negative in all {
            if kept
                .last()
                .is_some_and(|k| (k.a, k.b) == (negative.a, negative.b))
            {
                dropped.duplicate_pairs += 1;
                continue;
            }
            if self.split_of(negative.a) != self.split_of(negative.b) {
                match negative.source {
                    Source::Synthetic => dropped.cross_split_synthetic += 1,
                    _ => dropped.cross_split_hard += 1,
                }
                continue;
            }
            kept.push(negative);
        }
        Ok(kept)
    }

    fn build_split(
        &self,
        split: Split,
        negatives: &[Negative],
        config: &BuildConfig,
    ) -> Result<SplitRows, BuildError> {
        let mut counts = SplitCounts::default();
        let instances = self.split_instances(split);
        counts.instances = instances.len() as u64;
        counts.images = instances
            .iter()
            .map(|&i| self.instances[i].images.len() as u64)
            .sum();

        // (first image, second image, source), in the order shown to the model.
        let mut pairs: Vec<(usize, usize, Source)> = Vec::new();

        let mut rng = StageRng::new(config.seed, &format!("positives/{split}"));
        let cap = config.positives_per_instance as usize;
        for &instance in &instances {
            let images = &self.instances[instance].images;
            let mut all = Vec::new();
            for (i, &a) in images.iter().enumerate() {
                for &b in &images[i + 1..] {
                    all.push((a, b));
                }
            }
            rng.shuffle(&mut all);
            counts.positives_over_cap += all.len().saturating_sub(cap) as u64;
            for &(a, b) in all.iter().take(cap) {
                let (first, second) = if rng.coin() { (b, a) } else { (a, b) };
                pairs.push((first, second, Source::Positive));
            }
        }

        let split_negatives: Vec<Negative> = negatives
            .iter()
            .filter(|n| self.split_of(n.a) == split)
            .copied()
            .collect();
        let mut rng = StageRng::new(config.seed, &format!("negatives/{split}"));
        let hard_used = config.negatives != NegativesMode::Random;
        if hard_used {
            for n in &split_negatives {
                let (first, second) = if rng.coin() { (n.b, n.a) } else { (n.a, n.b) };
                pairs.push((first, second, n.source));
            }
        }
        let asked = random_target(
            config,
            self.pairable_instances(&instances).len(),
            split_negatives.len(),
        );
        let random_target = usize::try_from(asked.min(MAX_RANDOM_NEGATIVES_PER_SPLIT))
            .expect("the per-split maximum fits in a usize");
        // Every given pair is excluded, used or not, so random pairs never repeat one; random
        // pairs already drawn join it, so filling never repeats them either.
        let mut taken: HashSet<(usize, usize)> = negatives.iter().map(|n| (n.a, n.b)).collect();
        if random_target > 0 {
            let random = self.random_negatives(&instances, random_target, &mut taken, &mut rng);
            // What the cap left out counts as not found, with what the images could not give.
            counts.random_shortfall = asked.saturating_sub(random.len() as u64);
            for (a, b) in random {
                pairs.push((a, b, Source::Random));
            }
        }
        let positive_count = pairs.iter().filter(|p| p.2 == Source::Positive).count();
        let mode_negatives = pairs.len() - positive_count;
        if config.fill_negatives && mode_negatives < positive_count {
            // Its own stream, so turning filling on or off leaves the mode's pairs as they were.
            let mut rng = StageRng::new(config.seed, &format!("fill/{split}"));
            let wanted = positive_count - mode_negatives;
            let fill = self.random_negatives(&instances, wanted, &mut taken, &mut rng);
            counts.random_fill = fill.len() as u64;
            counts.fill_shortfall = (wanted - fill.len()) as u64;
            for (a, b) in fill {
                pairs.push((a, b, Source::Random));
            }
        }
        let negative_count = pairs.len() - positive_count;
        self.check_balance(
            split,
            &instances,
            (positive_count, negative_count),
            &counts,
            config,
        )?;

        let multi = self.multi_questions(split, &instances, &split_negatives, config, &mut counts);
        let pairs = balance(split, pairs, config, &mut counts);

        let mut rows: Vec<Row> = Vec::with_capacity(pairs.len() + multi.len());
        for (first, second, source) in pairs {
            counts.pairs.add(source, 1);
            let answer = if source == Source::Positive {
                counts.yes += 1;
                "yes"
            } else {
                counts.no += 1;
                "no"
            };
            rows.push(Row {
                id: String::new(),
                split,
                kind: RowKind::Pair { source },
                question: prompts::PAIR_QUESTION.to_owned(),
                answer: answer.to_owned(),
                images: vec![self.refs[first].clone(), self.refs[second].clone()],
            });
        }
        counts.pair_rows = rows.len() as u64;
        for question in multi {
            counts.multi_answers[question.answer] += 1;
            let mut images = vec![self.refs[question.reference].clone()];
            images.extend(
                question
                    .candidates
                    .iter()
                    .map(|&(c, _)| self.refs[c].clone()),
            );
            rows.push(Row {
                id: String::new(),
                split,
                kind: RowKind::Multi {
                    candidates: question.candidates.iter().map(|&(_, s)| s).collect(),
                },
                question: prompts::MULTI_QUESTION.to_owned(),
                answer: question.answer.to_string(),
                images,
            });
        }
        counts.multi_rows = rows.len() as u64 - counts.pair_rows;

        // Pairs and multi questions interleaved, so a loader that does not shuffle still mixes
        // them; ids are numbered in this final order.
        StageRng::new(config.seed, &format!("order/{split}")).shuffle(&mut rows);
        let (mut pair_n, mut multi_n) = (0, 0);
        for row in &mut rows {
            row.id = match row.kind {
                RowKind::Pair { .. } => {
                    pair_n += 1;
                    format!("{split}-pair-{:06}", pair_n - 1)
                }
                RowKind::Multi { .. } => {
                    multi_n += 1;
                    format!("{split}-multi-{:06}", multi_n - 1)
                }
            };
        }
        Ok(SplitRows {
            rows,
            counts,
            negatives: negative_count as u64,
        })
    }

    /// Refuses a split whose pairs cannot be balanced as configured: with `balance` on, one
    /// without a single yes or no pair; with filling on, one without a single negative, or (with
    /// `balance = none`, where nothing else evens them) fewer negatives than positives. A split
    /// with no pair at all passes: there is nothing to tell apart, and nothing skewed.
    fn check_balance(
        &self,
        split: Split,
        instances: &[usize],
        (yes, no): (usize, usize),
        counts: &SplitCounts,
        config: &BuildConfig,
    ) -> Result<(), BuildError> {
        let balancing = config.balance != Balance::None;
        let fill = config.fill_negatives;
        let reason = if yes + no == 0 {
            None
        } else if yes == 0 && (balancing || fill) {
            Some(format!(
                "no instance in it has two images (it holds {}), so there is no positive pair",
                self.describe(instances)
            ))
        } else if no == 0 && (balancing || fill) {
            Some(self.why_no_negative(instances, config))
        } else if fill && !balancing && no < yes {
            Some(format!(
                "filling drew only {} random negatives from its {} ({} short of the positives); \
                 set balance = \"downsample\" or \"oversample\" to even the rest, or \
                 fill_negatives = false to keep the split unbalanced",
                counts.random_fill,
                self.describe(instances),
                counts.fill_shortfall
            ))
        } else {
            None
        };
        match reason {
            None => Ok(()),
            Some(reason) => Err(BuildError::CannotBalance {
                split,
                yes: yes as u64,
                no: no as u64,
                reason,
            }),
        }
    }

    /// Why a split has no negative pair at all.
    fn why_no_negative(&self, instances: &[usize], config: &BuildConfig) -> String {
        let described = self.describe(instances);
        let in_split = if config.negatives == NegativesMode::Random {
            "hard and synthetic pairs are not used in `random` mode"
        } else {
            "no hard or synthetic pair lies inside it"
        };
        if self.pairable_instances(instances).is_empty() {
            format!("{in_split}, and it holds {described}, so no random negative can be drawn")
        } else if !config.fill_negatives {
            format!(
                "{in_split}, and fill_negatives is off (it holds {described}, which could give \
                 random ones)"
            )
        } else {
            format!("{in_split}, and it holds {described}, but no random pair of them was left")
        }
    }

    /// `N instances in C categories, none with a second instance in the split` or `…, K with two
    /// or more in the split`.
    fn describe(&self, instances: &[usize]) -> String {
        let mut per_category: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in instances {
            *per_category.entry(self.instances[i].category).or_default() += 1;
        }
        let pairable = per_category.values().filter(|&&n| n >= 2).count();
        let count =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let head = format!(
            "{} in {}",
            count(instances.len(), "instance", "instances"),
            count(per_category.len(), "category", "categories")
        );
        if pairable == 0 {
            format!("{head}, none with a second instance in the split")
        } else {
            format!("{head}, {pairable} with two or more in the split")
        }
    }

    /// Instances of `instances` whose category has another instance among them.
    fn pairable_instances(&self, instances: &[usize]) -> Vec<usize> {
        let mut per_category: HashMap<usize, usize> = HashMap::new();
        for &i in instances {
            *per_category.entry(self.instances[i].category).or_default() += 1;
        }
        instances
            .iter()
            .copied()
            .filter(|&i| per_category[&self.instances[i].category] >= 2)
            .collect()
    }

    /// Up to `target` new random negative pairs, anchored at the instances in turn (shuffled
    /// order, round robin) so each instance anchors about the same number; each pairs an image
    /// of the anchor with an image of another instance of its category in the split.
    fn random_negatives(
        &self,
        instances: &[usize],
        target: usize,
        taken: &mut HashSet<(usize, usize)>,
        rng: &mut StageRng,
    ) -> Vec<(usize, usize)> {
        // The split's instances per category; an anchor's rivals are its category's members but
        // itself. Kept per category: a list of rivals per anchor would be quadratic.
        let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
        for &instance in instances {
            members
                .entry(self.instances[instance].category)
                .or_default()
                .push(instance);
        }
        let mut anchors = self.pairable_instances(instances);
        rng.shuffle(&mut anchors);
        // The target comes from options; what can be drawn is bounded by the images.
        let mut out = Vec::with_capacity(target.min(self.refs.len()));
        while out.len() < target && !anchors.is_empty() {
            // Anchors with no untaken pair left drop out of the next round.
            let mut live = Vec::with_capacity(anchors.len());
            for &anchor in &anchors {
                if out.len() == target {
                    break;
                }
                let category = &members[&self.instances[anchor].category];
                if let Some((a, b)) = self.draw_random_pair(anchor, category, taken, rng) {
                    taken.insert((a.min(b), a.max(b)));
                    out.push((a, b));
                    live.push(anchor);
                }
            }
            anchors = live;
        }
        out
    }

    /// A random untaken pair (anchor image, rival image), the rival among `members` (the anchor's
    /// category in the split, anchor included): a few random tries, then an exhaustive scan so a
    /// nearly exhausted anchor still finds its last pairs.
    fn draw_random_pair(
        &self,
        anchor: usize,
        members: &[usize],
        taken: &HashSet<(usize, usize)>,
        rng: &mut StageRng,
    ) -> Option<(usize, usize)> {
        let own = &self.instances[anchor].images;
        for _ in 0..16 {
            let rival = members[rng.below(members.len())];
            if rival == anchor {
                continue;
            }
            let a = own[rng.below(own.len())];
            let rival = &self.instances[rival].images;
            let b = rival[rng.below(rival.len())];
            if !taken.contains(&(a.min(b), a.max(b))) {
                return Some((a, b));
            }
        }
        let mut free = Vec::new();
        for &a in own {
            for &rival in members.iter().filter(|&&rival| rival != anchor) {
                for &b in &self.instances[rival].images {
                    if !taken.contains(&(a.min(b), a.max(b))) {
                        free.push((a, b));
                    }
                }
            }
        }
        (!free.is_empty()).then(|| free[rng.below(free.len())])
    }

    fn negative_pools(
        &self,
        instances: &[usize],
        split_negatives: &[Negative],
        config: &BuildConfig,
    ) -> NegativePools {
        let mut partners: HashMap<usize, Vec<(usize, Source)>> = HashMap::new();
        if config.negatives != NegativesMode::Random {
            let mut listed: HashSet<(usize, usize)> = HashSet::new();
            for n in split_negatives {
                for (own, other) in [(n.a, n.b), (n.b, n.a)] {
                    let instance = self.instance_of[own];
                    // An image partnered with several of the instance's images is listed once,
                    // with the source of its first pair in canonical order.
                    if listed.insert((instance, other)) {
                        partners
                            .entry(instance)
                            .or_default()
                            .push((other, n.source));
                    }
                }
            }
        }
        let random = config.negatives == NegativesMode::Random || config.fill_negatives;
        let category = random.then(|| {
            let mut images: HashMap<usize, Vec<usize>> = HashMap::new();
            for &instance in instances {
                let i = &self.instances[instance];
                images.entry(i.category).or_default().extend(&i.images);
            }
            images
        });
        NegativePools { partners, category }
    }

    /// `multi_questions` of the split, the same number per answer 0–3 where feasible; the rest is
    /// counted as shortfall, with the reason.
    fn multi_questions(
        &self,
        split: Split,
        instances: &[usize],
        split_negatives: &[Negative],
        config: &BuildConfig,
        counts: &mut SplitCounts,
    ) -> Vec<MultiQuestion> {
        let per_answer = (*config.multi_questions.get(split) / 4) as usize;
        if per_answer == 0 {
            return Vec::new();
        }
        let mut rng = StageRng::new(config.seed, &format!("multi/{split}"));

        let pools = self.negative_pools(instances, split_negatives, config);
        let sizes: HashMap<usize, usize> = instances
            .iter()
            .map(|&i| (i, pools.size(self, i)))
            .collect();
        // The request comes from options: reserve no more than a few questions per image (the
        // vector grows if more are made).
        let mut out = Vec::with_capacity((per_answer * 4).min(self.refs.len() * 4));
        let mut seen: HashSet<(usize, [usize; 3])> = HashSet::new();
        for answer in 0..4usize {
            let needed_negatives = 3 - answer;
            let with_images: Vec<usize> = instances
                .iter()
                .copied()
                .filter(|&i| self.instances[i].images.len() > answer)
                .collect();
            // Every reference image with enough positives and negatives, equally likely.
            let references: Vec<usize> = with_images
                .iter()
                .filter(|i| sizes[i] >= needed_negatives)
                .flat_map(|&i| self.instances[i].images.iter().copied())
                .collect();
            let mut made = 0;
            let mut attempts = 0;
            // At most 50 draws per question asked (+200), and no more once draws pass 100 per
            // question made (+1000): a request far beyond what the split's images allow (up to
            // `MAX_MULTI_QUESTIONS` on a handful of images) would otherwise spend 50 million
            // draws on duplicates. The second bound never binds while, on average, one draw in a
            // hundred or more finds a new question.
            let max_attempts = per_answer * 50 + 200;
            let within_budget = |attempts: usize, made: usize| {
                attempts < max_attempts && attempts < 1000 + 100 * made
            };
            while made < per_answer && !references.is_empty() && within_budget(attempts, made) {
                attempts += 1;
                let reference = references[rng.below(references.len())];
                let instance = self.instance_of[reference];
                let others: Vec<usize> = self.instances[instance]
                    .images
                    .iter()
                    .copied()
                    .filter(|&image| image != reference)
                    .collect();
                let mut candidates: Vec<(usize, Source)> = rng
                    .sample(&others, answer)
                    .into_iter()
                    .map(|image| (image, Source::Positive))
                    .collect();
                candidates.extend(pools.sample(self, instance, needed_negatives, &mut rng));
                rng.shuffle(&mut candidates);
                let mut key = [candidates[0].0, candidates[1].0, candidates[2].0];
                key.sort_unstable();
                if !seen.insert((reference, key)) {
                    continue;
                }
                out.push(MultiQuestion {
                    reference,
                    candidates,
                    answer,
                });
                made += 1;
            }
            counts.multi_shortfall[answer] = (per_answer - made) as u64;
            if made < per_answer {
                let most =
                    |values: &mut dyn Iterator<Item = usize>| values.max().unwrap_or(0) as u64;
                counts.multi_shortfall_reasons[answer] = Some(if instances.is_empty() {
                    MultiShortfall::NoInstances
                } else if with_images.is_empty() {
                    MultiShortfall::TooFewImages {
                        needed: answer as u64 + 1,
                        most: most(&mut instances.iter().map(|&i| self.instances[i].images.len())),
                    }
                } else if references.is_empty() {
                    MultiShortfall::TooFewNegatives {
                        needed: needed_negatives as u64,
                        most: most(&mut with_images.iter().map(|i| sizes[i])),
                    }
                } else {
                    MultiShortfall::Exhausted {
                        made: made as u64,
                        draws: attempts as u64,
                    }
                });
            }
        }
        out
    }
}

/// The negative candidates of multi questions, per reference instance: its hard and synthetic
/// partners first, then (in `random` mode, or when filling) any image of another instance of its
/// category in the split.
struct NegativePools {
    /// `hard` and `both`: each instance's hard and synthetic partners (image, source), without
    /// repeats. Empty in `random` mode.
    partners: HashMap<usize, Vec<(usize, Source)>>,
    /// The split's images per category, when random candidates are allowed. Kept per category
    /// rather than per instance, which would hold a category's images once per instance.
    category: Option<HashMap<usize, Vec<usize>>>,
}

impl NegativePools {
    fn partners(&self, instance: usize) -> &[(usize, Source)] {
        self.partners.get(&instance).map_or(&[][..], Vec::as_slice)
    }

    /// How many distinct negatives `instance` can get.
    fn size(&self, catalog: &Catalog, instance: usize) -> usize {
        let partners = self.partners(instance);
        let Some(images) = &self.category else {
            return partners.len();
        };
        let category = catalog.instances[instance].category;
        let of_category = images.get(&category).map_or(0, Vec::len);
        // Partners of the same category are among the category's images: count them once.
        let partners_in_category = partners
            .iter()
            .filter(|&&(image, _)| {
                catalog.instances[catalog.instance_of[image]].category == category
            })
            .count();
        partners.len() + of_category
            - catalog.instances[instance].images.len()
            - partners_in_category
    }

    /// `k` distinct negatives of `instance` (`k` at most its [`NegativePools::size`]): hard
    /// partners where it has them, random images of its category for the rest.
    fn sample(
        &self,
        catalog: &Catalog,
        instance: usize,
        k: usize,
        rng: &mut StageRng,
    ) -> Vec<(usize, Source)> {
        let partners = self.partners(instance);
        let mut chosen: Vec<(usize, Source)> = rng.sample(partners, k);
        let Some(images) = &self.category else {
            return chosen;
        };
        if chosen.len() == k {
            return chosen;
        }
        // Every partner is chosen by now, so "not chosen" also means "not a partner".
        let category = catalog.instances[instance].category;
        let pool = images.get(&category).map_or(&[][..], Vec::as_slice);
        let free = |image: usize, chosen: &[(usize, Source)]| {
            catalog.instance_of[image] != instance && chosen.iter().all(|&(c, _)| c != image)
        };
        // Rejection keeps this O(k) for large categories; a category dominated by the reference's
        // own images falls back to filtering.
        for _ in 0..k * 16 {
            if chosen.len() == k || pool.is_empty() {
                break;
            }
            let image = pool[rng.below(pool.len())];
            if free(image, &chosen) {
                chosen.push((image, Source::Random));
            }
        }
        if chosen.len() < k {
            let rest: Vec<usize> = pool
                .iter()
                .copied()
                .filter(|&image| free(image, &chosen))
                .collect();
            let more = rng.sample(&rest, k - chosen.len());
            chosen.extend(more.into_iter().map(|image| (image, Source::Random)));
        }
        chosen
    }
}

struct MultiQuestion {
    reference: usize,
    /// (image, source) in the order shown.
    candidates: Vec<(usize, Source)>,
    answer: usize,
}

struct SplitRows {
    rows: Vec<Row>,
    counts: SplitCounts,
    /// Negative pairs before balancing.
    negatives: u64,
}

/// Equal yes and no pairs, per [`BuildConfig::balance`]. A split with pairs on one side only
/// was refused before ([`Catalog::check_balance`]).
fn balance(
    split: Split,
    pairs: Vec<(usize, usize, Source)>,
    config: &BuildConfig,
    counts: &mut SplitCounts,
) -> Vec<(usize, usize, Source)> {
    if config.balance == Balance::None {
        return pairs;
    }
    let (yes, no): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|p| p.2 == Source::Positive);
    if yes.len() == no.len() || yes.is_empty() || no.is_empty() {
        return yes.into_iter().chain(no).collect();
    }
    let (mut major, mut minor) = if yes.len() > no.len() {
        (yes, no)
    } else {
        (no, yes)
    };
    let mut rng = StageRng::new(config.seed, &format!("balance/{split}"));
    if config.balance == Balance::Downsample {
        counts.balance_removed = (major.len() - minor.len()) as u64;
        rng.shuffle(&mut major);
        major.truncate(minor.len());
    } else {
        let extra = major.len() - minor.len();
        counts.balance_added = extra as u64;
        let mut copies = Vec::with_capacity(extra);
        while copies.len() < extra {
            let mut round = minor.clone();
            rng.shuffle(&mut round);
            round.truncate(extra - copies.len());
            copies.extend(round);
        }
        minor.extend(copies);
    }
    major.into_iter().chain(minor).collect()
}
