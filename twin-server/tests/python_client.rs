//! A client no one here wrote: `examples/python/client.py` (grpcio, with the stubs that
//! `examples/python/gen.sh` generates from proto/) against the real `twin serve` binary on a free
//! port with a temporary data folder. The client lists, creates, syncs as the device, watches,
//! updates desired and must see the delta on the device stream and the change on the watch.
//!
//! Needs python3 with the packages of examples/python/requirements.txt. Without them this test
//! fails (it does not skip) and says which command installs them; `.ci/run` installs them first.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The command that installs what the test needs.
const INSTALL: &str = "python3 -m pip install -r examples/python/requirements.txt";

/// Longest a client run may take; client.py bounds itself well below (10 x its --timeout).
const CLIENT_LIMIT: Duration = Duration::from_secs(150);

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python")
}

/// Fails with the install command unless python3 can import grpcio and grpcio-tools.
fn require_python_packages() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc, google.protobuf"])
        .output();
    match probe {
        Err(error) => panic!("python3 is not available ({error}): install Python 3, then run `{INSTALL}`"),
        Ok(output) if !output.status.success() => panic!(
            "python3 cannot import grpcio/grpcio-tools/protobuf ({}): run `{INSTALL}` (from the repository root)",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Ok(_) => {}
    }
}

/// `twin serve` on 127.0.0.1:0; its stderr is drained by a thread after the address is read.
struct Server {
    child: Child,
    address: String,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    fn start(data: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_twin"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("twin serve starts");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        // The log line "serving twin.v1 address=127.0.0.1:PORT" says the server accepts calls.
        let mut address = None;
        let mut seen = String::new();
        let mut line = String::new();
        while address.is_none() {
            line.clear();
            if stderr.read_line(&mut line).expect("read the server log") == 0 {
                panic!("twin serve exited before serving:\n{seen}");
            }
            seen.push_str(&line);
            if line.contains("serving twin.v1") {
                address = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("address="))
                    .map(str::to_owned);
            }
        }
        let log = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            seen + &rest
        });
        Server {
            child,
            address: address.expect("address"),
            log: Some(log),
        }
    }

    /// SIGTERM, then the exit status must be 0; returns the whole log.
    fn stop(mut self) -> String {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let status = self.child.wait().expect("twin serve exits");
        let log = self
            .log
            .take()
            .map(|log| log.join().expect("log thread"))
            .unwrap_or_default();
        assert_eq!(status.code(), Some(0), "twin serve:\n{log}");
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only reached with the child still running when a test failed: do not leave it behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to its end, killing it after `limit`.
fn run_bounded(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let id = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let output = child.wait_with_output();
        let _ = done.send(());
        output
    });
    let started = Instant::now();
    if finished.recv_timeout(limit).is_err() {
        let _ = Command::new("kill").args(["-KILL", &id.to_string()]).status();
        panic!("{command:?} took longer than {:?} (killed)", started.elapsed());
    }
    waiter.join().expect("waiter").expect("the command's output")
}

fn client(stubs: &Path, address: &str, extra: &[&str]) -> Output {
    let mut command = Command::new("python3");
    command
        .arg(examples_dir().join("client.py"))
        .arg("--stubs")
        .arg(stubs)
        .args(["--target", address])
        .args(extra);
    run_bounded(command, CLIENT_LIMIT)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_python_client_sees_the_delta_on_its_device_stream_and_the_change_on_its_watch() {
    require_python_packages();
    let dir = tempfile::tempdir().expect("tempdir");
    let stubs = dir.path().join("stubs");

    let mut gen_sh = Command::new("bash");
    gen_sh.arg(examples_dir().join("gen.sh")).arg(&stubs);
    let generated = run_bounded(gen_sh, CLIENT_LIMIT);
    assert!(
        generated.status.success(),
        "gen.sh failed ({}):\n{}{}\nrun `{INSTALL}`",
        generated.status,
        text(&generated.stdout),
        text(&generated.stderr)
    );
    assert!(stubs.join("twin/v1/twins_pb2_grpc.py").is_file());

    let server = Server::start(&dir.path().join("data"));
    let first = client(&stubs, &server.address, &["--device", "py-test-1"]);
    let (stdout, stderr) = (text(&first.stdout), text(&first.stderr));
    assert_eq!(first.status.code(), Some(0), "client.py failed:\n{stdout}\n{stderr}");
    let expected = [
        format!("connected to {} (plaintext)", server.address),
        "listed 0 twins".to_owned(),
        "created twin py-test-1 at version 1".to_owned(),
        "device stream open: CONNECTED delta {\"sampling\":{\"rate_hz\":10}}".to_owned(),
        "watch started at revision".to_owned(),
        "desired updated: version".to_owned(),
        "device received delta (DESIRED_CHANGED) at version".to_owned(),
        "watch saw DESIRED_UPDATED of py-test-1 at revision".to_owned(),
        "device reported it back: ack version".to_owned(),
        "watch saw REPORTED_UPDATED of py-test-1".to_owned(),
        "twin py-test-1 at version".to_owned(),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    let mut at = 0;
    for wanted in &expected {
        let found = lines[at..].iter().position(|line| line.starts_with(wanted.as_str()));
        let Some(offset) = found else {
            panic!("client.py did not print {wanted:?} (in order):\n{stdout}");
        };
        at += offset + 1;
    }
    assert!(stdout.contains("\"python_client\":{"), "{stdout}");
    assert!(
        stdout.contains(": delta {}\n"),
        "the delta should be empty at the end:\n{stdout}"
    );
    assert_eq!(lines.last().copied(), Some("ok"), "{stdout}");

    // The twin exists now: a second run finds it instead of creating it.
    let second = client(&stubs, &server.address, &["--device", "py-test-1"]);
    let stdout = text(&second.stdout);
    assert_eq!(
        second.status.code(),
        Some(0),
        "second run:\n{stdout}\n{}",
        text(&second.stderr)
    );
    assert!(
        stdout.contains("listed 1 twins\ntwin py-test-1 exists at version"),
        "{stdout}"
    );

    let address = server.address.clone();
    let log = server.stop();
    assert!(log.contains("server stopped"), "{log}");

    // Nothing listening any more: the client fails with a clear message and a non-zero exit.
    let refused = client(&stubs, &address, &["--timeout", "1"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.starts_with("error: connect: ") && stderr.contains("not reachable"),
        "{stderr}"
    );
}
