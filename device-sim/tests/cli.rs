//! The `device-sim` binary's contract, as a subprocess: exit codes and messages for bad input,
//! unreachable targets and failed load criteria.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{require_broker, scenarios, unique};

fn device_sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(args)
        .output()
        .expect("device-sim runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn smoke() -> String {
    scenarios().join("device-sim-smoke.toml").display().to_string()
}

#[test]
fn a_bad_url_or_an_unknown_scheme_exits_2() {
    let smoke = smoke();
    for (url, expected) in [
        ("127.0.0.1:1883", "not a URL"),
        ("amqp://127.0.0.1:5672", "unknown scheme `amqp`"),
        ("grpc://127.0.0.1", "needs a port"),
        ("mqtt://127.0.0.1:http", "port `http` is not a number"),
    ] {
        let output = device_sim(&["run", &smoke, "--target", url]);
        assert_eq!(output.status.code(), Some(2), "{url}: {}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{url}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(url),
            "the message names the URL: {}",
            stderr(&output)
        );
    }
}

#[test]
fn an_unreachable_target_exits_2_within_the_connect_timeout() {
    // Port 9 on loopback: nothing listens there (connection refused).
    let smoke = smoke();
    for url in ["mqtt://127.0.0.1:9", "nats://127.0.0.1:9", "grpc://127.0.0.1:9"] {
        let output = device_sim(&["run", &smoke, "--target", url, "--connect-timeout", "2s"]);
        assert_eq!(output.status.code(), Some(2), "{url}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(
            message.contains("cannot connect to") && message.contains(url),
            "{url}: {message}"
        );
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

const FLEET: &str = r#"
[meta]
name = "cli"

[clock]
duration = "1s"
tick = "250ms"

[[fleet]]
name = "t"
count = 2
[[fleet.sensors]]
name = "temperature"
rate_hz = 4
constant = { value = 20.0 }

[[criteria]]
metric = "run.devices"
eq = 2
"#;

#[test]
fn scenario_errors_exit_2_with_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unknown_field = write(
        dir.path(),
        "unknown.toml",
        &format!("{FLEET}\n[load]\nduratoin = \"1s\"\n"),
    );
    let output = device_sim(&["run", &unknown_field, "--target", "mqtt://127.0.0.1:9"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "{unknown_field}:22:1: load.duratoin: unknown field `duratoin`"
        )),
        "{message}"
    );

    let unknown_metric = write(
        dir.path(),
        "metric.toml",
        &format!("{FLEET}\n[[load.criteria]]\nmetric = \"e2e_p99\"\nlt = 50\n"),
    );
    let output = device_sim(&["run", &unknown_metric, "--target", "mqtt://127.0.0.1:9"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "{unknown_metric}:22:1: load.criteria[0].metric: unknown metric `e2e_p99` (did you mean `e2e_p99_ms`?)"
        )),
        "{message}"
    );
}

#[test]
fn a_failed_load_criterion_exits_1_and_the_json_report_says_why() {
    require_broker("NATS", 4222);
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = write(
        dir.path(),
        "fails.toml",
        &format!("{FLEET}\n[load]\n[[load.criteria]]\nmetric = \"sent\"\nlt = 1\n"),
    );
    let json = dir.path().join("report.json");
    let subject = unique("dscli");
    let output = device_sim(&[
        "run",
        &scenario,
        "--target",
        "nats://127.0.0.1:4222",
        "--topic",
        &format!("{subject}.{{id}}"),
        "--json",
        &json.display().to_string(),
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("FAIL sent < 1"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    // Two devices at 4 Hz for 1 s, one message per reading.
    assert_eq!(report["messages"]["sent"], 8);
    assert_eq!(report["metrics"]["sent"], 8.0);
    assert_eq!(report["passed"], false);
    assert_eq!(report["criteria"][0]["passed"], false);
}

#[test]
fn metrics_lists_the_load_metric_names() {
    let output = device_sim(&["metrics"]);
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for name in ["e2e_p99_ms", "loss", "acks", "convergence_p99_ms", "msgs_per_core_s"] {
        assert!(stdout.lines().any(|l| l.starts_with(name)), "{name} in {stdout}");
    }
}
