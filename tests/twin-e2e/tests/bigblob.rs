//! Blobs of gigabytes end to end with flat memory: a generated blob (never held whole) piped
//! through `twin blobs put -` and back through `twin blobs get HASH -o -`, with the peak resident
//! memory of the server and of each CLI process measured; an interrupted `twin blobs put FILE`
//! and `get` that resume; a disk that fills while an upload is received.
//!
//! Peak memory: a CLI's from `getrusage(RUSAGE_CHILDREN)` (the largest peak among this process's
//! waited children; the tests here run one at a time, so the children waited are theirs), the
//! server's from its `VmHWM` while it runs. `TWIN_BIGBLOB_BYTES` sets the blob's size.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use twin_core::BlobHash;
use twin_e2e::{Server, bin, eventually, text};

const MIB: usize = 1 << 20;
/// The most resident memory any process may reach, in KiB (what `getrusage` and `VmHWM` count).
const RSS_LIMIT_KIB: u64 = 256 * 1024;
const DEFAULT_BYTES: u64 = 1_610_612_736;

/// One test at a time: `RUSAGE_CHILDREN` counts every child this process waited for.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deterministic bytes, cheap enough for a debug build: 1 MiB windows at pseudo-random offsets
/// into a small pseudo-random pool, each stamped with its index, so no two blocks are alike and a
/// lost, repeated or shifted byte changes the hash.
struct Generator {
    pool: Vec<u8>,
    state: u64,
    block: u64,
}

impl Generator {
    fn new(seed: u64) -> Self {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pool = (0..(MIB + 64 * 1024) / 8)
            .flat_map(|_| next().to_le_bytes())
            .collect();
        Self {
            pool,
            state: seed.rotate_left(17) | 1,
            block: 0,
        }
    }

    /// The next `buf.len()` (at most 1 MiB) bytes.
    fn fill(&mut self, buf: &mut [u8]) {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let at = (self.state % (64 * 1024)) as usize;
        buf.copy_from_slice(&self.pool[at..at + buf.len()]);
        let stamp = self.block.to_le_bytes();
        let n = stamp.len().min(buf.len());
        buf[..n].copy_from_slice(&stamp[..n]);
        self.block += 1;
    }

    /// Writes `total` bytes to `out`, returning their hash.
    fn write_to(&mut self, total: u64, out: &mut impl Write) -> BlobHash {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; MIB];
        let mut left = total;
        while left > 0 {
            let n = left.min(MIB as u64) as usize;
            self.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
        BlobHash(hasher.finalize().into())
    }
}

/// The largest peak resident size among the children waited so far, in KiB.
fn children_peak_kib() -> u64 {
    getrusage(UsageWho::RUSAGE_CHILDREN).unwrap().max_rss() as u64
}

/// A running process's peak resident size (`VmHWM`), in KiB.
fn vm_hwm_kib(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn twin_cmd(server: &Server) -> Command {
    let mut cmd = Command::new(bin("twin"));
    cmd.args(["--server", &server.url]).env_remove("TWIN_TOKEN");
    cmd
}

fn hash_file(path: &Path) -> BlobHash {
    let mut f = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).unwrap();
    BlobHash(hasher.finalize().into())
}

