//! AdamW with decoupled weight decay and bias correction (PyTorch's `torch.optim.AdamW`), and
//! global gradient-norm clipping. A step is one fused engine call over all parameters
//! ([`engine::adamw_step`]: one kernel launch on CUDA, threads over the elements on the CPU),
//! updating parameters and moments in place; [`AdamW::step_reference`] is the same update as a
//! handful of engine tensor ops per parameter and `Tensor::assign`, kept as the reference. The
//! moments are kept in f32 (f64 for f64 parameters, for exact tests).
//!
//! One step at count `t` (1-based) with gradient `g` (times the clipping scale `c`):
//! ```text
//! p ← p · (1 − lr·wd)
//! m ← β1·m + (1 − β1)·c·g          v ← β2·v + (1 − β2)·(c·g)²
//! p ← p − lr/(1 − β1ᵗ) · m / (√(v/(1 − β2ᵗ)) + ε)
//! ```
//! Parameters without a gradient are left alone (no decay, no moment update), as in PyTorch.

use std::collections::HashMap;
use std::path::Path;

use engine::{AdamWHyper, DType, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The metadata key of the step count in the saved state.
const STEPS_KEY: &str = "adamw_steps";

pub struct AdamW {
    pub config: AdamWConfig,
    names: Vec<String>,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,    // m, same shapes as params, math dtype
    exp_avg_sq: Vec<Tensor>, // v
    /// Per parameter, its learning rate as a multiple of the step's (1 unless
    /// [`AdamW::scale_lr`] set another).
    lr_scales: Vec<f64>,
    steps: u64,
}

impl AdamW {
    /// An optimizer over named variables (as `Llama::trainable_params()` returns them).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<AdamW> {
        let mut seen = std::collections::HashSet::new();
        let (mut names, mut ps, mut m, mut v) = (vec![], vec![], vec![], vec![]);
        for (name, p) in params {
            if !p.is_variable() {
                return Err(Error::Optimizer(format!(
                    "parameter {name} is not a variable"
                )));
            }
            if !seen.insert(name.clone()) {
                return Err(Error::Optimizer(format!(
                    "parameter {name} is listed twice"
                )));
            }
            let md = p.dtype().accumulation();
            m.push(Tensor::zeros(p.shape().clone(), md, p.device())?);
            v.push(Tensor::zeros(p.shape().clone(), md, p.device())?);
            names.push(name);
            ps.push(p);
        }
        Ok(AdamW {
            config,
            names,
            lr_scales: vec![1.0; ps.len()],
            params: ps,
            exp_avg: m,
            exp_avg_sq: v,
            steps: 0,
        })
    }

    /// Gives the parameters whose names `which` accepts the learning rate `scale` times the
    /// step's (a parameter group of its own, as `torch.optim` has them); returns how many. The
    /// moments, decay and bias correction are unchanged: with `scale` 1 nothing changes.
    pub fn scale_lr(&mut self, scale: f64, which: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        for (name, s) in self.names.iter().zip(&mut self.lr_scales) {
            if which(name) {
                *s = scale;
                n += 1;
            }
        }
        n
    }

    /// Each parameter's learning-rate multiple, in the order of [`AdamW::params`].
    pub fn lr_scales(&self) -> &[f64] {
        &self.lr_scales
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    /// Steps taken so far (the bias-correction count).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clears every parameter's gradient (call after `step`).
    pub fn zero_grad(&self) {
        self.params.iter().for_each(Tensor::zero_grad);
    }

    /// One update with learning rate `lr`, the gradients multiplied by `grad_scale` first (the
    /// clipping factor of [`clip_grad_norm`]; 1.0 for none): every parameter in one fused engine
    /// call ([`engine::adamw_step`]; one kernel launch on CUDA).
    ///
    /// With parameters of several learning-rate multiples ([`AdamW::scale_lr`]), one call per
    /// multiple, each over its parameters at `lr` times it (the update of each element is the
    /// same function of its own state either way).
    pub fn step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.step_with(lr, Scale::Host(grad_scale))
    }

    /// [`AdamW::step`] with the gradient scale read where it lives: `factor` is one f64 element on
    /// the parameters' device (the factor of [`clip_factor`]), so the host queues the step without
    /// waiting for the device. A factor that is not finite leaves every parameter and moment as
    /// it was (the step count still advances: the run stops at such a step).
    pub fn step_scaled(&mut self, lr: f64, factor: &Tensor) -> Result<()> {
        self.step_with(lr, Scale::Device(factor))
    }

    fn step_with(&mut self, lr: f64, scale: Scale<'_>) -> Result<()> {
        self.steps += 1;
        let run = |p: &[Tensor], m: &[Tensor], v: &[Tensor], h: &AdamWHyper| match scale {
            Scale::Host(_) => engine::adamw_step(p, m, v, h),
            Scale::Device(t) => engine::adamw_step_scaled(p, m, v, h, t),
        };
        let grad_scale = match scale {
            Scale::Host(s) => s,
            Scale::Device(_) => 1.0, // replaced by the device's value
        };
        if self.lr_scales.iter().all(|&s| s == 1.0) {
            let h = self.hyper(lr, grad_scale);
            run(&self.params, &self.exp_avg, &self.exp_avg_sq, &h)?;
            return Ok(());
        }
        let mut scales: Vec<f64> = Vec::new();
        for &s in &self.lr_scales {
            if !scales.contains(&s) {
                scales.push(s);
            }
        }
        for scale in scales {
            let pick = |ts: &[Tensor]| -> Vec<Tensor> {
                ts.iter()
                    .zip(&self.lr_scales)
                    .filter(|(_, &s)| s == scale)
                    .map(|(t, _)| t.clone())
                    .collect()
            };
            let (p, m, v) = (
                pick(&self.params),
                pick(&self.exp_avg),
                pick(&self.exp_avg_sq),
            );
            let h = self.hyper(lr * scale, grad_scale);
            run(&p, &m, &v, &h)?;
        }
        Ok(())
    }

    /// The hyper-parameters of the step about to be taken (`self.steps` already counts it).
    fn hyper(&self, lr: f64, grad_scale: f64) -> AdamWHyper {
        AdamWHyper {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            grad_scale,
            step: self.steps,
        }
    }

    /// [`AdamW::step`] written as engine tensor ops (about ten per parameter, then
    /// `Tensor::assign`): the reference the fused step is tested against. Same state, same
    /// results (bit for bit on the CPU).
    pub fn step_reference(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        let _g = engine::NoGradGuard::new();
        self.steps += 1;
        let AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
        } = self.config;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let base_lr = lr;
        for (((p, m), v), scale) in self
            .params
            .iter()
            .zip(&self.exp_avg)
            .zip(&self.exp_avg_sq)
            .zip(&self.lr_scales)
        {
            let lr = base_lr * scale;
            let Some(g) = p.grad() else { continue };
            let md = m.dtype();
            let g = g.to_dtype(md)?.affine(grad_scale, 0.0)?;
            let m_new = m.affine(b1, 0.0)?.add(&g.affine(1.0 - b1, 0.0)?)?;
            let v_new = v.affine(b2, 0.0)?.add(&g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            m.assign(&m_new)?;
            v.assign(&v_new)?;
            let denom = v_new.affine(1.0 / bc2, 0.0)?.sqrt()?.add_scalar(eps)?;
            let update = m_new.div(&denom)?.affine(lr / bc1, 0.0)?;
            let p_new = p.to_dtype(md)?.affine(1.0 - lr * wd, 0.0)?.sub(&update)?;
            p.assign(&p_new.to_dtype(p.dtype())?)?;
        }
        Ok(())
    }

    /// The moments `(exp_avg, exp_avg_sq)` of every parameter, in the order of [`AdamW::params`].
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// The moments as safetensors bytes: `{name}.exp_avg`, `{name}.exp_avg_sq`, and the step
    /// count in the metadata (`adamw_steps`).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut bufs: Vec<(String, Vec<usize>, StDtype, Vec<u8>)> = Vec::new();
        for (i, name) in self.names.iter().enumerate() {
            for (suffix, t) in [
                ("exp_avg", &self.exp_avg[i]),
                ("exp_avg_sq", &self.exp_avg_sq[i]),
            ] {
                let (dt, bytes) = match t.dtype() {
                    DType::F64 => (
                        StDtype::F64,
                        t.to_vec_f64()?
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                    ),
                    _ => (
                        StDtype::F32,
                        t.to_vec_f32()?
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                    ),
                };
                bufs.push((format!("{name}.{suffix}"), t.dims().to_vec(), dt, bytes));
            }
        }
        let views = bufs
            .iter()
            .map(|(n, s, d, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| Error::Optimizer(format!("cannot serialise the state: {e}")))?;
        // One metadata entry, so that the bytes are deterministic.
        let meta = HashMap::from([(STEPS_KEY.to_string(), self.steps.to_string())]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Optimizer(format!("cannot serialise the state: {e}")))
    }

    /// Writes the state to `path` (flushed to disk).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::checkpoint::write_synced(path, &self.to_safetensors()?)
    }

    /// Restores the moments and the step count from `path`, which must hold exactly the state of
    /// these parameters (same names and shapes).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.load_bytes(&bytes)
            .map_err(|msg| Error::Optimizer(format!("{}: {msg}", path.display())))
    }

    fn load_bytes(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let steps = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STEPS_KEY))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(format!("no `{STEPS_KEY}` in the metadata"))?;
        let expected: std::collections::HashSet<String> = self
            .names
            .iter()
            .flat_map(|n| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")])
            .collect();
        if let Some(extra) = st.names().into_iter().find(|n| !expected.contains(*n)) {
            return Err(format!("state for unknown parameter `{extra}`"));
        }
        let mut loaded = Vec::new();
        for (i, name) in self.names.iter().enumerate() {
            for (k, dst) in [
                ("exp_avg", &self.exp_avg[i]),
                ("exp_avg_sq", &self.exp_avg_sq[i]),
            ] {
                let key = format!("{name}.{k}");
                let view = st.tensor(&key).map_err(|_| format!("`{key}` is missing"))?;
                if view.shape() != dst.dims() {
                    return Err(format!(
                        "`{key}` has shape {:?}, the parameter {:?}",
                        view.shape(),
                        dst.dims()
                    ));
                }
                let data: Vec<f64> = match view.dtype() {
                    StDtype::F32 => view
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                        .collect(),
                    StDtype::F64 => view
                        .data()
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect(),
                    d => return Err(format!("`{key}` has dtype {d:?} (f32 or f64 expected)")),
                };
                let t = Tensor::from_f64(&data, dst.shape().clone(), dst.dtype(), dst.device())
                    .map_err(|e| e.to_string())?;
                loaded.push((dst.clone(), t));
            }
        }
        // Only once everything has been read: a bad file leaves the optimizer as it was.
        for (dst, t) in loaded {
            dst.assign(&t).map_err(|e| e.to_string())?;
        }
        self.steps = steps;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `params` (those without a gradient count as 0), read
/// back as one number, and the factor `min(1, max_norm / (norm + 1e-6))` that `AdamW::step` should
/// apply to them (PyTorch's `clip_grad_norm_`). `max_norm == 0` disables clipping (factor 1).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let norm = grad_norm(params)?;
    let scale = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    Ok((norm, scale))
}

