//! The OpenAPI document's invariants that third-party tools rely on, checked without them
//! (`deploy/api-check.sh` runs the tools themselves): unique operation ids, discriminated unions
//! whose branches carry their own tag, error responses declared with the shared error body, and
//! every status the server actually answers, for requests a fuzzer would send, declared.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::Method;
use actix_web::test::{self, TestRequest};
use serde_json::{Value, json};
use twin_core::JobKind;
use twin_server::api::{self, Limits};
use twin_server::auth::{Auth, TokenConfig};
use twin_server::metrics::Metrics;
use twin_server::service::Service;

const LIMITS: Limits = Limits {
    max_json_bytes: 64 * 1024,
    max_blob_bytes: 1024,
    storage_reserve_bytes: 0,
};
const ERROR_BODY: &str = "#/components/schemas/ErrorBody";
const METHODS: [&str; 6] = ["get", "put", "post", "patch", "delete", "head"];

fn document() -> Value {
    serde_json::to_value(api::openapi()).unwrap()
}

/// Every operation: (method, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                ops.push((method.to_owned(), path.clone(), op.clone()));
            }
        }
    }
    ops
}

fn schema<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let name = reference
        .strip_prefix("#/components/schemas/")
        .unwrap_or_else(|| panic!("{reference} is not a component reference"));
    doc["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("no component {name}"))
}

#[test]
fn operation_ids_are_unique_names_a_generator_can_use() {
    let doc = document();
    let mut seen = BTreeMap::new();
    for (method, path, op) in operations(&doc) {
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} has no operation id"));
        assert!(
            id.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{method} {path}: operation id `{id}` is not snake_case"
        );
        if let Some(other) = seen.insert(id.to_owned(), format!("{method} {path}")) {
            panic!("operation id `{id}` names both {other} and {method} {path}");
        }
    }
}

/// The union's branches, each checked to be an object that lists `tag` among its own required
/// properties as a one-value enum, with the discriminator mapping each value to its branch.
/// Returns the tag values.
fn discriminated_union(doc: &Value, union: &str, tag: &str) -> BTreeSet<String> {
    let union_schema = &doc["components"]["schemas"][union];
    let branches = union_schema["oneOf"]
        .as_array()
        .unwrap_or_else(|| panic!("{union} is not a oneOf: {union_schema}"));
    assert_eq!(
        union_schema["discriminator"]["propertyName"], tag,
        "{union}"
    );
    let mapping = union_schema["discriminator"]["mapping"]
        .as_object()
        .unwrap();
    let mut values = BTreeSet::new();
    for branch in branches {
        let reference = branch["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{union}: a branch is not a reference: {branch}"));
        let target = schema(doc, reference);
        assert_eq!(target["type"], "object", "{reference}: {target}");
        let own = &target["properties"][tag];
        let value = match own["enum"].as_array().map(Vec::as_slice) {
            Some([Value::String(v)]) => v.clone(),
            _ => panic!("{reference} does not declare `{tag}` as a one-value enum: {target}"),
        };
        assert!(
            target["required"]
                .as_array()
                .is_some_and(|r| r.contains(&json!(tag))),
            "{reference}: `{tag}` is not required"
        );
        assert_eq!(mapping.get(&value), Some(&json!(reference)), "{union}");
        assert!(values.insert(value.clone()), "{union}: `{value}` twice");
    }
    assert_eq!(
        mapping.len(),
        values.len(),
        "{union}: stray mapping entries"
    );
    values
}

#[test]
fn job_specs_outputs_and_results_are_unions_on_kind_covering_every_built_kind() {
    let doc = document();
    let built: BTreeSet<String> = JobKind::ALL
        .into_iter()
        .filter(|k| k.is_built())
        .map(|k| k.as_str().to_owned())
        .collect();
    for union in ["JobSpec", "JobOutput", "JobResult"] {
        assert_eq!(discriminated_union(&doc, union, "kind"), built, "{union}");
    }
}

