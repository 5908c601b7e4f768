//! The model registry in-process: registration checks every file a manifest lists and refuses a
//! bad manifest before anything is recorded; names, roles, pinning at submission; and blob
//! collection, which never takes a blob something names.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use serde_json::{Value, json};
use twin_core::BlobHash;
use twin_core::model::{ModelFile, ModelManifest};
use twin_server::api::{self, Limits};
use twin_server::auth::{Auth, TokenConfig};
use twin_server::metrics::Metrics;
use twin_server::service::Service;

const LIMITS: Limits = Limits {
    max_json_bytes: 64 * 1024,
    max_blob_bytes: 1 << 20,
    storage_reserve_bytes: 0,
};

fn open_service(dir: &std::path::Path) -> Arc<Service> {
    Service::open(
        dir,
        Duration::from_secs(30),
        Arc::new(Metrics::new()),
        Arc::new(twin_plugins::Host::new(twin_plugins::HostConfig::default()).unwrap()),
    )
    .unwrap()
}

fn auth() -> Arc<Auth> {
    let configs: Vec<TokenConfig> = [
        ("alice", "a", "submit"),
        ("bob", "b", "submit"),
        ("executors", "e", "execute"),
        ("root", "r", "admin"),
        ("reader", "x", "read"),
    ]
    .iter()
    .map(|(name, token, role)| {
        serde_json::from_value(json!({"name": name, "token": token, "roles": [role]})).unwrap()
    })
    .collect();
    Arc::new(Auth::new(&configs).unwrap())
}

fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

async fn body_json<B: actix_web::body::MessageBody>(
    resp: actix_web::dev::ServiceResponse<B>,
) -> (StatusCode, Value) {
    let status = resp.status();
    let body = test::read_body(resp).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

macro_rules! call {
    ($app:expr, $req:expr) => {
        body_json(test::call_service(&$app, $req).await).await
    };
}

macro_rules! put_blob {
    ($app:expr, $bytes:expr) => {{
        let bytes: Vec<u8> = $bytes;
        let hash = BlobHash::of(&bytes);
        let got = call!(
            $app,
            TestRequest::put()
                .uri(&format!("/v1/blobs/{hash}"))
                .insert_header(bearer("a"))
                .insert_header(("Content-Type", "application/octet-stream"))
                .set_payload(bytes)
                .to_request()
        );
        assert!(got.0.is_success(), "{}", got.1);
        hash
    }};
}

macro_rules! register {
    ($app:expr, $body:expr) => {
        call!(
            $app,
            TestRequest::post()
                .uri("/v1/models")
                .insert_header(bearer("a"))
                .set_json($body)
                .to_request()
        )
    };
}

fn file(path: &str, bytes: &[u8]) -> ModelFile {
    ModelFile {
        path: path.into(),
        size: bytes.len() as u64,
        sha256: BlobHash::of(bytes),
    }
}

#[actix_web::test]
async fn a_model_registers_only_when_every_file_it_lists_is_stored_as_listed() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = test::init_service(api::app(svc.clone(), auth(), LIMITS)).await;
    let config = br#"{"model_type":"clip","architectures":["CLIPModel"]}"#.to_vec();
    let weights = vec![7u8; 1000];
    let manifest = ModelManifest::new(vec![
        file("config.json", &config),
        file("model.safetensors", &weights),
    ])
    .unwrap();
    let m = put_blob!(app, manifest.to_bytes());

    // The weights are not uploaded yet: refused, naming the file, and nothing recorded.
    put_blob!(app, config.clone());
    let got = register!(app, json!({"manifest": m, "name": "clip"}));
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
    let msg = got.1["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`model.safetensors`") && msg.contains("not uploaded"),
        "{msg}"
    );
    assert!(svc.read(|p| p.models.is_empty() && p.model_aliases.is_empty()));

    put_blob!(app, weights.clone());
    let got = register!(app, json!({"manifest": m, "name": "clip"}));
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
    assert_eq!(got.1["hash"], m.to_hex());
    assert_eq!(got.1["bytes"], 1000 + config.len());
    assert_eq!(got.1["kind"]["model_type"], "clip");
    assert_eq!(got.1["aliases"], json!(["clip"]));
    let again = register!(app, json!({"manifest": m}));
    assert_eq!(again.0, StatusCode::OK, "same manifest, same model");

    // Listed, described by name and by hash; a reader may read, not register.
    let list = call!(
        app,
        TestRequest::get()
            .uri("/v1/models")
            .insert_header(bearer("x"))
            .to_request()
    );
    assert_eq!(list.1.as_array().unwrap().len(), 1);
    for r in ["clip", &m.to_hex()] {
        let got = call!(
            app,
            TestRequest::get()
                .uri(&format!("/v1/models/{r}"))
                .insert_header(bearer("x"))
                .to_request()
        );
        assert_eq!(got.1["hash"], m.to_hex());
    }
    let got = call!(
        app,
        TestRequest::post()
            .uri("/v1/models")
            .insert_header(bearer("x"))
            .set_json(json!({"manifest": m}))
            .to_request()
    );
    assert_eq!(got.0, StatusCode::FORBIDDEN);

    // A spec naming it passes the model check (and stops at the next: no scorer modules here;
    // the e2e tests see the pinned hash); an unknown name is refused, saying how to register.
    let sub = |model: &str| json!({"spec": {"kind": "eval", "model": model, "data": {"questions": "/q.jsonl"}}});
    for (model, want) in [
        ("clip", "spec.scorers.pair.module"),
        (m.to_hex().as_str(), "spec.scorers.pair.module"),
        ("/models/qwen", "spec.scorers.pair.module"),
        ("nope", "spec.model: no model `nope` is registered"),
    ] {
        let got = call!(
            app,
            TestRequest::post()
                .uri("/v1/jobs")
                .insert_header(bearer("a"))
                .set_json(sub(model))
                .to_request()
        );
        assert_eq!(got.0, StatusCode::BAD_REQUEST);
        let msg = got.1["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(want), "{model}: {msg}");
    }

    // Aliases: to unknown hashes and with bad names refused.
    let got = call!(
        app,
        TestRequest::put()
            .uri("/v1/models/aliases/other")
            .insert_header(bearer("a"))
            .set_json(json!({"hash": BlobHash::of(b"x")}))
            .to_request()
    );
    assert_eq!(got.0, StatusCode::NOT_FOUND, "{}", got.1);
    let got = call!(
        app,
        TestRequest::put()
            .uri("/v1/models/aliases/Bad%20Name")
            .insert_header(bearer("a"))
            .set_json(json!({"hash": m}))
            .to_request()
    );
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
}