/// The gradient norm of `params` and its clipping factor as [`clip_grad_norm`] gives them, left
/// on `device` as an f64 tensor `[norm, factor]` (`engine::clip_norm_factor`: nothing is read
/// back; the factor is NaN when the norm is not finite, and [`AdamW::step_scaled`] then skips).
pub fn clip_factor(params: &[Tensor], max_norm: f64, device: engine::Device) -> Result<Tensor> {
    let grads: Vec<Tensor> = params.iter().filter_map(Tensor::grad).collect();
    let refs: Vec<&Tensor> = grads.iter().collect();
    Ok(engine::clip_norm_factor(&refs, max_norm, device)?)
}

/// Where a step's gradient scale comes from.
#[derive(Clone, Copy)]
enum Scale<'a> {
    Host(f64),
    /// One f64 element on the device.
    Device(&'a Tensor),
}

/// `√(Σ_p Σ g_p²)` over the parameters that have a gradient, accumulated in f64 by one backend
/// call for all of them (`engine::sum_of_squares`: one kernel launch on a GPU).
pub fn grad_norm(params: &[Tensor]) -> Result<f64> {
    let grads: Vec<Tensor> = params.iter().filter_map(Tensor::grad).collect();
    let refs: Vec<&Tensor> = grads.iter().collect();
    Ok(engine::sum_of_squares(&refs)?.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::Device;

    /// A variable with `values` whose gradient is `grad` (via backward of Σ p ⊙ grad).
    fn var_with_grad(values: &[f64], grad: &[f64], dtype: DType) -> Tensor {
        let p = Tensor::from_f64(values, values.len(), dtype, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let g = Tensor::from_f64(grad, grad.len(), dtype, Device::Cpu).unwrap();
        p.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        p
    }

    /// The reference: the update written out in f64 on the host.
    #[allow(clippy::too_many_arguments)]
    fn reference_step(
        p: &mut [f64],
        m: &mut [f64],
        v: &mut [f64],
        g: &[f64],
        t: i32,
        lr: f64,
        c: &AdamWConfig,
        scale: f64,
    ) {
        for i in 0..p.len() {
            let gi = g[i] * scale;
            p[i] *= 1.0 - lr * c.weight_decay;
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
            let mh = m[i] / (1.0 - c.beta1.powi(t));
            let vh = v[i] / (1.0 - c.beta2.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + c.eps);
        }
    }

    #[test]
    fn first_step_by_hand() {
        // With bias correction, the first step moves each weight by lr·sign(g) (|g| ≫ ε), after
        // the decay p·(1 − lr·wd).
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let p = var_with_grad(&[1.0, -2.0, 0.5], &[0.3, -4.0, 0.0], DType::F64);
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg).unwrap();
        opt.step(0.01, 1.0).unwrap();
        let got = p.to_vec_f64().unwrap();
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn several_steps_match_the_reference() {
        let cfg = AdamWConfig {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.05,
        };
        let init = [0.3, -0.7, 1.2, 0.0];
        let p = Tensor::from_f64(&init, [2, 2], DType::F64, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg).unwrap();
        let (mut rp, mut rm, mut rv) = (init.to_vec(), vec![0.0; 4], vec![0.0; 4]);
        for t in 1..=5 {
            // loss = Σ p³ / 3 + Σ p: gradient p² + 1.
            let cur = p.to_vec_f64().unwrap();
            let g: Vec<f64> = cur.iter().map(|x| x * x + 1.0).collect();
            opt.zero_grad();
            p.powf(3.0)
                .unwrap()
                .affine(1.0 / 3.0, 0.0)
                .unwrap()
                .add(&p)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let lr = 0.01 * t as f64;
            opt.step(lr, 0.5).unwrap();
            reference_step(&mut rp, &mut rm, &mut rv, &g, t, lr, &cfg, 0.5);
        }
        let got = p.to_vec_f64().unwrap();
        for (a, b) in got.iter().zip(&rp) {
            assert!((a - b).abs() < 1e-12, "{got:?} vs {rp:?}");
        }
        assert_eq!(opt.steps(), 5);
    }

    #[test]
    fn weight_decay_alone_shrinks_weights() {
        // A zero gradient: the Adam part is 0 and only the decoupled decay acts.
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let p = var_with_grad(&[2.0, -4.0], &[0.0, 0.0], DType::F32);
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg).unwrap();
        opt.step(0.1, 1.0).unwrap();
        let got = p.to_vec_f64().unwrap();
        assert!(
            (got[0] - 1.9).abs() < 1e-6 && (got[1] + 3.8).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn parameters_without_gradient_are_untouched() {
        let a = var_with_grad(&[1.0], &[1.0], DType::F32);
        let b = Tensor::from_f64(&[3.0], 1, DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let mut opt = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        opt.step(0.1, 1.0).unwrap();
        assert_eq!(b.to_vec_f64().unwrap(), vec![3.0]);
        assert!(a.to_vec_f64().unwrap()[0] < 1.0);
    }

    #[test]
    fn rejects_non_variables_and_duplicates() {
        let t = Tensor::zeros(2, DType::F32, Device::Cpu).unwrap();
        assert!(AdamW::new(vec![("t".into(), t)], AdamWConfig::default()).is_err());
        let v = Tensor::zeros(2, DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let e = AdamW::new(
            vec![("v".into(), v.clone()), ("v".into(), v)],
            AdamWConfig::default(),
        );
        assert!(e.err().unwrap().to_string().contains("twice"));
    }

    #[test]
    fn clipping_norm_and_factor() {
        let a = var_with_grad(&[0.0, 0.0], &[3.0, 0.0], DType::F32);
        let b = var_with_grad(&[0.0], &[4.0], DType::F32);
        let c = Tensor::zeros(1, DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap(); // no grad
        let ps = [a, b, c];
        let (norm, scale) = clip_grad_norm(&ps, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-9);
        assert_eq!(clip_grad_norm(&ps, 10.0).unwrap().1, 1.0);
        assert_eq!(clip_grad_norm(&ps, 0.0).unwrap().1, 1.0);
        // The clipped gradient has norm max_norm: a step with it equals a step on g/5.
        let p1 = var_with_grad(&[1.0, 1.0], &[3.0, 4.0], DType::F64);
        let p2 = var_with_grad(&[1.0, 1.0], &[0.6, 0.8], DType::F64);
        let (_, s) = clip_grad_norm(std::slice::from_ref(&p1), 1.0).unwrap();
        let cfg = AdamWConfig {
            eps: 0.5,
            ..Default::default()
        }; // ε large: the step depends on |g|
        let mut o1 = AdamW::new(vec![("p".into(), p1.clone())], cfg).unwrap();
        let mut o2 = AdamW::new(vec![("p".into(), p2.clone())], cfg).unwrap();
        o1.step(0.1, s).unwrap();
        o2.step(0.1, 1.0).unwrap();
        let (x, y) = (p1.to_vec_f64().unwrap(), p2.to_vec_f64().unwrap());
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6, "{x:?} vs {y:?}");
        }
    }

    /// The device-side clipping (`clip_factor`, `step_scaled`) is the host's (`clip_grad_norm`,
    /// `step`) bit for bit, with several learning-rate multiples; a NaN gradient gives a NaN
    /// factor and a step that changes nothing.
    #[test]
    fn device_clipping_equals_the_host_clipping() {
        let mk = || {
            let a = var_with_grad(&[0.5, -1.0, 2.0], &[3.0, -4.0, 0.25], DType::F32);
            let b = var_with_grad(&[1.5, 0.25], &[-2.0, 7.0], DType::F64);
            let mut o =
                AdamW::new(vec![("a".into(), a), ("b".into(), b)], Default::default()).unwrap();
            o.scale_lr(3.0, |n| n == "b");
            o
        };
        let (mut host, mut dev) = (mk(), mk());
        let (norm, scale) = clip_grad_norm(host.params(), 1.0).unwrap();
        let clip = clip_factor(dev.params(), 1.0, Device::Cpu).unwrap();
        let got = clip.to_vec_f64().unwrap();
        assert_eq!(
            (got[0].to_bits(), got[1].to_bits()),
            (norm.to_bits(), scale.to_bits())
        );
        host.step(0.01, scale).unwrap();
        dev.step_scaled(0.01, &clip.narrow(0, 1, 1).unwrap())
            .unwrap();
        for (x, y) in host.params().iter().zip(dev.params()) {
            assert_eq!(x.to_vec_f64().unwrap(), y.to_vec_f64().unwrap());
        }
        let c = var_with_grad(&[1.0], &[f64::NAN], DType::F32);
        let mut o = AdamW::new(vec![("c".into(), c)], Default::default()).unwrap();
        let clip = clip_factor(o.params(), 1.0, Device::Cpu).unwrap();
        assert!(clip.to_vec_f64().unwrap()[1].is_nan());
        o.step_scaled(0.01, &clip.narrow(0, 1, 1).unwrap()).unwrap();
        assert_eq!(o.params()[0].to_vec_f64().unwrap(), vec![1.0]);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let mk = || {
            let p = Tensor::from_f64(&[0.5, -0.25, 2.0], 3, DType::F32, Device::Cpu)
                .unwrap()
                .to_var()
                .unwrap();
            let o =
                AdamW::new(vec![("layer.w".into(), p.clone())], AdamWConfig::default()).unwrap();
            (p, o)
        };
        let grad_step = |p: &Tensor, o: &mut AdamW| {
            o.zero_grad();
            p.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            o.step(0.05, 1.0).unwrap();
        };
        let (p, mut o) = mk();
        grad_step(&p, &mut o);
        grad_step(&p, &mut o);
        let bytes = o.to_safetensors().unwrap();
        // A fresh optimizer over a copy of the weights, restored, then one more step on both.
        let (q, mut o2) = mk();
        q.assign(&p.detach()).unwrap();
        o2.load_bytes(&bytes).unwrap();
        assert_eq!(o2.steps(), 2);
        grad_step(&p, &mut o);
        grad_step(&q, &mut o2);
        assert_eq!(p.to_vec_f64().unwrap(), q.to_vec_f64().unwrap());
    }

    #[test]
    fn loading_mismatched_state_fails_and_changes_nothing() {
        let p = Tensor::zeros([2, 3], DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let o = AdamW::new(vec![("a".into(), p)], AdamWConfig::default()).unwrap();
        let bytes = o.to_safetensors().unwrap();
        let q = Tensor::zeros([3, 2], DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let mut o2 = AdamW::new(vec![("a".into(), q)], AdamWConfig::default()).unwrap();
        assert!(o2.load_bytes(&bytes).unwrap_err().contains("shape"));
        let r = Tensor::zeros([2, 3], DType::F32, Device::Cpu)
            .unwrap()
            .to_var()
            .unwrap();
        let mut o3 = AdamW::new(vec![("b".into(), r)], AdamWConfig::default()).unwrap();
        assert!(o3
            .load_bytes(&bytes)
            .unwrap_err()
            .contains("unknown parameter `a."));
        assert_eq!(o3.steps(), 0);
    }
}
