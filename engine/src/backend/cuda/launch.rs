//! The launch macro shared by the op files.

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
                b.launch($cfg).map(|_| ()).map_err(|e| dev.err($op, e))
            }
        }
    }};
}
pub(crate) use launch;
