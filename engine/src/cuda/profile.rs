//! Where a GPU step's time goes: with profiling on ([`Gpu::set_profiling`]), every kernel
//! launch and every cuBLASLt product is bracketed by a pair of CUDA events, and
//! [`Gpu::profile`] sums the measured device time per kernel name (products per shape).
//! Events cost a few microseconds of host time a launch, so profiled steps run slower than
//! unprofiled ones: use the shares, not the totals, to decide what to make faster.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use cudarc::driver::CudaEvent;
use cudarc::driver::sys::CUevent_flags;
use serde::Serialize;

use super::{Gpu, drv};
use crate::error::Result;

/// Device time of one kernel (or one product shape).
#[derive(Debug, Clone, Serialize)]
pub struct KernelTime {
    /// Kernel name, or `gemm OUT<-IN MxNxK` for a product.
    pub name: String,
    /// Launches timed.
    pub calls: u64,
    /// Device milliseconds, all launches together.
    pub ms: f64,
}

/// Events waiting to be read, and the sums of those already read.
#[derive(Default)]
pub(crate) struct Profiler {
    pending: Vec<(String, CudaEvent, CudaEvent)>,
    totals: HashMap<String, (u64, f64)>,
}

/// Pending event pairs before they are read (each read waits for the stream).
const MAX_PENDING: usize = 4096;

impl Profiler {
    fn fold(&mut self) -> Result<()> {
        for (name, start, end) in self.pending.drain(..) {
            let ms = drv("reading a profiling event", start.elapsed_ms(&end))?;
            let t = self.totals.entry(name).or_default();
            t.0 += 1;
            t.1 += f64::from(ms);
        }
        Ok(())
    }
}

impl Gpu {
    /// Turns per-kernel timing on or off (off by default; `FEDTUNE_PROFILE=1` turns it on
    /// when the GPU is opened). Turning it on clears earlier sums.
    pub fn set_profiling(&self, on: bool) {
        let mut p = self.profiler.lock().unwrap_or_else(|e| e.into_inner());
        *p = on.then(Profiler::default);
        self.profiling.store(on, Ordering::Relaxed);
    }

    /// Runs `f` (which queues work on the stream) between two timing events labelled
    /// `label()` when profiling is on; just runs it otherwise.
    pub(crate) fn timed<R>(&self, label: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
        if !self.profiling.load(Ordering::Relaxed) {
            return f();
        }
        let event = || {
            self.stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap_or_else(|e| panic!("recording a profiling event: {e}"))
        };
        let start = event();
        let r = f();
        let end = event();
        let mut p = self.profiler.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = p.as_mut() {
            p.pending.push((label(), start, end));
            if p.pending.len() >= MAX_PENDING {
                p.fold()
                    .unwrap_or_else(|e| panic!("reading profiling events: {e}"));
            }
        }
        r
    }

    /// The device time per kernel since profiling was turned on (or last read), longest
    /// first; waits for the stream and starts new sums.
    pub fn profile(&self) -> Result<Vec<KernelTime>> {
        self.synchronize()?;
        let mut p = self.profiler.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = p.as_mut() else {
            return Ok(Vec::new());
        };
        p.fold()?;
        let mut out: Vec<KernelTime> = p
            .totals
            .drain()
            .map(|(name, (calls, ms))| KernelTime { name, calls, ms })
            .collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }
}
