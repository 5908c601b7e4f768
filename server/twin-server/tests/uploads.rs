//! Resumable uploads and ranged downloads: the protocol in-process (actix's test harness, with
//! request bodies that break off or stall), and the client's transfers against a real HTTP
//! server on loopback (a raw connection cut mid-body, a resumed `.partial` download).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use bytes::Bytes;
use serde_json::{Value, json};
use twin_core::BlobHash;
use twin_server::api::{self, Limits};
use twin_server::auth::{Auth, TokenConfig};
use twin_server::metrics::Metrics;
use twin_server::service::Service;

const LIMITS: Limits = Limits {
    max_json_bytes: 64 * 1024,
    max_blob_bytes: 1 << 20,
    storage_reserve_bytes: 0,
};

const TOKENS: &[(&str, &str, &str)] = &[
    ("alice", "a", "submit"),
    ("bob", "b", "execute"),
    ("root", "r", "admin"),
    ("reader", "x", "read"),
];

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
    let configs: Vec<TokenConfig> = TOKENS
        .iter()
        .map(|(name, token, role)| {
            serde_json::from_value(json!({"name": name, "token": token, "roles": [role]})).unwrap()
        })
        .collect();
    Arc::new(Auth::new(&configs).unwrap())
}

/// Deterministic test bytes.
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

fn patch(id: &str, token: &str, offset: u64) -> TestRequest {
    TestRequest::patch()
        .uri(&format!("/v1/uploads/{id}"))
        .insert_header(bearer(token))
        .insert_header(("Content-Type", "application/offset+octet-stream"))
        .insert_header(("Upload-Offset", offset.to_string()))
}

/// A request whose body is `stream` (chunked: no Content-Length). A macro: the request type
/// (actix-http's) is not nameable from here.
macro_rules! with_stream {
    ($req:expr, $stream:expr) => {{
        let stream: std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<Bytes, PayloadError>>>,
        > = Box::pin($stream);
        $req.to_request().replace_payload(Payload::from(stream)).0
    }};
}

fn header<B>(resp: &actix_web::dev::ServiceResponse<B>, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn body_json<B: actix_web::body::MessageBody>(
    resp: actix_web::dev::ServiceResponse<B>,
) -> (StatusCode, Value) {
    let status = resp.status();
    let body = test::read_body(resp).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn assert_code(got: &(StatusCode, Value), status: u16, code: &str) {
    assert_eq!(got.0.as_u16(), status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
}

macro_rules! app {
    ($svc:expr, $limits:expr) => {
        test::init_service(api::app($svc.clone(), auth(), $limits)).await
    };
}

macro_rules! call {
    ($app:expr, $req:expr) => {
        body_json(test::call_service(&$app, $req).await).await
    };
}

#[actix_web::test]
async fn an_upload_broken_off_mid_body_resumes_from_what_arrived_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = app!(svc, LIMITS);
    let blob = data(300_000);
    let hash = BlobHash::of(&blob);

    let created = call!(
        app,
        TestRequest::post()
            .uri("/v1/uploads")
            .insert_header(bearer("a"))
            .set_json(json!({"bytes": blob.len(), "hash": hash}))
            .to_request()
    );
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);
    assert_eq!(created.1["offset"], 0);
    let id = created.1["id"].as_str().unwrap().to_owned();

    // The body delivers 100 000 bytes, then the connection breaks.
    let first = Bytes::copy_from_slice(&blob[..100_000]);
    let broken = futures_util::stream::iter(vec![Ok(first), Err(PayloadError::Incomplete(None))]);
    let resp = call!(app, with_stream!(patch(&id, "a", 0), broken));
    assert_code(&resp, 400, "invalid_body");
    let status = call!(
        app,
        TestRequest::get()
            .uri(&format!("/v1/uploads/{id}"))
            .insert_header(bearer("a"))
            .to_request()
    );
    assert_eq!(status.1["offset"], 100_000, "{}", status.1);

    // A PATCH from anywhere else than the session's offset is refused, naming the offset.
    let wrong = call!(
        app,
        patch(&id, "a", 0)
            .set_payload(blob[..10].to_vec())
            .to_request()
    );
    assert_code(&wrong, 409, "upload_offset_mismatch");
    assert!(
        wrong.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100000"),
        "{}",
        wrong.1
    );

    // A restart: the session is on disk; its hash state is rebuilt from the partial file.
    drop(app);
    svc.close();
    drop(svc);
    let svc = open_service(dir.path());
    let app = app!(svc, LIMITS);
    let more = call!(
        app,
        patch(&id, "a", 100_000)
            .set_payload(blob[100_000..200_000].to_vec())
            .to_request()
    );
    assert_eq!(more.0, StatusCode::OK, "{}", more.1);
    assert_eq!(more.1["offset"], 200_000);
    assert!(more.1["blob"].is_null());
    let done = call!(
        app,
        patch(&id, "a", 200_000)
            .set_payload(blob[200_000..].to_vec())
            .to_request()
    );
    assert_eq!(done.0, StatusCode::OK, "{}", done.1);
    assert_eq!(done.1["blob"]["hash"], hash.to_hex());
    assert_eq!(done.1["blob"]["bytes"], blob.len());
    assert_eq!(svc.blobs.read(&hash).unwrap(), blob);
    // The session is gone, and so are its files.
    let gone = call!(
        app,
        TestRequest::get()
            .uri(&format!("/v1/uploads/{id}"))
            .insert_header(bearer("a"))
            .to_request()
    );
    assert_code(&gone, 404, "not_found");
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs/uploads"))
            .unwrap()
            .count(),
        0
    );
    // Asking again for a stored blob: nothing to send.
    let again = call!(
        app,
        TestRequest::post()
            .uri("/v1/uploads")
            .insert_header(bearer("a"))
            .set_json(json!({"bytes": blob.len(), "hash": hash}))
            .to_request()
    );
    assert_eq!(again.0, StatusCode::OK, "{}", again.1);
    assert_eq!(again.1["blob"]["hash"], hash.to_hex());
}

