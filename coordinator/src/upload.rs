//! Update uploads, each on its own stream: the signed header goes to the machine
//! ([`Coordinator::handle_upload_header`](crate::Coordinator::handle_upload_header)), the payload streams to a resumable partial file under `incoming/` (hashed as it
//! goes), and a complete payload whose digest is the signed one is read in, within the memory
//! budget, and handed to the machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedtune_protocol::messages::{MAX_CONTROL, decode};
use fedtune_protocol::quic::{read_frame, write_frame};
use fedtune_protocol::{PublicKey, SignedHeader, Upload};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::event::{Event, Refusal};

/// A partial upload's file name: signer, round and signed digest.
fn part_name(pk: &PublicKey, round: u64, digest: &[u8; 32]) -> String {
    format!("{}-{round}-{}.part", pk.to_hex(), hex::encode(digest))
}

/// `(signer, round)` of a partial upload's file name.
fn parse_part(name: &str) -> Option<(PublicKey, u64)> {
    let stem = name.strip_suffix(".part")?;
    let mut it = stem.split('-');
    let (pk, round) = (
        PublicKey::from_hex(it.next()?).ok()?,
        it.next()?.parse().ok()?,
    );
    Some((pk, round))
}

/// How often partial uploads are checked for having been idle too long.
const PART_SWEEP: Duration = Duration::from_secs(5);

/// Partial uploads under `incoming/`: those of closed rounds are removed (at start, and as
/// rounds close), and so are those that received nothing for longer than `idle_limit`.
pub(crate) struct Parts {
    dir: PathBuf,
    /// Rounds closed when closed rounds' parts were last removed.
    cleaned: Option<u64>,
    /// When idle parts were last looked for.
    swept: Option<tokio::time::Instant>,
    idle_limit: Duration,
}

impl Parts {
    pub(crate) fn new(dir: PathBuf, idle_limit: Duration) -> Parts {
        Parts {
            dir,
            cleaned: None,
            swept: None,
            idle_limit,
        }
    }

    /// Removes the parts of rounds up to `closed` when that changed, and idle parts every
    /// [`PART_SWEEP`]: each removed part as (client, round, bytes, why).
    pub(crate) fn tidy(&mut self, closed: u64) -> Vec<(PublicKey, u64, u64, &'static str)> {
        let mut removed = Vec::new();
        if self.cleaned != Some(closed) {
            self.cleaned = Some(closed);
            for (pk, round, bytes) in remove_parts(&self.dir, |_, r, _| r <= closed) {
                removed.push((pk, round, bytes, "its round is closed"));
            }
        }
        if self.swept.is_none_or(|t| t.elapsed() >= PART_SWEEP) {
            self.swept = Some(tokio::time::Instant::now());
            let idle = |name: &str| {
                std::fs::metadata(self.dir.join(name))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > self.idle_limit)
            };
            for (pk, round, bytes) in remove_parts(&self.dir, |_, _, name| idle(name)) {
                removed.push((
                    pk,
                    round,
                    bytes,
                    "nothing received for longer than an update header lives",
                ));
            }
        }
        removed
    }
}

/// Removes the partial uploads under `dir` that `stale(signer, round, name)` selects;
/// returns `(signer, round, bytes)` of each.
pub(crate) fn remove_parts(
    dir: &std::path::Path,
    stale: impl Fn(&PublicKey, u64, &str) -> bool,
) -> Vec<(PublicKey, u64, u64)> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((pk, round)) = parse_part(&name)
            && stale(&pk, round, &name)
        {
            let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(e.path()).is_ok() {
                removed.push((pk, round, bytes));
            }
        }
    }
    removed
}

/// The stream error code of an upload the coordinator has no room for now (it asks again).
pub(crate) const STOP_NO_ROOM: u32 = 6;

/// An upload the disk cannot take: its stream is stopped with [`STOP_NO_ROOM`], it is logged
/// as abandoned (`got` bytes held, `why`), and its client is asked again once there is room
/// for its `want` bytes.
async fn no_room(
    stream: &mut quinn::RecvStream,
    events: &mpsc::Sender<Event>,
    (pk, round, got, want): (PublicKey, u64, u64, u64),
    why: String,
) {
    let _ = stream.stop(STOP_NO_ROOM.into());
    let abandoned = Event::Abandoned {
        pk,
        round,
        bytes: got,
        why,
    };
    let _ = events.send(abandoned).await;
    let _ = events.send(Event::NoRoom { pk, bytes: want }).await;
}

