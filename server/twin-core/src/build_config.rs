//! The options of a `build-dataset` job, typed and validated here so the server checks them at
//! submission without linking the data crate that builds (`twin-data` uses these same types).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// An option out of range or of the wrong type; `field` is its name inside `options`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid build option `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The longest side of an image as the model sees it (TWIN resizes to at most 512 px).
pub const DEFAULT_MAX_SIDE: u32 = 512;

// The counts below come from a job's options and size what a build draws and holds. Each
// maximum is far above what the TWIN recipe asks for (TWIN has about 561k pairs in all) and far
// below a count that would exhaust an executor's memory before the build could say anything.

/// The largest [`BuildConfig::positives_per_instance`]. An instance's positives are also bounded
/// by its images (n images give n(n−1)/2 pairs); the recipe's default is 4.
pub const MAX_POSITIVES_PER_INSTANCE: u32 = 1_000_000;

/// The largest [`BuildConfig::random_negatives_per_instance`] (the recipe's default is 2). The
/// product with the number of instances is bounded separately, by
/// [`MAX_RANDOM_NEGATIVES_PER_SPLIT`].
pub const MAX_RANDOM_NEGATIVES_PER_INSTANCE: u32 = 1_000_000;

/// The most random negatives the `random` and `both` modes draw for one split, whatever
/// `random_negatives_per_instance` × instances or `hard_share` ask for; what is asked beyond it
/// is counted as `random_shortfall`. About nine times TWIN's whole set of pairs.
pub const MAX_RANDOM_NEGATIVES_PER_SPLIT: u64 = 5_000_000;

/// The least [`BuildConfig::hard_share`]: `both` mode adds (1 − s)/s random negatives per hard
/// one, so a share near 0 asks for an unbounded number (10⁹ at s = 10⁻⁹); at 0.01 it is 99.
pub const MIN_HARD_SHARE: f64 = 0.01;

/// The largest [`BuildConfig::hard_share`]: at 0.99 random negatives are about 1 % of the
/// negatives; a larger share is `hard` mode in all but name.
pub const MAX_HARD_SHARE: f64 = 0.99;

/// The largest [`BuildConfig::multi_questions`] per split.
pub const MAX_MULTI_QUESTIONS: u32 = 1_000_000;

/// The largest [`BuildConfig::max_side`]: 16 times the recipe's 512. A larger side only gives
/// images the model's processor shrinks again (Qwen2.5-VL's default cap is 12845056 pixels, a
/// square of 3584 px).
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// Which side of the instance-disjoint split a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub const ALL: [Split; 2] = [Split::Train, Split::Eval];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "eval" => Ok(Split::Eval),
            other => Err(format!(
                "unknown split `{other}` (expected `train` or `eval`)"
            )),
        }
    }
}

/// Where the negative pairs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativesMode {
    /// Accepted hard negatives and synthetic negatives (the TWIN recipe).
    Hard,
    /// Random pairs of images of different instances of one category, and no hard or synthetic
    /// pair anywhere (the "without hard negatives" ablation).
    Random,
    /// Every hard and synthetic negative plus random pairs, so that hard ones make up
    /// [`BuildConfig::hard_share`] of the negatives.
    Both,
}

impl NegativesMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NegativesMode::Hard => "hard",
            NegativesMode::Random => "random",
            NegativesMode::Both => "both",
        }
    }
}

/// Equalising the yes and no pair rows of each split (multi rows are balanced by construction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Keep every pair.
    None,
    /// Drop randomly chosen pairs of the larger side.
    Downsample,
    /// Repeat pairs of the smaller side (each copy is its own row), cycling through a shuffled
    /// order so no pair is repeated twice before every pair is repeated once.
    Oversample,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::None => "none",
            Balance::Downsample => "downsample",
            Balance::Oversample => "oversample",
        }
    }
}

/// One value per split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerSplit<T> {
    #[serde(default)]
    pub train: T,
    #[serde(default)]
    pub eval: T,
}

impl<T> PerSplit<T> {
    pub fn get(&self, split: Split) -> &T {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }
}

