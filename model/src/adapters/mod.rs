//! LoRA and MixLoRA adapters on a frozen LLaMA: their settings ([`AdapterConfig`]), maths
//! ([`lora`], [`router`], [`mixlora`]) and files ([`save`], [`load`]).
//!
//! Parameter names are those of the files (docs/DESIGN.md):
//! - MixLoRA: `mixlora.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`,
//!   `mixlora.layers.{i}.mlp.moe_gate.weight` `[E, H]`,
//!   `mixlora.layers.{i}.mlp.{gate,up,down}_proj.experts.{e}.lora_{A,B}.weight`;
//! - LoRA (PEFT): `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A,B}.weight`;
//!
//! with `A` `[r, in]` and `B` `[out, r]`.

mod base_name;
pub mod config;
pub mod config_keys;
pub mod export;
mod io;
pub mod lora;
pub mod mixlora;
pub mod mixlora_fused;
pub mod router;

use std::collections::HashMap;

use engine::{rng::Rng, DType, Device, Tensor};

pub use base_name::base_model_name;
pub use config::{AdapterConfig, PeftType, RoutingStrategy, ATTN_MODULES, MLP_MODULES};
pub use export::{export, read_folder, AdapterFiles, ExportFormat};
pub use io::{load, save, save_adapters, BIN_FILE, CONFIG_FILE, WEIGHTS_FILE};
pub use lora::{lora_linear, LoraLinear};
pub use mixlora::{ExpertLora, MixLoraFfn, MoeImpl, SharedFfn};
pub use mixlora_fused::FusedExperts;
pub use router::{aux_loss, expert_load, z_loss, Router, RouterOutput, Routing};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// The FFN side of one layer's adapters.
#[derive(Clone, Debug)]
pub enum MlpAdapters {
    /// Plain LoRA on gate, up, down (each `None` when not a target).
    Lora([Option<LoraLinear>; 3]),
    /// The MixLoRA mixture of experts.
    MixLora(MixLoraFfn),
}

/// One decoder layer's adapters.
#[derive(Clone, Debug)]
pub struct LayerAdapters {
    /// LoRA on q, k, v, o (each `None` when not a target).
    pub attn: [Option<LoraLinear>; 4],
    pub mlp: MlpAdapters,
    /// The MixLoRA experts stacked once for the fused path at inference
    /// (`Llama::merge_adapters_for_inference`); `None` while training, when each forward stacks
    /// them.
    pub fused_inference: Option<FusedExperts>,
}

impl LayerAdapters {
    /// The layer's trainable tensors (LoRA A and B, router weights), in no particular order.
    pub fn params(&self) -> Vec<Tensor> {
        let loras = |l: &[Option<LoraLinear>]| -> Vec<Tensor> {
            l.iter()
                .flatten()
                .flat_map(|l| [l.a.clone(), l.b.clone()])
                .collect()
        };
        let mut out = loras(&self.attn);
        match &self.mlp {
            MlpAdapters::Lora(ffn) => out.extend(loras(ffn)),
            MlpAdapters::MixLora(moe) => {
                out.push(moe.router.weight.clone());
                for e in &moe.experts {
                    out.extend(loras(&[e.gate.clone(), e.up.clone(), e.down.clone()]));
                }
            }
        }
        out
    }
}

/// The adapters attached to a model.
#[derive(Clone, Debug)]
pub struct Adapters {
    pub config: AdapterConfig,
    pub layers: Vec<LayerAdapters>,
    /// How MoE FFNs are computed.
    pub moe_impl: MoeImpl,
    /// The coefficient of the router z-loss a training forward adds
    /// ([`router::z_loss`]; 0: none, the paper's loss). A training-time setting of the trainer,
    /// not part of the adapter file: it changes no inference.
    pub router_z_loss_coef: f64,
}

/// What a parameter is, for its init and for messages about its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParamKind {
    /// `[r, in]`: dim 0 comes from the adapter config.
    LoraA,
    /// `[out, r]`: dim 1 comes from the adapter config.
    LoraB,
    /// `[E, H]`: dim 0 comes from the adapter config.
    Router,
}

