//! Which keys of an `adapter_config.json` are read, which are harmless and dropped, and which are
//! refused because their value would make the adapter compute something this crate does not
//! (docs/DESIGN.md, "adapter_config.json keys"). MoE-PEFT and PEFT write keys of their own; a key
//! is never ignored silently when it changes results.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The keys [`super::AdapterConfig`] holds.
pub const OUR_KEYS: [&str; 16] = [
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "routing_strategy",
    "num_experts",
    "top_k",
    "top_p",
    "act_fn",
    "router_aux_loss_coef",
    "router_init_range",
    "use_rslora",
    "base_model_name_or_path",
    "mixlora_base_model_path",
    "task_type",
];

/// Keys that never change what the adapter computes (initialisation, bookkeeping, PEFT's
/// inference flag, the adapter's name in MoE-PEFT): dropped whatever their value.
pub const HARMLESS_KEYS: [&str; 12] = [
    "inference_mode",
    "revision",
    "lora_init",
    "init_lora_weights",
    "auto_mapping",
    "peft_version",
    "megatron_config",
    "megatron_core",
    "name",
    "task_name",
    "converted_from",
    "runtime_config",
];

/// Keys accepted only with an empty value (null, `[]`, `{}`): otherwise they restrict or extend
/// what the LoRA covers (layers, per-module ranks, extra trained modules).
pub const EMPTY_ONLY_KEYS: [&str; 10] = [
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "loftq_config",
    "layer_replication",
    "exclude_modules",
    "trainable_token_indices",
    "target_parameters",
];

/// Keys accepted only when false.
pub const FALSE_ONLY_KEYS: [&str; 4] = ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"];

/// Keys accepted only when zero (or null).
pub const ZERO_ONLY_KEYS: [&str; 2] = ["temperature", "jitter_noise"];

/// MoE-PEFT's settings of Switch Transformers routing (`mixlora-switch`), which is not
/// implemented: refused unless null.
pub const SWITCH_KEYS: [&str; 4] = [
    "router_z_loss_coef",
    "expert_capacity",
    "sparse_step",
    "ffn_dropout",
];

/// The LoRA keys a MoE-PEFT `expert_lora` section may override, with their default when the
/// top level does not have them.
fn lora_default(key: &str) -> Option<Value> {
    Some(match key {
        "use_dora" | "use_rslora" => Value::Bool(false),
        "lora_init" => Value::String("original".into()),
        "bias" => Value::String("none".into()),
        "lora_dropout" => Value::from(0.0),
        "r" | "lora_alpha" | "target_modules" | "peft_type" => Value::Null,
        _ => return None,
    })
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// Equal as MoE-PEFT would use them: numbers by value (`32` and `32.0` are one alpha).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Checks the keys of the JSON object `obj` (the file `file`) and rewrites it into the keys of
/// [`super::AdapterConfig`]: harmless keys dropped, `router_loss: false` turned into
/// `router_aux_loss_coef: 0` (MoE-PEFT then adds no aux loss; a zero coefficient adds exactly
/// zero), a `target_modules` object (MoE-PEFT's `{name: bool}`) into the list of its true names.
/// Anything else that is not one of ours is an error naming the key and its value.
pub fn normalize(file: &str, obj: &mut Map<String, Value>) -> Result<()> {
    let refuse = |key: &str, v: &Value, why: &str| Error::key(file, key, format!("{v}: {why}"));
    if let Some(v) = obj.get("routing_strategy") {
        if v.as_str() == Some("mixlora-switch") {
            return Err(refuse(
                "routing_strategy",
                v,
                "Switch Transformers routing is not implemented (use mixlora for top-k or mixlora-dynamic for top-p)",
            ));
        }
    }
    if let Some(Value::Object(t)) = obj.get("target_modules") {
        let list: Vec<Value> = t
            .iter()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .map(|(k, _)| Value::String(k.clone()))
            .collect();
        obj.insert("target_modules".into(), Value::Array(list));
    }
    if let Some(v) = obj.get("expert_lora") {
        check_expert_lora(file, obj, v)?;
    }
    let keys: Vec<String> = obj.keys().cloned().collect();
    for key in keys {
        let k = key.as_str();
        let v = obj[k].clone();
        if OUR_KEYS.contains(&k) {
            continue;
        }
        if HARMLESS_KEYS.contains(&k) {
        } else if EMPTY_ONLY_KEYS.contains(&k) {
            if !is_empty(&v) {
                return Err(refuse(k, &v, "not supported (only null or empty)"));
            }
        } else if FALSE_ONLY_KEYS.contains(&k) {
            if v != Value::Bool(false) {
                return Err(refuse(k, &v, "not supported (only false)"));
            }
        } else if ZERO_ONLY_KEYS.contains(&k) {
            if !(v.is_null() || v.as_f64() == Some(0.0)) {
                let what = if k == "temperature" {
                    "a router temperature is not implemented (only 0)"
                } else {
                    "router jitter noise is not implemented (only 0)"
                };
                return Err(refuse(k, &v, what));
            }
        } else if SWITCH_KEYS.contains(&k) {
            if !v.is_null() {
                return Err(refuse(
                    k,
                    &v,
                    "a setting of Switch Transformers routing, which is not implemented",
                ));
            }
        } else if k == "bias" {
            if v.as_str() != Some("none") {
                return Err(refuse(
                    k,
                    &v,
                    "LoRA biases are not supported (only \"none\")",
                ));
            }
        } else if k == "router_loss" {
            match v {
                Value::Bool(true) => {}
                Value::Bool(false) => {
                    obj.insert("router_aux_loss_coef".into(), Value::from(0.0));
                }
                _ => return Err(refuse(k, &v, "expected true or false")),
            }
        } else if k == "expert_lora" {
            // Checked above, against the top level as written.
        } else {
            return Err(refuse(
                k,
                &v,
                "unknown key (docs/DESIGN.md lists the keys read; unknown ones are refused so that none changes results unnoticed)",
            ));
        }
        obj.remove(k);
    }
    Ok(())
}

/// MoE-PEFT's `expert_lora`: the experts' LoRA settings, overriding the top level's. Accepted
/// only when every value equals the top level's (or its default), since the experts here share
/// the adapter's rank, alpha and dropout.
fn check_expert_lora(file: &str, top: &Map<String, Value>, v: &Value) -> Result<()> {
    let Value::Object(expert) = v else {
        return Err(Error::key(
            file,
            "expert_lora",
            format!("{v}: expected an object"),
        ));
    };
    for (k, ev) in expert {
        let key = format!("expert_lora.{k}");
        let Some(default) = lora_default(k) else {
            return Err(Error::key(
                file,
                &key,
                format!("{ev}: unknown key of expert_lora"),
            ));
        };
        let tv = top.get(k).cloned().unwrap_or(default);
        if !same(ev, &tv) {
            return Err(Error::key(
                file,
                &key,
                format!(
                    "{ev} differs from the top-level {k} {tv} (per-expert LoRA settings are not implemented)"
                ),
            ));
        }
    }
    Ok(())
}
