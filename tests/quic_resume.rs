//! The upload path over QUIC, against the coordinator daemon: an upload cut by a dropped
//! connection resumes where it stopped (a client speaking the protocol directly sends half of
//! a signed update, drops its connection, reconnects, is told how many bytes the coordinator
//! already holds, sends only the rest, and its update is accepted); the limits on connections,
//! partial files and handshakes; and a disk that fills or fails.

use std::time::Duration;

use fedtune_coordinator::daemon::ConnectionLimits;
use fedtune_protocol::messages::{MAX_CONTROL, decode};
use fedtune_protocol::quic::read_frame;
use fedtune_protocol::tls::{self, CertPair};
use fedtune_protocol::{ToClient, digest, quic};

#[path = "support/fed.rs"]
mod fed;
use fed::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_by_a_dropped_connection_resumes_where_it_stopped() {
    let mut f = start("resume", 1, ConnectionLimits::default());
    // First connection: the plan, then half of a signed update, then the connection drops.
    let (ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    let (header, payload) = update(0.0, &f.id, &plan, &global);
    let half = payload.len() / 2;
    let (mut s, _r, offset) = open_upload(&conn, &header).await;
    assert_eq!(offset, 0);
    s.write_all(&payload[..half]).await.unwrap();
    // Let the bytes arrive, then drop the connection without finishing the stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.close(0u32.into(), b"link lost");
    ep.wait_idle().await;

    // Second connection: the coordinator asks again, and holds the first half.
    let (_ep2, conn2, _send2, mut recv2) = f.client().await;
    let (again, _) = next_plan(&mut recv2).await;
    assert_eq!(again.round, plan.round);
    let (mut s, _r, offset) = open_upload(&conn2, &header).await;
    assert_eq!(offset as usize, half, "the coordinator kept the first half");
    s.write_all(&payload[half..]).await.unwrap();
    s.finish().unwrap();
    let accepted = loop {
        let b = read_frame(&mut recv2, MAX_CONTROL).await.unwrap().unwrap();
        match decode::<ToClient>(&b, MAX_CONTROL, "m").unwrap() {
            ToClient::Accepted { round } => break round,
            ToClient::Rejected { reason, .. } => panic!("rejected: {reason}"),
            _ => {}
        }
    };
    assert_eq!(accepted, plan.round);
    let summary = f.finish().await;
    assert_eq!(summary.rounds, 1);
    // FedIT of a single update is that update.
    assert_eq!(digest(&summary.global), digest(&payload));
    let _ = std::fs::remove_dir_all(&f.data_dir);
}

/// A second connection of the same client supersedes the first, cleanly: the first is closed
/// by the coordinator, its end does not disconnect the client, and the next round reaches the
/// second connection (before, the first connection's end dropped the client's current route
/// and marked it disconnected: round 2 never reached it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_of_a_client_supersedes_the_older_one() {
    let f = start("supersede", 2, ConnectionLimits::default());
    let (_ep1, conn1, _send1, mut recv1) = f.client().await;
    let (plan, _) = next_plan(&mut recv1).await;
    assert_eq!(plan.round, 1);
    let (_ep2, conn2, _send2, mut recv2) = f.client().await;
    let (again, global) = next_plan(&mut recv2).await;
    assert_eq!(
        again.round, 1,
        "the newer connection gets the open round's plan"
    );
    let (code, reason) = closed_by_peer(&conn1, 10).await;
    assert_eq!(
        (code, reason.as_str()),
        (6, "superseded by a newer connection")
    );
    // The older connection's end is now behind us; the client uploads on the newer one.
    let (header, payload) = update(0.0, &f.id, &plan, &global);
    let (mut s, _r, offset) = open_upload(&conn2, &header).await;
    assert_eq!(offset, 0);
    s.write_all(&payload).await.unwrap();
    s.finish().unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), next_plan(&mut recv2))
        .await
        .expect("round 2 reaches the client's current connection");
    assert_eq!(next.0.round, 2);
    drop(conn2);
    f.coordinator.abort();
    let _ = std::fs::remove_dir_all(&f.data_dir);
}