#[test]
fn recorded_events_are_a_union_on_type_naming_types_as_the_server_sends_them() {
    let doc = document();
    let names: BTreeSet<String> = twin_core::event::SCHEMA_VERSIONS
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    assert_eq!(discriminated_union(&doc, "RecordedEvent", "type"), names);
}

#[test]
fn error_responses_carry_the_error_body_and_input_can_be_refused() {
    let doc = document();
    for (method, path, op) in operations(&doc) {
        let responses = op["responses"].as_object().unwrap();
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"], ERROR_BODY,
                    "{method} {path} {status}: not the error body"
                );
            }
        }
        let takes_input = op.get("requestBody").is_some()
            || op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] != "path"));
        if takes_input {
            assert!(
                responses.contains_key("400"),
                "{method} {path} takes input but declares no 400"
            );
        }
        // Everything under /v1 but the document itself asks for a token when tokens are set.
        if path.starts_with("/v1/") && path != "/v1/openapi.json" {
            for status in ["401", "403"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} authenticates but declares no {status}"
                );
            }
        }
    }
}

struct Harness {
    svc: Arc<Service>,
    auth: Arc<Auth>,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::open(
        dir.path(),
        Duration::from_secs(30),
        Arc::new(Metrics::new()),
        Arc::new(twin_plugins::Host::new(twin_plugins::HostConfig::default()).unwrap()),
    )
    .unwrap();
    let tokens: Vec<TokenConfig> = [("reader", "r", "read"), ("admin", "a", "admin")]
        .iter()
        .map(|(name, token, role)| {
            serde_json::from_value(json!({"name": name, "token": token, "roles": [role]})).unwrap()
        })
        .collect();
    Harness {
        svc,
        auth: Arc::new(Auth::new(&tokens).unwrap()),
        _dir: dir,
    }
}

/// Every operation called as a fuzzer would: without a token, with a token short of the role,
/// and with junk ids, an empty or malformed body and an unknown query parameter. Each answer's
/// status must be one the operation declares, and an error must come as the error body.
#[actix_web::test]
async fn every_status_an_operation_answers_is_declared() {
    let h = harness();
    let doc = document();
    let app = test::init_service(api::app(h.svc.clone(), h.auth.clone(), LIMITS)).await;
    let mut answered = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let declared: BTreeSet<&str> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let has_query = op["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
        let body_type = op["requestBody"]["content"]
            .as_object()
            .and_then(|c| c.keys().next().cloned());
        let mut cases = vec![(None, "0", false), (Some("r"), "0", false)];
        for id in ["0", "Not-An-Id"] {
            cases.push((Some("a"), id, false));
            if has_query {
                cases.push((Some("a"), id, true));
            }
        }
        for (token, id, bad_query) in cases {
            let mut uri = path
                .split('/')
                .map(|s| if s.starts_with('{') { id } else { s })
                .collect::<Vec<_>>()
                .join("/");
            if bad_query {
                uri.push_str("?no_such_parameter=1");
            }
            let mut req = TestRequest::default()
                .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                .uri(&uri);
            if let Some(t) = token {
                req = req.insert_header(("Authorization", format!("Bearer {t}")));
            }
            req = match body_type.as_deref() {
                Some("application/json") => req.set_json(json!({})),
                Some(other) => req
                    .insert_header(("Content-Type", other))
                    .set_payload("not what it should be"),
                None => req,
            };
            let resp = test::call_service(&app, req.to_request()).await;
            let status = resp.status().as_u16().to_string();
            let case = format!("{method} {uri} (token {token:?})");
            assert!(
                declared.contains(status.as_str()),
                "{case} answered {status}, which it does not declare ({declared:?})"
            );
            if token.is_none() && path.starts_with("/v1/") && path != "/v1/openapi.json" {
                assert_eq!(status, "401", "{case}");
            }
            if resp.status().as_u16() >= 400 && method != "head" {
                let body: Value = serde_json::from_slice(&test::read_body(resp).await)
                    .unwrap_or_else(|e| panic!("{case}: the error is not JSON: {e}"));
                assert!(body["error"]["code"].is_string(), "{case}: {body}");
                assert!(body["error"]["message"].is_string(), "{case}: {body}");
            }
            answered.insert(status);
        }
    }
    // The cases reached past authentication into the handlers' own refusals.
    for status in ["400", "401", "403", "404", "422"] {
        assert!(answered.contains(status), "no case answered {status}");
    }
}