/// A parameter the config and the base model call for.
#[derive(Clone, Debug)]
pub(crate) struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

/// `(in, out)` of projection `module` of a layer.
fn proj_dims(mc: &LlamaConfig, module: &str) -> (usize, usize) {
    let (h, i) = (mc.hidden_size, mc.intermediate_size);
    let (q, kv) = (
        mc.num_attention_heads * mc.head_dim,
        mc.num_key_value_heads * mc.head_dim,
    );
    match module {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        _ => (i, h), // down_proj
    }
}

/// The name prefix of a (non-expert) LoRA on `module` of `layer`.
fn lora_prefix(cfg: &AdapterConfig, layer: usize, module: &str) -> String {
    let block = if ATTN_MODULES.contains(&module) {
        "self_attn"
    } else {
        "mlp"
    };
    match cfg.peft_type {
        PeftType::MixLora => format!("mixlora.layers.{layer}.{block}.{module}"),
        PeftType::Lora => format!("base_model.model.model.layers.{layer}.{block}.{module}"),
    }
}

fn expert_prefix(layer: usize, module: &str, e: usize) -> String {
    format!("mixlora.layers.{layer}.mlp.{module}.experts.{e}")
}

fn router_name(layer: usize) -> String {
    format!("mixlora.layers.{layer}.mlp.moe_gate.weight")
}

/// Whether `name` is the name of a MixLoRA expert's LoRA matrix
/// (`mixlora.layers.{i}.mlp.{gate,up,down}_proj.experts.{e}.lora_{A,B}.weight`).
pub fn is_expert_param(name: &str) -> bool {
    name.strip_prefix("mixlora.layers.")
        .and_then(|rest| rest.split_once(".mlp."))
        .is_some_and(|(_, rest)| rest.contains("_proj.experts."))
}

/// How fresh adapters are initialised beyond the paper's (`A` kaiming-uniform, `B = 0`, router
/// `N(0, router_init_range)`), which the default keeps. A training-time choice: the adapter file
/// does not record it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdapterInit {
    /// `B` of every MixLoRA expert's LoRA drawn `N(0, expert_b_std)` instead of zero, so that
    /// the experts differ from the first step and the router's gradient is not zero there
    /// (docs/DESIGN.md, "Variants"). 0: `B = 0`, the paper's. Plain LoRAs (attention) keep
    /// `B = 0`.
    pub expert_b_std: f64,
}

/// Whether `name` is the name of a MixLoRA router's weight (`mixlora.layers.{i}.mlp.moe_gate.weight`,
/// as [`Adapters::named_params`] names it): how an optimizer tells the routers from the experts
/// and LoRAs, by name and never by shape.
pub fn is_router_param(name: &str) -> bool {
    name.strip_prefix("mixlora.layers.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(layer, rest)| {
            !layer.is_empty()
                && layer.bytes().all(|b| b.is_ascii_digit())
                && rest == "mlp.moe_gate.weight"
        })
}

/// The names of the tensors `cfg` calls for on a base of `layers` layers, with their kind, in
/// [`Adapters::build`]'s order (for checking a folder without its base model).
pub(crate) fn param_names(cfg: &AdapterConfig, layers: usize) -> Vec<(String, ParamKind)> {
    let mut out = Vec::new();
    let lora = |out: &mut Vec<(String, ParamKind)>, prefix: String, module: &str| {
        if cfg.targets(module) {
            out.push((format!("{prefix}.lora_A.weight"), ParamKind::LoraA));
            out.push((format!("{prefix}.lora_B.weight"), ParamKind::LoraB));
        }
    };
    for l in 0..layers {
        for m in ATTN_MODULES {
            lora(&mut out, lora_prefix(cfg, l, m), m);
        }
        if cfg.is_mixlora() {
            out.push((router_name(l), ParamKind::Router));
            for e in 0..cfg.num_experts {
                for m in MLP_MODULES {
                    lora(&mut out, expert_prefix(l, m, e), m);
                }
            }
        } else {
            for m in MLP_MODULES {
                lora(&mut out, lora_prefix(cfg, l, m), m);
            }
        }
    }
    out
}

