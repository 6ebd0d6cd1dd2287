//! Parity of the naive MixLoRA FFN with `mixlora_block_reference.json` (MoE-PEFT semantics in
//! float64): `y`, the aux loss and every gradient (x, router, all LoRA A/B) of
//! `loss = Σ y ⊙ dy + aux`. Skips, saying why, when the fixture is absent.

use std::path::{Path, PathBuf};

use engine::{DType, Device, Tensor};
use model::adapters::{
    aux_loss, ExpertLora, LoraLinear, MixLoraFfn, MoeImpl, Router, Routing, SharedFfn,
};
use serde_json::Value;
use testutil::rel_err;

/// `$MIXLORA_FIXTURES/`, else `shared/fixtures/` in or beside the repository.
fn fixture(name: &str) -> Option<Value> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = std::env::var_os("MIXLORA_FIXTURES")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(repo.join("shared/fixtures"));
    dirs.push(repo.join("../shared/fixtures"));
    let Some(path) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) else {
        testutil::skip(format_args!("{name} not found (set MIXLORA_FIXTURES)"));
        return None;
    };
    Some(
        serde_json::from_str(&std::fs::read_to_string(path).expect("read fixture"))
            .expect("parse fixture"),
    )
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn tensor(v: &Value, shape: &[usize]) -> Tensor {
    Tensor::from_f64(&floats(v), shape.to_vec(), DType::F64, Device::Cpu).unwrap()
}

fn check(what: &str, got: &[f64], want: &[f64], worst: &mut f64) {
    let e = rel_err(got, want);
    println!("{what}: relative error {e:.3e}");
    assert!(e < 1e-10, "{what}: relative error {e:.3e}");
    *worst = worst.max(e);
}

#[test]
fn mixlora_ffn_matches_reference_fixture() {
    ffn_matches_fixture(MoeImpl::Naive);
}

/// The device-side grouped path pins the same semantics.
#[test]
fn grouped_mixlora_ffn_matches_reference_fixture() {
    ffn_matches_fixture(MoeImpl::Grouped);
}

fn ffn_matches_fixture(imp: MoeImpl) {
    let Some(fx) = fixture("mixlora_block_reference.json") else {
        return;
    };
    let sz = &fx["sizes"];
    let n = |k: &str| sz[k].as_u64().unwrap() as usize;
    let (t, h, i, e, k, r) = (n("T"), n("H"), n("I"), n("E"), n("K"), n("R"));
    let (alpha, coef) = (
        sz["alpha"].as_f64().unwrap(),
        sz["aux_coef"].as_f64().unwrap(),
    );
    let s = alpha / r as f64;

    let x = tensor(&fx["x"], &[t, h]).to_var().unwrap();
    let (wg, wu, wd) = (
        tensor(&fx["w_gate"], &[i, h]),
        tensor(&fx["w_up"], &[i, h]),
        tensor(&fx["w_down"], &[h, i]),
    );
    let router = tensor(&fx["router"], &[e, h]).to_var().unwrap();
    let dims = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)];
    // lora[p][e] = (A [r, in], B [out, r]) as variables.
    let lora: Vec<Vec<(Tensor, Tensor)>> = dims
        .iter()
        .map(|&(p, n_in, n_out)| {
            (0..e)
                .map(|j| {
                    let ab = &fx["lora"][p][j];
                    (
                        tensor(&ab["A"], &[r, n_in]).to_var().unwrap(),
                        tensor(&ab["B"], &[n_out, r]).to_var().unwrap(),
                    )
                })
                .collect()
        })
        .collect();
    let lin = |p: usize, j: usize| {
        Some(LoraLinear::new(
            lora[p][j].0.clone(),
            lora[p][j].1.clone(),
            s,
            0.0,
        ))
    };
    let ffn = MixLoraFfn {
        router: Router {
            weight: router.clone(),
            routing: Routing::TopK(k),
        },
        experts: (0..e)
            .map(|j| ExpertLora {
                gate: lin(0, j),
                up: lin(1, j),
                down: lin(2, j),
            })
            .collect(),
    };
    let shared = SharedFfn {
        gate: &engine::FrozenWeight::from(wg.clone()),
        up: &engine::FrozenWeight::from(wu.clone()),
        down: &engine::FrozenWeight::from(wd.clone()),
    };
    let (y, route) = ffn.forward(&x, shared, imp, None).unwrap();
    let aux = aux_loss(&[route.clone()], None, coef).unwrap().unwrap();
    let dy = tensor(&fx["dy"], &[t, h]);
    let loss = y.mul(&dy).unwrap().sum_all().unwrap().add(&aux).unwrap();
    loss.backward().unwrap();

    let ex = &fx["expected"];
    // The routing itself: the selected experts (as sets) and their renormalised weights.
    let mask = route.mask.to_vec_f64().unwrap();
    let weights = route.weights.to_vec_f64().unwrap();
    let sel: Vec<usize> = ex["topk_experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let want_w = floats(&ex["topk_weights"]);
    let mut got_w = Vec::new();
    for tok in 0..t {
        let picked: Vec<usize> = (0..e).filter(|&j| mask[tok * e + j] != 0.0).collect();
        let mut want: Vec<usize> = sel[tok * k..(tok + 1) * k].to_vec();
        want.sort();
        assert_eq!(picked, want, "experts of token {tok}");
        got_w.extend(
            sel[tok * k..(tok + 1) * k]
                .iter()
                .map(|&j| weights[tok * e + j]),
        );
    }
    let mut worst = 0.0f64;
    check("topk_weights", &got_w, &want_w, &mut worst);
    check("y", &y.to_vec_f64().unwrap(), &floats(&ex["y"]), &mut worst);
    check(
        "aux",
        &[aux.to_scalar().unwrap()],
        &[ex["aux"].as_f64().unwrap()],
        &mut worst,
    );
    check(
        "grad_x",
        &x.grad().unwrap().to_vec_f64().unwrap(),
        &floats(&ex["grad_x"]),
        &mut worst,
    );
    check(
        "grad_router",
        &router.grad().unwrap().to_vec_f64().unwrap(),
        &floats(&ex["grad_router"]),
        &mut worst,
    );
    for (pi, &(p, _, _)) in dims.iter().enumerate() {
        for j in 0..e {
            let want = &ex["grad_lora"][p][j];
            let (a, b) = &lora[pi][j];
            let got = |v: &Tensor| {
                v.grad()
                    .map_or_else(|| vec![0.0; v.elem_count()], |g| g.to_vec_f64().unwrap())
            };
            check(
                &format!("grad {p} expert {j} A"),
                &got(a),
                &floats(&want["A"]),
                &mut worst,
            );
            check(
                &format!("grad {p} expert {j} B"),
                &got(b),
                &floats(&want["B"]),
                &mut worst,
            );
        }
    }
    println!("worst relative error over y, aux and every gradient: {worst:.3e}");
}
