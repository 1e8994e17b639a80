//! The coordinator's disk, as the daemon sees it: free space is checked before an upload is
//! taken (room is kept for the coordinator's own writes), and a write that fails — a full disk,
//! an I/O error — is not the end of the daemon: the actions from the failed one on are held and
//! retried in order, uploads are refused meanwhile, and the clients they were refused to are
//! asked again once writes succeed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedtune_protocol::PublicKey;

/// Bytes available to the daemon on the volume holding `path` (`None` where that cannot be
/// told).
pub(crate) fn available(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let s = rustix::fs::statvfs(path).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// How often held actions are tried again while writes fail.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

/// A failing write.
struct Failing {
    since: Instant,
    what: String,
    error: String,
    tried: Instant,
}

/// The disk's state for the daemon's loop.
pub(crate) struct Disk {
    dir: PathBuf,
    reserve: u64,
    failing: Option<Failing>,
    /// Clients whose upload was refused for the disk's sake, with its size: asked again when
    /// writes succeed and there is room for it.
    refused: BTreeMap<PublicKey, u64>,
    /// When the last upload was refused (clients are asked again no sooner than [`RETRY`]
    /// after).
    last_refusal: Option<Instant>,
}

/// What changed when a held write went through.
pub(crate) struct Recovered {
    /// How long writes failed.
    pub(crate) failed_for: Duration,
    /// The clients to ask again for their update.
    pub(crate) refused: BTreeSet<PublicKey>,
}

impl Disk {
    /// The disk under `dir`, keeping `reserve` bytes free for the coordinator's own writes.
    pub(crate) fn new(dir: &Path, reserve: u64) -> Self {
        Disk {
            dir: dir.to_path_buf(),
            reserve,
            failing: None,
            refused: BTreeMap::new(),
            last_refusal: None,
        }
    }

    /// Free bytes an upload of `bytes` needs: its partial file and its stored copy, plus the
    /// reserve.
    fn need(&self, bytes: u64) -> u64 {
        bytes.saturating_mul(2).saturating_add(self.reserve)
    }

    /// `client`'s upload of `bytes` could not be taken for the disk's sake (refused, or its
    /// partial file could not be written): it is asked again later.
    pub(crate) fn no_room(&mut self, client: PublicKey, bytes: u64) {
        self.refused.insert(client, bytes);
        self.last_refusal = Some(Instant::now());
    }

    /// Why an upload of `bytes` from `client` cannot be taken now, if it cannot: writes are
    /// failing, or the volume has less free than twice the payload (its partial file and its
    /// stored copy) plus the reserve. The client is remembered, to be asked again.
    pub(crate) fn refuse(&mut self, client: PublicKey, bytes: u64) -> Option<String> {
        let why = match &self.failing {
            Some(f) => format!(
                "the coordinator cannot write to its disk ({}: {})",
                f.what, f.error
            ),
            None => {
                let need = self.need(bytes);
                let free = available(&self.dir).filter(|&free| free < need)?;
                format!(
                    "the coordinator's disk has {free} bytes free; an upload of {bytes} bytes \
                     needs {need} (twice its size plus the {} bytes kept for the coordinator's \
                     own writes)",
                    self.reserve
                )
            }
        };
        self.no_room(client, bytes);
        Some(why)
    }

    /// A write (`what`) failed with `error`; true the first time (not on each retry).
    pub(crate) fn failed(&mut self, what: &str, error: &std::io::Error) -> bool {
        let now = Instant::now();
        match &mut self.failing {
            Some(f) => {
                f.tried = now;
                f.what = what.to_string();
                f.error = error.to_string();
                false
            }
            None => {
                self.failing = Some(Failing {
                    since: now,
                    what: what.to_string(),
                    error: error.to_string(),
                    tried: now,
                });
                true
            }
        }
    }

    /// Whether held actions should be tried again now (writes failed at least [`RETRY`] ago).
    pub(crate) fn retry_due(&self) -> bool {
        self.failing
            .as_ref()
            .is_none_or(|f| f.tried.elapsed() >= RETRY)
    }

    /// Every held action went through. After a failure, says for how long writes failed;
    /// the clients refused meanwhile (or for lack of space) are handed over, at least
    /// [`RETRY`] after the last refusal, each once the volume has room for its upload.
    pub(crate) fn succeeded(&mut self) -> Option<Recovered> {
        let failed_for = self.failing.take().map(|f| f.since.elapsed());
        let due = self.last_refusal.is_none_or(|t| t.elapsed() >= RETRY);
        let mut refused = BTreeSet::new();
        if due && !self.refused.is_empty() {
            let free = available(&self.dir);
            let room: Vec<PublicKey> = self
                .refused
                .iter()
                .filter(|(_, b)| free.is_none_or(|f| f >= self.need(**b)))
                .map(|(pk, _)| *pk)
                .collect();
            for pk in room {
                self.refused.remove(&pk);
                refused.insert(pk);
            }
        }
        (failed_for.is_some() || !refused.is_empty()).then(|| Recovered {
            failed_for: failed_for.unwrap_or_default(),
            refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_refused_without_room_or_while_writes_fail_and_clients_asked_again() {
        let dir = std::env::temp_dir();
        let free = available(&dir).expect("statvfs works here");
        assert!(free > 0);
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        // Room for a small upload.
        let mut disk = Disk::new(&dir, 0);
        assert_eq!(disk.refuse(a, 1), None);
        assert!(disk.succeeded().is_none(), "nothing to report");
        // A reserve larger than the volume refuses every upload, naming the figures.
        let mut full = Disk::new(&dir, u64::MAX / 4);
        let why = full.refuse(a, 10).expect("refused");
        assert!(why.contains("bytes free") && why.contains("needs"), "{why}");
        // Still no room: nobody is asked again yet.
        full.last_refusal = None;
        assert!(full.succeeded().is_none());
        // A failing write refuses uploads and is reported once.
        let e = std::io::Error::other("No space left on device");
        assert!(disk.failed("persisting state", &e));
        assert!(!disk.failed("persisting state", &e), "reported once");
        assert!(!disk.retry_due(), "not retried at once");
        let why = disk.refuse(b, 1).expect("refused while failing");
        assert!(
            why.contains("persisting state: No space left on device"),
            "{why}"
        );
        assert!(disk.failing.is_some());
        // Writes succeed again: said at once; the refused client is asked a second later.
        let r = disk.succeeded().expect("recovered");
        assert!(r.refused.is_empty(), "not at once after a refusal");
        disk.last_refusal = Some(Instant::now() - RETRY);
        let r = disk.succeeded().expect("asked again");
        assert_eq!(r.refused, BTreeSet::from([b]));
        assert!(disk.failing.is_none() && disk.retry_due());
        assert!(disk.succeeded().is_none(), "reported once");
    }
}