#[test]
fn a_blob_of_gigabytes_goes_up_and_down_with_flat_memory() {
    let _serial = serial();
    let total: u64 = std::env::var("TWIN_BIGBLOB_BYTES")
        .ok()
        .map(|v| v.parse().expect("TWIN_BIGBLOB_BYTES is a byte count"))
        .unwrap_or(DEFAULT_BYTES);
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--no-executor"]);
    let before = children_peak_kib();

    let started = Instant::now();
    let mut put = twin_cmd(&server)
        .args(["blobs", "put", "-", "--bytes", &total.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = put.stdin.take().unwrap();
    let expected = Generator::new(42).write_to(total, &mut stdin);
    drop(stdin);
    let out = put.wait_with_output().unwrap();
    assert!(out.status.success(), "twin blobs put -: {:?}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected.to_hex()
    );
    let put_peak = children_peak_kib();
    let uploaded = started.elapsed();

    let started = Instant::now();
    let mut get = twin_cmd(&server)
        .args(["blobs", "get", &expected.to_hex(), "-o", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = get.stdout.take().unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB];
    let mut received = 0u64;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        received += n as u64;
    }
    let status = get.wait().unwrap();
    assert!(status.success(), "twin blobs get -o -: {status}");
    let get_peak = children_peak_kib();
    let downloaded = started.elapsed();
    // Read while the server still runs (its own peak is not among the waited children).
    let server_peak = vm_hwm_kib(server.pid());
    eprintln!(
        "{total} bytes: put {uploaded:.1?}, get {downloaded:.1?}; peak RSS: server {server_peak} KiB, \
         put CLI {put_peak} KiB, get CLI {} KiB (children's peak before: {before} KiB)",
        if get_peak > put_peak {
            format!("{get_peak}")
        } else {
            format!("≤ {put_peak}")
        }
    );
    assert_eq!(received, total);
    assert_eq!(BlobHash(hasher.finalize().into()), expected);
    assert!(
        put_peak < RSS_LIMIT_KIB,
        "twin blobs put peaked at {put_peak} KiB"
    );
    assert!(
        get_peak < RSS_LIMIT_KIB,
        "twin blobs get peaked at {get_peak} KiB"
    );
    assert!(
        server_peak < RSS_LIMIT_KIB,
        "twin-server peaked at {server_peak} KiB"
    );
    server.stop();
}

/// Waits until `path` (or, for a directory, its one `.part` file) holds at least `bytes`.
fn wait_for_size(what: &str, child: &mut Child, bytes: u64, size: impl Fn() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if size() >= bytes {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} ended ({status}) before it was interrupted: make the file larger");
        }
        assert!(
            Instant::now() < deadline,
            "{what} never reached {bytes} bytes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn part_size(uploads: &Path) -> u64 {
    std::fs::read_dir(uploads)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The byte a run said it resumed from (`resuming at byte N` on stderr).
fn resumed_from(out: &Output) -> u64 {
    let (_, stderr) = text(out);
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("resuming at byte "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("the second run did not resume: {stderr}"))
}

fn sigkill(child: &mut Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let _ = child.wait();
}

#[test]
fn an_interrupted_put_or_get_of_a_file_resumes_where_it_stopped() {
    let _serial = serial();
    let size: u64 = 384 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("big.bin");
    let expected = {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let h = Generator::new(7).write_to(size, &mut f);
        f.flush().unwrap();
        h
    };
    let data = tmp.path().join("data");
    let server = Server::start(&data, &["--no-executor"]);
    let uploads = data.join("blobs/uploads");

    let mut put = twin_cmd(&server)
        .args(["blobs", "put"])
        .arg(&file)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_size("twin blobs put", &mut put, 16 << 20, || part_size(&uploads));
    sigkill(&mut put);
    let out = twin_cmd(&server)
        .args(["blobs", "put"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected.to_hex()
    );
    let offset = resumed_from(&out);
    eprintln!("the second `twin blobs put` resumed at byte {offset} of {size}");
    assert!(offset > 0 && offset < size, "resumed at {offset}");
    assert_eq!(
        part_size(&uploads),
        0,
        "the finished upload leaves no partial file"
    );

    let dest = tmp.path().join("back.bin");
    let partial = tmp.path().join("back.bin.partial");
    let mut get = twin_cmd(&server)
        .args(["blobs", "get", &expected.to_hex(), "-o"])
        .arg(&dest)
        .spawn()
        .unwrap();
    wait_for_size("twin blobs get", &mut get, 16 << 20, || {
        std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0)
    });
    sigkill(&mut get);
    assert!(!dest.exists());
    let out = twin_cmd(&server)
        .args(["blobs", "get", &expected.to_hex(), "-o"])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let offset = resumed_from(&out);
    eprintln!("the second `twin blobs get` resumed at byte {offset} of {size}");
    assert!(offset > 0 && offset < size, "resumed at {offset}");
    assert!(!partial.exists());
    assert_eq!(hash_file(&dest), expected);
    server.stop();
}

struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount(&self.0);
    }
}

fn free_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Fills the file system under `path` until a write fails.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

/// Sends a request head, then a chunked body of `parts` (written by `body`, which may stall or
/// change the world between parts), and returns the status line and body of the answer, or
/// what broke.
fn chunked(url: &str, head: &str, mut body: impl FnMut(&mut dyn FnMut(&[u8]) -> bool)) -> String {
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{head}\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut send = |part: &[u8]| -> bool {
        let mut frame = format!("{:x}\r\n", part.len()).into_bytes();
        frame.extend_from_slice(part);
        frame.extend_from_slice(b"\r\n");
        s.write_all(&frame).is_ok()
    };
    body(&mut send);
    let _ = send(&[]);
    let mut answer = String::new();
    match BufReader::new(s).read_to_string(&mut answer) {
        Ok(_) => answer,
        Err(e) => format!("{answer} (read: {e})"),
    }
}

#[test]
fn a_disk_that_fills_while_a_blob_arrives_refuses_it_and_loses_nothing_else() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64m"),
    ) {
        eprintln!("skipped: cannot mount a tmpfs here ({e}); run as root to test a full disk");
        return;
    }
    let _guard = Tmpfs(mnt.clone());
    // No reserve: the refusals below come from the full disk itself.
    let config = tmp.path().join("server.toml");
    std::fs::write(&config, "storage_reserve_bytes = 0\n").unwrap();
    let data = mnt.join("data");
    let mut server = Server::start(
        &data,
        &["--no-executor", "--config", config.to_str().unwrap()],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = twin_client::Client::new(&server.url, None).unwrap();
    let earlier = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let earlier_hash = rt.block_on(client.put_blob(earlier.clone())).unwrap().hash;
    let spec = |i: usize| serde_json::json!({"spec": {"kind": "ingest", "dataset": format!("d{i}"), "source": {"dir": "/nowhere"}}});
    rt.block_on(client.submit(&spec(0), None)).unwrap();
    let leftovers = |dir: &str| {
        std::fs::read_dir(data.join("blobs").join(dir))
            .map(|d| d.count())
            .unwrap_or(0)
    };

    // A PUT with no declared length, so only the disk stops it: more than fits.
    let hash = BlobHash::of(b"never stored");
    let answer = chunked(
        &server.url,
        &format!("PUT /v1/blobs/{hash} HTTP/1.1\r\nContent-Type: application/octet-stream"),
        |send| {
            let part = vec![1u8; MIB];
            for _ in 0..100 {
                if !send(&part) {
                    break;
                }
            }
        },
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("storage_unavailable"), "{answer}");
    assert_eq!(leftovers("tmp"), 0, "the refused PUT left a temporary file");

    // A session that fits, receiving when the disk fills up under it.
    let room = free_bytes(&data) - (4 << 20);
    let session = rt.block_on(client.create_upload(room, None)).unwrap();
    let uploads = data.join("blobs/uploads");
    let answer = chunked(
        &server.url,
        &format!(
            "PATCH /v1/uploads/{} HTTP/1.1\r\nContent-Type: application/offset+octet-stream\r\n\
             Upload-Offset: 0",
            session.id
        ),
        |send| {
            let part = vec![2u8; MIB];
            assert!(send(&part));
            eventually(Duration::from_secs(10), "the first MiB on disk", || {
                (part_size(&uploads) >= MIB as u64).then_some(())
            });
            fill(&mnt.join("filler"));
            let mut sent = MIB as u64;
            while sent + (MIB as u64) < room && send(&part) {
                sent += MIB as u64;
            }
        },
    );
    assert!(
        answer.starts_with("HTTP/1.1 503") || answer.contains("read:") || answer.is_empty(),
        "{answer}"
    );
    let gone = rt.block_on(client.upload_status(&session.id)).unwrap_err();
    assert_eq!(gone.code(), Some("not_found"), "{gone}");
    assert_eq!(leftovers("uploads"), 0, "the refused session left files");

    // With the disk still full, a new upload is refused before it starts.
    let small = tmp.path().join("small.bin");
    std::fs::write(&small, vec![3u8; 8 << 20]).unwrap();
    let out = twin_cmd(&server)
        .args(["blobs", "put"])
        .arg(&small)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("storage_unavailable"),
        "{:?}",
        text(&out)
    );
    assert!(server.alive(), "the server survives a full disk");

    // Space returns: the earlier blob is intact, appends and uploads work again.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    assert_eq!(
        rt.block_on(client.get_blob(&earlier_hash)).unwrap(),
        earlier
    );
    let appended = (1..100).any(|i| {
        let ok = rt.block_on(client.submit(&spec(i), None)).is_ok();
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    assert!(appended, "appends succeed again once space returns");
    let out = twin_cmd(&server)
        .args(["blobs", "put"])
        .arg(&small)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    server.stop();
}
