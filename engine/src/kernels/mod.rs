//! CPU kernels for the training hot paths, run on the flex backend's own memory: a tensor's
//! storage is borrowed through burn's extension API (`try_into_primitive::<Flex>`, an `Arc`
//! clone, no copy) and results are wrapped back without copying. On other devices the callers
//! use the burn-op versions in [`crate::train::ops`].
//!
//! Hot loops are compiled twice, for baseline x86-64 and for AVX2+FMA, and dispatched at run
//! time ([`simd!`]), so binaries stay portable.

pub mod attention;
pub mod elementwise;
pub mod fastmath;

use burn::backend::Flex;
use burn::tensor::{Device, Tensor, TensorData};
use burn_flex::FlexTensor;

/// A contiguous f32 flex tensor borrowed as a slice.
pub struct Host {
    t: FlexTensor,
}

impl Host {
    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        self.t
            .as_slice::<f32>()
            .expect("made contiguous f32 in `host`")
    }
}

/// Borrows `t`'s storage when it is an f32 tensor on the flex backend (made contiguous if it
/// is a strided view); `None` on other devices or dtypes.
pub fn host<const D: usize>(t: &Tensor<D>) -> Option<Host> {
    if t.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let p: FlexTensor = t.clone().try_into_primitive::<Flex>().ok()?;
    let p = if p.is_contiguous() && p.as_slice::<f32>().is_some() {
        p
    } else {
        p.to_contiguous()
    };
    p.as_slice::<f32>()?;
    Some(Host { t: p })
}

/// Wraps a vector as a tensor on `device` (no copy on the flex backend).
pub fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Whether tensors on `device` can use these kernels.
pub fn available(device: &Device) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
}

/// Runs `$body` compiled for AVX2+FMA when the CPU has them, else for the baseline target.
/// `$body` is a closure-free expression; locals it uses must be passed as `name: Type` pairs.
#[macro_export]
macro_rules! simd {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected at run time.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
