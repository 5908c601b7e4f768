//! Benchmark of the Wasm host: `binary-match` in Wasm against the same Rust compiled natively and
//! against CPython running the reference expressions, per-call overhead, filter throughput and
//! the cost of fuel metering. All measured in one run on one machine; medians of repeats.
//!
//! Run: `./deploy/build-modules.sh && cargo run --release -p twin-plugins --example bench_plugins`

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use twin_plugins::{CandidatePair, Grants, Host, HostConfig, QuestionType, Rollout};

const REPEATS: usize = 15;

fn modules_dir() -> PathBuf {
    std::env::var_os("TWIN_MODULES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/guest")
        })
}

fn read_module(name: &str) -> Vec<u8> {
    let path = modules_dir().join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run deploy/build-modules.sh)", path.display()))
}

/// Completions shaped like Qwen2.5-VL's answers to the TWIN pair prompt (~700 characters).
fn rollouts(n: usize) -> Vec<Rollout> {
    let reasons = [
        "Both images show a stainless steel travel mug with a black lid and the same embossed logo near the base. The handle shape, the seam along the side and the proportions match, and the small scratch near the rim appears in both photographs despite the different lighting and background.",
        "The first image shows a ceramic mug with a blue glaze and a rounded handle, while the second mug has a squared handle and a matte finish. The logo is printed rather than embossed, and the rim is noticeably thicker, so these are different products even though the colours are similar.",
    ];
    (0..n)
        .map(|i| {
            let yes = i % 2 == 0;
            let answer = if (i % 7 == 3) != yes { "yes" } else { "no" };
            Rollout {
                prompt: "<image>\n<image>\n\nAre these images of the same or identical products?"
                    .into(),
                completion: format!(
                    "{} Therefore, after comparing the details carefully, <answer>{}</answer>",
                    reasons[i % 2],
                    if i % 5 == 0 {
                        format!(" {answer}. ")
                    } else {
                        answer.to_owned()
                    }
                ),
                ground_truth: if yes { "yes" } else { "no" }.into(),
                question_type: QuestionType::Pair,
                metadata: "{}".into(),
            }
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(mut f: impl FnMut() -> T) -> Duration {
    let mut samples = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let t = Instant::now();
        std::hint::black_box(f());
        samples.push(t.elapsed());
    }
    median(samples)
}

const CPYTHON: &str = r#"
import json, re, string, sys, time
def normalize(s):
    s = s.strip().lower()
    s = s.translate(str.maketrans("", "", string.punctuation)).strip()
    return s or None
def reward(completion, truth):
    m = re.findall(r"<answer>\s*(.*?)\s*</answer>", completion, re.IGNORECASE | re.DOTALL)
    pred = m[-1].strip() if m else None
    p = normalize(pred) if pred is not None else None
    t = normalize(truth)
    return 1.0 if p is not None and t is not None and p == t else 0.0
rows = [json.loads(l) for l in sys.stdin]
out = {}
for n in (1, 64, 2400):
    batch = rows[:n]
    samples = []
    for _ in range(15):
        t = time.perf_counter()
        s = [reward(r["completion"], r["ground_truth"]) for r in batch]
        samples.append(time.perf_counter() - t)
    samples.sort()
    out[n] = {"seconds": samples[len(samples) // 2], "sum": sum(s)}
print(json.dumps(out))
"#;

fn cpython(rows: &[Rollout]) -> serde_json::Value {
    let mut child = Command::new("python3")
        .args(["-c", CPYTHON])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for r in rows {
            writeln!(stdin, "{}", serde_json::to_string(r).expect("json")).expect("write");
        }
    }
    let out = child.wait_with_output().expect("python3 ran");
    serde_json::from_slice(&out.stdout).expect("python3 printed JSON")
}

fn per_item_us(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let host = Host::new(HostConfig::default()).expect("host");
    let unfueled = Host::new(HostConfig {
        consume_fuel: false,
        ..HostConfig::default()
    })
    .expect("host");
    let bm = host
        .load(&read_module("binary_match"))
        .expect("binary-match");
    let bm_nofuel = unfueled
        .load(&read_module("binary_match"))
        .expect("binary-match");
    let rows = rollouts(2400);
    let grants = Grants::default();
    if std::env::var_os("TWIN_BENCH_PROFILE_CALLS").is_some() {
        // For `perf record`: nothing but empty calls, so the profile shows the per-call path.
        for _ in 0..100_000 {
            host.score(&bm, "{}", &grants, None, &[]).expect("score");
        }
        return;
    }
    let py = cpython(&rows);

    println!("binary-match, per rollout (median of {REPEATS}), ~700-char completions");
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>10} {:>12}",
        "batch", "wasm µs", "native µs", "CPython µs", "wasm/nat", "CPython/wasm"
    );
    for n in [1usize, 64, 2400] {
        let batch = &rows[..n];
        let wasm = time(|| host.score(&bm, "{}", &grants, None, batch).expect("score"));
        let native = time(|| {
            batch
                .iter()
                .map(|r| twin_rules::binary_match(&r.completion, &r.ground_truth))
                .sum::<f64>()
        });
        // The same answers in all three, or the comparison means nothing.
        let wasm_sum: f64 = host
            .score(&bm, "{}", &grants, None, batch)
            .expect("score")
            .values
            .iter()
            .map(|s| s.score)
            .sum();
        let native_sum: f64 = batch
            .iter()
            .map(|r| twin_rules::binary_match(&r.completion, &r.ground_truth))
            .sum();
        let py_sum = py[n.to_string()]["sum"].as_f64().expect("sum");
        assert!(
            wasm_sum == native_sum && native_sum == py_sum,
            "scores differ: {wasm_sum} {native_sum} {py_sum}"
        );
        let py_s = py[n.to_string()]["seconds"].as_f64().expect("seconds");
        let (w, nat, p) = (
            per_item_us(wasm, n),
            per_item_us(native, n),
            py_s * 1e6 / n as f64,
        );
        println!(
            "{n:>6} {w:>12.3} {nat:>12.3} {p:>12.3} {:>10.2} {:>12.1}",
            w / nat,
            p / w
        );
    }

    let empty = time(|| host.score(&bm, "{}", &grants, None, &[]).expect("score"));
    let mut many = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        host.score(&bm, "{}", &grants, None, &[]).expect("score");
        many.push(t.elapsed());
    }
    println!(
        "\nper call with an empty batch (fresh store + instantiate from InstancePre + configure + score): median {:.1} µs ({} samples: {:.1} µs)",
        empty.as_secs_f64() * 1e6,
        many.len(),
        median(many).as_secs_f64() * 1e6
    );

    let fueled = time(|| host.score(&bm, "{}", &grants, None, &rows).expect("score"));
    let plain = time(|| {
        unfueled
            .score(&bm_nofuel, "{}", &grants, None, &rows)
            .expect("score")
    });
    println!(
        "fuel: batch 2400 with fuel {:.2} ms, without {:.2} ms: overhead {:.1}%",
        fueled.as_secs_f64() * 1e3,
        plain.as_secs_f64() * 1e3,
        (fueled.as_secs_f64() / plain.as_secs_f64() - 1.0) * 100.0
    );

    let band = host
        .load(&read_module("similarity_band"))
        .expect("similarity-band");
    let dup = host
        .load(&read_module("near_duplicate"))
        .expect("near-duplicate");
    let pairs: Vec<CandidatePair> = (0..10_000u64)
        .map(|i| CandidatePair {
            image_a: format!("{:064x}", i),
            image_b: format!("{:064x}", i + 1),
            instance_a: format!("inst-{}", i / 4),
            instance_b: format!("inst-{}", i / 4 + 1),
            category_a: "mug".into(),
            category_b: "mug".into(),
            phash_a: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            phash_b: i.wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
            similarity: (i % 100) as f64 / 100.0,
            rank: (i % 32) as u32,
            metadata: "{}".into(),
        })
        .collect();
    for (name, module, params) in [
        ("similarity-band", &band, r#"{"min":0.8,"max":0.95}"#),
        ("near-duplicate", &dup, "{}"),
    ] {
        let d = time(|| {
            pairs
                .chunks(1000)
                .map(|c| {
                    host.judge(module, params, &grants, None, c)
                        .expect("judge")
                        .values
                        .len()
                })
                .sum::<usize>()
        });
        println!(
            "filter {name}: {:.0} candidates/s (10,000 in batches of 1,000)",
            pairs.len() as f64 / d.as_secs_f64()
        );
    }
}
