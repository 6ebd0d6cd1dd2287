//! Random and constant creation (`Tensor::randn`, `rand_uniform`, `full`, `zeros`, uploads;
//! `backend/{cpu,cuda}/random.rs`, `kernels/src/random.cu`). The CPU tests of the values these
//! give are the other ops' tests, which build their inputs with them.
//!
//! Parity (module `gpu`): `full`, `zeros` and uploads of 1024, 1007 and 1 elements in every
//! dtype, `randn` and `rand_uniform` in every float dtype (relative error within f32 1e-5, bf16
//! 1e-2, f64 1e-10, u32 equal), and uniform fills bit-identical to the CPU's.

#[cfg(feature = "cuda")]
mod gpu {
    //! CPU ↔ CUDA parity (skipped, saying why, without a GPU).
    use engine::{DType, Device, Shape, Storage};
    use testutil::gpu::{ints, read, up, vals, Checker, ALL, FLOATS};

    #[test]
    fn creation() {
        let Some(mut c) = Checker::new() else { return };
        for &n in &[1024usize, 1007, 1] {
            for dt in ALL {
                c.case(&format!("full {n} {dt}"), dt, |dev| {
                    Ok(read(&Storage::full(dev, &Shape::from(n), dt, 3.7)?, n))
                });
                c.case(&format!("zeros {n} {dt}"), dt, |dev| {
                    Ok(read(&Storage::zeros(dev, &Shape::from(n), dt)?, n))
                });
                let data = if dt == DType::U32 {
                    ints(n, 1000, 60)
                } else {
                    vals(n, 60)
                };
                c.case(&format!("upload {n} {dt}"), dt, |dev| {
                    Ok(read(&up(dev, &data, dt), n))
                });
            }
            for dt in FLOATS {
                c.case(&format!("randn {n} {dt}"), dt, |dev| {
                    Ok(read(
                        &Storage::randn(dev, &Shape::from(n), dt, 0.5, 2.0, 77)?,
                        n,
                    ))
                });
                c.case(&format!("rand_uniform {n} {dt}"), dt, |dev| {
                    Ok(read(
                        &Storage::rand_uniform(dev, &Shape::from(n), dt, -1.0, 3.0, 78)?,
                        n,
                    ))
                });
            }
        }
        c.finish();
        // Uniform fills are bit-identical to the CPU's.
        let gpu = Device::Cuda(0);
        let shape = Shape::from(4097);
        let u = |d| Storage::rand_uniform(d, &shape, DType::F64, -1.0, 3.0, 5).unwrap();
        assert_eq!(read(&u(Device::Cpu), 4097), read(&u(gpu), 4097));
    }
}