#[actix_web::test]
async fn sizes_hashes_owners_and_concurrent_patches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = std::rc::Rc::new(app!(svc, LIMITS));
    let create = |token: &str, body: Value| {
        TestRequest::post()
            .uri("/v1/uploads")
            .insert_header(bearer(token))
            .set_json(body)
            .to_request()
    };
    // Over max_blob_bytes: refused before anything is written.
    let big = call!(app, create("a", json!({"bytes": (1 << 20) + 1})));
    assert_code(&big, 413, "payload_too_large");
    assert_code(
        &call!(app, create("x", json!({"bytes": 10}))),
        403,
        "forbidden",
    );

    let (_, s) = call!(app, create("a", json!({"bytes": 10})));
    let id = s["id"].as_str().unwrap().to_owned();
    // More than declared: by Content-Length up front, or while streaming.
    let over = call!(
        app,
        patch(&id, "a", 0).set_payload(vec![1u8; 11]).to_request()
    );
    assert_code(&over, 413, "payload_too_large");
    let chunks = futures_util::stream::iter(vec![
        Ok(Bytes::from_static(b"12345")),
        Ok(Bytes::from_static(b"678901")),
    ]);
    let over = call!(app, with_stream!(patch(&id, "a", 0), chunks));
    assert_code(&over, 413, "payload_too_large");
    // What fitted is kept.
    let (_, s) = call!(
        app,
        TestRequest::get()
            .uri(&format!("/v1/uploads/{id}"))
            .insert_header(bearer("a"))
            .to_request()
    );
    assert_eq!(s["offset"], 5);

    // Another caller may not touch the session; an admin may.
    for req in [
        TestRequest::get().uri(&format!("/v1/uploads/{id}")),
        TestRequest::delete().uri(&format!("/v1/uploads/{id}")),
    ] {
        assert_code(
            &call!(app, req.insert_header(bearer("b")).to_request()),
            403,
            "forbidden",
        );
    }
    assert_code(
        &call!(
            app,
            patch(&id, "b", 5)
                .set_payload(b"67890".to_vec())
                .to_request()
        ),
        403,
        "forbidden",
    );
    let (status, _) = call!(
        app,
        TestRequest::get()
            .uri(&format!("/v1/uploads/{id}"))
            .insert_header(bearer("r"))
            .to_request()
    );
    assert_eq!(status, StatusCode::OK);

    // A second PATCH while one is still receiving: 409 upload_busy.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, PayloadError>>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let first = {
        let app = app.clone();
        let req = with_stream!(patch(&id, "a", 5), stream);
        actix_web::rt::spawn(async move { body_json(test::call_service(&*app, req).await).await })
    };
    tx.send(Ok(Bytes::from_static(b"67"))).await.unwrap();
    // The channel holds one item: this send returns once the handler took the first, so the
    // session is held.
    tx.send(Ok(Bytes::from_static(b"89"))).await.unwrap();
    let busy = call!(
        app,
        patch(&id, "a", 5)
            .set_payload(b"67890".to_vec())
            .to_request()
    );
    assert_code(&busy, 409, "upload_busy");
    let busy = call!(
        app,
        TestRequest::delete()
            .uri(&format!("/v1/uploads/{id}"))
            .insert_header(bearer("a"))
            .to_request()
    );
    assert_code(&busy, 409, "upload_busy");
    tx.send(Ok(Bytes::from_static(b"0"))).await.unwrap();
    drop(tx);
    let done = first.await.unwrap();
    assert_eq!(done.0, StatusCode::OK, "{}", done.1);
    assert_eq!(done.1["blob"]["hash"], BlobHash::of(b"1234567890").to_hex());

    // A claimed hash the bytes do not have: refused at the last byte, the session ended.
    let (_, s) = call!(
        app,
        create("a", json!({"bytes": 3, "hash": BlobHash::of(b"xyz")}))
    );
    let id = s["id"].as_str().unwrap().to_owned();
    let wrong = call!(
        app,
        patch(&id, "a", 0).set_payload(b"abc".to_vec()).to_request()
    );
    assert_code(&wrong, 400, "blob_hash_mismatch");
    assert!(!svc.blobs.contains(&BlobHash::of(b"abc")));
    assert_code(
        &call!(
            app,
            TestRequest::get()
                .uri(&format!("/v1/uploads/{id}"))
                .insert_header(bearer("a"))
                .to_request()
        ),
        404,
        "not_found",
    );

    // A missing Upload-Offset, a junk id.
    let (_, s) = call!(app, create("b", json!({"bytes": 3})));
    let id = s["id"].as_str().unwrap().to_owned();
    let no_offset = call!(
        app,
        TestRequest::patch()
            .uri(&format!("/v1/uploads/{id}"))
            .insert_header(bearer("b"))
            .insert_header(("Content-Type", "application/offset+octet-stream"))
            .set_payload(b"abc".to_vec())
            .to_request()
    );
    assert_code(&no_offset, 400, "invalid_body");
    assert_code(
        &call!(
            app,
            TestRequest::get()
                .uri("/v1/uploads/..%2Fx")
                .insert_header(bearer("b"))
                .to_request()
        ),
        400,
        "invalid_id",
    );
    // DELETE abandons it.
    let (status, _) = call!(
        app,
        TestRequest::delete()
            .uri(&format!("/v1/uploads/{id}"))
            .insert_header(bearer("b"))
            .to_request()
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_code(
        &call!(
            app,
            patch(&id, "b", 0).set_payload(b"abc".to_vec()).to_request()
        ),
        404,
        "not_found",
    );

    // An empty blob needs no PATCH.
    let (status, s) = call!(app, create("a", json!({"bytes": 0})));
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(s["blob"]["hash"], BlobHash::of(b"").to_hex());
}