/// The hand-written schemas against what serde writes: a recorded event of each type the log
/// holds, and a job's spec and result, list exactly the properties their branch declares.
#[actix_web::test]
async fn served_values_have_exactly_their_branchs_properties() {
    let h = harness();
    let doc = document();
    let app = test::init_service(api::app(h.svc.clone(), h.auth.clone(), LIMITS)).await;
    let admin = ("Authorization", "Bearer a");
    let call = |req: TestRequest| req.insert_header(admin).to_request();
    let submitted: Value = test::call_and_read_body_json(
        &app,
        call(TestRequest::post().uri("/v1/jobs").set_json(json!({
            "spec": {"kind": "ingest", "dataset": "d", "source": {"dir": "/images"}}
        }))),
    )
    .await;
    let id = submitted["id"].as_str().unwrap();
    let grant: Value = test::call_and_read_body_json(
        &app,
        call(
            TestRequest::post()
                .uri("/v1/executors/lease")
                .set_json(json!({"executor": "e", "capabilities": {"kinds": ["ingest"]}})),
        ),
    )
    .await;
    let epoch = grant["epoch"].clone();
    let manifest = b"{}\n";
    let hash = twin_core::BlobHash::of(manifest).to_hex();
    let resp = test::call_service(
        &app,
        call(
            TestRequest::put()
                .uri(&format!("/v1/blobs/{hash}"))
                .set_payload(&manifest[..]),
        ),
    )
    .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    let output = json!({"kind": "ingest", "manifest": hash, "images": 0, "instances": 0,
        "categories": 0, "rejected": [], "rejected_total": 0});
    let done: Value = test::call_and_read_body_json(
        &app,
        call(
            TestRequest::post()
                .uri(&format!("/v1/jobs/{id}/complete"))
                .set_json(json!({"epoch": epoch, "output": output})),
        ),
    )
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    let properties = |reference: &str| keys(&schema(&doc, reference)["properties"]);
    let branch = |union: &str, tag: &str, value: &Value| -> String {
        let tag_value = value[tag].as_str().unwrap();
        doc["components"]["schemas"][union]["discriminator"]["mapping"][tag_value]
            .as_str()
            .unwrap_or_else(|| panic!("{union} has no branch for {tag} `{tag_value}`"))
            .to_owned()
    };
    let spec = &done["submission"]["spec"];
    assert_eq!(keys(spec), properties(&branch("JobSpec", "kind", spec)));
    let result = &done["result"];
    assert_eq!(
        keys(result),
        properties(&branch("JobResult", "kind", result))
    );
    assert_eq!(
        keys(&output),
        properties(&branch("JobOutput", "kind", &output))
    );

    let page: Value =
        test::call_and_read_body_json(&app, call(TestRequest::get().uri("/v1/events"))).await;
    let events = page["events"].as_array().unwrap();
    assert!(events.len() >= 4, "{page}");
    for event in events {
        let reference = branch("RecordedEvent", "type", event);
        assert_eq!(keys(event), properties(&reference), "{event}");
        let payload = &schema(&doc, &reference)["properties"]["data"]["$ref"];
        let declared = properties(payload.as_str().unwrap());
        assert!(
            keys(&event["data"]).is_subset(&declared),
            "{event}: `data` has fields {payload} does not declare"
        );
    }
}
