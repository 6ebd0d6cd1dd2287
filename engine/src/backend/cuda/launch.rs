//! The launch macro shared by the op files.
//!
//! With `MIXLORA_PROFILE=1` every launch is bracketed by stream synchronisations and its time
//! added to the engine's op profile under the kernel's name (`crate::backend::cpu::profile`):
//! slow, but it says where the GPU time goes without a profiler.

/// Launches kernel `$name` of module `$src` on `$dev`'s stream with the arguments `$arg`
/// (identifiers, so that each lives until the launch). Expands to `Result<()>`; must be used in
/// an `unsafe` block whose `// SAFETY:` comment says why the sizes are right.
macro_rules! launch {
    ($dev:expr, $op:expr, $src:expr, $name:expr, $cfg:expr, [$($arg:ident),* $(,)?]) => {{
        let dev: &$crate::backend::cuda::CudaDevice = $dev;
        match dev.func(&$src, &$name) {
            Err(e) => Err(e),
            Ok(f) => {
                use cudarc::driver::PushKernelArg;
                let mut b = dev.stream().launch_builder(&f);
                $( b.arg(&$arg); )*
                $crate::backend::cuda::launch::profiled(dev, &$name, || {
                    b.launch($cfg).map(|_| ()).map_err(|e| dev.err($op, e))
                })
            }
        }
    }};
}
pub(crate) use launch;

/// Runs `launch` (queued work on `dev`'s stream), timing it to completion under `name` when the
/// profile is on.
pub(crate) fn profiled<R>(
    dev: &crate::backend::cuda::CudaDevice,
    name: &str,
    launch: impl FnOnce() -> crate::Result<R>,
) -> crate::Result<R> {
    use crate::backend::cpu::profile;
    if !profile::enabled() {
        return launch();
    }
    dev.synchronize()?;
    profile::timed(
        || format!("cuda {name}"),
        || {
            let r = launch()?;
            dev.synchronize()?;
            Ok(r)
        },
    )
}
