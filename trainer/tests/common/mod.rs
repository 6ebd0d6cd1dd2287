//! Helpers shared by the trainer's integration tests.

use std::path::{Path, PathBuf};

/// A fresh (removed) folder under the temporary folder, unique to this process, `kind` and `name`.
pub fn out_dir(kind: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixlora-{kind}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `(step, loss)` of every train line of `out`'s metrics.jsonl.
pub fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The first GPU, or `None` after printing why the test skips (no usable GPU, or a build
/// without the `cuda` feature: scripts/dev/build-gpu.sh builds the GPU tests with it).
#[allow(dead_code)] // only the GPU tests use it
pub fn gpu() -> Option<engine::Device> {
    #[cfg(feature = "cuda")]
    {
        testutil::gpu::configure();
        match engine::backend::cuda::CudaDevice::get(0) {
            Ok(_) => Some(engine::Device::Cuda(0)),
            Err(e) => {
                testutil::skip(format_args!("no usable GPU: {e}"));
                None
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        testutil::skip("built without the `cuda` feature");
        None
    }
}
