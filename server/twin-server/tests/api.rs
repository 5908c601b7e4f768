//! In-process API tests: the real service, log and blob store behind actix's test harness.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use serde_json::{Value, json};
use twin_server::api::{self, Limits};
use twin_server::auth::{Auth, TokenConfig};
use twin_server::metrics::Metrics;
use twin_server::service::Service;

const LIMITS: Limits = Limits {
    max_json_bytes: 64 * 1024,
    max_blob_bytes: 1024,
    storage_reserve_bytes: 0,
};

struct Harness {
    svc: Arc<Service>,
    auth: Arc<Auth>,
    _dir: tempfile::TempDir,
}

fn harness(tokens: &[(&str, &str, &[&str])]) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::open(
        dir.path(),
        Duration::from_secs(30),
        Arc::new(Metrics::new()),
        Arc::new(twin_plugins::Host::new(twin_plugins::HostConfig::default()).unwrap()),
    )
    .unwrap();
    let configs: Vec<TokenConfig> = tokens
        .iter()
        .map(|(name, token, roles)| {
            serde_json::from_value(json!({"name": name, "token": token, "roles": roles})).unwrap()
        })
        .collect();
    Harness {
        svc,
        auth: Arc::new(Auth::new(&configs).unwrap()),
        _dir: dir,
    }
}

macro_rules! call {
    ($h:expr, $req:expr) => {{
        let app = test::init_service(api::app($h.svc.clone(), $h.auth.clone(), LIMITS)).await;
        let resp = test::call_service(&app, $req.to_request()).await;
        let status = resp.status();
        let body = test::read_body(resp).await;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, json)
    }};
}

fn ingest(dataset: &str) -> Value {
    json!({"spec": {"kind": "ingest", "dataset": dataset, "source": {"dir": "/nonexistent"}}})
}

fn assert_error(got: &(StatusCode, Value), status: u16, code: &str, mentions: &str) {
    assert_eq!(got.0.as_u16(), status, "{:?}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{:?}", got.1);
    let message = got.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "message {message:?} should mention {mentions:?}"
    );
}

#[actix_web::test]
async fn bad_specs_are_refused_with_the_field_named() {
    let h = harness(&[]);
    let post = |body: Value| TestRequest::post().uri("/v1/jobs").set_json(body);
    assert_error(
        &call!(h, post(json!({"spec": {"kind": "ingest", "dataset": "d"}}))),
        400,
        "invalid_spec",
        "spec.source",
    );
    assert_error(
        &call!(
            h,
            post(
                json!({"spec": {"kind": "ingest", "dataset": "d", "source": {"dir": "rel/ative"}}})
            )
        ),
        400,
        "invalid_spec",
        "spec.source.dir",
    );
    assert_error(
        &call!(h, post(json!({"spec": {"kind": "synthesize"}}))),
        400,
        "kind_not_built",
        "synthesize",
    );
    assert_error(
        &call!(h, post(json!({"spec": {"kind": "juggle"}}))),
        400,
        "unknown_kind",
        "juggle",
    );
    let mut with_exp = ingest("d");
    with_exp["experiment"] = json!("nope");
    assert_error(&call!(h, post(with_exp)), 400, "invalid_spec", "experiment");
    let not_json = TestRequest::post()
        .uri("/v1/jobs")
        .insert_header(("content-type", "application/json"))
        .set_payload("{nope");
    assert_error(&call!(h, not_json), 400, "invalid_body", "body");
    assert_eq!(h.svc.last_seq(), 0, "nothing was recorded");
}

#[actix_web::test]
async fn unknown_and_malformed_ids_and_routes() {
    let h = harness(&[]);
    assert_error(
        &call!(
            h,
            TestRequest::get().uri("/v1/jobs/01aaaaaaaaaaaaaaaaaaaaaaaa")
        ),
        404,
        "not_found",
        "01aaaaaaaaaaaaaaaaaaaaaaaa",
    );
    assert_error(
        &call!(h, TestRequest::get().uri("/v1/jobs/NOT%20AN%20ID")),
        400,
        "invalid_id",
        "job id",
    );
    assert_error(
        &call!(
            h,
            TestRequest::post()
                .uri("/v1/jobs/01aaaaaaaaaaaaaaaaaaaaaaaa/cancel")
                .insert_header(("x-twin-client", "test"))
        ),
        404,
        "not_found",
        "job",
    );
    assert_error(
        &call!(h, TestRequest::get().uri("/v1/nothing-here")),
        404,
        "route_not_found",
        "/v1/nothing-here",
    );
    assert_error(
        &call!(h, TestRequest::get().uri("/v1/blobs/abc")),
        400,
        "invalid_id",
        "blob hash",
    );
    assert_error(
        &call!(h, TestRequest::get().uri("/v1/jobs?state=sleeping")),
        400,
        "invalid_query",
        "state",
    );
}

