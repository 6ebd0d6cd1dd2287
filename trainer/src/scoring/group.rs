//! `mixlora eval --adapter A --adapter B ...`: several adapters of one base scored in one pass.
//!
//! The base loads once. The adapters are attached as a group (`Llama::set_adapter_group`),
//! unmerged, and every batch of (prompt, candidate) pairs goes through one grouped forward with a
//! segment per adapter, each segment the same ids and key mask: `--batch-size` pairs per adapter,
//! so a pass holds N times a single eval's batch. MixLoRA FFNs take the implementation a single
//! eval takes (`--moe-impl`, fused by default, gate and up stacked for its one GEMM).
//!
//! Each adapter's scores equal those of `mixlora eval --adapter X` up to rounding, not bit for
//! bit: that one merges plain LoRAs into an f32 base (`W + s·B·A`), the group adds `s·B·(A·x)`
//! to `W·x`.

use std::path::{Path, PathBuf};

use engine::no_grad;
use model::{GroupSegment, HostTokens, Llama, MoeImpl};

use super::check_adapter_of_run;
use crate::base_model::builtin_seed;
use crate::error::{Error, Result};
use crate::eval::{self, ScorePair};

/// Checks the adapters of one eval before anything loads: each folder exists and is given once
/// (`a` and `./a` are one folder), each run's adapter is the one its settings describe, all name
/// the same built-in base, and `--routing` (one adapter's statistics) is not asked for.
pub(super) fn check_adapters(dirs: &[PathBuf], routing: Option<&Path>) -> Result<()> {
    if let Some(path) = routing {
        return Err(Error::Config(format!(
            "--routing {}: takes one --adapter, {} are given (run one eval per adapter for their \
             routing)",
            path.display(),
            dirs.len()
        )));
    }
    let mut seen: Vec<(PathBuf, &Path)> = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let real = std::fs::canonicalize(dir)
            .map_err(|e| Error::Config(format!("--adapter {}: {e}", dir.display())))?;
        if !real.is_dir() {
            return Err(Error::Config(format!(
                "--adapter {}: not a folder",
                dir.display()
            )));
        }
        if let Some((_, first)) = seen.iter().find(|(r, _)| *r == real) {
            return Err(Error::Config(format!(
                "--adapter {}: the same folder as --adapter {} (give each adapter once)",
                dir.display(),
                first.display()
            )));
        }
        seen.push((real, dir));
        check_adapter_of_run(dir)?;
    }
    // The built-in model (and the synthetic tasks) of an eval come from one seed.
    let first = builtin_seed(Some(&dirs[0]));
    for dir in &dirs[1..] {
        let seed = builtin_seed(Some(dir));
        if seed != first {
            return Err(Error::Config(format!(
                "--adapter {}: made for the built-in model of seed {seed}, --adapter {} for seed \
                 {first} (one eval has one base)",
                dir.display(),
                dirs[0].display()
            )));
        }
    }
    Ok(())
}

/// Loads the adapter of each folder of `dirs` for `model` (its shapes checked against the base's,
/// as for one adapter) and attaches them as a group, unmerged, their MixLoRA FFNs computed by
/// `imp`.
pub(super) fn attach(model: &mut Llama, dirs: &[PathBuf], imp: MoeImpl) -> Result<()> {
    let mut group = Vec::with_capacity(dirs.len());
    for dir in dirs {
        model::adapters::load(dir, model)?;
        let mut adapters = model.remove_adapters().ok_or_else(|| {
            Error::Eval(format!("{}: no adapter after loading it", dir.display()))
        })?;
        adapters.moe_impl = imp;
        group.push(adapters);
    }
    if matches!(imp, MoeImpl::Fused(_)) && group.iter().any(|a| a.config.is_mixlora()) {
        model.stack_gate_up()?; // G and U in one GEMM, as a single eval has them
    }
    model.set_adapter_group(group)?;
    Ok(())
}

/// Sum of the log-likelihoods of each pair's target tokens for every adapter of `model`'s group
/// (one list per adapter, in the group's order), from one grouped forward without dropout.
pub(super) fn score_pairs(model: &Llama, pad: u32, pairs: &[ScorePair]) -> Result<Vec<Vec<f64>>> {
    let hb = eval::pairs_batch(pairs, pad);
    let (ids, mask, labels) = hb.to_tensors(model.device())?;
    let segments: Vec<GroupSegment> = (0..model.adapter_group().len())
        .map(|adapter| GroupSegment {
            adapter,
            ids: ids.clone(),
            key_mask: Some(mask.clone()),
            dropout_seed: None,
            host: Some(HostTokens {
                ids: hb.ids.clone(),
                key_mask: hb.key_mask.clone(),
            }),
        })
        .collect();
    no_grad(|| {
        model
            .forward_train_group_hidden(&segments)?
            .iter()
            .map(|out| {
                let logits = model.logits(&out.hidden)?;
                Ok(eval::target_log_likelihood(&logits, &labels)?.to_vec_f64()?)
            })
            .collect()
    })
}
