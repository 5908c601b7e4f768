//! TLS: a server started with `--tls-cert/--tls-key` (a certificate from a CA made at test time)
//! serves the CLI and executors that trust that CA through `--ca-file`; a client that does not
//! trust it fails on the certificate, plain HTTP gets nowhere, and a bad certificate or key stops
//! the server at start naming the file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use twin_e2e::{ExecutorProcess, Server, bin, ingest_spec, text, twin};

/// A private CA and a server certificate it signed for `localhost` and `127.0.0.1`.
struct Certificates {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Certificates {
    fn generate(dir: &Path) -> Certificates {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "twin test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let files = Certificates {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    fn server_flags(&self) -> Vec<&str> {
        vec![
            "--tls-cert",
            self.cert.to_str().unwrap(),
            "--tls-key",
            self.key.to_str().unwrap(),
        ]
    }
}

/// A sample image set and an ingest spec naming it (`twin submit` uploads the images).
fn ingest(dir: &Path, dataset: &str) -> PathBuf {
    let images = dir.join(format!("{dataset}-images"));
    crate::sample(
        &images,
        &[
            "--categories",
            "1",
            "--instances",
            "2",
            "--views",
            "2",
            "--size",
            "32",
        ],
    );
    ingest_spec(dir, dataset, &images)
}

/// `twin submit SPEC --wait` through `server`, asserting the job succeeded with 4 images.
fn submit_and_wait(server: &str, ca: &Path, spec: &Path) {
    let out = twin(&[
        "--server",
        server,
        "--ca-file",
        ca.to_str().unwrap(),
        "--json",
        "submit",
        spec.to_str().unwrap(),
        "--wait",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The submitted job, then (after --wait) the finished one.
    let job = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<serde_json::Value>()
        .last()
        .unwrap()
        .unwrap();
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["images"], 4, "{job:#}");
}

#[test]
fn the_cli_and_an_executor_that_trust_the_ca_work_over_tls_and_others_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certificates::generate(tmp.path());
    let mut flags = certs.server_flags();
    flags.push("--no-executor");
    let server = Server::start(&tmp.path().join("data"), &flags);
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let ca = certs.ca.to_str().unwrap();

    // An executor on another machine: it leases, downloads the uploads and reports over TLS.
    let _executor =
        ExecutorProcess::start_with_args(&server.url, "tls-exec", &["--ca-file", ca], &[]);
    submit_and_wait(&server.url, &certs.ca, &ingest(tmp.path(), "over-tls"));
    let out = twin(&["--server", &server.url, "--ca-file", ca, "jobs", "ls"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}");

    // No CA: the certificate is not trusted, and the error says so (an error, not a panic).
    let out = twin(&["--server", &server.url, "jobs", "ls"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("certificate") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Plain HTTP to the TLS port gets no answer.
    let plain = server.url.replacen("https://", "http://", 1);
    let out = twin(&["--server", &plain, "--ca-file", ca, "jobs", "ls"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("cannot reach the twin server"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A CA file that holds no certificate is named.
    let out = twin(&[
        "--server",
        &server.url,
        "--ca-file",
        certs.key.to_str().unwrap(),
        "jobs",
        "ls",
    ]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(certs.key.to_str().unwrap()) && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
    server.stop();
}

#[test]
fn the_embedded_executor_reaches_a_tls_server() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certificates::generate(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &certs.server_flags());
    submit_and_wait(&server.url, &certs.ca, &ingest(tmp.path(), "embedded"));
    server.stop();
}

#[test]
fn a_bad_certificate_or_key_stops_the_server_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certificates::generate(tmp.path());
    let other = Certificates::generate(&{
        let dir = tmp.path().join("other");
        std::fs::create_dir(&dir).unwrap();
        dir
    });
    let garbled = tmp.path().join("garbled.pem");
    std::fs::write(&garbled, "not a certificate\n").unwrap();
    let missing = tmp.path().join("missing.key");
    let cases: [(&Path, &Path, &Path, &str); 3] = [
        (&certs.cert, &missing, &missing, "No such file"),
        (&garbled, &certs.key, &garbled, "no PEM certificate"),
        (
            &certs.cert,
            &other.key,
            &other.key,
            "cannot serve certificate",
        ),
    ];
    for (cert, key, named, says) in cases {
        let out = Command::new(bin("twin-server"))
            .args(["serve", "--no-executor", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
        assert!(
            stderr.contains(named.to_str().unwrap()) && stderr.contains(says),
            "{stderr}"
        );
        assert!(!stdout.contains("listening"), "{stdout}");
    }
}