impl Adapters {
    /// Builds the adapters `cfg` calls for on a base of shape `mc`, taking every parameter from
    /// `get` (fresh init, a file, ...), in a fixed order: per layer q, k, v, o, then the router
    /// and the experts (or gate, up, down for plain LoRA); `A` before `B`.
    pub(crate) fn build(
        cfg: &AdapterConfig,
        mc: &LlamaConfig,
        mut get: impl FnMut(&ParamSpec) -> Result<Tensor>,
    ) -> Result<Adapters> {
        // The LoRA on `module` named `prefix`, when `module` is a target.
        let lora = |get: &mut dyn FnMut(&ParamSpec) -> Result<Tensor>,
                    prefix: String,
                    module: &str|
         -> Result<Option<LoraLinear>> {
            if !cfg.targets(module) {
                return Ok(None);
            }
            let (n_in, n_out) = proj_dims(mc, module);
            let spec = |ab: &str, shape: Vec<usize>, kind| ParamSpec {
                name: format!("{prefix}.lora_{ab}.weight"),
                shape,
                kind,
            };
            let a = get(&spec("A", vec![cfg.r, n_in], ParamKind::LoraA))?;
            let b = get(&spec("B", vec![n_out, cfg.r], ParamKind::LoraB))?;
            Ok(Some(LoraLinear::new(a, b, cfg.scale(), cfg.lora_dropout)))
        };
        let mut layers = Vec::with_capacity(mc.num_hidden_layers);
        for l in 0..mc.num_hidden_layers {
            let mut attn: [Option<LoraLinear>; 4] = Default::default();
            for (slot, m) in attn.iter_mut().zip(ATTN_MODULES) {
                *slot = lora(&mut get, lora_prefix(cfg, l, m), m)?;
            }
            let mlp = if cfg.is_mixlora() {
                let spec = ParamSpec {
                    name: router_name(l),
                    shape: vec![cfg.num_experts, mc.hidden_size],
                    kind: ParamKind::Router,
                };
                let weight = get(&spec)?;
                let routing = cfg.routing();
                let mut experts = Vec::with_capacity(cfg.num_experts);
                for e in 0..cfg.num_experts {
                    let mut one = |m: &str| lora(&mut get, expert_prefix(l, m, e), m);
                    experts.push(ExpertLora {
                        gate: one("gate_proj")?,
                        up: one("up_proj")?,
                        down: one("down_proj")?,
                    });
                }
                MlpAdapters::MixLora(MixLoraFfn {
                    router: Router { weight, routing },
                    experts,
                })
            } else {
                let mut ffn: [Option<LoraLinear>; 3] = Default::default();
                for (slot, m) in ffn.iter_mut().zip(MLP_MODULES) {
                    *slot = lora(&mut get, lora_prefix(cfg, l, m), m)?;
                }
                MlpAdapters::Lora(ffn)
            };
            layers.push(LayerAdapters {
                attn,
                mlp,
                fused_inference: None,
            });
        }
        Ok(Adapters {
            config: cfg.clone(),
            layers,
            moe_impl: MoeImpl::default(),
            router_z_loss_coef: 0.0,
        })
    }

    /// Fresh trainable adapters (`A` uniform in `±1/√in`, `B = 0`, router `N(0, init_range)`),
    /// seeded, in the adapter dtype for a `base` dtype; each MixLoRA layer's expert matrices of
    /// one kind laid out in one buffer ([`Adapters::stack_experts`]).
    pub fn init(
        cfg: &AdapterConfig,
        mc: &LlamaConfig,
        seed: u64,
        base: DType,
        device: Device,
    ) -> Result<Adapters> {
        Self::init_with(cfg, mc, seed, base, device, AdapterInit::default())
    }

