//! twin's Rust guest SDK: write a reward or filter module as a trait impl plus one macro call.
//!
//! ```ignore
//! use twin_guest::{Description, Reward, Rollout, Score};
//!
//! struct ExactMatch;
//!
//! impl Reward for ExactMatch {
//!     fn describe() -> Description {
//!         Description::new("exact-match", "1.0.0", "1 if the completion equals the ground truth")
//!     }
//!     fn configure(_params: &str) -> Result<Self, String> {
//!         Ok(ExactMatch)
//!     }
//!     fn score(&mut self, r: &Rollout) -> Result<Score, String> {
//!         Ok(Score::new(if r.completion.trim() == r.ground_truth { 1.0 } else { 0.0 }))
//!     }
//! }
//!
//! twin_guest::export_reward!(ExactMatch);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component to register. The generated bindings for the
//! WIT worlds are in [`reward_world`] and [`filter_world`] for modules that want them directly.

use serde::de::DeserializeOwned;

/// Generated bindings of the reward worlds. One world serves both: a reward that never calls
/// [`lookup`] does not import it (unused imports are left out of the component).
#[doc(hidden)]
pub mod reward_world {
    wit_bindgen::generate!({
        path: "../wit",
        world: "reward-with-lookup",
        pub_export_macro: true,
        export_macro_name: "__export_reward_world",
        default_bindings_module: "twin_guest::reward_world",
    });
}

#[doc(hidden)]
pub use twin_guest_filter as filter_world;

/// Looks `key` up in the table the job granted (`grants.lookup`); each call is recorded by the
/// host. A module that calls it imports the capability, and jobs must grant it.
pub fn lookup(key: &str) -> Option<String> {
    reward_world::twin::plugin::lookup::get(key)
}

/// What `describe` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub name: String,
    pub version: String,
    pub summary: String,
    /// JSON Schema of the parameters `configure` accepts.
    pub parameters_schema: String,
}

/// The schema of a module that takes no parameters.
pub const NO_PARAMETERS: &str = r#"{"type":"object","additionalProperties":false}"#;

impl Description {
    /// A module without parameters.
    pub fn new(name: &str, version: &str, summary: &str) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            summary: summary.into(),
            parameters_schema: NO_PARAMETERS.into(),
        }
    }

    pub fn with_parameters(mut self, json_schema: &str) -> Self {
        self.parameters_schema = json_schema.into();
        self
    }
}

/// Which kind of question a rollout answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuestionType {
    Pair,
    Multi,
    Other,
}

/// One completion to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub prompt: String,
    pub completion: String,
    pub ground_truth: String,
    pub question_type: QuestionType,
    /// A JSON object as a string.
    pub metadata: String,
}

/// A reward's score for one rollout, with optional named components.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub score: f64,
    pub components: Vec<(String, f64)>,
}

impl Score {
    pub fn new(score: f64) -> Self {
        Self {
            score,
            components: Vec::new(),
        }
    }

    pub fn with(mut self, name: &str, value: f64) -> Self {
        self.components.push((name.into(), value));
        self
    }
}

/// A candidate negative pair.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidatePair {
    pub image_a: String,
    pub image_b: String,
    pub instance_a: String,
    pub instance_b: String,
    pub category_a: String,
    pub category_b: String,
    pub phash_a: u64,
    pub phash_b: u64,
    pub similarity: f64,
    pub rank: u32,
    pub metadata: String,
}

/// Keep or drop a candidate, with an optional reason for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub keep: bool,
    pub reason: Option<String>,
}

impl Verdict {
    pub fn keep() -> Self {
        Self {
            keep: true,
            reason: None,
        }
    }

    pub fn drop(reason: impl Into<String>) -> Self {
        Self {
            keep: false,
            reason: Some(reason.into()),
        }
    }
}

/// A reward module. A fresh instance is configured once per batch, so `configure` may do work
/// that `score` reuses (compile a pattern, parse parameters).
pub trait Reward: Sized + Send + 'static {
    fn describe() -> Description;
    /// `params` is the job's parameter object as JSON; see [`params`] to parse it.
    fn configure(params: &str) -> Result<Self, String>;
    fn score(&mut self, rollout: &Rollout) -> Result<Score, String>;
}

/// A negative-pair filter module.
pub trait Filter: Sized + Send + 'static {
    fn describe() -> Description;
    fn configure(params: &str) -> Result<Self, String>;
    fn judge(&mut self, pair: &CandidatePair) -> Result<Verdict, String>;
}

/// Parses a module's parameters. "null" and "" count as `{}`; unknown fields are the caller's
/// business (use `#[serde(deny_unknown_fields)]` to reject them).
pub fn params<T: DeserializeOwned>(json: &str) -> Result<T, String> {
    let json = json.trim();
    let json = if json.is_empty() || json == "null" {
        "{}"
    } else {
        json
    };
    serde_json::from_str(json).map_err(|e| format!("bad parameters: {e}"))
}

/// Accepts only an empty parameter object, for modules that take none.
pub fn no_params(json: &str) -> Result<(), String> {
    let map: serde_json::Map<String, serde_json::Value> = params(json)?;
    match map.keys().next() {
        None => Ok(()),
        Some(k) => Err(format!("this module takes no parameters (got {k:?})")),
    }
}

#[doc(hidden)]
pub mod __private {
    //! Glue the export macros expand to; not a stable API.

    use std::sync::Mutex;

    pub fn configure<T>(state: &Mutex<Option<T>>, value: Result<T, String>) -> Result<(), String> {
        let value = value?;
        *state.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        Ok(())
    }

