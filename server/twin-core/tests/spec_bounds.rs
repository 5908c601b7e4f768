//! Every count, size and ratio of the ingest, mine, build-dataset and score specs has a named
//! maximum: a submission at the maximum is accepted, one past it is refused naming the field,
//! and the OpenAPI schema states the same number the code checks.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use serde_json::{Value, json};
use twin_core::build_config::{
    MAX_HARD_SHARE, MAX_IMAGE_SIDE, MAX_MULTI_QUESTIONS, MAX_POSITIVES_PER_INSTANCE,
    MAX_RANDOM_NEGATIVES_PER_INSTANCE, MAX_RANDOM_NEGATIVES_PER_SPLIT, MIN_HARD_SHARE,
};
use twin_core::dataset::{MAX_MINES, MAX_SYNTHETIC_BLOBS};
use twin_core::mine::{
    MAX_FILTERS, MAX_HNSW_EF, MAX_MINE_BATCH, MAX_NEIGHBOURS, MAX_RECALL_SAMPLE,
};
use twin_core::score::{
    MAX_BATCH, MAX_DEADLINE_MS, MAX_FUEL, MAX_LOOKUP_BYTES, MAX_LOOKUP_ENTRIES, MAX_MEMORY_MB,
    MAX_NAME_BYTES, MAX_REWARD_TERMS, MAX_REWARD_WEIGHT,
};
use twin_core::spec::JobSubmission;

const HASH: &str = "abababababababababababababababababababababababababababababababab";

fn mine(extra: Value) -> Value {
    let mut spec = json!({"kind": "mine", "dataset": "d", "model": "/m"});
    merge(&mut spec, extra);
    json!({ "spec": spec })
}

fn score(extra: Value) -> Value {
    let mut spec = json!({"kind": "score", "rollouts": HASH, "reward": {"module": "m"}});
    merge(&mut spec, extra);
    json!({ "spec": spec })
}

fn build(extra: Value) -> Value {
    let mut spec = json!({"kind": "build-dataset", "name": "b", "dataset": "d"});
    merge(&mut spec, extra);
    json!({ "spec": spec })
}

fn build_options(options: Value) -> Value {
    build(json!({ "options": options }))
}

fn merge(into: &mut Value, extra: Value) {
    let (Value::Object(into), Value::Object(extra)) = (into, extra) else {
        panic!("specs and their changes are objects");
    };
    into.extend(extra);
}

/// `Ok(())` for an accepted submission, or the field its refusal names.
fn outcome(submission: Value) -> Result<(), String> {
    JobSubmission::from_json(submission)
        .map(|_| ())
        .map_err(|e| e.field().to_owned())
}

/// Given a submission at a maximum and one past it, when both are submitted, then the first is
/// accepted and the second refused naming `field`.
fn check(field: &str, at_maximum: Value, past_maximum: Value) {
    assert_eq!(outcome(at_maximum.clone()), Ok(()), "{at_maximum}");
    assert_eq!(
        outcome(past_maximum.clone()),
        Err(field.to_owned()),
        "{past_maximum}"
    );
}

fn filters(n: usize) -> Value {
    (0..n).map(|i| json!({"module": format!("f{i}")})).collect()
}

fn terms(n: usize) -> Value {
    (0..n)
        .map(|i| json!({"module": format!("m{i}"), "weight": 1.0}))
        .collect()
}

fn job_ids(n: usize) -> Value {
    (0..n).map(|i| format!("mine-{i}")).collect()
}

#[test]
fn mine_counts_stop_at_their_maxima() {
    check(
        "spec.batch_size",
        mine(json!({"batch_size": MAX_MINE_BATCH})),
        mine(json!({"batch_size": MAX_MINE_BATCH + 1})),
    );
    check(
        "spec.k",
        mine(json!({"k": MAX_NEIGHBOURS})),
        mine(json!({"k": MAX_NEIGHBOURS + 1})),
    );
    check(
        "spec.filter_batch",
        mine(json!({"filter_batch": MAX_BATCH})),
        mine(json!({"filter_batch": MAX_BATCH + 1})),
    );
    check(
        "spec.hnsw.ef_construction",
        mine(json!({"hnsw": {"ef_construction": MAX_HNSW_EF}})),
        mine(json!({"hnsw": {"ef_construction": MAX_HNSW_EF + 1}})),
    );
    check(
        "spec.hnsw.ef_search",
        mine(json!({"hnsw": {"ef_search": MAX_HNSW_EF}})),
        mine(json!({"hnsw": {"ef_search": 0}})),
    );
    check(
        "spec.recall_sample",
        mine(json!({"recall_sample": MAX_RECALL_SAMPLE})),
        mine(json!({"recall_sample": MAX_RECALL_SAMPLE + 1})),
    );
    check(
        "spec.filters",
        mine(json!({"filters": filters(MAX_FILTERS)})),
        mine(json!({"filters": filters(MAX_FILTERS + 1)})),
    );
    check(
        "spec.filters[0].name",
        mine(json!({"filters": [{"module": "f", "name": "n".repeat(MAX_NAME_BYTES)}]})),
        mine(json!({"filters": [{"module": "f", "name": "n".repeat(MAX_NAME_BYTES + 1)}]})),
    );
    // Mine jobs run filter modules: their limits are a job's limits like any other.
    check(
        "spec.limits.memory_mb",
        mine(json!({"limits": {"memory_mb": MAX_MEMORY_MB}})),
        mine(json!({"limits": {"memory_mb": MAX_MEMORY_MB + 1}})),
    );
}

