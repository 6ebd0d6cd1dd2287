use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::Parser;
use engine::{Device, MoeFfnOptions, MoeKernels};
use model::{MoeImpl, PeftType, RoutingStrategy};

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

fn try_args(flags: &[&str]) -> std::result::Result<TrainArgs, String> {
    let mut v = vec!["mixlora"];
    v.extend_from_slice(flags);
    Cli::try_parse_from(v)
        .map(|c| c.args)
        .map_err(|e| e.to_string())
}

fn args(flags: &[&str]) -> TrainArgs {
    try_args(flags).unwrap()
}

fn tmp_file(name: &str, text: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-config-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn defaults_match_the_design() {
    // The embedded default differs from the design defaults only by its learning rate.
    let builtin = args(&[]).resolve().unwrap();
    assert_eq!(builtin.lr, BUILTIN_MODEL_LR);
    assert_eq!(
        TrainConfig {
            lr: 2e-4,
            ..builtin
        },
        TrainConfig::default()
    );
    let c = args(&["--model", "base.gguf"]).resolve().unwrap();
    assert_eq!(
        c,
        TrainConfig {
            model: Some("base.gguf".into()),
            ..TrainConfig::default()
        }
    );
    assert_eq!(
        (c.batch_size, c.micro_batch_size, c.grad_accum()),
        (16, 8, 2)
    );
    assert_eq!((c.lr, c.weight_decay, c.max_grad_norm), (2e-4, 0.01, 1.0));
    assert_eq!((c.num_experts, c.top_k, c.rank, c.alpha), (8, 2, 16, 32.0));
    assert_eq!(
        (c.dropout, c.aux_loss_coef, c.cutoff_len, c.seed),
        (0.05, 0.001, 512, 42)
    );
    assert_eq!(c.lora_scale(), 2.0);
    assert_eq!(c.router_init_range, 0.02);
    assert_eq!(c.device, Device::Cpu);
    assert_eq!(
        (c.adapter, c.routing),
        (PeftType::MixLora, RoutingStrategy::TopK)
    );
    let c = args(&["--router-init-range", "0.5"]).resolve().unwrap();
    assert_eq!(c.router_init_range, 0.5);
    let e = args(&["--router-init-range=-1"]).resolve().unwrap_err();
    assert!(e.to_string().contains("router_init_range"), "{e}");
}

#[test]
fn flags_override_toml_which_overrides_defaults() {
    let p = tmp_file(
        "prec.toml",
        "lr = 1e-3\nbatch_size = 32\nmicro_batch_size = 4\nwarmup_steps = 10\n\
         data = [\"d/train.json\"]\nschedule = \"cosine\"\nresume = true\n",
    );
    let ps = p.display().to_string();
    let c = args(&["--config", &ps]).resolve().unwrap();
    assert_eq!((c.lr, c.batch_size, c.micro_batch_size), (1e-3, 32, 4));
    assert_eq!(c.schedule, ScheduleKind::Cosine);
    assert_eq!(c.data, vec![p.parent().unwrap().join("d/train.json")]);
    assert_eq!(
        c.out_dir,
        PathBuf::from("out"),
        "the default is not the file's"
    );
    assert_eq!(c.epochs, 2, "untouched keys keep the default");
    assert_eq!(c.warmup_steps, Some(10));
    assert!(c.resume);
    let c = args(&[
        "--config",
        &ps,
        "--lr",
        "5e-4",
        "--micro-batch-size",
        "8",
        "--warmup-ratio",
        "0.1",
        "--data",
        "x.json",
    ])
    .resolve()
    .unwrap();
    assert_eq!((c.lr, c.batch_size, c.micro_batch_size), (5e-4, 32, 8));
    assert_eq!((c.warmup_steps, c.warmup_ratio), (None, Some(0.1)));
    assert_eq!(c.data, vec![PathBuf::from("x.json")]);
    assert!(c.resume, "a flag not given leaves the file's");
}

#[test]
fn toml_paths_are_relative_to_the_file() {
    let p = tmp_file(
        "paths.toml",
        "model = \"m.gguf\"\nout_dir = \"runs/a\"\neval_data = [\"/abs/v.json\"]\n",
    );
    let dir = p.parent().unwrap();
    let c = args(&["--config", &p.display().to_string()])
        .resolve()
        .unwrap();
    assert_eq!(c.model, Some(dir.join("m.gguf")));
    assert_eq!(c.out_dir, dir.join("runs/a"));
    assert_eq!(c.eval_data, vec![PathBuf::from("/abs/v.json")]);
    let c = args(&["--config", &p.display().to_string(), "--out", "here"])
        .resolve()
        .unwrap();
    assert_eq!(c.out_dir, PathBuf::from("here"));
}

#[test]
fn unknown_key_names_key_file_and_line() {
    let p = tmp_file("unknown.toml", "lr = 1e-3\n\nlearning_rat = 2\n");
    let e = args(&["--config", &p.display().to_string()])
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown.toml"), "{e}");
    assert!(e.contains("unknown key `learning_rat`"), "{e}");
    assert!(e.contains("line 3"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    // `config` is a flag, not a key.
    let e = TrainConfig::from_toml_str("c.toml", "config = \"x.toml\"\n").unwrap_err();
    assert!(e.to_string().contains("unknown key `config`"), "{e}");
}

#[test]
fn wrong_values_in_toml_are_one_line() {
    for (text, needle) in [
        ("epochs = \"two\"\n", "line 1"),
        ("\ndevice = \"tpu\"\n", "line 2: unknown device `tpu`"),
        ("routing = \"mixlora\"\n", "unknown routing `mixlora`"),
        ("moe_impl = \"dense\"\n", "expected auto, naive"),
        ("moe_kernels = \"tile\"\n", "expected gemms or tiles"),
        ("moe_chunk_tokens = 0\n", "line 1"),
    ] {
        let e = TrainConfig::from_toml_str("c.toml", text)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml: line") && e.contains(needle),
            "{text}: {e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn validation_errors_are_one_line() {
    for (flags, needle) in [
        (
            &["--batch-size", "16", "--micro-batch-size", "3"][..],
            "does not divide",
        ),
        (&["--top-k", "9"][..], "top_k 9"),
        (&["--warmup-ratio", "1.5"][..], "warmup_ratio"),
        (&["--epochs", "0"][..], "nothing to train"),
        (&["--dropout", "1"][..], "dropout"),
        (&["--adam-beta2", "1.0"][..], "adam_beta2"),
        (
            &["--warmup-steps", "3", "--warmup-ratio", "0.1"][..],
            "not both",
        ),
    ] {
        let e = args(flags).resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("config: ") && e.contains(needle),
            "{flags:?}: {e}"
        );
        assert!(!e.contains('\n'));
    }
    let c = TrainConfig {
        warmup_steps: Some(1),
        warmup_ratio: Some(0.1),
        ..Default::default()
    };
    assert!(c.validate().unwrap_err().to_string().contains("not both"));
}

#[test]
fn bad_words_on_the_command_line_name_the_flag_and_the_value() {
    for (flags, needle) in [
        (
            &["--device", "cuda:x"][..],
            "invalid value 'cuda:x' for '--device <DEVICE>': unknown device `cuda:x`",
        ),
        (&["--routing", "top2"][..], "unknown routing `top2`"),
        (&["--adapter", "dora"][..], "unknown adapter `dora`"),
        (&["--moe-impl", "dense"][..], "'--moe-impl <IMPL>'"),
        (&["--moe-kernels", "wmma"][..], "'--moe-kernels <KERNELS>'"),
        (
            &["--moe-chunk-tokens", "0"][..],
            "invalid value '0' for '--moe-chunk-tokens <N>': must be at least 1",
        ),
    ] {
        let e = try_args(flags).unwrap_err();
        assert!(e.lines().next().unwrap().contains(needle), "{flags:?}: {e}");
    }
}

#[test]
fn total_steps_from_epochs_and_max_steps() {
    let mut c = TrainConfig::default();
    assert_eq!(c.total_steps(|_| 30), 60);
    // Packed epochs may differ in steps.
    assert_eq!(c.total_steps(|e| 30 - e), 59);
    c.max_steps = Some(45);
    assert_eq!(c.total_steps(|_| 30), 45);
    c.max_steps = Some(500);
    assert_eq!(c.total_steps(|_| 30), 60);
    c.epochs = 0;
    assert_eq!(c.total_steps(|_| 30), 500);
}

#[test]
fn toml_round_trip() {
    let c = TrainConfig {
        model: Some("m.gguf".into()),
        max_steps: Some(7),
        routing: RoutingStrategy::TopP,
        device: Device::Cuda(1),
        moe_impl: Some(MoeImpl::Grouped),
        moe_kernels: MoeKernels::Tiles,
        moe_chunk_tokens: NonZeroUsize::new(64),
        base_dtype: super::BaseDTypeName::Fp8,
        ..Default::default()
    };
    let text = c.to_toml_string().unwrap();
    assert!(text.contains("base_dtype = \"fp8\"\n"), "{text}");
    assert_eq!(TrainConfig::from_toml_str("x", &text).unwrap(), c);
}

/// `train_config.toml` keeps its format: every key by its name, words as the flags spell them,
/// unset optional settings left out.
#[test]
fn train_config_toml_format() {
    let text = TrainConfig::default().to_toml_string().unwrap();
    let want = "adapter = \"mixlora\"\ndata = []\neval_data = []\nval_set_size = 0\n\
        out_dir = \"out\"\nepochs = 2\nbatch_size = 16\nmicro_batch_size = 8\nlr = 0.0002\n\
        weight_decay = 0.01\nadam_beta1 = 0.9\nadam_beta2 = 0.999\nadam_eps = 0.00000001\n\
        max_grad_norm = 1.0\nschedule = \"linear\"\ncutoff_len = 512\npacking = false\n\
        pack_micro_batches = false\nseed = 42\n\
        num_experts = 8\ntop_k = 2\nrank = 16\nalpha = 32.0\nrslora = false\ndropout = 0.05\n\
        target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \
        \"up_proj\", \"down_proj\"]\nrouting = \"topk\"\ntop_p = 0.8\naux_loss_coef = 0.001\nrouter_init_range = 0.02\n\
        router_z_loss = 0.0\nrouter_lr_scale = 1.0\nexpert_b_init_std = 0.0\n\
        eval_every = 0\nsave_every = 0\nsave_total_limit = 3\nlog_every = 1\n\
        device = \"cpu\"\ndtype = \"f32\"\nbase_dtype = \"same\"\nresume = false\n\
        gradient_checkpointing = false\n\
        moe_impl = \"auto\"\nmoe_kernels = \"gemms\"\ngroup_mode = \"auto\"\nattention = \"composite\"\n\
        cuda_graphs = \"off\"\n";
    assert_eq!(text, want);
}

#[test]
fn cuda_graphs_auto_records_graphs_in_one_process_on_a_gpu_unless_the_adapters_are_batched() {
    let gpu = Device::Cuda(0);
    let on_a_gpu = if cfg!(feature = "cuda") {
        CudaGraphs::On
    } else {
        CudaGraphs::Off
    };
    assert_eq!(CudaGraphs::Auto.resolve(gpu, false, false), on_a_gpu);
    assert_eq!(
        CudaGraphs::Auto.resolve(Device::Cpu, false, false),
        CudaGraphs::Off
    );
    // Several adapters in one batch (`--group-mode shared`), several processes: kernel by kernel.
    assert_eq!(CudaGraphs::Auto.resolve(gpu, true, false), CudaGraphs::Off);
    assert_eq!(CudaGraphs::Auto.resolve(gpu, false, true), CudaGraphs::Off);
    // A setting given is kept (and refused by the run where it cannot run).
    for s in [CudaGraphs::Off, CudaGraphs::Eager, CudaGraphs::On] {
        assert_eq!(s.resolve(gpu, true, true), s);
        assert_eq!(s.resolve(Device::Cpu, false, false), s);
    }
    assert_eq!(
        args(&["--cuda-graphs", "auto"]).cuda_graphs,
        Some(CudaGraphs::Auto)
    );
}

#[test]
fn inference_uses_the_fused_moe_path_on_every_device_unless_asked() {
    let fused = MoeImpl::Fused(MoeFfnOptions::default());
    let auto = MoeArgs::default();
    assert_eq!(auto.inference_moe_impl(Device::Cpu), fused);
    assert_eq!(auto.inference_moe_impl(Device::Cuda(0)), fused);
    let naive = MoeArgs {
        moe_impl: Some(MoeImpl::Naive),
        ..MoeArgs::default()
    };
    assert_eq!(naive.inference_moe_impl(Device::Cpu), MoeImpl::Naive);
}

#[test]
fn moe_impl_defaults_to_fused_on_a_gpu_and_naive_on_the_cpu() {
    let fused = MoeImpl::Fused(MoeFfnOptions::default());
    let on = |c: &TrainConfig, device| {
        TrainConfig {
            device,
            ..c.clone()
        }
        .moe()
    };
    let c = TrainConfig::default();
    assert_eq!(c.moe_impl, None);
    assert_eq!(on(&c, Device::Cpu), MoeImpl::Naive);
    assert_eq!(on(&c, Device::Cuda(0)), fused);
    for (name, imp) in [
        ("naive", MoeImpl::Naive),
        ("paper", MoeImpl::Paper),
        ("grouped", MoeImpl::Grouped),
        ("fused", fused),
    ] {
        let c = TrainConfig::from_toml_str("t.toml", &format!("moe_impl = \"{name}\"")).unwrap();
        assert_eq!(on(&c, Device::Cpu), imp);
        assert_eq!(on(&c, Device::Cuda(0)), imp);
        let c = args(&["--moe-impl", name]).resolve().unwrap();
        assert_eq!(on(&c, Device::Cpu), imp);
    }
    let c = args(&["--moe-impl", "auto"]).resolve().unwrap();
    assert_eq!(c.moe_impl, None);
}

#[test]
fn fused_moe_options_from_flags_and_toml() {
    let want = MoeImpl::Fused(MoeFfnOptions {
        kernels: MoeKernels::Tiles,
        chunk_tokens: Some(7),
    });
    let flags = ["--moe-kernels", "tiles", "--moe-chunk-tokens", "7"];
    let c = args(&flags).resolve().unwrap();
    assert_eq!(
        TrainConfig {
            device: Device::Cuda(0),
            ..c.clone()
        }
        .moe(),
        want
    );
    assert_eq!(
        c.moe(),
        MoeImpl::Naive,
        "auto on the CPU: the options wait for `fused`"
    );
    let c = args(&[&flags[..], &["--moe-impl", "fused"]].concat())
        .resolve()
        .unwrap();
    assert_eq!(c.moe(), want);
    let c = TrainConfig::from_toml_str(
        "t.toml",
        "moe_impl = \"fused\"\nmoe_kernels = \"tiles\"\nmoe_chunk_tokens = 7\n",
    )
    .unwrap();
    assert_eq!(c.moe(), want);
}

/// What a help text gives as the default: the text of its last `[default: …]`.
fn help_default(help: &str) -> Option<(&str, &str)> {
    let (what, rest) = help.rsplit_once("[default: ")?;
    Some((what, rest.split(']').next()?))
}

#[test]
fn every_train_option_says_what_it_does_and_its_default() {
    use clap::CommandFactory;
    let defaults = toml::Table::try_from(TrainConfig::default()).unwrap();
    let mut checked = Vec::new();
    for arg in Cli::command().get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(id));
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let (what, default) =
            help_default(&help).unwrap_or_else(|| panic!("{flag}: no `[default: …]` in {help:?}"));
        assert!(what.trim().len() >= 10, "{flag}: no description: {help:?}");
        // A default that clap knows would hide the TOML file's value (switches are false unless
        // given, which `resolve` leaves out).
        if arg.get_action().takes_values() {
            assert!(
                arg.get_default_values().is_empty(),
                "{flag}: a clap default would override --config"
            );
        }
        if id == "config" {
            continue;
        }
        let value = default.split([';', ',', ' ']).next().unwrap();
        match defaults.get(id) {
            // No value: the help says in words what happens instead.
            None => assert!(
                value.parse::<f64>().is_err(),
                "{flag}: the setting has no default value, its help says {default:?}"
            ),
            Some(toml::Value::Array(a)) if a.is_empty() => assert!(value.parse::<f64>().is_err()),
            // A list: its items, comma-separated.
            Some(toml::Value::Array(a)) => {
                let items: Vec<&str> = a.iter().filter_map(toml::Value::as_str).collect();
                assert_eq!(default, items.join(","), "{flag}")
            }
            Some(toml::Value::Integer(i)) => {
                assert_eq!(value.parse::<i64>().ok(), Some(*i), "{flag}: {default:?}")
            }
            Some(toml::Value::Float(f)) => {
                assert_eq!(value.parse::<f64>().ok(), Some(*f), "{flag}: {default:?}")
            }
            Some(toml::Value::Boolean(b)) => assert!(
                value == b.to_string() || (!b && value == "off"),
                "{flag}: {default:?} for {b}"
            ),
            Some(toml::Value::String(s)) => assert_eq!(value, s, "{flag}"),
            Some(v) => panic!("{flag}: a default {v} this test does not read"),
        }
        checked.push(id.to_string());
    }
    // Every setting has its flag.
    for key in defaults.keys() {
        assert!(checked.contains(key), "`{key}` has no flag");
    }
    assert!(checked.len() >= 40, "{checked:?}");
}