#[actix_web::test]
async fn uploads_that_would_eat_the_storage_reserve_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = app!(
        svc,
        Limits {
            storage_reserve_bytes: u64::MAX / 2,
            ..LIMITS
        }
    );
    let refused = call!(
        app,
        TestRequest::post()
            .uri("/v1/uploads")
            .insert_header(bearer("a"))
            .set_json(json!({"bytes": 10}))
            .to_request()
    );
    assert_code(&refused, 503, "storage_unavailable");
    assert!(
        refused.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reserve"),
        "{}",
        refused.1
    );
    let hash = BlobHash::of(b"hello");
    let refused = call!(
        app,
        TestRequest::put()
            .uri(&format!("/v1/blobs/{hash}"))
            .insert_header(bearer("a"))
            .set_payload(b"hello".to_vec())
            .to_request()
    );
    assert_code(&refused, 503, "storage_unavailable");
    assert!(!svc.blobs.contains(&hash));
    assert!(
        !dir.path().join("blobs/uploads").exists()
            || std::fs::read_dir(dir.path().join("blobs/uploads"))
                .unwrap()
                .count()
                == 0,
        "a refused session leaves no files"
    );
}

#[actix_web::test]
async fn downloads_answer_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let app = app!(svc, LIMITS);
    let blob = data(1000);
    let hash = svc.blobs.put(&blob).unwrap();
    let get = |range: Option<&str>| {
        let mut req = TestRequest::get()
            .uri(&format!("/v1/blobs/{hash}"))
            .insert_header(bearer("x"));
        if let Some(r) = range {
            req = req.insert_header(("Range", r));
        }
        req.to_request()
    };
    let whole = test::call_service(&app, get(None)).await;
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(header(&whole, "accept-ranges"), "bytes");
    assert_eq!(test::read_body(whole).await, blob);
    for (range, first, last) in [
        ("bytes=400-", 400, 999),
        ("bytes=10-19", 10, 19),
        ("bytes=990-5000", 990, 999),
        ("bytes=-100", 900, 999),
    ] {
        let resp = test::call_service(&app, get(Some(range))).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&resp, "content-range"),
            format!("bytes {first}-{last}/1000"),
            "{range}"
        );
        assert_eq!(header(&resp, "accept-ranges"), "bytes");
        assert_eq!(
            header(&resp, "content-length"),
            (last - first + 1).to_string()
        );
        assert_eq!(test::read_body(resp).await, blob[first..=last], "{range}");
    }
    let past = test::call_service(&app, get(Some("bytes=1000-"))).await;
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&past, "content-range"), "bytes */1000");
    assert_code(&body_json(past).await, 416, "range_not_satisfiable");
    // Several ranges are not served as such: the whole blob comes.
    let multi = test::call_service(&app, get(Some("bytes=0-1,5-6"))).await;
    assert_eq!(multi.status(), StatusCode::OK);
    assert_eq!(test::read_body(multi).await, blob);
    let head = test::call_service(
        &app,
        TestRequest::default()
            .method(actix_web::http::Method::HEAD)
            .uri(&format!("/v1/blobs/{hash}"))
            .insert_header(bearer("x"))
            .to_request(),
    )
    .await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(header(&head, "x-blob-bytes"), "1000");
    assert_eq!(header(&head, "accept-ranges"), "bytes");
}

