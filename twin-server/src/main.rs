//! `twin`: run and validate fleet scenarios.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use twin_core::LoadOptions;
use twin_core::time::ClockMode;
use twin_server::files::load_scenario;
use twin_server::run::{RunRequest, default_out_dir, run_scenario};
use twin_server::{EXIT_CRITERIA_FAILED, EXIT_INVALID, EXIT_OK, models, summary};

/// Digital twin of an edge-AI fleet: run what-if scenarios far faster than real time.
#[derive(Parser, Debug)]
#[command(name = "twin", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario and write its report (exit 0: criteria pass, 1: a criterion fails, 2: invalid input).
    Run {
        /// Scenario file (TOML).
        file: PathBuf,
        /// Override the scenario's master seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Output folder (default: `out/<scenario name>/`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write every reading to recording.jsonl (the replay format).
        #[arg(long)]
        record: bool,
        /// Override the pacing: virtual, realtime, or scaled:FACTOR.
        #[arg(long, value_parser = parse_pace)]
        clock: Option<ClockMode>,
        /// Worker threads for the sensor pass (default: all cores). Results do not depend on it.
        #[arg(long)]
        threads: Option<usize>,
        /// Largest estimated fleet memory accepted, in MiB.
        #[arg(long, default_value_t = 8192)]
        max_memory: u64,
    },
    /// Check scenario files (exit 0: all valid, 2: any invalid; problems on stderr).
    Validate {
        /// Scenario files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Largest estimated fleet memory accepted, in MiB.
        #[arg(long, default_value_t = 8192)]
        max_memory: u64,
    },
    /// List the metric names a scenario's criteria can use.
    Metrics {
        /// Scenario file.
        file: PathBuf,
    },
    /// The model registry: list, inspect and run ONNX models (exit 2 on any error).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Every model version in the registry: aliases, file, sha256 (verified), inputs, outputs.
    List {
        /// Registry folder (holds manifest.json).
        #[arg(long, default_value = models::DEFAULT_MODELS_DIR)]
        dir: PathBuf,
    },
    /// Operators, shapes and metadata of an ONNX file, and whether tract can run it (exit 1 if not).
    Inspect {
        /// The .onnx file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a model: a JSON array of input rows in, a JSON array of output rows on stdout.
    Run {
        /// MODEL, MODEL@VERSION, MODEL@ALIAS, or a path to an .onnx file.
        model: String,
        /// JSON array of rows (each an array of numbers), or one row.
        #[arg(long)]
        input: String,
        /// Registry folder (holds manifest.json).
        #[arg(long, default_value = models::DEFAULT_MODELS_DIR)]
        dir: PathBuf,
    },
}

fn parse_pace(text: &str) -> Result<ClockMode, String> {
    match text {
        "virtual" => Ok(ClockMode::Virtual),
        "realtime" => Ok(ClockMode::Realtime),
        _ => match text.strip_prefix("scaled:").map(str::parse::<f64>) {
            Some(Ok(factor)) if factor > 0.0 && factor.is_finite() => Ok(ClockMode::Scaled { factor }),
            _ => Err(format!(
                "`{text}` is not virtual, realtime or scaled:FACTOR (FACTOR > 0)"
            )),
        },
    }
}

fn load_options(max_memory_mib: u64, seed: Option<u64>) -> LoadOptions {
    LoadOptions {
        max_memory_bytes: max_memory_mib.saturating_mul(1 << 20),
        seed,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { EXIT_INVALID } else { EXIT_OK });
        }
    };
    ExitCode::from(match cli.command {
        Command::Run {
            file,
            seed,
            out,
            record,
            clock,
            threads,
            max_memory,
        } => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
            twin_core::init_threads(threads);
            let scenario = match load_scenario(&file, load_options(max_memory, seed)) {
                Ok(s) => s,
                Err(err) => {
                    eprintln!("{err}");
                    return ExitCode::from(EXIT_INVALID);
                }
            };
            let out_dir = out.unwrap_or_else(|| default_out_dir(&scenario));
            let request = RunRequest {
                out_dir,
                record,
                pace: clock,
                progress: true,
                threads,
            };
            match run_scenario(scenario, &request) {
                Ok(outcome) => {
                    print!("{}", summary::render(&outcome));
                    if outcome.report.passed {
                        EXIT_OK
                    } else {
                        EXIT_CRITERIA_FAILED
                    }
                }
                Err(err) => {
                    eprintln!("error: {err:#}");
                    EXIT_INVALID
                }
            }
        }
        Command::Validate { files, max_memory } => {
            let mut all_valid = true;
            for file in &files {
                match load_scenario(file, load_options(max_memory, None)) {
                    Ok(scenario) => println!(
                        "{}: ok ({} devices, {} sensors, {} events, {} criteria)",
                        file.display(),
                        scenario.device_count(),
                        scenario.sensor_count(),
                        scenario.events.len(),
                        scenario.criteria.len()
                    ),
                    Err(err) => {
                        eprintln!("{err}");
                        all_valid = false;
                    }
                }
            }
            if all_valid { EXIT_OK } else { EXIT_INVALID }
        }
        Command::Models { command } => run_models(command),
        Command::Metrics { file } => match load_scenario(&file, LoadOptions::default()) {
            Ok(scenario) => {
                let (numbers, texts) = twin_core::report::metric_names(&scenario);
                for name in numbers {
                    println!("{name}");
                }
                for name in texts {
                    println!("{name}  (text: compare with equals)");
                }
                EXIT_OK
            }
            Err(err) => {
                eprintln!("{err}");
                EXIT_INVALID
            }
        },
    })
}

fn run_models(command: ModelsCommand) -> u8 {
    let outcome = match command {
        ModelsCommand::List { dir } => models::list(&dir).map(|text| (text, true)),
        ModelsCommand::Inspect { file, json } => models::inspect_file(&file, json),
        ModelsCommand::Run { model, input, dir } => models::run(&model, &input, &dir).map(|text| (text, true)),
    };
    match outcome {
        Ok((text, ok)) => {
            print!("{text}");
            if ok { EXIT_OK } else { EXIT_CRITERIA_FAILED }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            EXIT_INVALID
        }
    }
}
