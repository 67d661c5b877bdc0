//! The `twin` command's contract, black-box: exit codes, outputs, messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn twin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twin"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("twin runs")
}

fn json_file(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_invalid_scenario_is_refused_with_its_message_and_exit_2() {
    let dir = workspace().join("tests/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/invalid")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "only {} invalid scenarios", files.len());
    for file in files {
        let relative = file
            .strip_prefix(workspace())
            .expect("inside")
            .to_string_lossy()
            .into_owned();
        let source = std::fs::read_to_string(&file).expect("readable");
        let expected = source
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line is `# expect: ...`");
        let output = twin(&["validate", &relative]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{relative}: exit code; stderr: {stderr}");
        assert!(
            stderr.contains(&format!("{relative}:{expected}")),
            "{relative}: expected `{relative}:{expected}` in:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{relative} panicked: {stderr}");
        // `run` refuses it the same way, before doing anything.
        let output = twin(&["run", &relative, "--out", "target/cli-test-invalid"]);
        assert_eq!(output.status.code(), Some(2), "{relative}: run exit code");
    }
}

#[test]
fn validate_accepts_every_shipped_scenario() {
    let mut args = vec!["validate".to_owned()];
    for entry in std::fs::read_dir(workspace().join("scenarios")).expect("scenarios") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            args.push(
                path.strip_prefix(workspace())
                    .expect("inside")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = twin(&refs);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout).lines().filter(|l| l.contains(": ok (")).count(),
        args.len() - 1
    );
}

#[test]
fn validate_with_one_bad_file_among_good_ones_exits_2() {
    let output = twin(&["validate", "scenarios/quickstart.toml", "tests/invalid/zero-count.toml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stdout).contains("scenarios/quickstart.toml: ok"));
    assert!(text(&output.stderr).contains("fleet[1].count: must be at least 1, got 0"));
}

#[test]
fn run_writes_report_and_timing_and_exits_0_when_criteria_pass() {
    let out = tempfile::tempdir().expect("tempdir");
    let out_dir = out.path().to_string_lossy().into_owned();
    let output = twin(&["run", "scenarios/quickstart.toml", "--out", &out_dir]);
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        text(&output.stderr)
    );
    assert!(stdout.contains("criteria: 5 passed, 0 failed"), "{stdout}");
    let report = json_file(&out.path().join("report.json"));
    assert_eq!(report["scenario"], "quickstart");
    assert_eq!(report["passed"], true);
    assert_eq!(report["run"]["devices"], 100);
    let timing = json_file(&out.path().join("timing.json"));
    assert!(timing["wall_seconds"].as_f64().is_some_and(|s| s > 0.0));
    // Machine-dependent figures stay out of the report.
    assert!(report.get("wall_seconds").is_none() && report.to_string().find("wall").is_none());
}

#[test]
fn a_failing_criterion_exits_1_and_is_listed_with_its_measured_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = std::fs::read_to_string(workspace().join("scenarios/quickstart.toml"))
        .expect("quickstart")
        .replace("metric = \"faults.drift\"\neq = 6", "metric = \"faults.drift\"\neq = 7");
    let path = dir.path().join("failing.toml");
    std::fs::write(&path, scenario).expect("write");
    let out_dir = dir.path().join("out");
    let output = twin(&["run", &path.to_string_lossy(), "--out", &out_dir.to_string_lossy()]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL the drift reached six pumps: faults.drift = 6 (expected == 7)"),
        "{stdout}"
    );
    let report = json_file(&out_dir.join("report.json"));
    assert_eq!(report["passed"], false);
}

