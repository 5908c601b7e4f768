//! A reward module that misbehaves in the way its `mode` parameter names, so the host's limits,
//! trap mapping, output validation and sandbox can be tested against a real component.

use std::hint::black_box;

use serde::Deserialize;
use twin_guest::{Description, Reward, Rollout, Score};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Misbehave {
    mode: String,
}

impl Reward for Misbehave {
    fn describe() -> Description {
        Description::new(
            "misbehave",
            "0.1.0",
            "fails in the way `mode` asks (tests only)",
        )
        .with_parameters(
            r#"{"type":"object","properties":{"mode":{"type":"string"}},"required":["mode"]}"#,
        )
    }

    fn configure(params: &str) -> Result<Self, String> {
        let m: Self = twin_guest::params(params)?;
        if m.mode == "bad-config" {
            return Err("bad-config asked for".into());
        }
        Ok(m)
    }

    fn score(&mut self, r: &Rollout) -> Result<Score, String> {
        match self.mode.as_str() {
            "ok" | "wrong-length" => Ok(Score::new(r.completion.len() as f64)),
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "recursion" => Ok(Score::new(recurse(black_box(1)) as f64)),
            // `std::thread::sleep` lowers to `wasi:clocks/monotonic-clock.subscribe-duration` and
            // `wasi:io/poll`: host calls, where the epoch deadline cannot reach.
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(Score::new(r.completion.len() as f64))
            }
            "sleep-forever" => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            // Outputs over the host's caps. Every rollout's component points at its own 12 MiB
            // name: together more than the host takes in one transfer.
            "huge-component" => Ok(Score::new(0.0).with(&"x".repeat(12 << 20), 1.0)),
            "many-components" => {
                Ok((0..1000).fold(Score::new(0.0), |s, i| s.with(&format!("c{i}"), 1.0)))
            }
            "long-error" => Err("e".repeat(1 << 20)),
            "panic" => panic!("misbehave panicked on purpose"),
            "error" => Err("misbehave returned an error on purpose".into()),
            "nan" => Ok(Score::new(f64::NAN)),
            "infinite-component" => Ok(Score::new(0.0).with("x", f64::INFINITY)),
            // Each observation of the outside world becomes the score.
            "clock" => Ok(Score::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(-1.0),
            )),
            "env" => Ok(Score::new(std::env::vars().count() as f64)),
            "fs" => Ok(Score::new(match std::fs::read_dir("/") {
                Ok(_) => 1.0,
                Err(_) => 0.0,
            })),
            // RandomState seeds itself from WASI's random source.
            "random" => {
                use std::hash::BuildHasher;
                let v = std::collections::hash_map::RandomState::new().hash_one(1u8);
                Ok(Score::new((v % 1_000_000) as f64))
            }
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

/// Recursion that lives on the Wasm stack (no locals in linear memory), so it exhausts the
/// engine's stack limit rather than the guest's shadow stack.
#[inline(never)]
fn recurse(n: u64) -> u64 {
    if black_box(n) == u64::MAX {
        return 0;
    }
    recurse(black_box(n + 1)).wrapping_mul(3).wrapping_add(n)
}

// Exported through the raw bindings rather than `export_reward!`, which always returns one score
// per rollout: this module must be able to return the wrong number.
mod raw {
    use std::sync::Mutex;

    use twin_guest::reward_world::exports::twin::plugin::{module, scorer};
    use twin_guest::reward_world::twin::plugin::types as wit;
    use twin_guest::{Reward, Rollout};

    use super::Misbehave;

    static STATE: Mutex<Option<Misbehave>> = Mutex::new(None);

    pub struct Raw;

    impl module::Guest for Raw {
        fn describe() -> wit::Descriptor {
            let d = Misbehave::describe();
            wit::Descriptor {
                name: d.name,
                version: d.version,
                kind: wit::ModuleKind::Reward,
                summary: d.summary,
                parameters_schema: d.parameters_schema,
            }
        }

        fn configure(params: String) -> Result<(), String> {
            let m = Misbehave::configure(&params)?;
            *STATE.lock().unwrap() = Some(m);
            Ok(())
        }
    }

    impl scorer::Guest for Raw {
        fn score(batch: Vec<wit::Rollout>) -> Result<Vec<wit::RewardScore>, String> {
            let mut guard = STATE.lock().unwrap();
            let state = guard.as_mut().ok_or("not configured")?;
            let n = batch.len();
            let mut out = Vec::new();
            for r in batch {
                let r = Rollout {
                    prompt: r.prompt,
                    completion: r.completion,
                    ground_truth: r.ground_truth,
                    question_type: twin_guest::QuestionType::Other,
                    metadata: r.metadata,
                };
                let s = state.score(&r)?;
                out.push(wit::RewardScore {
                    score: s.score,
                    components: s
                        .components
                        .into_iter()
                        .map(|(name, value)| wit::ScoreComponent { name, value })
                        .collect(),
                });
            }
            if state.mode == "wrong-length" {
                out.truncate(n.saturating_sub(1));
            }
            Ok(out)
        }
    }

    twin_guest::reward_world::__export_reward_world!(Raw with_types_in twin_guest::reward_world);
}
