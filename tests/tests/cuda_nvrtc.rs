//! Compiles every kernel module with NVRTC to PTX for sm_90 (the H200), on any machine: NVRTC
//! needs no GPU. Skips, saying why, when the engine is built without its `cuda` feature or when
//! no NVRTC library is found (scripts/ci-nvrtc.sh installs one from PyPI and runs this test).

#[cfg(feature = "cuda")]
#[test]
fn every_kernel_module_compiles_for_sm_90() {
    use engine::backend::cuda::compile::{compile_module, nvrtc_available};

    if !nvrtc_available() {
        // scripts/ci-nvrtc.sh sets MIXLORA_REQUIRE_NVRTC: there a missing library is a failure.
        assert!(
            std::env::var_os("MIXLORA_REQUIRE_NVRTC").is_none(),
            "libnvrtc was not found on LD_LIBRARY_PATH"
        );
        testutil::skip(
            "libnvrtc was not found on LD_LIBRARY_PATH (scripts/ci-nvrtc.sh installs it)",
        );
        return;
    }
    // The include folder from MIXLORA_CUDA_INCLUDE (scripts/ci-nvrtc.sh), else the default.
    let opts = testutil::gpu::cuda_options();
    eprintln!("CUDA include folder: {:?}", opts.nvrtc_include_dir());
    // MIXLORA_PTX_DUMP=folder writes each module's PTX there, for reading the generated code.
    let dump = std::env::var_os("MIXLORA_PTX_DUMP");
    let mut failures = Vec::new();
    for src in kernels::SOURCES {
        let t = std::time::Instant::now();
        match compile_module(src, "sm_90", &opts) {
            Ok(ptx) => {
                if let Some(dir) = &dump {
                    let path = std::path::Path::new(dir).join(format!("{}.ptx", src.name));
                    std::fs::write(&path, &ptx).expect("writing the PTX dump");
                }
                // Every listed kernel is an entry point of the PTX, and nothing else is.
                let entries: Vec<&str> = ptx
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
                    .map(|l| l.split('(').next().unwrap_or(l).trim())
                    .collect();
                for k in src.kernels {
                    if !entries.contains(k) {
                        failures.push(format!(
                            "{}: kernel {k} is listed but not in the PTX",
                            src.name
                        ));
                    }
                }
                for e in &entries {
                    if !src.kernels.contains(e) {
                        failures.push(format!("{}: PTX entry {e} is not listed", src.name));
                    }
                }
                eprintln!(
                    "{}: {} kernels, {} KiB of PTX in {:.2} s",
                    src.name,
                    entries.len(),
                    ptx.len() / 1024,
                    t.elapsed().as_secs_f64()
                );
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn every_kernel_module_compiles_for_sm_90() {
    testutil::skip("built without the `cuda` feature (run with --features cuda)");
}