#[actix_web::test]
async fn tokens_and_roles_are_enforced_and_the_actor_is_recorded() {
    let h = harness(&[
        ("alice", "alice-secret", &["submit"]),
        ("viewer", "view-secret", &["read"]),
    ]);
    let submit = || TestRequest::post().uri("/v1/jobs").set_json(ingest("d"));
    assert_error(&call!(h, submit()), 401, "unauthenticated", "Bearer");
    assert_error(
        &call!(h, submit().insert_header(("authorization", "Bearer wrong"))),
        401,
        "bad_token",
        "unknown token",
    );
    assert_error(
        &call!(
            h,
            submit().insert_header(("authorization", "Bearer view-secret"))
        ),
        403,
        "forbidden",
        "submit",
    );
    let ok = call!(
        h,
        submit().insert_header(("authorization", "Bearer alice-secret"))
    );
    assert_eq!(ok.0, StatusCode::CREATED, "{:?}", ok.1);
    assert_eq!(ok.1["submitted_by"], "alice");
    let events = call!(
        h,
        TestRequest::get()
            .uri("/v1/events")
            .insert_header(("authorization", "Bearer view-secret"))
    );
    assert_eq!(
        events.1["events"][0]["actor"], "alice",
        "every mutation records its actor"
    );
    let lease = TestRequest::post()
        .uri("/v1/executors/lease")
        .set_json(json!({"executor": "x"}));
    assert_error(
        &call!(
            h,
            lease.insert_header(("authorization", "Bearer alice-secret"))
        ),
        403,
        "forbidden",
        "execute",
    );
    // Operational endpoints stay open for probes and scrapers.
    assert_eq!(
        call!(h, TestRequest::get().uri("/healthz")).0,
        StatusCode::OK
    );
}

#[actix_web::test]
async fn oversized_bodies_get_413() {
    let h = harness(&[]);
    let big = json!({"spec": {"kind": "ingest", "dataset": "d", "source": {"dir": format!("/{}", "x".repeat(70_000))}}});
    assert_error(
        &call!(h, TestRequest::post().uri("/v1/jobs").set_json(big)),
        413,
        "payload_too_large",
        "65536",
    );
    let blob = vec![7u8; 2048];
    let hash = twin_core::BlobHash::of(&blob);
    let put = TestRequest::put()
        .uri(&format!("/v1/blobs/{hash}"))
        .set_payload(blob);
    assert_error(&call!(h, put), 413, "payload_too_large", "1024");
}

#[actix_web::test]
async fn idempotency_keys_replay_or_conflict() {
    let h = harness(&[]);
    let post = |body: Value| {
        TestRequest::post()
            .uri("/v1/jobs")
            .insert_header(("idempotency-key", "k-1"))
            .set_json(body)
    };
    let first = call!(h, post(ingest("d")));
    assert_eq!(first.0, StatusCode::CREATED);
    let again = call!(h, post(ingest("d")));
    assert_eq!(again.0, StatusCode::OK, "a replay answers 200");
    assert_eq!(again.1["id"], first.1["id"], "the original job comes back");
    assert_error(
        &call!(h, post(ingest("other"))),
        409,
        "idempotency_key_reused",
        "k-1",
    );
    let jobs = call!(h, TestRequest::get().uri("/v1/jobs"));
    assert_eq!(jobs.1.as_array().map(Vec::len), Some(1));
}

#[actix_web::test]
async fn blobs_are_checked_against_their_hash() {
    let h = harness(&[]);
    let hash = twin_core::BlobHash::of(b"hello");
    let wrong = twin_core::BlobHash::of(b"other");
    assert_error(
        &call!(
            h,
            TestRequest::put()
                .uri(&format!("/v1/blobs/{wrong}"))
                .set_payload("hello")
        ),
        400,
        "blob_hash_mismatch",
        &hash.to_hex(),
    );
    assert_eq!(
        call!(
            h,
            TestRequest::put()
                .uri(&format!("/v1/blobs/{hash}"))
                .set_payload("hello")
        )
        .0,
        StatusCode::CREATED
    );
    let app = test::init_service(api::app(h.svc.clone(), h.auth.clone(), LIMITS)).await;
    let got = test::call_and_read_body(
        &app,
        TestRequest::get()
            .uri(&format!("/v1/blobs/{hash}"))
            .to_request(),
    )
    .await;
    assert_eq!(&got[..], b"hello");
    assert_error(
        &call!(h, TestRequest::get().uri(&format!("/v1/blobs/{wrong}"))),
        404,
        "not_found",
        &wrong.to_hex(),
    );
}