/// The real server on a loopback port (so the client and raw sockets reach it).
fn serve(svc: Arc<Service>) -> (String, actix_web::dev::ServerHandle) {
    serve_at(svc, "127.0.0.1:0".parse().unwrap())
}

fn serve_at(
    svc: Arc<Service>,
    addr: std::net::SocketAddr,
) -> (String, actix_web::dev::ServerHandle) {
    let auth = auth();
    let limits = Limits {
        max_blob_bytes: 1 << 30,
        ..LIMITS
    };
    let server = actix_web::HttpServer::new(move || api::app(svc.clone(), auth.clone(), limits))
        .workers(1)
        .disable_signals()
        .bind(addr)
        .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (format!("http://{addr}"), handle)
}

/// A writer that stops the server once `at` bytes went through it (a connection cut mid-body).
struct CutAt {
    written: Vec<u8>,
    at: usize,
    cut: Option<(actix_web::dev::ServerHandle, Arc<tokio::sync::Notify>)>,
}

impl tokio::io::AsyncWrite for CutAt {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.written.extend_from_slice(buf);
        if self.written.len() >= self.at
            && let Some((handle, stopped)) = self.cut.take()
        {
            // `stop` sends its command at once; the future only waits for the shutdown.
            drop(handle.stop(false));
            stopped.notify_one();
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[actix_web::test]
async fn the_client_continues_transfers_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let (url, handle) = serve(svc.clone());
    let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    let blob = data(96 << 20);
    let hash = BlobHash::of(&blob);
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &blob).unwrap();