/// How to build a dataset. Deserialised from a job's `options` with [`BuildConfig::from_json`];
/// every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildConfig {
    /// Seeds every random choice (split, sampling, order). Default 0.
    pub seed: u64,
    /// Share of the instances (not images) assigned to eval, in [0, 1). Default 0.1.
    ///
    /// A category that contributes to eval contributes at least two instances, so that negatives
    /// inside the eval split exist (a negative pair never crosses the split), and keeps at least
    /// one in train. So:
    /// - a category of n ≥ 3 instances with round(n × eval_fraction) ≥ 2 sends that many (at most
    ///   n − 1) to eval on its own: large datasets have every category in both splits, and adding
    ///   a category moves no other category's instances;
    /// - the other categories of two or more instances ("small" ones: round(n × eval_fraction) ≤
    ///   1, or n = 2) send two instances each, and only some of them do: in a seeded order
    ///   (categories of three or more first, so they keep one in train, then those of two, which
    ///   go to eval whole) they are taken while the eval instances taken from them stay within
    ///   half a group of their share (the sum of n × eval_fraction over them). At least one is
    ///   taken when no category reached eval otherwise, and none that would leave train without
    ///   a category of two instances. Which small categories contribute depends on the seed,
    ///   eval_fraction and the set of small categories (their names and sizes): adding one may
    ///   change which others do;
    /// - categories of one instance stay in train. When no category has two instances there is
    ///   no eval split (`eval.instances` is 0).
    ///
    /// Which instances of a category go to eval depends only on the seed, the category's name
    /// and its instances. The README demo (6 categories × 4 instances, 0.25) gives 3 categories
    /// × 2 instances = 6 of 24 in eval.
    pub eval_fraction: f64,
    /// At most this many positive pairs (two distinct images) per instance, in
    /// 1..=[`MAX_POSITIVES_PER_INSTANCE`] (1000000). Default 4.
    pub positives_per_instance: u32,
    /// Where negatives come from. Default `hard`.
    pub negatives: NegativesMode,
    /// `random` mode: random negative pairs anchored at each instance, in
    /// 1..=[`MAX_RANDOM_NEGATIVES_PER_INSTANCE`] (1000000), and at most
    /// [`MAX_RANDOM_NEGATIVES_PER_SPLIT`] (5000000) in a split. Default 2.
    pub random_negatives_per_instance: u32,
    /// `both` mode: the share of hard (and synthetic) pairs among negatives, in
    /// [[`MIN_HARD_SHARE`], [`MAX_HARD_SHARE`]] = [0.01, 0.99]; every hard pair is kept and random
    /// pairs are added to reach it (at most [`MAX_RANDOM_NEGATIVES_PER_SPLIT`] in a split).
    /// Default 0.5.
    pub hard_share: f64,
    /// Multi questions per split, each a multiple of 4 (an equal number per answer 0–3) and at
    /// most [`MAX_MULTI_QUESTIONS`] (1000000). Default 0 and 0.
    pub multi_questions: PerSplit<u32>,
    /// Per split, after the mode's negatives: while negatives are fewer than positives, add
    /// random negatives drawn from the split's own instances (two instances of one category,
    /// never a given hard or synthetic pair), counted as `random_fill`; multi questions in `hard`
    /// and `both` modes likewise take random images of the reference's category in the split
    /// when its hard partners are too few. A split with pairs but not a single negative, or not a
    /// single positive, is then an error (the data crate's `BuildError::CannotBalance`), and so, with
    /// `balance = none`, is one whose negatives still fall short of its positives; `downsample`
    /// and `oversample` even what filling could not (counted as `fill_shortfall`).
    ///
    /// Default true: an evaluation split of mostly `yes` measures little. `false` keeps each
    /// split's negatives as the mode made them (and an unbalanced split with `balance = none`),
    /// the behaviour before this option; a manifest written before it reads back as `false`.
    #[serde(default)]
    pub fill_negatives: bool,
    /// Equalise yes and no pair rows per split. Default `none`: filling alone brings negatives up
    /// to the positives but keeps a surplus of hard negatives (train usually has one, and so may
    /// eval); `downsample` makes them exactly equal.
    pub balance: Balance,
    /// Longest side of the resized images, in 1..=[`MAX_IMAGE_SIDE`] (8192). Default 512.
    pub max_side: u32,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            eval_fraction: 0.1,
            positives_per_instance: 4,
            negatives: NegativesMode::Hard,
            random_negatives_per_instance: 2,
            hard_share: 0.5,
            multi_questions: PerSplit { train: 0, eval: 0 },
            fill_negatives: true,
            balance: Balance::None,
            max_side: DEFAULT_MAX_SIDE,
        }
    }
}

