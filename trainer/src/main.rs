//! `mixlora`: fine-tune LLaMA-family models with MixLoRA adapters.
//!
//! The libraries read no environment variable: every setting is a value. This binary fills them
//! from its flags (and `train`'s TOML file), and maps the few variables of [`ENVIRONMENT`] onto
//! them, here and nowhere else.

mod export_cmd;
mod generate_cmd;
mod launch_cmd;

// Tensors allocate and free large buffers at every op: mimalloc reuses them instead of mapping
// fresh pages each time (measured 3-15x faster elementwise ops than the system allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use engine::profile::ProfileMode;
use trainer::config::ProfileArgs;

/// The environment variables this binary reads (shown by `--help`).
const ENVIRONMENT: &str = "\
Environment variables:
  MIXLORA_PROFILE        the op profile when --profile is not given: 0 or unset off, gpu CUDA
                         events, anything else wall
  MIXLORA_PROFILE_ROWS   rows of the printed profile when --profile-rows is not given
  MIXLORA_CUDA_INCLUDE   the folder with cuda_bf16.h for NVRTC (else $CUDA_HOME/include, else
                         /usr/local/cuda/include)
  MIXLORA_NVRTC_OPTIONS  options added to every NVRTC compilation, whitespace-separated
                         (e.g. -DLM_CODES_UNROLL=2)
  MIXLORA_CUDA_NO_CACHE  1: no caching allocator on the GPU, each buffer its own driver
                         allocation (for compute-sanitizer's memcheck; slow)
  MIXLORA_FONT           the TrueType font of plot-routing and plot-loss when --font is not
                         given
  (train, data parallel; see --gpus)";

#[derive(Parser)]
#[command(
    name = "mixlora",
    version,
    about = "Fine-tune LLaMA-family models with MixLoRA adapters",
    after_help = help_environment()
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA or MixLoRA adapter. With no arguments: the embedded default, MixLoRA on
    /// synthetic multi-task data with a built-in tiny LLaMA, on the CPU.
    Train(Box<TrainCmd>),
    /// Accuracy per task: every candidate answer scored by its log-likelihood; JSON on stdout.
    Eval(trainer::config::EvalArgs),
    /// Continue a prompt with a base model (GGUF file or Hugging Face folder).
    Generate(generate_cmd::GenerateArgs),
    /// Converts an adapter folder to MoE-PEFT's format (adapter_model.bin) or back to ours
    /// (adapter_model.safetensors); the tensors are copied bit for bit.
    Export(export_cmd::ExportArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Draws the routing picture (PNG: expert shares per task and layer) from the JSON of
    /// `mixlora eval --routing`.
    PlotRouting(PlotRoutingArgs),
    /// Draws the training-loss curves of several runs in one PNG from their metrics.jsonl
    /// (ours, or one JSON object per step with "step" and "loss"), and prints a line per run.
    PlotLoss(PlotLossArgs),
}

#[derive(clap::Args)]
struct TrainCmd {
    #[command(flatten)]
    args: trainer::config::TrainArgs,
    /// With the profile on, where the run's time went is printed at its end (stderr).
    #[command(flatten)]
    profile: ProfileArgs,
    #[command(flatten)]
    launch: launch_cmd::LaunchArgs,
}

/// `--help`'s list of variables: the binary's own, then those of a data-parallel rank.
fn help_environment() -> String {
    format!("{ENVIRONMENT}{}", launch_cmd::ENVIRONMENT)
}

#[derive(clap::Args)]
struct PlotLossArgs {
    /// A run as LABEL=PATH (or PATH, labelled by its folder): its metrics.jsonl, or the run's
    /// folder that holds it. Repeat for each run.
    #[arg(long = "run", required = true, value_name = "LABEL=PATH")]
    runs: Vec<String>,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// Steps in the moving mean of each curve [default: 1% of the longest run, at least 1].
    #[arg(long, value_name = "STEPS")]
    smooth: Option<usize>,
    /// A TrueType font file for the labels [default: $MIXLORA_FONT, then DejaVu Sans or a
    /// system font where one is found].
    #[arg(long)]
    font: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PlotRoutingArgs {
    /// The JSON written by `mixlora eval --routing`.
    #[arg(long)]
    input: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// A TrueType font file for the labels [default: $MIXLORA_FONT, then DejaVu Sans or a
    /// system font where one is found].
    #[arg(long)]
    font: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The MixLoRA paper's Table 6: forward and backward µs/token, tokens/s and peak memory of
    /// LoRA and MixLoRA training steps on a LLaMA-2-7B-shaped model with random bf16 weights;
    /// with `--adapters N,...`, N adapters trained together on the one base against a single run.
    Table6(Box<trainer::bench::Table6Args>),
    /// Training on real data as `mixlora train` runs it (ragged lengths, the recipe's batches):
    /// tokens/s, step time, host busy time per step, GPU busy fraction and peak memory.
    Recipe(Box<RecipeCmd>),
}

#[derive(clap::Args)]
struct RecipeCmd {
    #[command(flatten)]
    args: trainer::bench::recipe::RecipeArgs,
    /// With `--gpus N`, the steps run data parallel as `mixlora train --gpus N` runs them (the
    /// global batch is `--batch`); rank 0 reports the figures of the whole run.
    #[command(flatten)]
    launch: launch_cmd::LaunchArgs,
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = engine::configure_cuda(cuda_options_from_env())
        .map_err(Into::into)
        .and_then(|()| run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Stopped>() {
            Some(stopped) => {
                eprintln!("{stopped}");
                ExitCode::from(trainer::interrupt::EXIT_STATUS)
            }
            None => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A run stopped by an interrupt: what to print (where it stopped, the command that goes on);
/// the exit status is [`trainer::interrupt::EXIT_STATUS`].
#[derive(Debug)]
struct Stopped(String);

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stopped {}

/// The command line as given, for the command that continues an interrupted run.
fn command_line() -> Vec<String> {
    std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// Ctrl-C (and SIGTERM, SIGHUP) set the returned flag, which the training loop polls: it stops
/// at the next micro-batch and saves a checkpoint of the last step done. A second interrupt
/// ends the process at once, printing the command that continues from the newest checkpoints
/// of the output folders `outs` (one per adapter). Only a `writer` (one process, or rank 0 of a
/// data-parallel run) says so; the other ranks stop as quietly.
fn interrupt_flag(outs: Vec<PathBuf>, writer: bool) -> &'static AtomicBool {
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    let installed = ctrlc::set_handler(move || {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            let newest: Vec<_> = outs
                .iter()
                .filter_map(|o| trainer::checkpoint::latest(o).ok().flatten())
                .collect();
            let at = if newest.is_empty() {
                "no checkpoint was saved".to_string()
            } else {
                let list: Vec<String> = newest
                    .iter()
                    .map(|(d, s)| format!("{} (step {})", d.display(), s.step))
                    .collect();
                format!("the newest checkpoints: {}", list.join(", "))
            };
            let newest = newest.first();
            if !writer {
                std::process::exit(trainer::interrupt::EXIT_STATUS.into());
            }
            eprintln!(
                "\nstopped at once; {at}; to go on:\n  {}",
                trainer::interrupt::next_command(&command_line(), newest.is_some())
            );
            std::process::exit(trainer::interrupt::EXIT_STATUS.into());
        }
        if !writer {
            return;
        }
        eprintln!(
            "\ninterrupt: stopping at the next micro-batch, then saving a checkpoint of the last \
             step done (interrupt again to stop at once)"
        );
    });
    if let Err(e) = installed {
        eprintln!("warning: no interrupt handler ({e}): Ctrl-C stops the run without a checkpoint");
    }
    &INTERRUPTED
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Generate(args)) => generate_cmd::run(args),
        Some(Command::Train(cmd)) => train(*cmd),
        Some(Command::Bench(BenchCommand::Table6(args))) => table6(*args),
        Some(Command::Bench(BenchCommand::Recipe(args))) => recipe(*args),
        Some(Command::PlotRouting(args)) => plot_routing(args),
        Some(Command::PlotLoss(args)) => plot_loss(args),
        Some(Command::Export(args)) => export_cmd::run(args),
        Some(Command::Eval(args)) => {
            let report = trainer::scoring::eval(&args)?;
            println!("{}", report.to_json_pretty());
            Ok(())
        }
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            eprintln!(
                "\n(`mixlora train` with no other argument runs the embedded default job: MixLoRA \
                 on synthetic tasks with a built-in tiny LLaMA, on the CPU)"
            );
            Ok(())
        }
    }
}

fn train(cmd: TrainCmd) -> Result<()> {
    let profile = profile_from_env(cmd.profile)?;
    let mut plan = cmd.args.resolve_plan()?;
    let comm = match launch_cmd::role(&cmd.launch, &plan)? {
        launch_cmd::Role::Single => None,
        launch_cmd::Role::Launcher(n) => {
            for line in launch_cmd::uneven_shards(&plan, n) {
                eprintln!("warning: {line}");
            }
            return launch_cmd::launch(n);
        }
        launch_cmd::Role::Rank(w) => {
            launch_cmd::place(&mut plan, &w);
            let timeout = std::time::Duration::from_secs(cmd.launch.dist_timeout.max(1));
            Some(launch_cmd::communicator(&w, timeout)?)
        }
    };
    // The other ranks print only their errors.
    let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
    if !writer {
        trainer::progress::hide_progress();
    }
    let outs = plan.adapters.iter().map(|a| a.config.out_dir.clone());
    let ctl = trainer::run::RunControl {
        interrupt: Some(interrupt_flag(outs.collect(), writer)),
        comm: comm.as_deref(),
        ..Default::default()
    };
    let outcomes = match trainer::run::train_plan(&plan, ctl, |line| eprintln!("{line}")) {
        Ok(o) => o,
        Err(e @ trainer::Error::Interrupted { .. }) => {
            let saved = matches!(&e, trainer::Error::Interrupted { checkpoints, .. } if !checkpoints.is_empty());
            let next = trainer::interrupt::next_command(&command_line(), saved);
            return Err(Box::new(Stopped(format!("{e}:\n  {next}"))));
        }
        Err(e) => return Err(e.into()),
    };
    if !writer {
        return match outcomes.iter().find_map(|o| o.result.as_ref().err()) {
            Some(e) => Err(e.to_string().into()),
            None => Ok(()),
        };
    }
    if engine::profile::enabled() {
        eprintln!("profile of the run:");
        eprint!("{}", engine::profile::report(profile.rows()));
    }
    if let [one] = outcomes.as_slice() {
        let summary = match &one.result {
            Ok(s) => s,
            Err(e) => return Err(e.to_string().into()),
        };
        eprintln!(
            "trained {} steps: loss {:.4} -> {:.4}; adapter written to {}",
            summary.steps,
            summary.first_loss,
            summary.last_loss,
            summary.adapter_dir.display()
        );
        if let Some(r) = &summary.eval {
            println!("{}", r.to_json_pretty());
        }
        return Ok(());
    }
    // Several adapters: a line each, the evaluations as one JSON object keyed by adapter name.
    let mut failed = Vec::new();
    let mut evals = serde_json::Map::new();
    for o in &outcomes {
        match &o.result {
            Ok(s) => {
                eprintln!(
                    "[{}] trained {} steps: loss {:.4} -> {:.4}; adapter written to {}",
                    o.name,
                    s.steps,
                    s.first_loss,
                    s.last_loss,
                    s.adapter_dir.display()
                );
                if let Some(r) = &s.eval {
                    evals.insert(o.name.clone(), serde_json::to_value(r)?);
                }
            }
            Err(e) => {
                eprintln!("[{}] stopped: {e}", o.name);
                failed.push(o.name.as_str());
            }
        }
    }
    if !evals.is_empty() {
        println!("{}", serde_json::to_string_pretty(&evals)?);
    }
    if !failed.is_empty() {
        return Err(format!(
            "{} of {} adapters stopped before their last step: {}",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        )
        .into());
    }
    Ok(())
}

fn recipe(cmd: RecipeCmd) -> Result<()> {
    use trainer::bench::recipe;
    let mut args = cmd.args;
    let comm = match launch_cmd::role_on(&cmd.launch, args.device)? {
        launch_cmd::Role::Single => None,
        launch_cmd::Role::Launcher(n) => return launch_cmd::launch(n),
        launch_cmd::Role::Rank(w) => {
            args.device = engine::Device::Cuda(w.local_rank);
            let timeout = std::time::Duration::from_secs(cmd.launch.dist_timeout.max(1));
            Some(launch_cmd::communicator(&w, timeout)?)
        }
    };
    if comm.as_ref().is_some_and(|c| c.rank() != 0) {
        trainer::progress::hide_progress();
    }
    let r = recipe::recipe_on(&args, comm.as_deref(), |line| eprintln!("{line}"))?;
    if comm.as_ref().is_some_and(|c| c.rank() != 0) {
        return Ok(());
    }
    if let Some(p) = &r.profile {
        eprintln!("profile of {} more steps:", args.steps);
        eprint!("{p}");
    }
    let json = recipe::recipe_json(&args, &r);
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n"))
            .map_err(|e| format!("{}: cannot write the report: {e}", path.display()))?;
    }
    println!("{}", recipe::recipe_summary(&r));
    Ok(())
}