    // The server goes away while the upload's body is on the wire, and comes back.
    let client = twin_client::Client::new(&url, Some("a".into())).unwrap();
    let upload = {
        let (client, file) = (client.clone(), file.clone());
        actix_web::rt::spawn(async move {
            let mut events = Vec::new();
            let stored = client
                .upload_file_observed(&file, &mut |e| events.push(format!("{e:?}")))
                .await;
            (stored, events)
        })
    };
    let uploads = dir.path().join("blobs/uploads");
    let part_len = || {
        std::fs::read_dir(&uploads)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while part_len() < 8 << 20 {
        assert!(
            Instant::now() < deadline && !upload.is_finished(),
            "the upload ended or never started before the server stopped"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    handle.stop(false).await;
    let (_, handle) = serve_at(svc.clone(), addr);
    let (stored, events) = upload.await.unwrap();
    assert_eq!(stored.unwrap().hash, hash);
    assert!(
        events.iter().any(|e| e.starts_with("Retrying")),
        "the upload did not retry: {events:?}"
    );
    assert_eq!(svc.blobs.read(&hash).unwrap(), blob);

    // The same for a download into a writer: it continues with a Range from what it has.
    let stopped = Arc::new(tokio::sync::Notify::new());
    let mut sink = CutAt {
        written: Vec::new(),
        at: 8 << 20,
        cut: Some((handle, stopped.clone())),
    };
    let restart = {
        let svc = svc.clone();
        actix_web::rt::spawn(async move {
            stopped.notified().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            serve_at(svc, addr).1
        })
    };
    let mut events = Vec::new();
    let len = client
        .download_to_writer_observed(&hash, &mut sink, &mut |e| events.push(format!("{e:?}")))
        .await
        .unwrap();
    assert_eq!(len, blob.len() as u64);
    assert!(sink.written == blob, "the resumed download differs");
    assert!(
        events.iter().any(|e| e.starts_with("Retrying")),
        "the download did not retry: {events:?}"
    );
    restart.await.unwrap().stop(true).await;
}

#[actix_web::test]
async fn the_client_resumes_an_upload_cut_off_on_the_wire_and_a_partial_download() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open_service(dir.path());
    let (url, handle) = serve(svc.clone());
    let client = twin_client::Client::new(&url, Some("a".into())).unwrap();
    let blob = data(700_000);
    let hash = BlobHash::of(&blob);
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &blob).unwrap();

    // A session, then a PATCH whose connection dies after 300 000 of its 700 000 bytes.
    let status = client
        .create_upload(blob.len() as u64, Some(hash))
        .await
        .unwrap();
    let addr = url.strip_prefix("http://").unwrap().to_owned();
    let id = status.id.clone();
    let head = blob[..300_000].to_vec();
    std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "PATCH /v1/uploads/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n\
             Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
             Content-Length: 700000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&head).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = client.upload_status(&status.id).await.unwrap();
        if s.offset == 300_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut PATCH left offset {}",
            s.offset
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client finds the session by the file's hash and sends the rest only.
    let mut events = Vec::new();
    let stored = client
        .upload_file_observed(&file, &mut |e| events.push(format!("{e:?}")))
        .await
        .unwrap();
    assert_eq!(stored.hash, hash);
    assert_eq!(
        events,
        vec!["Resumed { offset: 300000 }".to_owned()],
        "{events:?}"
    );
    assert_eq!(svc.blobs.read(&hash).unwrap(), blob);
    // Uploading it again sends nothing.
    assert_eq!(client.upload_file(&file).await.unwrap().hash, hash);

    // A download resumes from a `.partial` an earlier attempt left.
    let dest = dir.path().join("out.bin");
    std::fs::write(dir.path().join("out.bin.partial"), &blob[..123_456]).unwrap();
    let mut events = Vec::new();
    let len = client
        .download_to_file_observed(&hash, &dest, &mut |e| events.push(format!("{e:?}")))
        .await
        .unwrap();
    assert_eq!(len, blob.len() as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), blob);
    assert!(!dir.path().join("out.bin.partial").exists());
    assert_eq!(events, vec!["Resumed { offset: 123456 }".to_owned()]);
    // A `.partial` that does not belong to the blob fails the check and is removed.
    std::fs::write(dir.path().join("bad.bin.partial"), b"not the start").unwrap();
    let err = client
        .download_to_file(&hash, &dir.path().join("bad.bin"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("do not hash to"), "{err}");
    assert!(!dir.path().join("bad.bin.partial").exists());
    assert!(!dir.path().join("bad.bin").exists());
    // Into any writer, and the one-pass upload from a reader.
    let mut sink = Vec::new();
    assert_eq!(
        client.download_to_writer(&hash, &mut sink).await.unwrap(),
        blob.len() as u64
    );
    assert_eq!(sink, blob);
    let other = data(50_000)[..49_999].to_vec();
    let stored = client
        .upload_reader(std::io::Cursor::new(other.clone()), other.len() as u64)
        .await
        .unwrap();
    assert_eq!(stored.hash, BlobHash::of(&other));
    let short = client
        .upload_reader(std::io::Cursor::new(vec![0u8; 10]), 20)
        .await
        .unwrap_err();
    assert!(
        !matches!(short, twin_client::ClientError::Api { .. }),
        "{short}"
    );
    // A raw read of a range, as any HTTP client would.
    let mut s = std::net::TcpStream::connect(url.strip_prefix("http://").unwrap()).unwrap();
    write!(
        s,
        "GET /v1/blobs/{hash} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n\
         Range: bytes=699990-\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 206"), "{text}");
    assert!(
        text.to_lowercase()
            .contains("content-range: bytes 699990-699999/700000"),
        "{text}"
    );
    assert!(answer.ends_with(&blob[699_990..]));
    handle.stop(true).await;
}