/// A connection that never says hello is closed after the hello timeout, and connections of
/// one identity beyond the cap are closed at once; a client that then connects properly is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_time_out_and_one_identity_cannot_hoard_connections() {
    let limits = ConnectionLimits {
        hello_timeout: Duration::from_secs(1),
        per_client: 2,
        ..ConnectionLimits::default()
    };
    let f = start("hoard", 1, limits);
    let addr = f.addr;
    let silent = |ca: CertPair, own: CertPair| async move {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(
            quic::client_config(tls::client_config(&ca.cert_pem, &own).unwrap()).unwrap(),
        );
        let conn = ep
            .connect(addr, tls::COORDINATOR_NAME)
            .unwrap()
            .await
            .unwrap();
        (ep, conn)
    };
    let started = std::time::Instant::now();
    let (_e1, a) = silent(f.ca.clone(), f.own.clone()).await;
    let (_e2, b) = silent(f.ca.clone(), f.own.clone()).await;
    // A third connection of the same identity is over the cap of two: one of the three (the
    // last the coordinator counts) is closed at once, the other two after the hello timeout.
    let (_e3, c) = silent(f.ca.clone(), f.own.clone()).await;
    let mut closes = Vec::new();
    for conn in [&a, &b, &c] {
        closes.push(closed_by_peer(conn, 5).await);
    }
    closes.sort();
    assert_eq!(
        closes,
        [
            (2, "no hello in time".to_string()),
            (2, "no hello in time".to_string()),
            (5, "too many connections".to_string())
        ]
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    // Their slots are free again: a proper client gets its plan.
    let (_ep, _conn, _send, mut recv) = f.client().await;
    let (plan, _) = tokio::time::timeout(Duration::from_secs(10), next_plan(&mut recv))
        .await
        .expect("a proper client is served");
    assert_eq!(plan.round, 1);
    f.coordinator.abort();
    let _ = std::fs::remove_dir_all(&f.data_dir);
}