    /// [`Adapters::init`] with the initialisation options `init` (the default: the paper's).
    /// Every parameter draws its seed from one stream in the same order whatever `init` says,
    /// so the options change only the tensors they name.
    pub fn init_with(
        cfg: &AdapterConfig,
        mc: &LlamaConfig,
        seed: u64,
        base: DType,
        device: Device,
        init: AdapterInit,
    ) -> Result<Adapters> {
        cfg.validate("adapter config")?;
        if !(init.expert_b_std.is_finite() && init.expert_b_std >= 0.0) {
            return Err(Error::Invalid(format!(
                "expert B init std {} must be >= 0",
                init.expert_b_std
            )));
        }
        let dtype = base.accumulation();
        let mut rng = Rng::new(seed);
        Self::build(cfg, mc, |spec| {
            let seed = rng.next_u64();
            let t = match spec.kind {
                ParamKind::LoraA => {
                    let bound = 1.0 / (spec.shape[1] as f64).sqrt();
                    Tensor::rand_uniform(spec.shape.clone(), -bound, bound, seed, dtype, device)?
                }
                ParamKind::LoraB if init.expert_b_std > 0.0 && is_expert_param(&spec.name) => {
                    Tensor::randn(
                        spec.shape.clone(),
                        0.0,
                        init.expert_b_std,
                        seed,
                        dtype,
                        device,
                    )?
                }
                ParamKind::LoraB => Tensor::zeros(spec.shape.clone(), dtype, device)?,
                ParamKind::Router => Tensor::randn(
                    spec.shape.clone(),
                    0.0,
                    cfg.router_init_range,
                    seed,
                    dtype,
                    device,
                )?,
            };
            Ok(t.to_var()?)
        })
        .and_then(Adapters::with_stacked_experts)
    }

    /// `self` after [`Adapters::stack_experts`].
    pub(crate) fn with_stacked_experts(mut self) -> Result<Adapters> {
        self.stack_experts()?;
        Ok(self)
    }

    /// Lays out each MixLoRA layer's expert matrices of one kind (`A` or `B` of gate, up or down)
    /// as the slices of one `[E, r, in]` (`[E, out, r]`) buffer, each expert's matrix a trainable
    /// view of its slice (values unchanged), so that the MoE paths stack them without a copy
    /// (`engine::Tensor::stack_views`). [`Adapters::init`] and [`load`] do this; a kind whose
    /// experts are already laid out so is left alone, and so is one where an expert lacks it or
    /// the experts' matrices differ in shape, dtype or device, or are not all variables. The
    /// tensors of a kind it lays out are new variables (their old buffers are freed unless
    /// something else holds them): call it before creating an optimizer over
    /// [`Adapters::named_params`].
    pub fn stack_experts(&mut self) -> Result<()> {
        type Pick = fn(&mut ExpertLora) -> Option<&mut Tensor>;
        let kinds: [Pick; 6] = [
            |e| e.gate.as_mut().map(|l| &mut l.a),
            |e| e.gate.as_mut().map(|l| &mut l.b),
            |e| e.up.as_mut().map(|l| &mut l.a),
            |e| e.up.as_mut().map(|l| &mut l.b),
            |e| e.down.as_mut().map(|l| &mut l.a),
            |e| e.down.as_mut().map(|l| &mut l.b),
        ];
        for layer in &mut self.layers {
            let MlpAdapters::MixLora(moe) = &mut layer.mlp else {
                continue;
            };
            for pick in kinds {
                let Some(mats) = moe
                    .experts
                    .iter_mut()
                    .map(pick)
                    .collect::<Option<Vec<&mut Tensor>>>()
                else {
                    continue; // an expert without this LoRA
                };
                let Some(first) = mats.first() else { continue };
                let stackable = mats.iter().all(|t| {
                    t.is_variable()
                        && t.dims() == first.dims()
                        && t.dtype() == first.dtype()
                        && t.device() == first.device()
                });
                let refs: Vec<&Tensor> = mats.iter().map(|t| &**t).collect();
                if !stackable || Tensor::stack_views(&refs)?.is_some() {
                    continue;
                }
                let stacked = engine::no_grad(|| engine::stack(&refs))?; // [E, ..], one copy
                for (t, leaf) in mats.into_iter().zip(stacked.unstack_leaves()?) {
                    *t = leaf;
                }
            }
        }
        Ok(())
    }

