//! A broker restarted mid-run: device-sim reconnects (devices and checker), counts what was
//! lost, and completes its report. The test runs its own Mosquitto on a free port (the shared
//! one stays untouched), kills it once every device has published and starts it again.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Longest wait for any one step; a test that needs longer has failed.
const PATIENCE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// Starts `mosquitto -v -p PORT`; its log lines (stderr) arrive on the returned channel.
fn mosquitto(port: u16) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new("mosquitto")
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/local/sbin",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .args(["-v", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!("cannot start mosquitto ({err}): `apt-get install mosquitto` (see device-sim/README.md)")
        });
    let stderr = child.stderr.take().expect("stderr");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, received)
}

/// Waits for `count` log lines containing `pattern`.
fn wait_for(lines: &mpsc::Receiver<String>, pattern: &str, count: usize) {
    let mut seen = 0;
    while seen < count {
        let line = lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("mosquitto never logged {pattern:?}"));
        if line.contains(pattern) {
            seen += 1;
        }
    }
}

/// Waits until `count` distinct clients have published. A client publishes only once it has read
/// the broker's CONNACK, so each of them counts the next connection as a reconnect; the broker
/// logging "New client connected" is not enough (it logs on CONNECT, before its CONNACK may have
/// been read, and a client that never read one has never been connected).
fn wait_for_publishers(lines: &mpsc::Receiver<String>, count: usize) {
    let mut publishers = BTreeSet::new();
    while publishers.len() < count {
        let line = lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("only {publishers:?} published"));
        if let Some((_, rest)) = line.split_once("Received PUBLISH from ") {
            publishers.insert(rest.split_whitespace().next().unwrap_or_default().to_string());
        }
    }
}

#[test]
fn a_broker_restart_means_reconnects_counted_losses_and_a_complete_report() {
    let port = free_port();
    let (mut first, lines) = mosquitto(port);
    wait_for(&lines, "running", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let scenario = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/device-sim-smoke.toml");
    let mut fleet = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "run",
            &scenario.display().to_string(),
            "--target",
            &format!("mqtt://127.0.0.1:{port}"),
            "--qos",
            "1",
            "--clock",
            "scaled:0.5",
            "--drain-timeout",
            "3s",
            "--json",
            &json.display().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("device-sim starts");
    // The five devices connect and publish; then the broker goes away and comes back.
    wait_for_publishers(&lines, 5);
    first.kill().expect("kill mosquitto");
    first.wait().expect("mosquitto ends");
    let (mut second, lines) = mosquitto(port);
    wait_for(&lines, "running", 1);
    let status = fleet.wait().expect("device-sim ends");
    let _ = second.kill();
    let _ = second.wait();
    let output = fleet.wait_with_output().expect("output");
    assert!(
        matches!(status.code(), Some(0 | 1)),
        "the run completes (exit 0, or 1 for the losses): {status:?} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    let messages = &report["messages"];
    // The schedule is open loop: the restart changes nothing about what the fleet sent.
    assert_eq!(messages["sent"], 30, "{report}");
    let sent = messages["sent"].as_u64().expect("sent");
    let received = messages["received"].as_u64().expect("received");
    let lost = messages["lost"].as_u64().expect("lost");
    assert_eq!(received + lost, sent, "every message is received or counted lost");
    assert!(
        report["connections"]["reconnects"].as_u64().expect("reconnects") >= 5,
        "{report}"
    );
    assert!(
        report["connections"]["failures"].as_u64().expect("failures") >= 5,
        "{report}"
    );
    assert_eq!(report["passed"], lost == 0);
}