/// A listed client that starts uploads with fresh digests and stops each halfway (the
/// disk-fill attack) leaves one partial file per round, not one per attempt: each new digest
/// replaces the older partial (logged as abandoned), and the round's close removes the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_uploads_are_one_per_client_and_round_and_go_when_the_round_closes() {
    let mut f = start("partials", 1, ConnectionLimits::default());
    let (_ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    for k in 1..=3 {
        let (header, payload) = update(k as f32, &f.id, &plan, &global);
        let (mut s, _r, offset) = open_upload(&conn, &header).await;
        assert_eq!(offset, 0);
        s.write_all(&payload[..payload.len() / 2]).await.unwrap();
        s.finish().unwrap();
        let t = std::time::Instant::now();
        while parts(&f.data_dir).len() != 1 || t.elapsed() < Duration::from_millis(300) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{:?}",
                parts(&f.data_dir)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    upload_whole(&f, &conn, &plan, &global).await;
    let summary = f.finish().await;
    assert_eq!(summary.rounds, 1);
    assert_eq!(
        parts(&f.data_dir),
        Vec::<String>::new(),
        "partials of a closed round"
    );
    let log = std::fs::read_to_string(f.data_dir.join("rounds.jsonl")).unwrap();
    assert_eq!(log.matches("\"upload_abandoned\"").count(), 3, "{log}");
    let _ = std::fs::remove_dir_all(&f.data_dir);
}

/// A partial upload that received nothing for longer than an update header lives (the
/// coordinator's header lifetime plus clock skew) is removed while its round is still open,
/// with an `upload_abandoned` line; the client's later upload starts again and is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_idle_past_a_headers_lifetime_is_removed_while_its_round_is_open() {
    let mut f = start("idle", 1, ConnectionLimits::default());
    let (_ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    let (header, payload) = update(0.5, &f.id, &plan, &global);
    let (mut s, _r, _) = open_upload(&conn, &header).await;
    s.write_all(&payload[..payload.len() / 2]).await.unwrap();
    s.finish().unwrap();
    // Every byte sent is on disk (the partial is written as the bytes arrive).
    let half = (payload.len() / 2) as u64;
    let t = std::time::Instant::now();
    let part = loop {
        if let [name] = parts(&f.data_dir).as_slice() {
            let p = f.data_dir.join("incoming").join(name);
            if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) == half {
                break p;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no partial kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Two days without a byte: past the default header lifetime (an hour here) and skew.
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&part)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let log = f.data_dir.join("rounds.jsonl");
    let t = std::time::Instant::now();
    while !parts(&f.data_dir).is_empty()
        || !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("nothing received for longer than an update header lives")
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the idle partial is still there: {:?}",
            parts(&f.data_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_again_and_finish(&mut f, &conn, &header, &payload, "the upload starts again").await;
}

/// A payload whose bytes are not the signed ones is caught as it streams to disk: it is never
/// read into memory or handed on (an `upload_abandoned` line says why, no partial is kept),
/// and the client's correct upload is then accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_does_not_match_its_signed_digest_is_dropped_as_it_streams() {
    let mut f = start("digest", 1, ConnectionLimits::default());
    let (_ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    let (header, payload) = update(0.0, &f.id, &plan, &global);
    let mut forged = payload.clone();
    *forged.last_mut().unwrap() ^= 0x40;
    let (mut s, _r, _) = open_upload(&conn, &header).await;
    s.write_all(&forged).await.unwrap();
    s.finish().unwrap();
    let log = f.data_dir.join("rounds.jsonl");
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("do not match the signed digest")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no abandoned upload logged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(parts(&f.data_dir), Vec::<String>::new());
    send_again_and_finish(
        &mut f,
        &conn,
        &header,
        &payload,
        "nothing of the forged bytes is kept",
    )
    .await;
}

#[path = "../examples/handshake_flood.rs"]
#[allow(dead_code)]
mod flood;

/// A flood of 20 000 QUIC Initials that never finish their handshakes (no certificate needed)
/// costs the coordinator at most its cap of pending handshakes: beyond a few dozen, attempts
/// get a stateless Retry the flood never answers. Meanwhile an honest client (whose quinn
/// answers the Retry) connects, uploads and its round closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_met_with_retries_and_honest_rounds_complete() {
    let limits = ConnectionLimits::default();
    let mut f = start("flood", 1, limits);
    let config = quic::client_config(tls::client_config(&f.ca.cert_pem, &f.own).unwrap()).unwrap();
    let datagrams = flood::initials(20_000, f.addr, &config, tls::COORDINATOR_NAME);
    assert_eq!(datagrams.len(), 20_000);
    assert!(datagrams.iter().all(|d| d.len() >= 1200), "padded Initials");
    let addr = f.addr;
    let flooder = tokio::task::spawn_blocking(move || flood::send(&datagrams, addr, 64).unwrap());
    // Let the flood get going, then the honest client does its round while it lasts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    let (_ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    let payload = upload_whole(&f, &conn, &plan, &global).await;
    let summary = f.finish().await;
    assert_eq!(summary.rounds, 1);
    assert_eq!(digest(&summary.global), digest(&payload));
    println!(
        "honest round done {:.1} s after the flood began",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(flooder.await.unwrap(), 20_000);
    let h = summary.handshakes;
    println!("{h:?}");
    assert!(
        h.peak_pending <= limits.handshakes.max_pending,
        "{} handshakes pending at once",
        h.peak_pending
    );
    // Every flood Initial the socket delivered was answered statelessly once the threshold
    // was reached (the kernel may drop some under the burst; most arrive on loopback).
    assert!(h.retried >= 10_000, "{h:?}");
    assert!(
        h.accepted <= limits.handshakes.retry_above as u64 + 8,
        "{h:?}"
    );
    let _ = std::fs::remove_dir_all(&f.data_dir);
}

/// Opens an upload stream and sends the signed header; the coordinator's resume offset, or
/// `None` when it refused the upload before taking a byte.
async fn try_upload(
    conn: &quinn::Connection,
    header: &fedtune_protocol::SignedHeader,
) -> Option<(quinn::SendStream, quinn::RecvStream, u64)> {
    use fedtune_protocol::messages::encode;
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    fedtune_protocol::quic::write_frame(&mut s, &encode(header))
        .await
        .unwrap();
    let reply = read_frame(&mut r, 8).await.ok()??;
    Some((s, r, u64::from_le_bytes(reply.try_into().ok()?)))
}

/// The round of the first acknowledgement the client receives within `wait`, if one comes.
async fn accepted_within(recv: &mut quinn::RecvStream, wait: Duration) -> Option<u64> {
    tokio::time::timeout(wait, async {
        loop {
            let b = read_frame(recv, MAX_CONTROL).await.unwrap().unwrap();
            if let ToClient::Accepted { round } = decode(&b, MAX_CONTROL, "m").unwrap() {
                return round;
            }
        }
    })
    .await
    .ok()
}

/// Waits (at most `secs`) until `rounds.jsonl` contains `text`.
async fn logged(f: &Fed, text: &str, secs: u64) -> String {
    let t = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(f.data_dir.join("rounds.jsonl")).unwrap_or_default();
        if log.contains(text) {
            return log;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{text:?} not in the log: {log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Without room on the data directory's volume for twice an upload plus the reserve kept for
/// the coordinator's own writes, the upload is refused before a byte of payload is taken
/// (logged with the figures, not counted as a rejection), and the coordinator keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_without_room_on_the_disk_is_refused_before_its_payload() {
    let limits = ConnectionLimits {
        disk_reserve: u64::MAX / 4,
        ..ConnectionLimits::default()
    };
    let f = start("noroom", 1, limits);
    let (_ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    let (header, _) = update(0.0, &f.id, &plan, &global);
    assert!(try_upload(&conn, &header).await.is_none(), "refused");
    let log = logged(&f, "\"upload_refused\"", 10).await;
    assert!(log.contains("bytes free"), "{log}");
    assert!(!log.contains("\"rejected\""), "{log}");
    assert!(!parts(&f.data_dir).iter().any(|_| true), "no partial file");
    assert!(!f.coordinator.is_finished(), "still serving");
    f.coordinator.abort();
    let _ = std::fs::remove_dir_all(&f.data_dir);
}

/// A partial file that cannot be written (its writes fail with "No space left on device":
/// the file is a link to /dev/full) is removed with an `upload_abandoned` line naming the
/// error, the client is told to stop, and a second later the coordinator asks it again (the
/// plan again); its upload then goes through and the round closes. Before, a failed write
/// left the partial in place and the client was never asked again.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_that_cannot_be_written_is_dropped_and_its_client_asked_again() {
    let mut f = start("fullpart", 1, ConnectionLimits::default());
    let (_ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    let (header, payload) = update(0.0, &f.id, &plan, &global);
    // The partial's name: signer, round and signed digest.
    let name = format!(
        "{}-{}-{}.part",
        f.id.public().to_hex(),
        plan.round,
        hex::encode(header.header.payload_digest)
    );
    let part = f.data_dir.join("incoming").join(&name);
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();
    let (mut s, _r, offset) = try_upload(&conn, &header).await.expect("taken");
    assert_eq!(offset, 0);
    let _ = s.write_all(&payload).await;
    let _ = s.finish();
    let log = logged(&f, "\"upload_abandoned\"", 10).await;
    assert!(log.contains("No space left on device"), "{log}");
    assert!(
        std::fs::symlink_metadata(&part).is_err(),
        "the partial went"
    );
    // Asked again: the same round's plan comes once more.
    let (again, _) = tokio::time::timeout(Duration::from_secs(10), next_plan(&mut recv))
        .await
        .expect("asked again");
    assert_eq!(again.round, plan.round);
    send_again_and_finish(&mut f, &conn, &header, &payload, "nothing of it was kept").await;
}

/// A write of the coordinator's store that fails (here the directory for stored updates cannot
/// be made) does not end the daemon: the accepted update is neither acknowledged nor lost, the
/// actions from the failed write on are held and tried again each second, uploads are refused
/// meanwhile, and once the write succeeds the acknowledgement goes out and the round closes.
/// Before, the daemon exited (`persisting updates/…: …`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_holds_the_round_and_it_resumes_when_the_write_succeeds() {
    let mut f = start("failwrite", 1, ConnectionLimits::default());
    let (_ep, conn, _send, mut recv) = f.client().await;
    let (plan, global) = next_plan(&mut recv).await;
    // A file where the store's `updates/` directory goes.
    let blocker = f.data_dir.join("store").join("updates");
    std::fs::write(&blocker, b"in the way").unwrap();
    let (header, payload) = update(0.0, &f.id, &plan, &global);
    let (mut s, _r, _) = try_upload(&conn, &header).await.expect("taken");
    s.write_all(&payload).await.unwrap();
    s.finish().unwrap();
    // No acknowledgement while the update is not stored; the daemon keeps running.
    let ack = accepted_within(&mut recv, Duration::from_millis(2500)).await;
    assert_eq!(ack, None, "acknowledged before it was stored");
    assert!(!f.coordinator.is_finished(), "the daemon is alive");
    // Uploads are refused meanwhile (not counted against the client).
    assert!(try_upload(&conn, &header).await.is_none());
    logged(&f, "cannot write to its disk", 10).await;
    // The write can succeed again: the held actions go out, the round closes.
    std::fs::remove_file(&blocker).unwrap();
    let accepted = accepted_within(&mut recv, Duration::from_secs(10)).await;
    assert_eq!(accepted, Some(plan.round), "acknowledged once stored");
    let summary = f.finish().await;
    assert_eq!(summary.rounds, 1);
    assert_eq!(digest(&summary.global), digest(&payload));
    assert!(summary.rejections.is_empty(), "{:?}", summary.rejections);
    let log = logged(&f, "\"storage_recovered\"", 5).await;
    assert!(log.contains("\"round_closed\""), "{log}");
    let _ = std::fs::remove_dir_all(&f.data_dir);
}