#[actix_web::test]
async fn bad_manifests_are_refused_before_anything_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = test::init_service(api::app(svc.clone(), auth(), LIMITS)).await;
    let w = put_blob!(app, b"weights".to_vec());
    let entry = |path: &str| json!({"path": path, "size": 7, "sha256": w});
    // Hand-written, in the canonical field order, so only the named rule is broken.
    let raw = |files: Vec<Value>| {
        format!(
            "{{\"format\":\"twin.model/1\",\"files\":[{}]}}",
            files
                .iter()
                .map(|f| format!(
                    "{{\"path\":{},\"size\":{},\"sha256\":{}}}",
                    f["path"], f["size"], f["sha256"]
                ))
                .collect::<Vec<_>>()
                .join(",")
        )
        .into_bytes()
    };
    for (bytes, want) in [
        (raw(vec![entry("/etc/passwd")]), "absolute"),
        (raw(vec![entry("../x.safetensors")]), "`..`"),
        (raw(vec![entry("a"), entry("a")]), "listed twice"),
        (raw(vec![entry("pytorch_model.bin")]), "pickled"),
        (raw(vec![entry("b"), entry("a")]), "canonical"),
        (raw(vec![]), "no files"),
        (
            b"{\"format\":\"twin.model/1\", \"files\":[]}".to_vec(),
            "no files",
        ),
        (b"not json".to_vec(), "not a model manifest"),
        (
            raw(vec![json!({"path": "x", "size": 8, "sha256": w})]),
            "listed with 8 bytes",
        ),
        (
            raw(vec![
                json!({"path": "x", "size": 7, "sha256": BlobHash::of(b"gone")}),
            ]),
            "not uploaded",
        ),
    ] {
        let m = put_blob!(app, bytes);
        let got = register!(app, json!({"manifest": m}));
        assert_eq!(got.0, StatusCode::BAD_REQUEST, "{want}: {}", got.1);
        let msg = got.1["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "want {want:?} in {msg}");
    }
    // A manifest that was never uploaded.
    let got = register!(app, json!({"manifest": BlobHash::of(b"never")}));
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upload the manifest"),
        "{}",
        got.1
    );
    assert!(svc.read(|p| p.models.is_empty()));
}

