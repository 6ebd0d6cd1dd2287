#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use engine::{DType, Device, Tensor};
use std::time::Instant;
fn t<F: FnMut() -> Tensor>(name: &str, mut f: F) {
    let _ = f();
    let s = Instant::now();
    for _ in 0..5 {
        let _ = f();
    }
    println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 1000.0 / 5.0);
}
fn main() {
    let r = |s: &[usize], seed| {
        Tensor::randn(s.to_vec(), 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    };
    let (b, h, tt) = (4, 9, 512);
    let scores = r(&[b, h, tt, tt], 1);
    let bias = r(&[1, 1, tt, tt], 2);
    let q = r(&[b, 3, 3 * tt, 64], 3);
    let k = r(&[b, 3, tt, 64], 4);
    t("add_bias", || scores.add(&bias).unwrap());
    t("add_same", || scores.add(&scores).unwrap());
    t("softmax", || scores.softmax_last_dim().unwrap());
    t("affine", || scores.affine(2.0, 0.0).unwrap());
    t("qk", || q.matmul(&k.t().unwrap()).unwrap());
    t("pv", || {
        scores
            .reshape([b, 3, 3 * tt, tt])
            .unwrap()
            .matmul(&k)
            .unwrap()
    });
    t("copy", || scores.copy().unwrap());
}