#[actix_web::test]
async fn the_executor_protocol_is_fenced_by_epoch() {
    let h = harness(&[]);
    let job = call!(h, TestRequest::post().uri("/v1/jobs").set_json(ingest("d"))).1;
    let id = job["id"].as_str().unwrap().to_owned();
    let lease = call!(
        h,
        TestRequest::post()
            .uri("/v1/executors/lease")
            .set_json(json!({"executor": "e1", "capabilities": {"kinds": ["ingest"]}}))
    );
    assert_eq!(lease.0, StatusCode::OK, "{:?}", lease.1);
    assert_eq!(lease.1["epoch"], 1);
    let none = call!(
        h,
        TestRequest::post()
            .uri("/v1/executors/lease")
            .set_json(json!({"executor": "e2", "capabilities": {"kinds": ["ingest"]}}))
    );
    assert_eq!(
        none.0,
        StatusCode::NO_CONTENT,
        "a leased job is not leased twice"
    );
    let stale = |verb: &str, body: Value| {
        TestRequest::post()
            .uri(&format!("/v1/jobs/{id}/{verb}"))
            .set_json(body)
    };
    assert_error(
        &call!(h, stale("heartbeat", json!({"epoch": 7}))),
        409,
        "stale_epoch",
        "epoch 7",
    );
    assert_error(
        &call!(h, stale("start", json!({"epoch": 2}))),
        409,
        "stale_epoch",
        "epoch 2",
    );
    assert_error(
        &call!(h, stale("fail", json!({"epoch": 0, "error": "x"}))),
        409,
        "stale_epoch",
        "epoch 0",
    );
    assert_error(
        &call!(
            h,
            stale(
                "progress",
                json!({"epoch": 1, "message": "m", "fraction": 2.0})
            )
        ),
        400,
        "invalid_body",
        "fraction",
    );
    assert_error(
        &call!(
            h,
            stale(
                "artefacts",
                json!({"epoch": 1, "name": "m", "blob": twin_core::BlobHash::of(b"?")})
            )
        ),
        400,
        "invalid_body",
        "upload it first",
    );
    assert_error(
        &call!(h, stale("fail", json!({"epoch": 1}))),
        400,
        "invalid_body",
        "error",
    );
    let failed = call!(
        h,
        stale(
            "fail",
            json!({"epoch": 1, "error": "disk on fire", "retryable": false})
        )
    );
    assert_eq!(failed.1["status"], "failed");
    assert_eq!(failed.1["attempts"][0]["error"], "disk on fire");
    assert_error(
        &call!(h, stale("heartbeat", json!({"epoch": 1}))),
        409,
        "invalid_state",
        "failed",
    );
}