#[actix_web::test]
async fn collection_takes_only_what_nothing_names_and_only_for_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = test::init_service(api::app(svc.clone(), auth(), LIMITS)).await;
    // A model (manifest + file), a job's input, a blob named only inside a referenced JSONL
    // blob (as a dataset manifest names its images), and two strays.
    let weights = put_blob!(app, vec![1u8; 100]);
    let manifest = ModelManifest::new(vec![ModelFile {
        path: "w.safetensors".into(),
        size: 100,
        sha256: weights,
    }])
    .unwrap();
    let m = put_blob!(app, manifest.to_bytes());
    let got = register!(app, json!({"manifest": m}));
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
    let image = put_blob!(app, b"\x89PNG\r\n\x1a\nimage".to_vec());
    let listing = put_blob!(app, format!("{{\"blob\":\"{image}\"}}\n").into_bytes());
    // Named by a job only as text in its spec (as any field may name a blob).
    let ingest = json!({"spec": {"kind": "ingest", "dataset": "d", "source": {"dir": format!("/data/{listing}")}}});
    let got = call!(
        app,
        TestRequest::post()
            .uri("/v1/jobs")
            .insert_header(bearer("a"))
            .set_json(ingest)
            .to_request()
    );
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
    let stray = put_blob!(app, b"stray".to_vec());
    let stray_png = put_blob!(app, b"\x89PNG\r\n\x1a\nother".to_vec());

    let gc = |token: &str, body: Value| {
        TestRequest::post()
            .uri("/v1/admin/blobs/gc")
            .insert_header(bearer(token))
            .set_json(body)
            .to_request()
    };
    let got = call!(app, gc("a", json!({"dry_run": true})));
    assert_eq!(got.0, StatusCode::FORBIDDEN, "admin only");
    let young = call!(app, gc("r", json!({"dry_run": true})));
    assert_eq!(
        young.1["unreferenced"],
        json!([]),
        "everything is younger than an hour"
    );
    let dry = call!(app, gc("r", json!({"dry_run": true, "min_age_secs": 0})));
    let mut listed: Vec<String> = dry.1["unreferenced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["hash"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut want = vec![stray.to_hex(), stray_png.to_hex()];
    want.sort();
    assert_eq!(listed, want, "{}", dry.1);
    assert!(svc.blobs.contains(&stray), "a dry run deletes nothing");
    let done = call!(app, gc("r", json!({"min_age_secs": 0})));
    assert_eq!(done.1["deleted"], true);
    for gone in [stray, stray_png] {
        assert!(!svc.blobs.contains(&gone));
    }
    for kept in [weights, m, image, listing] {
        assert!(svc.blobs.contains(&kept), "{kept} was named and must stay");
    }
}