    /// Every trainable tensor with its file name, in [`Adapters::build`]'s order.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        fn push(out: &mut Vec<(String, Tensor)>, prefix: String, l: &Option<LoraLinear>) {
            if let Some(l) = l {
                out.push((format!("{prefix}.lora_A.weight"), l.a.clone()));
                out.push((format!("{prefix}.lora_B.weight"), l.b.clone()));
            }
        }
        let cfg = &self.config;
        let mut out = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            for (l, m) in layer.attn.iter().zip(ATTN_MODULES) {
                push(&mut out, lora_prefix(cfg, li, m), l);
            }
            match &layer.mlp {
                MlpAdapters::Lora(ffn) => {
                    for (l, m) in ffn.iter().zip(MLP_MODULES) {
                        push(&mut out, lora_prefix(cfg, li, m), l);
                    }
                }
                MlpAdapters::MixLora(moe) => {
                    out.push((router_name(li), moe.router.weight.clone()));
                    for (e, ex) in moe.experts.iter().enumerate() {
                        for (l, m) in [&ex.gate, &ex.up, &ex.down].into_iter().zip(MLP_MODULES) {
                            push(&mut out, expert_prefix(li, m, e), l);
                        }
                    }
                }
            }
        }
        out
    }

    /// Replaces the tensor called `name` (same shape) by `value`, e.g. to evaluate the model at
    /// other adapter values: `value` itself becomes the parameter (a gradient lands on it). An
    /// expert's matrix so replaced no longer lies in its layer's stacked buffer (see
    /// [`Adapters::stack_experts`]), so the MoE paths stack that kind with a copy;
    /// [`Adapters::assign_param`] keeps the layout.
    pub fn set_param(&mut self, mc: &LlamaConfig, name: &str, value: Tensor) -> Result<()> {
        let mut map: HashMap<String, Tensor> = self.named_params().into_iter().collect();
        let old = map
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("set_param: no adapter tensor named {name}")))?;
        if old.dims() != value.dims() {
            return Err(Error::Invalid(format!(
                "set_param: {name} has shape {:?}, got {:?}",
                old.dims(),
                value.dims()
            )));
        }
        map.insert(name.to_string(), value);
        let (moe_impl, z_coef) = (self.moe_impl, self.router_z_loss_coef);
        *self = Self::build(&self.config, mc, |spec| {
            map.remove(&spec.name)
                .ok_or_else(|| Error::Invalid(format!("set_param: {} vanished", spec.name)))
        })?;
        self.moe_impl = moe_impl;
        self.router_z_loss_coef = z_coef;
        Ok(())
    }

    /// Copies `value`'s elements into the tensor called `name` in place, when shapes, dtypes and
    /// devices match: the parameter stays the same variable (an optimizer holding it sees the new
    /// values) and an expert's matrix stays a view of its layer's stacked buffer. Otherwise
    /// (another dtype, say) `value` replaces the tensor as in [`Adapters::set_param`].
    pub fn assign_param(&mut self, mc: &LlamaConfig, name: &str, value: &Tensor) -> Result<()> {
        let params = self.named_params();
        let Some((_, old)) = params.iter().find(|(n, _)| n == name) else {
            return Err(Error::Invalid(format!(
                "assign_param: no adapter tensor named {name}"
            )));
        };
        if old.dims() == value.dims()
            && old.dtype() == value.dtype()
            && old.device() == value.device()
        {
            return Ok(old.assign(value)?);
        }
        self.set_param(mc, name, value.clone())
    }
}