#[actix_web::test]
async fn the_openapi_document_lists_every_route() {
    let doc = serde_json::to_value(api::openapi()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut routes = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(
            !text.contains(".route("),
            "register routes with service(), never route(): they would miss the document"
        );
        for line in text.lines().map(str::trim) {
            for method in ["get", "post", "put", "head", "delete", "patch"] {
                if let Some(rest) = line.strip_prefix(&format!("#[{method}(\"")) {
                    let path = rest.split('"').next().unwrap();
                    let full = if ["/healthz", "/metrics"].contains(&path) {
                        path.to_owned()
                    } else {
                        format!("/v1{path}")
                    };
                    routes.push((method, full));
                }
            }
        }
    }
    assert!(
        routes.len() >= 20,
        "found only {} route macros",
        routes.len()
    );
    for (method, path) in &routes {
        assert!(
            paths.get(path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is missing from the OpenAPI document"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        routes.len(),
        "the document lists operations that no route serves"
    );
}

#[actix_web::test]
async fn leases_go_by_priority_then_age_and_respect_requirements() {
    let h = harness(&[]);
    let submit = |body: Value| TestRequest::post().uri("/v1/jobs").set_json(body);
    let with = |extra: Value| {
        let mut b = ingest("d");
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let old_low = call!(h, submit(with(json!({"priority": 0})))).1["id"].clone();
    let high = call!(h, submit(with(json!({"priority": 9})))).1["id"].clone();
    let newer_low = call!(h, submit(with(json!({"priority": 0})))).1["id"].clone();
    let gpu = call!(
        h,
        submit(with(
            json!({"priority": 50, "requirements": {"gpus": 1, "labels": ["a100"]}})
        ))
    )
    .1["id"]
        .clone();
    let lease = |caps: Value| {
        TestRequest::post()
            .uri("/v1/executors/lease")
            .set_json(json!({"executor": "e", "capabilities": caps}))
    };
    let cpu = json!({"kinds": ["ingest"]});
    let order: Vec<Value> = vec![
        call!(h, lease(cpu.clone())).1["job"]["id"].clone(),
        call!(h, lease(cpu.clone())).1["job"]["id"].clone(),
        call!(h, lease(cpu.clone())).1["job"]["id"].clone(),
    ];
    assert_eq!(
        order,
        vec![high, old_low, newer_low],
        "priority first, then the oldest"
    );
    assert_eq!(
        call!(h, lease(cpu)).0,
        StatusCode::NO_CONTENT,
        "a CPU executor never gets the GPU job"
    );
    assert_eq!(
        call!(h, lease(json!({"kinds": ["ingest"], "gpus": 2}))).0,
        StatusCode::NO_CONTENT,
        "labels must match too"
    );
    assert_eq!(
        call!(
            h,
            lease(json!({"kinds": ["mine"], "gpus": 2, "labels": ["a100"]}))
        )
        .0,
        StatusCode::NO_CONTENT,
        "and the kind"
    );
    let got = call!(
        h,
        lease(json!({"kinds": ["ingest"], "gpus": 2, "labels": ["a100", "x"]}))
    );
    assert_eq!(got.1["job"]["id"], gpu);
}

#[actix_web::test]
async fn experiments_group_jobs_and_names_are_unique() {
    let h = harness(&[]);
    let create = |name: &str| {
        TestRequest::post()
            .uri("/v1/experiments")
            .set_json(json!({"name": name}))
    };
    assert_eq!(call!(h, create("shoes")).0, StatusCode::CREATED);
    assert_error(
        &call!(h, create("shoes")),
        409,
        "experiment_exists",
        "shoes",
    );
    assert_error(&call!(h, create("Bad Name")), 400, "invalid_body", "name");
    let mut body = ingest("d");
    body["experiment"] = json!("shoes");
    let job = call!(h, TestRequest::post().uri("/v1/jobs").set_json(body)).1;
    let exp = call!(h, TestRequest::get().uri("/v1/experiments/shoes")).1;
    assert_eq!(exp["jobs"][0], job["id"]);
    let listed = call!(h, TestRequest::get().uri("/v1/jobs?experiment=shoes")).1;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
}

#[actix_web::test]
async fn only_the_lease_holder_may_act_on_a_lease() {
    let h = harness(&[
        ("boss", "boss-secret", &["submit"]),
        ("gpu-a", "a-secret", &["execute"]),
        ("gpu-b", "b-secret", &["execute"]),
    ]);
    let job = call!(
        h,
        TestRequest::post()
            .uri("/v1/jobs")
            .insert_header(("authorization", "Bearer boss-secret"))
            .set_json(ingest("d"))
    )
    .1;
    let id = job["id"].as_str().unwrap().to_owned();
    let lease = TestRequest::post()
        .uri("/v1/executors/lease")
        .insert_header(("authorization", "Bearer a-secret"))
        .set_json(json!({"executor": "a", "capabilities": {"kinds": ["ingest"]}}));
    assert_eq!(call!(h, lease).1["epoch"], 1);
    let as_b = |verb: &str, body: Value| {
        TestRequest::post()
            .uri(&format!("/v1/jobs/{id}/{verb}"))
            .insert_header(("authorization", "Bearer b-secret"))
            .set_json(body)
    };
    let heartbeat = as_b("heartbeat", json!({"epoch": 1}));
    assert_error(&call!(h, heartbeat), 409, "not_lease_holder", "gpu-a");
    let fail = as_b("fail", json!({"epoch": 1, "error": "not mine"}));
    assert_error(&call!(h, fail), 409, "not_lease_holder", "gpu-a");
    let release = as_b("release", json!({"epoch": 1}));
    assert_error(&call!(h, release), 409, "not_lease_holder", "gpu-a");
    let mine = TestRequest::post()
        .uri(&format!("/v1/jobs/{id}/start"))
        .insert_header(("authorization", "Bearer a-secret"))
        .set_json(json!({"epoch": 1}));
    assert_eq!(call!(h, mine).1["status"], "running");
}

#[actix_web::test]
async fn large_blobs_download_whole_in_chunks() {
    let h = harness(&[]);
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let hash = h.svc.blobs.put(&big).unwrap();
    let app = test::init_service(api::app(h.svc.clone(), h.auth.clone(), LIMITS)).await;
    let req = TestRequest::get()
        .uri(&format!("/v1/blobs/{hash}"))
        .to_request();
    let got = test::call_and_read_body(&app, req).await;
    assert_eq!(got.len(), big.len());
    assert_eq!(twin_core::BlobHash::of(&got), hash);
}

#[actix_web::test]
async fn eval_submissions_are_checked_and_pinned_at_submission() {
    let h = harness(&[]);
    let post = |body: Value| TestRequest::post().uri("/v1/jobs").set_json(body);
    let eval = |extra: Value| {
        let mut spec = json!({"kind": "eval", "model": "/models/qwen",
                              "data": {"questions": "/data/fgvqa/questions.jsonl"}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({ "spec": spec })
    };
    assert_error(
        &call!(h, post(eval(json!({"data": {"built": "nope"}})))),
        400,
        "invalid_spec",
        "spec.data.built: no built dataset `nope`",
    );
    assert_error(
        &call!(h, post(eval(json!({"max_new_tokens": 0})))),
        400,
        "invalid_spec",
        "spec.max_new_tokens: must be between 1 and 32768",
    );
    assert_error(
        &call!(h, post(eval(json!({"max_new_tokens": "many"})))),
        400,
        "invalid_spec",
        "spec.max_new_tokens: invalid type",
    );
    assert_error(
        &call!(h, post(eval(json!({"device": "cuda"})))),
        400,
        "invalid_spec",
        "spec.device: CUDA was requested but no executor has a GPU",
    );
    assert_error(
        &call!(h, post(eval(json!({})))),
        400,
        "invalid_spec",
        "spec.scorers.pair.module: no module `fgvqa-pair` is registered; register the \
         catalogue's scorer, e.g. `twin modules add target/wasm32-wasip2/guest/fgvqa_pair.wasm \
         --name fgvqa-pair`",
    );
    // Nothing was logged.
    let (status, jobs) = call!(h, TestRequest::get().uri("/v1/jobs"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(jobs, json!([]));

    // The job's spec and result are in the OpenAPI document.
    let doc = serde_json::to_value(api::openapi()).unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "EvalJobSpec",
        "EvalJobOutput",
        "EvalJobResult",
        "SubsetMetrics",
        "EvalData",
        "EvalScorers",
    ] {
        assert!(
            schemas.contains_key(name),
            "{name} is missing from the document"
        );
    }
}

fn lease_req(executor: &str) -> TestRequest {
    TestRequest::post()
        .uri("/v1/executors/lease")
        .set_json(json!({"executor": executor, "capabilities": {"kinds": ["ingest"]}}))
}

fn verb(id: &str, verb: &str, body: Value) -> TestRequest {
    TestRequest::post()
        .uri(&format!("/v1/jobs/{id}/{verb}"))
        .set_json(body)
}

/// Submits an ingest job with these top-level fields (retry, priority); returns its id.
async fn submit_with(h: &Harness, fields: Value) -> String {
    let mut body = ingest("d");
    for (k, v) in fields.as_object().unwrap() {
        body[k] = v.clone();
    }
    let job = call!(h, TestRequest::post().uri("/v1/jobs").set_json(body));
    assert_eq!(job.0, StatusCode::CREATED, "{:?}", job.1);
    job.1["id"].as_str().unwrap().to_owned()
}

/// The job's events, as the API lists them.
async fn job_events(h: &Harness, id: &str) -> Vec<Value> {
    let page = call!(
        h,
        TestRequest::get().uri(&format!("/v1/events?prefix=job/{id}"))
    );
    page.1["events"].as_array().unwrap().clone()
}

#[actix_web::test]
async fn a_released_lease_is_leased_again_at_once_with_the_next_epoch() {
    let h = harness(&[]);
    // One attempt, and a backoff long enough that a wrongly counted release would show.
    let id = submit_with(
        &h,
        json!({"retry": {"max_attempts": 1, "backoff_initial_ms": 60000, "backoff_max_ms": 60000}}),
    )
    .await;
    assert_error(
        &call!(h, verb(&id, "release", json!({"epoch": 0}))),
        409,
        "invalid_state",
        "queued",
    );
    for epoch in [1u64, 2] {
        let lease = call!(h, lease_req("e1"));
        assert_eq!(lease.1["epoch"], epoch, "{:?}", lease.1);
        let start = call!(h, verb(&id, "start", json!({"epoch": epoch})));
        assert_eq!(start.1["status"], "running");
        let released = call!(
            h,
            verb(
                &id,
                "release",
                json!({"epoch": epoch, "reason": "executor shutting down"})
            )
        );
        assert_eq!(released.0, StatusCode::OK, "{:?}", released.1);
        assert_eq!(released.1["status"], "queued");
        assert_eq!(released.1["not_before"], Value::Null, "no backoff");
        let attempt = &released.1["attempts"][epoch as usize - 1];
        assert_eq!(attempt["released"], true);
        assert_eq!(attempt["release_reason"], "executor shutting down");
        assert_eq!(
            (&attempt["error"], &attempt["code"]),
            (&Value::Null, &Value::Null)
        );
    }
    // A late call under a released epoch is fenced like any other.
    assert_error(
        &call!(h, verb(&id, "release", json!({"epoch": 1}))),
        409,
        "invalid_state",
        "queued",
    );
    let lease = call!(h, lease_req("e2"));
    assert_eq!(lease.1["epoch"], 3, "leased again at once: {:?}", lease.1);
    assert_error(
        &call!(h, verb(&id, "release", json!({"epoch": 2}))),
        409,
        "stale_epoch",
        "epoch 2",
    );
    assert_error(
        &call!(h, verb(&id, "release", json!({"epoch": 3, "why": "x"}))),
        400,
        "invalid_body",
        "why",
    );
    // Released without a reason: the caller is named.
    let released = call!(h, verb(&id, "release", json!({"epoch": 3})));
    assert_eq!(
        released.1["attempts"][2]["release_reason"],
        "released by local"
    );
    // Three leases released, and the job still gets its one real attempt.
    let lease = call!(h, lease_req("e2"));
    assert_eq!(lease.1["epoch"], 4);
    let failed = call!(
        h,
        verb(
            &id,
            "fail",
            json!({"epoch": 4, "error": "boom", "retryable": true})
        )
    );
    assert_eq!(failed.1["status"], "failed", "{:?}", failed.1);
    let events = job_events(&h, &id).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types.iter().filter(|t| **t == "job_lease_released").count(),
        3,
        "{types:?}"
    );
}

#[actix_web::test]
async fn a_failure_code_reaches_the_attempt_the_event_and_the_metrics() {
    let h = harness(&[]);
    let id = submit_with(&h, json!({"retry": {"max_attempts": 1}})).await;
    assert_eq!(call!(h, lease_req("e1")).1["epoch"], 1);
    assert_error(
        &call!(
            h,
            verb(
                &id,
                "fail",
                json!({"epoch": 1, "error": "x", "code": "flaky"})
            )
        ),
        400,
        "invalid_body",
        "unknown variant `flaky`, expected one of `bad_input`",
    );
    let long_detail = "d".repeat(4 * 1024 + 1);
    assert_error(
        &call!(
            h,
            verb(
                &id,
                "fail",
                json!({"epoch": 1, "error": "x", "code": "module_error", "detail": long_detail})
            )
        ),
        400,
        "invalid_body",
        "detail: at most 4096 bytes",
    );
    // A long message is kept, cut to 16 KiB on a character boundary ("é" is two bytes).
    let long_error = format!("x{}", "é".repeat(10_000));
    let failed = call!(
        h,
        verb(
            &id,
            "fail",
            json!({"epoch": 1, "error": long_error, "code": "module_error", "detail": "guest_trap"})
        )
    );
    assert_eq!(failed.0, StatusCode::OK, "{:?}", failed.1);
    let attempt = &failed.1["attempts"][0];
    assert_eq!(attempt["code"], "module_error");
    assert_eq!(attempt["detail"], "guest_trap");
    let kept = attempt["error"].as_str().unwrap();
    assert_eq!(kept.len(), 16 * 1024 - 1, "cut before the split character");
    assert!(long_error.starts_with(kept));

    let events = job_events(&h, &id).await;
    let failure = events
        .iter()
        .find(|e| e["type"] == "job_attempt_failed")
        .unwrap();
    assert_eq!(failure["data"]["code"], "module_error");
    assert_eq!(failure["data"]["detail"], "guest_trap");

    let metrics = h.svc.metrics.render(h.svc.read(|p| p.count_by_status()));
    assert!(
        metrics.contains(r#"twin_attempt_failures_total{code="module_error"} 1"#),
        "{metrics}"
    );
    for code in twin_core::FailureCode::ALL {
        assert!(
            metrics.contains(&format!(r#"twin_attempt_failures_total{{code="{code}"}}"#)),
            "every code has a series from the start: {code}"
        );
    }
}

#[actix_web::test]
async fn an_older_executors_failure_is_recorded_as_unclassified() {
    let h = harness(&[]);
    let id = submit_with(&h, json!({"retry": {"max_attempts": 1}})).await;
    call!(h, lease_req("e1"));
    let failed = call!(h, verb(&id, "fail", json!({"epoch": 1, "error": "old"})));
    assert_eq!(failed.1["attempts"][0]["code"], "unclassified");
    assert_eq!(failed.1["attempts"][0]["detail"], Value::Null);
}

#[actix_web::test]
async fn a_dead_executors_leases_expire_at_once_and_the_third_loss_is_final() {
    let h = harness(&[]);
    let retry = json!({"max_attempts": 10, "backoff_initial_ms": 0, "backoff_max_ms": 0});
    // The doomed job goes first whenever it is queued.
    let doomed = submit_with(&h, json!({"retry": retry, "priority": 5})).await;
    let bystander = submit_with(&h, json!({"retry": retry, "priority": 0})).await;
    assert_eq!(call!(h, lease_req("gpu-b")).1["job"]["id"], doomed);
    assert_eq!(call!(h, lease_req("gpu-a")).1["job"]["id"], bystander);
    let expired = h.svc.expire_leases_of("gpu-a").await;
    assert_eq!(
        expired.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        [bystander.as_str()]
    );
    let job = h.svc.get_job(&bystander).unwrap();
    assert_eq!(job.status, twin_core::JobStatus::Queued);
    assert_eq!(
        (job.attempts[0].code, job.attempts[0].error.as_deref()),
        (
            Some(twin_core::FailureCode::ExecutorLost),
            Some("lease expired")
        )
    );
    assert_eq!(
        h.svc.get_job(&doomed).unwrap().status,
        twin_core::JobStatus::Leased,
        "another executor's lease is untouched"
    );
    assert!(
        h.svc.expire_leases_of("gpu-a").await.is_empty(),
        "nothing left to expire"
    );

    // The doomed job kills its executor every time: the third loss fails it for good, although
    // ten attempts were allowed.
    h.svc.expire_leases_of("gpu-b").await;
    for executor in ["gpu-c", "gpu-d"] {
        let lease = call!(h, lease_req(executor));
        assert_eq!(lease.1["job"]["id"], doomed);
        call!(
            h,
            verb(&doomed, "start", json!({"epoch": lease.1["epoch"]}))
        );
        assert_eq!(h.svc.expire_leases_of(executor).await.len(), 1);
    }
    let job = h.svc.get_job(&doomed).unwrap();
    assert_eq!(
        job.status,
        twin_core::JobStatus::Failed,
        "{:?}",
        job.attempts
    );
    assert_eq!(job.executor_losses(), twin_core::job::MAX_EXECUTOR_LOSSES);
    let events = job_events(&h, &doomed).await;
    let last = events.last().unwrap();
    assert_eq!(last["type"], "job_lease_expired");
    assert_eq!(last["data"]["retry_at"], Value::Null);
    let metrics = h.svc.metrics.render(h.svc.read(|p| p.count_by_status()));
    assert!(
        metrics.contains(r#"twin_attempt_failures_total{code="executor_lost"} 4"#),
        "{metrics}"
    );
}

#[actix_web::test]
async fn the_client_releases_and_reports_failure_codes_over_http() {
    let h = harness(&[]);
    let (svc, auth) = (h.svc.clone(), h.auth.clone());
    let server = actix_web::HttpServer::new(move || api::app(svc.clone(), auth.clone(), LIMITS))
        .workers(1)
        .bind(("127.0.0.1", 0))
        .unwrap();
    let url = format!("http://{}", server.addrs()[0]);
    let server = server.run();
    let stop = server.handle();
    actix_web::rt::spawn(server);

    let client = twin_client::Client::new(&url, None).unwrap();
    let id = submit_with(&h, json!({"retry": {"max_attempts": 1}})).await;
    let request = twin_core::api::LeaseRequest {
        executor: "e1".into(),
        capabilities: twin_core::api::Capabilities {
            kinds: [twin_core::JobKind::Ingest].into(),
            ..Default::default()
        },
        wait_ms: 0,
    };
    let grant = client.lease(&request).await.unwrap().unwrap();
    let body = twin_core::api::ReleaseBody {
        epoch: grant.epoch,
        reason: Some("draining".into()),
    };
    let job = client.release(&id, &body).await.unwrap();
    assert_eq!(job.status, twin_core::JobStatus::Queued);
    assert!(job.attempts[0].released);
    let stale = client.release(&id, &body).await.unwrap_err();
    assert_eq!(stale.code(), Some("invalid_state"), "{stale}");

    let grant = client.lease(&request).await.unwrap().unwrap();
    assert_eq!(grant.epoch, 2);
    let fail = twin_core::api::FailBody {
        epoch: 2,
        error: "model weights missing".into(),
        retryable: false,
        code: twin_core::FailureCode::ModelError,
        detail: Some("config.json".into()),
    };
    let job = client.fail(&id, &fail).await.unwrap();
    assert_eq!(job.status, twin_core::JobStatus::Failed);
    let last = job.attempts.last().unwrap();
    assert_eq!(
        (last.code, last.detail.as_deref()),
        (
            Some(twin_core::FailureCode::ModelError),
            Some("config.json")
        )
    );
    stop.stop(true).await;
}

/// The race the holder check once lost: it read one snapshot, and the decision another. Token B
/// keeps starting epoch 1 of a queued job while token A leases it; a lease landing between B's
/// check and B's decision let B act on A's lease. Now both read the same snapshot, appended
/// under its version, so none of B's attempts may succeed, however they interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tokens_command_never_lands_on_a_lease_granted_concurrently() {
    let h = harness(&[]);
    let svc = h.svc.clone();
    for round in 0..150 {
        let (job, _) = svc
            .submit(
                twin_server::service::Claimant {
                    name: "boss",
                    admin: false,
                },
                ingest(&format!("d{round}")),
                None,
            )
            .await
            .unwrap();
        let id = job.id.to_string();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racers: Vec<_> = (0..3)
            .map(|_| {
                let (svc, id, stop) = (svc.clone(), id.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut accepted = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let start = twin_core::job::JobCommand::Start { epoch: 1 };
                        if svc.job_command("gpu-b", &id, start).await.is_ok() {
                            accepted += 1;
                        }
                        tokio::task::yield_now().await;
                    }
                    accepted
                })
            })
            .collect();
        let request: twin_core::api::LeaseRequest =
            serde_json::from_value(json!({"executor": "a", "capabilities": {"kinds": ["ingest"]}}))
                .unwrap();
        let grant = svc.lease("gpu-a", request).await.unwrap().expect("leased");
        assert_eq!(grant.job.id.to_string(), id);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in racers {
            assert_eq!(r.await.unwrap(), 0, "round {round}: B started A's lease");
        }
        let job = svc.get_job(&id).unwrap();
        assert_eq!(job.status.as_str(), "leased", "round {round}");
        svc.job_command(
            "gpu-a",
            &id,
            twin_core::job::JobCommand::Fail {
                epoch: 1,
                error: "done".into(),
                retryable: false,
                code: twin_core::FailureCode::Unclassified,
                detail: None,
                now: 0,
            },
        )
        .await
        .unwrap();
    }
}

/// A web page cannot use the visitor's browser against an open (no tokens) server: a rebound
/// name is not served, a foreign Origin is refused, and a POST must be one a browser only sends
/// after a preflight (JSON, another non-form content type, or `X-Twin-Client` without a body).
#[actix_web::test]
async fn browser_borne_requests_are_refused() {
    let h = harness(&[]);
    let id = submit_with(&h, json!({})).await;

    let rebound = TestRequest::get()
        .uri("/v1/jobs")
        .insert_header(("host", "evil.example:7878"));
    assert_error(&call!(h, rebound), 403, "host_not_allowed", "evil.example");
    for host in ["127.0.0.1:7878", "localhost:7878", "[::1]:7878"] {
        let ok = TestRequest::get()
            .uri("/v1/jobs")
            .insert_header(("host", host));
        assert_eq!(call!(h, ok).0, 200, "{host}");
    }

    let cancel = |content_type: Option<&str>| {
        let mut r = TestRequest::post()
            .uri(&format!("/v1/jobs/{id}/cancel"))
            .insert_header(("host", "127.0.0.1:7878"));
        if let Some(c) = content_type {
            r = r
                .insert_header(("content-type", c))
                .set_payload("reason=csrf");
        }
        r
    };
    for simple in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        assert_error(
            &call!(h, cancel(Some(simple))),
            400,
            "invalid_body",
            "Content-Type",
        );
    }
    assert_error(
        &call!(h, cancel(None)),
        400,
        "invalid_body",
        "x-twin-client",
    );
    let foreign = cancel(None)
        .insert_header(("x-twin-client", "t"))
        .insert_header(("origin", "https://evil.example"));
    assert_error(&call!(h, foreign), 403, "cross_origin", "evil.example");
    assert_eq!(h.svc.get_job(&id).unwrap().status.as_str(), "queued");

    let same_origin = cancel(None)
        .insert_header(("x-twin-client", "t"))
        .insert_header(("origin", "http://127.0.0.1:7878"));
    let got = call!(h, same_origin);
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["status"], "cancelled");
}

/// `/metrics` is unauthenticated: a request line must not be able to mint new series.
#[actix_web::test]
async fn unknown_methods_share_one_metrics_label() {
    let h = harness(&[]);
    for method in ["FOO", "BAR", "BAZ"] {
        let m = actix_web::http::Method::from_bytes(method.as_bytes()).unwrap();
        call!(h, TestRequest::default().method(m).uri("/v1/jobs"));
    }
    let metrics = h.svc.metrics.render(h.svc.read(|p| p.count_by_status()));
    for method in ["FOO", "BAR", "BAZ"] {
        assert!(!metrics.contains(method), "{method} became a label");
    }
    assert!(metrics.contains("method=\"other\""), "{metrics}");
}

/// Free text written into the log is capped, the field named; nothing is recorded.
#[actix_web::test]
async fn free_text_is_capped() {
    let h = harness(&[]);
    let long = "x".repeat(4_001);
    let exp = TestRequest::post()
        .uri("/v1/experiments")
        .set_json(json!({"name": "e", "description": long}));
    assert_error(&call!(h, exp), 400, "invalid_body", "description");
    let id = submit_with(&h, json!({})).await;
    let cancel = TestRequest::post()
        .uri(&format!("/v1/jobs/{id}/cancel"))
        .set_json(json!({"reason": "y".repeat(501)}));
    assert_error(&call!(h, cancel), 400, "invalid_body", "reason");
    assert_eq!(h.svc.get_job(&id).unwrap().status.as_str(), "queued");
}

/// A job kind's runtime limit: an attempt holding its lease past it fails with `timeout`, not
/// retried; other kinds, and jobs within their limit, are left alone.
#[actix_web::test]
async fn an_attempt_past_its_kinds_limit_fails_with_timeout() {
    let h = harness(&[]);
    h.svc
        .set_job_timeouts([(twin_core::JobKind::Ingest, Duration::from_millis(300))].into());
    let id = submit_with(&h, json!({})).await;
    let lease = call!(h, lease_req("x"));
    assert_eq!(lease.1["epoch"], 1, "{}", lease.1);
    h.svc.reap().await;
    assert_eq!(h.svc.get_job(&id).unwrap().status.as_str(), "leased");
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.svc.reap().await;
    let job = h.svc.get_job(&id).unwrap();
    assert_eq!(job.status.as_str(), "failed");
    let attempt = job.attempts.last().unwrap();
    assert_eq!(attempt.code, Some(twin_core::FailureCode::Timeout));
    assert!(
        attempt
            .error
            .as_deref()
            .unwrap()
            .contains("ingest limit of 300ms"),
        "{attempt:?}"
    );
}

/// Long polls are bounded per token for tokens without the execute role, and in all; a fleet of
/// executors sharing one token is bounded by the global limit only.
#[actix_web::test]
async fn long_polls_are_bounded_per_reading_token_but_not_per_executor_token() {
    let h = harness(&[
        ("viewer", "view-secret", &["read"]),
        ("fleet", "fleet-secret", &["execute"]),
    ]);
    h.svc.waiters.set_limits(3, 1);
    let app = test::init_service(api::app(h.svc.clone(), h.auth.clone(), LIMITS)).await;
    let poll = |token: &str| {
        TestRequest::get()
            .uri("/v1/events?from=1000&wait_ms=400")
            .insert_header(("authorization", format!("Bearer {token}")))
            .to_request()
    };
    let lease = || {
        TestRequest::post()
            .uri("/v1/executors/lease")
            .insert_header(("authorization", "Bearer fleet-secret"))
            .set_json(
                json!({"executor": "x", "capabilities": {"kinds": ["ingest"]}, "wait_ms": 400}),
            )
            .to_request()
    };
    let (first, second) = futures_util::join!(
        test::call_service(&app, poll("view-secret")),
        test::call_service(&app, poll("view-secret"))
    );
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 429);
    let body: Value = test::read_body_json(second).await;
    assert_eq!(body["error"]["code"], "too_many_waiters");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`viewer`")
    );

    // Two executors on one token wait side by side; a fourth wait is over the global limit.
    let (a, b, c, d) = futures_util::join!(
        test::call_service(&app, lease()),
        test::call_service(&app, lease()),
        test::call_service(&app, poll("view-secret")),
        test::call_service(&app, lease())
    );
    let statuses = [a.status(), b.status(), c.status()].map(|s| s.as_u16());
    assert_eq!(statuses, [204, 204, 200]);
    assert_eq!(d.status(), 429);
    assert_eq!(h.svc.waiters.held(), 0, "every slot is given back");
}