/// Shared names have owners: whoever took a model name first (or, for a dataset name, submitted
/// the job that registered it) keeps it; others are refused unless they are admins.
#[actix_web::test]
async fn only_a_names_owner_or_an_admin_points_it_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = test::init_service(api::app(svc.clone(), auth(), LIMITS)).await;
    let model = |seed: u8| {
        let weights = vec![seed; 16];
        let manifest = ModelManifest::new(vec![file("model.safetensors", &weights)]).unwrap();
        (manifest.to_bytes(), weights)
    };
    let mut hashes = Vec::new();
    for seed in [1, 2] {
        let (manifest, weights) = model(seed);
        put_blob!(app, weights);
        hashes.push(put_blob!(app, manifest));
    }
    let as_ = |token: &str, method: &str, uri: &str, body: Value| {
        let req = match method {
            "put" => TestRequest::put(),
            _ => TestRequest::post(),
        };
        req.uri(uri)
            .insert_header(bearer(token))
            .set_json(body)
            .to_request()
    };
    let got = call!(
        app,
        as_(
            "a",
            "post",
            "/v1/models",
            json!({"manifest": hashes[0], "name": "qwen"})
        )
    );
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);

    let got = call!(
        app,
        as_("b", "post", "/v1/models", json!({"manifest": hashes[1]}))
    );
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);

    // Bob may neither repoint alice's name nor take it with a registration.
    let alias = json!({"hash": hashes[1]});
    let got = call!(
        app,
        as_("b", "put", "/v1/models/aliases/qwen", alias.clone())
    );
    assert_eq!(got.0, StatusCode::FORBIDDEN, "{}", got.1);
    assert_eq!(got.1["error"]["code"], "forbidden");
    let msg = got.1["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("model name `qwen` belongs to `alice`"),
        "{msg}"
    );
    let got = call!(
        app,
        as_(
            "b",
            "post",
            "/v1/models",
            json!({"manifest": hashes[1], "name": "qwen"})
        )
    );
    assert_eq!(got.0, StatusCode::FORBIDDEN, "{}", got.1);
    assert_eq!(svc.read(|p| p.model_aliases["qwen"]), hashes[0]);
    // His own name is his; alice may repoint hers; an admin may repoint anyone's.
    let got = call!(
        app,
        as_("b", "put", "/v1/models/aliases/bobs", alias.clone())
    );
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = call!(
        app,
        as_("a", "put", "/v1/models/aliases/qwen", alias.clone())
    );
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = call!(
        app,
        as_(
            "r",
            "put",
            "/v1/models/aliases/bobs",
            json!({"hash": hashes[0]})
        )
    );
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    // The admin's repointing does not make the name the admin's.
    let got = call!(
        app,
        as_("b", "put", "/v1/models/aliases/bobs", alias.clone())
    );
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    // A dataset name goes to whoever submitted the job that registered it.
    let ingest = |name: &str| json!({"spec": {"kind": "ingest", "dataset": name, "source": {"dir": "/data"}}});
    let got = call!(app, as_("a", "post", "/v1/jobs", ingest("shoes")));
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
    let id = got.1["id"].as_str().unwrap().to_owned();
    let got = call!(
        app,
        as_(
            "e",
            "post",
            "/v1/executors/lease",
            json!({"executor": "x", "capabilities": {"kinds": ["ingest"]}})
        )
    );
    assert_eq!(got.1["epoch"], 1, "{}", got.1);
    let listing = put_blob!(app, b"{}\n".to_vec());
    let output = json!({"kind": "ingest", "manifest": listing, "images": 1, "instances": 1,
                        "categories": 1, "rejected": [], "rejected_total": 0});
    let got = call!(
        app,
        as_(
            "e",
            "post",
            &format!("/v1/jobs/{id}/complete"),
            json!({"epoch": 1, "output": output})
        )
    );
    assert_eq!(got.1["status"], "succeeded", "{}", got.1);
    let got = call!(app, as_("b", "post", "/v1/jobs", ingest("shoes")));
    assert_eq!(got.0, StatusCode::FORBIDDEN, "{}", got.1);
    let msg = got.1["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("dataset name `shoes` belongs to `alice`"),
        "{msg}"
    );
    for token in ["a", "r"] {
        let got = call!(app, as_(token, "post", "/v1/jobs", ingest("shoes")));
        assert_eq!(got.0, StatusCode::CREATED, "{token}: {}", got.1);
    }

    // The eval stage's default scorers are an admin's to point.
    let got = call!(
        app,
        as_(
            "a",
            "put",
            "/v1/modules/aliases/fgvqa-pair",
            json!({"hash": hashes[0]})
        )
    );
    assert_eq!(got.0, StatusCode::FORBIDDEN, "{}", got.1);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`admin`"),
        "{}",
        got.1
    );
}
