//! The `moebius` binary: parses flags into configs and calls into the crates.

mod allocator;
mod bench;
mod cmd;
mod generate;
mod telemetry;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use telemetry::LogFormat;

/// Expert-parallel serving of DeepSeek-family MoE models.
#[derive(Parser)]
#[command(name = "moebius", version, about)]
struct Cli {
    /// How log lines (stderr) are written: `text` for people, `json` (one object per line,
    /// with the fields of the request's span, e.g. its `request_id`) for log pipelines.
    #[arg(long, global = true, env = "MOEBIUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// OTLP/gRPC endpoint to export traces to (e.g. http://127.0.0.1:4317): one trace per
    /// request, from the router through the worker. Off when unset.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Check the flags and `MOEBIUS_*` variables of `worker`, `router` or `coordinator` as at
    /// start-up, print what the part would start as, and exit (2 and the problem when they are
    /// wrong, an unknown `MOEBIUS_*` variable included). Opens no port and no etcd connection.
    #[arg(long, global = true)]
    check_config: bool,
    /// Kernel family of the products with bf16 weights: `auto` (the best this CPU has), or
    /// one this CPU supports to test or measure it: `avx512bf16`, `avx512`, `avx2`, `neon`
    /// (aarch64), `portable`. The parts `up` starts inherit it.
    #[arg(long, global = true, env = "MOEBIUS_KERNELS", default_value = "auto")]
    kernels: String,
    /// On a GPU with FP8 tensor cores (Hopper, cuBLASLt 12.9 or later), quantise the
    /// activations of FP8 weights' products of more than 8 rows to FP8 in 1 × 128 blocks and
    /// multiply on the tensor cores, as DeepSeek-V3 was trained: faster prefill, further from
    /// transformers' numbers. Off (the default), those products dequantise the weight to bf16,
    /// as DeepSeek's reference inference does. The parts `up` starts inherit it.
    #[arg(long, global = true, env = "MOEBIUS_FP8_ACTIVATIONS")]
    fp8_activations: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt with a checkpoint directory, in this process.
    Generate(generate::GenerateArgs),
    /// Start a whole cluster on this machine: router, coordinator and workers.
    Up(cmd::up::UpArgs),
    /// Run one worker: a rank of the EP group with its slice of the experts.
    Worker(cmd::worker::WorkerArgs),
    /// Run a coordinator: forms epochs and places experts (one acts, others stand by).
    Coordinator(cmd::coordinator::CoordinatorArgs),
    /// Run the router: the public gRPC API.
    Router(cmd::router::RouterArgs),
    /// Operator commands against the leading coordinator: topology, rebalance, drain,
    /// redundant experts.
    Admin(cmd::admin::AdminArgs),
    /// One gRPC health check of a part (exit 0 when SERVING): the probe of a chart with TLS.
    Health(cmd::health::HealthArgs),
    /// Write a throwaway CA, a certificate it signs, its key and a data-plane secret into a
    /// folder: TLS for a cluster on one machine or a first try (`--tls-*` flags of each part).
    Certs(cmd::tls::CertsArgs),
    /// Benchmarks (numbers for BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// `--kernels`: forces a kernel family (and hands it on to the parts `up` starts).
fn force_kernels(name: &str) -> Result<(), String> {
    use moebius_worker::backend::kernels::{self, Family};
    if name == "auto" {
        return Ok(());
    }
    let family = Family::parse(name).ok_or_else(|| {
        format!("--kernels {name}: give auto, avx512bf16, avx512, avx2, neon or portable")
    })?;
    kernels::force(family).map_err(|e| format!("--kernels {name}: {e}"))?;
    std::env::set_var("MOEBIUS_KERNELS", name);
    Ok(())
}

/// Exit code for input the user can fix (bad flags, bad prompt).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    allocator::retain_freed_memory();
    let cli = Cli::parse();
    if cli.check_config {
        return exit(cmd::check::run(&Cli::command(), &cli.command));
    }
    let service = match &cli.command {
        Command::Up(_) => "moebius",
        Command::Worker(_) => "moebius-worker",
        Command::Coordinator(_) => "moebius-coordinator",
        Command::Router(_) => "moebius-router",
        _ => "moebius-cli",
    };
    // The parts `up` starts as processes inherit the log format and the trace endpoint.
    if let Some(endpoint) = &cli.otlp_endpoint {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    }
    std::env::set_var("MOEBIUS_LOG_FORMAT", cli.log_format.name());
    if let Err(line) = force_kernels(&cli.kernels) {
        eprintln!("error: {line}");
        return ExitCode::from(EXIT_USAGE);
    }
    moebius_worker::backend::device::use_fp8_activations(cli.fp8_activations);
    if cli.fp8_activations {
        std::env::set_var("MOEBIUS_FP8_ACTIVATIONS", "true");
    }
    let _telemetry = match telemetry::init(cli.log_format, cli.otlp_endpoint.as_deref(), service) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    exit(match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Up(args) => cmd::up::run(args),
        Command::Worker(args) => cmd::worker::run(args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Router(args) => cmd::router::run(args),
        Command::Admin(args) => cmd::admin::run(args),
        Command::Certs(args) => cmd::tls::run(args),
        Command::Health(args) => cmd::health::run(args),
    })
}

/// The exit code of a command's result, with its error on stderr.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let usage = err
                .downcast_ref::<moebius_worker::Error>()
                .is_some_and(|e| {
                    matches!(
                        e,
                        moebius_worker::Error::InvalidRequest(_) | moebius_worker::Error::Device(_)
                    )
                })
                || err.is::<cmd::UsageError>();
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}