#[test]
fn score_counts_stop_at_their_maxima() {
    check(
        "spec.batch_size",
        score(json!({"batch_size": MAX_BATCH})),
        score(json!({"batch_size": MAX_BATCH + 1})),
    );
    check(
        "spec.reward.weighted_sum",
        score(json!({"reward": {"weighted_sum": terms(MAX_REWARD_TERMS)}})),
        score(json!({"reward": {"weighted_sum": terms(MAX_REWARD_TERMS + 1)}})),
    );
    check(
        "spec.reward.weighted_sum[0].weight",
        score(json!({"reward": {"weighted_sum": [{"module": "m", "weight": -MAX_REWARD_WEIGHT}]}})),
        score(json!({"reward": {"weighted_sum": [{"module": "m", "weight": 1e300}]}})),
    );
    check(
        "spec.reward.weighted_sum[0].name",
        score(json!({"reward": {"weighted_sum": [
            {"module": "m", "weight": 1.0, "name": "n".repeat(MAX_NAME_BYTES)}]}})),
        score(json!({"reward": {"weighted_sum": [
            {"module": "m", "weight": 1.0, "name": "n".repeat(MAX_NAME_BYTES + 1)}]}})),
    );
    check(
        "spec.limits.fuel",
        score(json!({"limits": {"fuel": MAX_FUEL}})),
        score(json!({"limits": {"fuel": MAX_FUEL + 1}})),
    );
    check(
        "spec.limits.deadline_ms",
        score(json!({"limits": {"deadline_ms": MAX_DEADLINE_MS}})),
        score(json!({"limits": {"deadline_ms": MAX_DEADLINE_MS + 1}})),
    );
    let table = |entries: usize| -> Value {
        (0..entries)
            .map(|i| (format!("{i:06}"), Value::from("")))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    check(
        "spec.grants.lookup",
        score(json!({"grants": {"lookup": table(MAX_LOOKUP_ENTRIES)}})),
        score(json!({"grants": {"lookup": table(MAX_LOOKUP_ENTRIES + 1)}})),
    );
    check(
        "spec.grants.lookup",
        score(json!({"grants": {"lookup": {"k": "v".repeat(MAX_LOOKUP_BYTES - 1)}}})),
        score(json!({"grants": {"lookup": {"k": "v".repeat(MAX_LOOKUP_BYTES)}}})),
    );
}

#[test]
fn build_dataset_counts_and_ratios_stop_at_their_maxima() {
    check(
        "spec.mines",
        build(json!({"mines": job_ids(MAX_MINES)})),
        build(json!({"mines": job_ids(MAX_MINES + 1)})),
    );
    let blobs = |n: usize| vec![HASH; n];
    check(
        "spec.synthetic",
        build(json!({"synthetic": blobs(MAX_SYNTHETIC_BLOBS)})),
        build(json!({"synthetic": blobs(MAX_SYNTHETIC_BLOBS + 1)})),
    );
    check(
        "spec.options.positives_per_instance",
        build_options(json!({"positives_per_instance": MAX_POSITIVES_PER_INSTANCE})),
        build_options(json!({"positives_per_instance": MAX_POSITIVES_PER_INSTANCE + 1})),
    );
    check(
        "spec.options.random_negatives_per_instance",
        build_options(json!({
            "negatives": "random",
            "random_negatives_per_instance": MAX_RANDOM_NEGATIVES_PER_INSTANCE})),
        build_options(json!({
            "negatives": "random",
            "random_negatives_per_instance": MAX_RANDOM_NEGATIVES_PER_INSTANCE + 1})),
    );
    // The bug of issue 15: any u32 reached an allocation sized by it.
    check(
        "spec.options.random_negatives_per_instance",
        build_options(json!({})),
        build_options(json!({"random_negatives_per_instance": u32::MAX})),
    );
    check(
        "spec.options.multi_questions.train",
        build_options(json!({"multi_questions": {"train": MAX_MULTI_QUESTIONS}})),
        build_options(json!({"multi_questions": {"train": u32::MAX - 3}})),
    );
    check(
        "spec.options.max_side",
        build_options(json!({"max_side": MAX_IMAGE_SIDE})),
        build_options(json!({"max_side": MAX_IMAGE_SIDE + 1})),
    );
    // The bug of issue 15: a share of 1e-6 asked for a million random negatives per hard one.
    for (at_bound, past_bound) in [(MIN_HARD_SHARE, 1e-6), (MAX_HARD_SHARE, 0.999)] {
        check(
            "spec.options.hard_share",
            build_options(json!({"negatives": "both", "hard_share": at_bound})),
            build_options(json!({"negatives": "both", "hard_share": past_bound})),
        );
    }
}

/// The schema of `T` as JSON, for reading the bounds the OpenAPI document states.
fn schema<T: utoipa::PartialSchema>() -> Value {
    serde_json::to_value(T::schema()).unwrap()
}

/// The `keyword` (`maximum`, `minimum`, `maxItems`, `maxLength`) of property `path` (dotted,
/// through inline objects).
fn bound(schema: &Value, path: &str, keyword: &str) -> f64 {
    let mut at = schema;
    for part in path.split('.') {
        at = &at["properties"][part];
        // An optional field is `oneOf: [null, T]` or `type: [T, "null"]`; the bound is on T.
        if let Some(branches) = at.get("oneOf").and_then(Value::as_array) {
            at = branches.iter().find(|b| b["type"] != "null").unwrap();
        }
    }
    at[keyword]
        .as_f64()
        .unwrap_or_else(|| panic!("{path} has no {keyword} in {schema}"))
}

#[test]
fn the_openapi_schema_states_the_maxima_the_code_checks() {
    use twin_core::mine::{HnswParams, MineSpec};
    use twin_core::score::{ModuleLimits, RewardSpec, RewardTerm, ScoreSpec};

    let mine = schema::<MineSpec>();
    let hnsw = schema::<HnswParams>();
    let score = schema::<ScoreSpec>();
    let reward = schema::<RewardSpec>();
    let term = schema::<RewardTerm>();
    let limits = schema::<ModuleLimits>();
    let filter = schema::<twin_core::mine::FilterStep>();
    let build = schema::<twin_core::dataset::BuildDatasetSpec>();
    for (schema, path, name, want) in [
        (&mine, "batch_size", "maximum", f64::from(MAX_MINE_BATCH)),
        (&mine, "k", "maximum", f64::from(MAX_NEIGHBOURS)),
        (&mine, "filter_batch", "maximum", f64::from(MAX_BATCH)),
        (
            &mine,
            "recall_sample",
            "maximum",
            f64::from(MAX_RECALL_SAMPLE),
        ),
        (&mine, "filters", "maxItems", MAX_FILTERS as f64),
        (&hnsw, "ef_construction", "maximum", f64::from(MAX_HNSW_EF)),
        (&hnsw, "ef_search", "maximum", f64::from(MAX_HNSW_EF)),
        (&filter, "name", "maxLength", MAX_NAME_BYTES as f64),
        (&score, "batch_size", "maximum", f64::from(MAX_BATCH)),
        (&reward, "weighted_sum", "maxItems", MAX_REWARD_TERMS as f64),
        (&term, "weight", "maximum", MAX_REWARD_WEIGHT),
        (&term, "weight", "minimum", -MAX_REWARD_WEIGHT),
        (&term, "name", "maxLength", MAX_NAME_BYTES as f64),
        (&limits, "fuel", "maximum", MAX_FUEL as f64),
        (&limits, "deadline_ms", "maximum", MAX_DEADLINE_MS as f64),
        (&limits, "memory_mb", "maximum", MAX_MEMORY_MB as f64),
        (&build, "mines", "maxItems", MAX_MINES as f64),
        (&build, "synthetic", "maxItems", MAX_SYNTHETIC_BLOBS as f64),
    ] {
        assert_eq!(bound(schema, path, name), want, "{path}.{name}");
    }
    // `options` is a free object in the schema (twin-core's `BuildConfig` is read from it by
    // hand), so its description carries the bounds.
    let options = build["properties"]["options"]["description"]
        .as_str()
        .unwrap();
    for bound in [
        MAX_POSITIVES_PER_INSTANCE.to_string(),
        MAX_RANDOM_NEGATIVES_PER_INSTANCE.to_string(),
        MAX_MULTI_QUESTIONS.to_string(),
        MAX_IMAGE_SIDE.to_string(),
        MAX_RANDOM_NEGATIVES_PER_SPLIT.to_string(),
        format!("{MIN_HARD_SHARE} to {MAX_HARD_SHARE}"),
    ] {
        assert!(options.contains(&bound), "{options:?} lacks {bound}");
    }
}