    pub fn with_state<T, R>(
        state: &Mutex<Option<T>>,
        f: impl FnOnce(&mut T) -> Result<R, String>,
    ) -> Result<R, String> {
        let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(s) => f(s),
            None => Err("score called before configure".into()),
        }
    }

    macro_rules! world_conversions {
        ($world:ident) => {
            pub mod $world {
                use crate::$world::twin::plugin::types as wit;

                pub fn descriptor(d: crate::Description, kind: wit::ModuleKind) -> wit::Descriptor {
                    wit::Descriptor {
                        name: d.name,
                        version: d.version,
                        kind,
                        summary: d.summary,
                        parameters_schema: d.parameters_schema,
                    }
                }

                pub fn rollout(r: wit::Rollout) -> crate::Rollout {
                    crate::Rollout {
                        prompt: r.prompt,
                        completion: r.completion,
                        ground_truth: r.ground_truth,
                        question_type: match r.question_type {
                            wit::QuestionType::Pair => crate::QuestionType::Pair,
                            wit::QuestionType::Multi => crate::QuestionType::Multi,
                            wit::QuestionType::Other => crate::QuestionType::Other,
                        },
                        metadata: r.metadata,
                    }
                }

                pub fn score(s: crate::Score) -> wit::RewardScore {
                    wit::RewardScore {
                        score: s.score,
                        components: s
                            .components
                            .into_iter()
                            .map(|(name, value)| wit::ScoreComponent { name, value })
                            .collect(),
                    }
                }
            }
        };
    }
    world_conversions!(reward_world);

    pub mod filter_world {
        use crate::filter_world::twin::plugin::types as wit;

        pub fn descriptor(d: crate::Description) -> wit::Descriptor {
            wit::Descriptor {
                name: d.name,
                version: d.version,
                kind: wit::ModuleKind::Filter,
                summary: d.summary,
                parameters_schema: d.parameters_schema,
            }
        }

        pub fn pair(p: wit::CandidatePair) -> crate::CandidatePair {
            crate::CandidatePair {
                image_a: p.image_a,
                image_b: p.image_b,
                instance_a: p.instance_a,
                instance_b: p.instance_b,
                category_a: p.category_a,
                category_b: p.category_b,
                phash_a: p.phash_a,
                phash_b: p.phash_b,
                similarity: p.similarity,
                rank: p.rank,
                metadata: p.metadata,
            }
        }

        pub fn verdict(v: crate::Verdict) -> wit::Verdict {
            wit::Verdict {
                keep: v.keep,
                reason: v.reason,
            }
        }
    }
}

/// Exports a [`Reward`] implementation as the component's `reward` world.
#[macro_export]
macro_rules! export_reward {
    ($ty:ty) => {
        $crate::__twin_export_reward!($ty, reward_world, __export_reward_world);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __twin_export_reward {
    ($ty:ty, $world:ident, $export:ident) => {
        const _: () = {
            use $crate::$world::exports::twin::plugin as __exports;
            use $crate::$world::twin::plugin::types as __wit;
            static __STATE: ::std::sync::Mutex<::std::option::Option<$ty>> =
                ::std::sync::Mutex::new(::std::option::Option::None);
            struct __TwinReward;
            impl __exports::module::Guest for __TwinReward {
                fn describe() -> __wit::Descriptor {
                    $crate::__private::$world::descriptor(
                        <$ty as $crate::Reward>::describe(),
                        __wit::ModuleKind::Reward,
                    )
                }
                fn configure(params: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&__STATE, <$ty as $crate::Reward>::configure(&params))
                }
            }
            impl __exports::scorer::Guest for __TwinReward {
                fn score(
                    batch: ::std::vec::Vec<__wit::Rollout>,
                ) -> ::std::result::Result<::std::vec::Vec<__wit::RewardScore>, ::std::string::String> {
                    $crate::__private::with_state(&__STATE, |state| {
                        batch
                            .into_iter()
                            .map(|r| {
                                let r = $crate::__private::$world::rollout(r);
                                <$ty as $crate::Reward>::score(state, &r)
                                    .map($crate::__private::$world::score)
                            })
                            .collect()
                    })
                }
            }
            $crate::$world::$export!(__TwinReward with_types_in $crate::$world);
        };
    };
}

/// Exports a [`Filter`] implementation as the component's `filter` world.
#[macro_export]
macro_rules! export_filter {
    ($ty:ty) => {
        const _: () = {
            use $crate::filter_world::exports::twin::plugin as __exports;
            use $crate::filter_world::twin::plugin::types as __wit;
            static __STATE: ::std::sync::Mutex<::std::option::Option<$ty>> =
                ::std::sync::Mutex::new(::std::option::Option::None);
            struct __TwinFilter;
            impl __exports::module::Guest for __TwinFilter {
                fn describe() -> __wit::Descriptor {
                    $crate::__private::filter_world::descriptor(<$ty as $crate::Filter>::describe())
                }
                fn configure(params: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&__STATE, <$ty as $crate::Filter>::configure(&params))
                }
            }
            impl __exports::judge::Guest for __TwinFilter {
                fn judge(
                    batch: ::std::vec::Vec<__wit::CandidatePair>,
                ) -> ::std::result::Result<::std::vec::Vec<__wit::Verdict>, ::std::string::String> {
                    $crate::__private::with_state(&__STATE, |state| {
                        batch
                            .into_iter()
                            .map(|p| {
                                let p = $crate::__private::filter_world::pair(p);
                                <$ty as $crate::Filter>::judge(state, &p)
                                    .map($crate::__private::filter_world::verdict)
                            })
                            .collect()
                    })
                }
            }
            $crate::filter_world::__export_filter_world!(__TwinFilter with_types_in $crate::filter_world);
        };
    };
}