#[test]
fn thread_count_does_not_change_a_byte_of_report_or_recording() {
    let dir = tempfile::tempdir().expect("tempdir");
    // sensor-faults with its recording; vibration-monitoring (models scoring windows) by its report.
    for (scenario, record) in [
        ("scenarios/sensor-faults.toml", true),
        ("scenarios/vibration-monitoring.toml", false),
    ] {
        let mut outputs = Vec::new();
        for threads in ["1", "2", "3"] {
            let out_dir = dir.path().join(threads);
            let out = out_dir.to_string_lossy().into_owned();
            let mut args = vec!["run", scenario, "--threads", threads, "--out", &out];
            if record {
                args.push("--record");
            }
            let output = twin(&args);
            assert_eq!(output.status.code(), Some(0), "{scenario}: {}", text(&output.stderr));
            let report = std::fs::read(out_dir.join("report.json")).expect("report");
            let recording = if record {
                std::fs::read(out_dir.join("recording.jsonl")).expect("recording")
            } else {
                Vec::new()
            };
            outputs.push((report, recording));
        }
        assert!(
            !record || outputs[0].1.len() > 1_000_000,
            "{scenario}: the recording holds the run's readings"
        );
        assert!(
            outputs.iter().all(|o| o == &outputs[0]),
            "{scenario}: reports or recordings differ between thread counts"
        );
    }
}

#[test]
fn seed_flag_changes_the_run_and_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    assert_eq!(
        twin(&["run", "scenarios/quickstart.toml", "--out", &a.to_string_lossy()])
            .status
            .code(),
        Some(0)
    );
    assert!(
        twin(&[
            "run",
            "scenarios/quickstart.toml",
            "--seed",
            "43",
            "--out",
            &b.to_string_lossy()
        ])
        .status
        .code()
        .is_some()
    );
    let report_a = std::fs::read_to_string(a.join("report.json")).expect("a");
    let report_b = std::fs::read_to_string(b.join("report.json")).expect("b");
    assert!(report_b.contains("\"seed\": 43"));
    assert_ne!(report_a, report_b);
}