impl BuildConfig {
    /// Reads options given as a JSON object (absent fields take their defaults) and validates
    /// them. Errors name the field.
    pub fn from_json(options: &serde_json::Value) -> Result<Self, ConfigError> {
        let object = options
            .as_object()
            .ok_or_else(|| ConfigError::new("options", "must be a JSON object"))?;
        let mut config = BuildConfig::default();
        // Field by field rather than one `from_value`, so a type error names its field.
        for (key, value) in object {
            match key.as_str() {
                "seed" => config.seed = field(key, value)?,
                "eval_fraction" => config.eval_fraction = field(key, value)?,
                "positives_per_instance" => config.positives_per_instance = field(key, value)?,
                "negatives" => config.negatives = field(key, value)?,
                "random_negatives_per_instance" => {
                    config.random_negatives_per_instance = field(key, value)?
                }
                "hard_share" => config.hard_share = field(key, value)?,
                "multi_questions" => config.multi_questions = field(key, value)?,
                "fill_negatives" => config.fill_negatives = field(key, value)?,
                "balance" => config.balance = field(key, value)?,
                "max_side" => config.max_side = field(key, value)?,
                other => {
                    return Err(ConfigError::new(
                        other,
                        "unknown option (expected one of seed, eval_fraction, \
                         positives_per_instance, negatives, random_negatives_per_instance, \
                         hard_share, multi_questions, fill_negatives, balance, max_side)",
                    ));
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every field's range; the data crate's `build` calls it too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.eval_fraction.is_finite() && (0.0..1.0).contains(&self.eval_fraction)) {
            return Err(ConfigError::new(
                "eval_fraction",
                format!("must be in [0, 1), got {}", self.eval_fraction),
            ));
        }
        check_count(
            "positives_per_instance",
            self.positives_per_instance,
            1,
            MAX_POSITIVES_PER_INSTANCE,
        )?;
        if self.negatives == NegativesMode::Random && self.random_negatives_per_instance == 0 {
            return Err(ConfigError::new(
                "random_negatives_per_instance",
                "must be at least 1 when negatives is `random`",
            ));
        }
        // The maximum holds in every mode, so a spec never carries a count that would be refused
        // once its mode changed.
        check_count(
            "random_negatives_per_instance",
            self.random_negatives_per_instance,
            0,
            MAX_RANDOM_NEGATIVES_PER_INSTANCE,
        )?;
        if self.negatives == NegativesMode::Both
            && !(self.hard_share.is_finite()
                && (MIN_HARD_SHARE..=MAX_HARD_SHARE).contains(&self.hard_share))
        {
            return Err(ConfigError::new(
                "hard_share",
                format!(
                    "must lie in (0, 1), from {MIN_HARD_SHARE} to {MAX_HARD_SHARE} (at most 99 \
                     random negatives per hard one), when negatives is `both`, got {}",
                    self.hard_share
                ),
            ));
        }
        for split in Split::ALL {
            let count = *self.multi_questions.get(split);
            let field = format!("multi_questions.{split}");
            if !count.is_multiple_of(4) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "must be a multiple of 4 (the same number per answer 0-3), got {count}"
                    ),
                ));
            }
            check_count(&field, count, 0, MAX_MULTI_QUESTIONS)?;
        }
        if self.multi_questions.eval > 0 && self.eval_fraction == 0.0 {
            return Err(ConfigError::new(
                "multi_questions.eval",
                "must be 0 when eval_fraction is 0 (there is no eval split)",
            ));
        }
        check_count("max_side", self.max_side, 1, MAX_IMAGE_SIDE)?;
        Ok(())
    }
}

/// `value` in `least..=most`, the error naming `field` ("at least 1", "at most 8192").
fn check_count(field: &str, value: u32, least: u32, most: u32) -> Result<(), ConfigError> {
    if value < least {
        return Err(ConfigError::new(
            field,
            format!("must be at least {least}, got {value}"),
        ));
    }
    if value > most {
        return Err(ConfigError::new(
            field,
            format!("must be at most {most}, got {value}"),
        ));
    }
    Ok(())
}

fn field<T: DeserializeOwned>(name: &str, value: &serde_json::Value) -> Result<T, ConfigError> {
    T::deserialize(value).map_err(|e| ConfigError::new(name, e.to_string()))
}