/// How long an upload stream may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upload may stall between chunks.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) async fn upload(
    pk: PublicKey,
    (mut reply_stream, mut stream): (quinn::SendStream, quinn::RecvStream),
    events: mpsc::Sender<Event>,
    dir: PathBuf,
    budget: Arc<Budget>,
) {
    // A stream that does not send its header promptly is dropped (its slot is freed).
    let first = tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut stream, MAX_CONTROL)).await;
    let Ok(first) = first else {
        let _ = stream.stop(4u32.into());
        return;
    };
    let header = match first {
        Ok(Some(b)) => match decode::<SignedHeader>(&b, MAX_CONTROL, "update header") {
            Ok(h) => h,
            Err(_) => {
                let _ = stream.stop(1u32.into());
                return;
            }
        },
        _ => return,
    };
    let (reply, verdict) = oneshot::channel();
    if events
        .send(Event::UploadHeader {
            pk,
            header: Box::new(header.clone()),
            reply,
        })
        .await
        .is_err()
    {
        return;
    }
    match verdict.await {
        Ok(Ok(())) => {}
        Ok(Err(Refusal::NoRoom)) => {
            let _ = stream.stop(STOP_NO_ROOM.into());
            return;
        }
        _ => {
            let _ = stream.stop(2u32.into());
            return;
        }
    }
    // Resumable: the part file is named by signer, round and signed digest; the bytes already
    // held are announced and the client sends the rest. Never past the signed length. One
    // partial upload per client and round: a new digest replaces the older partial.
    let want = header.header.payload_len;
    let round = header.header.round;
    let name = part_name(&pk, round, &header.header.payload_digest);
    let path = dir.join(&name);
    for (_, r, bytes) in remove_parts(&dir, |p, r, n| *p == pk && r == round && n != name) {
        let _ = events
            .send(Event::Abandoned {
                pk,
                round: r,
                bytes,
                why: "replaced by a newer upload of the same round".into(),
            })
            .await;
    }
    let mut file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            let why = format!("the coordinator could not create its file: {e}");
            no_room(&mut stream, &events, (pk, round, 0, want), why).await;
            return;
        }
    };
    let mut got = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    if got > want {
        let _ = tokio::fs::remove_file(&path).await;
        let _ = stream.stop(3u32.into());
        return;
    }
    // The digest is computed as the bytes stream to disk (the bytes already held first), so a
    // payload is read back into memory only once it is known to be the signed one.
    let mut hasher = blake3::Hasher::new();
    if got > 0 && hash_file(&path, &mut hasher).await.is_err() {
        return;
    }
    if write_frame(&mut reply_stream, &got.to_le_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = reply_stream.finish();
    loop {
        let Ok(next) = tokio::time::timeout(CHUNK_TIMEOUT, stream.read_chunk(1 << 20, true)).await
        else {
            let _ = stream.stop(5u32.into());
            let _ = file.flush().await;
            return;
        };
        match next {
            Ok(Some(chunk)) => {
                got += chunk.bytes.len() as u64;
                if got > want {
                    let _ = stream.stop(3u32.into());
                    drop(file);
                    let _ = tokio::fs::remove_file(&path).await;
                    return;
                }
                hasher.update(&chunk.bytes);
                if let Err(e) = file.write_all(&chunk.bytes).await {
                    // A full disk: the partial file goes (it would only hold the space).
                    drop(file);
                    let _ = tokio::fs::remove_file(&path).await;
                    let why = format!("the coordinator could not write it: {e}");
                    no_room(&mut stream, &events, (pk, round, got, want), why).await;
                    return;
                }
            }
            Ok(None) => break,
            // A dropped connection keeps what arrived, for the client's next attempt.
            Err(_) => {
                let _ = file.flush().await;
                return;
            }
        }
    }
    let _ = file.flush().await;
    drop(file);
    if got < want {
        return;
    }
    if hasher.finalize().as_bytes() != &header.header.payload_digest {
        let _ = tokio::fs::remove_file(&path).await;
        let _ = events
            .send(Event::Abandoned {
                pk,
                round,
                bytes: got,
                why: "its bytes do not match the signed digest".into(),
            })
            .await;
        return;
    }
    // Completed payloads wait for their share of the memory budget before being read in:
    // however many uploads finish together, at most the budget is held in memory at once.
    let Some(permit) = budget.reserve(want).await else {
        return;
    };
    let payload = tokio::fs::read(&path).await.unwrap_or_default();
    let _ = tokio::fs::remove_file(&path).await;
    tracing::debug!(client = %pk, bytes = got, "upload complete");
    let _ = events
        .send(Event::Upload {
            pk,
            upload: Upload {
                header: Box::new(header),
                payload,
            },
            _permit: permit,
        })
        .await;
}

/// Feeds a file's bytes to `hasher`.
async fn hash_file(path: &std::path::Path, hasher: &mut blake3::Hasher) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// The memory budget of completed uploads, counted in MiB.
pub(crate) struct Budget {
    units: Arc<Semaphore>,
    total: u32,
}

impl Budget {
    const UNIT: u64 = 1 << 20;

    pub(crate) fn new(bytes: u64) -> Budget {
        let total = bytes.div_ceil(Self::UNIT).clamp(1, 1 << 20) as u32;
        Budget {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits for room for `bytes` (at most the whole budget: a payload larger than the budget
    /// still goes through, alone).
    async fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n = bytes.div_ceil(Self::UNIT).clamp(1, u64::from(self.total)) as u32;
        self.units.clone().acquire_many_owned(n).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_upload_budget_holds_completed_payloads_to_its_size() {
        let b = Budget::new(3 << 20);
        // A payload larger than the whole budget goes through alone.
        let big = b.reserve(10 << 20).await.expect("the whole budget");
        assert_eq!(b.units.available_permits(), 0);
        drop(big);
        let one = b.reserve(2 << 20).await.unwrap();
        // 2 MiB held: another 2 MiB waits until the first is handled.
        let waiting = tokio::time::timeout(Duration::from_millis(100), b.reserve(2 << 20)).await;
        assert!(waiting.is_err(), "over the budget");
        drop(one);
        let two = tokio::time::timeout(Duration::from_millis(100), b.reserve(2 << 20)).await;
        assert!(two.is_ok(), "room again");
    }

    #[test]
    fn part_file_names_round_trip() {
        let pk = PublicKey([7; 32]);
        let name = part_name(&pk, 12, &[0xab; 32]);
        assert_eq!(parse_part(&name), Some((pk, 12)));
        assert_eq!(parse_part("x.part"), None);
        assert_eq!(parse_part("state"), None);
    }
}