#[test]
fn bad_invocations_exit_2_with_a_message() {
    let missing = twin(&["run", "scenarios/no-such-file.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("scenarios/no-such-file.toml:1:1: cannot read the scenario"),
        "{}",
        text(&missing.stderr)
    );
    let bad_flag = twin(&["run", "scenarios/quickstart.toml", "--clock", "warp:9"]);
    assert_eq!(bad_flag.status.code(), Some(2));
    assert!(text(&bad_flag.stderr).contains("`warp:9` is not virtual, realtime or scaled:FACTOR"));
    let no_files = twin(&["validate"]);
    assert_eq!(no_files.status.code(), Some(2));
    let unwritable = twin(&[
        "run",
        "scenarios/quickstart.toml",
        "--out",
        "/proc/twin-cannot-write-here",
    ]);
    assert_eq!(unwritable.status.code(), Some(2));
    assert!(
        text(&unwritable.stderr).contains("cannot create the output folder /proc/twin-cannot-write-here"),
        "{}",
        text(&unwritable.stderr)
    );
}

#[test]
fn metrics_lists_the_names_criteria_can_use() {
    let output = twin(&["metrics", "scenarios/quickstart.toml"]);
    assert_eq!(output.status.code(), Some(0));
    let names = text(&output.stdout);
    for name in [
        "edge.raw.bytes",
        "groups.pumps.sensors.temperature.mean",
        "groups.monitors.sensors.accel.axes.x.std_dev",
        "gateways.plant-gw.lost.messages",
    ] {
        assert!(names.lines().any(|l| l == name), "{name} missing");
    }
}

#[test]
fn scaled_and_realtime_pacing_hold_simulated_time_to_the_wall_clock() {
    // 200 simulated seconds at 100x take at least 2 wall seconds; virtual takes far less.
    // (A lower bound on wall time is the pacing contract; no upper bound is asserted.)
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = "[meta]\nname = \"paced\"\n[clock]\nmode = \"scaled\"\nfactor = 100\nduration = \"200s\"\ntick = \"10s\"\n[[fleet]]\nname = \"g\"\ncount = 2\n[[fleet.sensors]]\nname = \"s\"\nrate_hz = 1.0\nconstant = { value = 1.0 }\n";
    let path = dir.path().join("paced.toml");
    std::fs::write(&path, scenario).expect("write");
    let out = dir.path().join("out");
    let output = twin(&["run", &path.to_string_lossy(), "--out", &out.to_string_lossy()]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let timing: serde_json::Value = json_file(&out.join("timing.json"));
    assert!(timing["wall_seconds"].as_f64().expect("wall") >= 2.0, "{timing}");
    // --clock virtual overrides the scenario's pacing: the same run, unpaced, same report.
    let report_paced = std::fs::read(out.join("report.json")).expect("report");
    let output = twin(&[
        "run",
        &path.to_string_lossy(),
        "--clock",
        "virtual",
        "--out",
        &out.to_string_lossy(),
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(std::fs::read(out.join("report.json")).expect("report"), report_paced);
    // realtime: one simulated second per wall second.
    let short = dir.path().join("short.toml");
    std::fs::write(
        &short,
        scenario
            .replace("duration = \"200s\"", "duration = \"1s\"")
            .replace("tick = \"10s\"", "tick = \"250ms\""),
    )
    .expect("write");
    let output = twin(&[
        "run",
        &short.to_string_lossy(),
        "--clock",
        "realtime",
        "--out",
        &out.to_string_lossy(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let timing: serde_json::Value = json_file(&out.join("timing.json"));
    assert!(timing["wall_seconds"].as_f64().expect("wall") >= 1.0, "{timing}");
}

#[test]
fn models_list_inspect_and_run() {
    let list = twin(&["models", "list"]);
    assert_eq!(list.status.code(), Some(0), "{}", text(&list.stderr));
    let listing = text(&list.stdout);
    assert!(listing.contains("vibration-anomaly@2 [champion]"), "{listing}");
    assert_eq!(listing.matches("(sha256 ok)").count(), 4, "{listing}");

    let inspect = twin(&["models", "inspect", "scenarios/models/digits-v1.onnx"]);
    assert_eq!(inspect.status.code(), Some(0));
    let description = text(&inspect.stdout);
    assert!(
        description.contains("input pixels: float [N, 64]") && description.contains("tract: runs it"),
        "{description}"
    );
    let unsupported = twin(&["models", "inspect", "tests/models/skl2onnx-zipmap.onnx"]);
    assert_eq!(unsupported.status.code(), Some(1));
    assert!(
        text(&unsupported.stdout)
            .contains("tract: cannot run it: operator not supported by tract: ZipMap (ai.onnx.ml, node `ZipMap`)"),
        "{}",
        text(&unsupported.stdout)
    );

    let row = "[0.01, 0.0, -9.8, 0.4, 0.05, 0.05, 1.6, 0.2, 0.2]";
    let run = twin(&[
        "models",
        "run",
        "vibration-anomaly@2",
        "--input",
        &format!("[{row}, {row}]"),
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    let rows: serde_json::Value = serde_json::from_str(&text(&run.stdout)).expect("json rows");
    assert_eq!(rows.as_array().expect("array").len(), 2);
    assert!(rows[0]["score"].as_f64().is_some_and(|s| (0.0..=1.0).contains(&s)));
    let by_path = twin(&[
        "models",
        "run",
        "scenarios/models/vibration-anomaly-v2.onnx",
        "--input",
        row,
    ]);
    assert_eq!(text(&by_path.stdout), format!("[{}]\n", rows[0]));

    for (args, message) in [
        (
            vec!["models", "run", "vibration-anomaly@9", "--input", row],
            "model `vibration-anomaly` has no version or alias `9` (versions: 1, 2, 3",
        ),
        (
            vec!["models", "run", "nonesuch", "--input", row],
            "unknown model `nonesuch`",
        ),
        (
            vec!["models", "run", "vibration-anomaly", "--input", "[1, 2]"],
            "row 0 has 2 values; `features` takes 9 per row",
        ),
        (
            vec!["models", "run", "vibration-anomaly", "--input", "{"],
            "--input is not JSON",
        ),
        (
            vec!["models", "run", "scenarios/models/missing.onnx", "--input", row],
            "cannot read scenarios/models/missing.onnx",
        ),
        (vec!["models", "inspect", "README.md"], "not a valid ONNX model"),
    ] {
        let output = twin(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            text(&output.stderr).contains(message),
            "{args:?}: {}",
            text(&output.stderr)
        );
    }
}