fn table6(mut args: trainer::bench::Table6Args) -> Result<()> {
    args.profile = profile_from_env(args.profile)?;
    if !args.adapters.is_empty() {
        return table6_multi(args);
    }
    let t6 = trainer::bench::table6(&args, |line| eprintln!("{line}"))?;
    let json = trainer::bench::table6_json(&args, &t6)?;
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n"))
            .map_err(|e| format!("{}: cannot write the report: {e}", path.display()))?;
    }
    print!("{}", trainer::bench::table6_markdown(&t6));
    Ok(())
}

/// `bench table6 --adapters N,...`: adapter groups against single runs.
fn table6_multi(args: trainer::bench::Table6Args) -> Result<()> {
    let rows = trainer::bench::table6_multi(&args, |line| eprintln!("{line}"))?;
    if let Some(path) = &args.json {
        let json = trainer::bench::table6_multi_json(&args, &rows)?;
        std::fs::write(path, format!("{json}\n"))
            .map_err(|e| format!("{}: cannot write the report: {e}", path.display()))?;
    }
    print!("{}", trainer::bench::table6_multi_markdown(&args, &rows));
    Ok(())
}

fn plot_routing(a: PlotRoutingArgs) -> Result<()> {
    let shares = trainer::plot::read_routing(&a.input)?;
    let font = a.font.or_else(|| env("MIXLORA_FONT").map(PathBuf::from));
    let font = trainer::plot::find_font(font.as_deref())
        .ok_or("no TrueType font found for the labels: pass --font PATH (or set MIXLORA_FONT)")?;
    trainer::plot::plot_routing(&shares, &a.out, &font)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn plot_loss(a: PlotLossArgs) -> Result<()> {
    let mut curves = Vec::new();
    for r in &a.runs {
        let (label, path) = match r.split_once('=') {
            Some((l, p)) if !l.is_empty() => (l.to_string(), PathBuf::from(p)),
            _ => {
                let p = PathBuf::from(r);
                let dir = if p.is_dir() {
                    p.as_path()
                } else {
                    p.parent().unwrap_or(&p)
                };
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                (name.unwrap_or_else(|| r.clone()), p)
            }
        };
        curves.push(trainer::plot_loss::read_losses(&label, &path)?);
    }
    let window = a
        .smooth
        .unwrap_or_else(|| trainer::plot_loss::default_window(&curves));
    for c in &curves {
        println!("{}", trainer::plot_loss::summary(c));
    }
    let font = a.font.or_else(|| env("MIXLORA_FONT").map(PathBuf::from));
    let font = trainer::plot::find_font(font.as_deref())
        .ok_or("no TrueType font found for the labels: pass --font PATH (or set MIXLORA_FONT)")?;
    trainer::plot_loss::plot_losses(&curves, window, &a.out, &font)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// A variable of the environment, `None` when unset or empty.
fn env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// The profile flags, with `MIXLORA_PROFILE` and `MIXLORA_PROFILE_ROWS` for those not given;
/// turns the engine's profile on in that mode.
fn profile_from_env(mut p: ProfileArgs) -> Result<ProfileArgs> {
    if p.profile.is_none() {
        p.profile = env("MIXLORA_PROFILE").map(|v| match v.to_str() {
            Some("0" | "off") => ProfileMode::Off,
            Some("gpu") => ProfileMode::GpuEvents,
            _ => ProfileMode::Wall,
        });
    }
    if p.profile_rows.is_none() {
        if let Some(v) = env("MIXLORA_PROFILE_ROWS") {
            let rows = v.to_str().and_then(|s| s.trim().parse().ok());
            p.profile_rows =
                Some(rows.ok_or_else(|| {
                    format!("MIXLORA_PROFILE_ROWS: {v:?} is not a number of rows")
                })?);
        }
    }
    engine::profile::set_mode(p.profile.unwrap_or_default());
    Ok(p)
}

/// The CUDA settings of the environment: the include folder (`MIXLORA_CUDA_INCLUDE`, else
/// `$CUDA_HOME/include`), extra NVRTC options (`MIXLORA_NVRTC_OPTIONS`) and the caching allocator
/// (off with `MIXLORA_CUDA_NO_CACHE=1`).
fn cuda_options_from_env() -> engine::CudaOptions {
    let include_dir = env("MIXLORA_CUDA_INCLUDE")
        .map(PathBuf::from)
        .or_else(|| env("CUDA_HOME").map(|h| PathBuf::from(h).join("include")));
    let nvrtc_options = env("MIXLORA_NVRTC_OPTIONS")
        .map(|v| {
            v.to_string_lossy()
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    engine::CudaOptions {
        include_dir,
        nvrtc_options,
        caching_allocator: env("MIXLORA_CUDA_NO_CACHE").is_none_or(|v| v != "1"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The options of `cmd` and its subcommands whose help says nothing, or no default.
    fn undocumented(cmd: &clap::Command, path: &str, problems: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let name = format!("{path} --{}", arg.get_long().unwrap_or(id));
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let text = help.split("[default: ").next().unwrap_or_default();
            if text.trim().len() < 10 {
                problems.push(format!("{name}: no description"));
            }
            let clap_shows = arg.get_action().takes_values()
                && !arg.get_default_values().is_empty()
                && !arg.is_hide_default_value_set();
            if !arg.is_required_set() && !clap_shows && !help.contains("[default: ") {
                problems.push(format!("{name}: no default shown"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            undocumented(sub, &format!("{path} {}", sub.get_name()), problems);
        }
    }

    #[test]
    fn uneven_shards_are_named() {
        let plan = |batch, micro| {
            trainer::config::RunPlan::of_one(trainer::config::TrainConfig {
                batch_size: batch,
                micro_batch_size: micro,
                ..Default::default()
            })
        };
        assert!(launch_cmd::uneven_shards(&plan(16, 4), 2).is_empty());
        assert!(launch_cmd::uneven_shards(&plan(16, 4), 4).is_empty());
        let lines = launch_cmd::uneven_shards(&plan(16, 4), 3);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("4 micro-batches a step") && lines[0].contains("run 2 and others 1"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn eval_takes_several_adapters() {
        let cli = Cli::try_parse_from(["mixlora", "eval", "--adapter", "a", "--adapter", "b/c"]);
        let Some(Command::Eval(args)) = cli.unwrap().command else {
            panic!("not eval");
        };
        assert_eq!(args.adapter, [PathBuf::from("a"), PathBuf::from("b/c")]);
    }

    #[test]
    fn every_option_says_what_it_does_and_its_default() {
        let mut problems = Vec::new();
        undocumented(&Cli::command(), "mixlora", &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
