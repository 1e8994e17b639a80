//! QUIC endpoints (quinn) for the daemons: transport settings and length-prefixed frames on
//! streams.
//!
//! Flow control is tuned for large adapters on long links: quinn's default stream window
//! (1.25 MB) caps one stream at 1.25 MB ÷ RTT (12.5 MB/s at 100 ms); fedtune uses a 32 MiB
//! stream window and a 64 MiB connection window (measured here: 56–62 MB/s at 100 ms). Memory
//! per connection stays bounded: at most 4 bidirectional and 4 unidirectional streams per
//! peer, so a peer that opens streams and never sends pins at most the connection window.
//! Keep-alive every 5 s with a 60 s idle timeout (long training rounds keep their
//! connection); connection migration off; 0-RTT off (see [`crate::tls`]). The coordinator's
//! stateless-reset and connection-id keys are fixed by its identity ([`server_endpoint`]), so
//! a restarted coordinator resets its clients' stale connections at their next keep-alive.

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};

use crate::error::{ProtocolError, Result};

/// Stream receive window.
pub const STREAM_WINDOW: u32 = 32 << 20;
/// Connection receive window.
pub const CONNECTION_WINDOW: u32 = 64 << 20;

/// Transport settings shared by both ends.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(CONNECTION_WINDOW as u64)
        .max_concurrent_bidi_streams(VarInt::from_u32(4))
        .max_concurrent_uni_streams(VarInt::from_u32(4))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(
            Duration::from_secs(60)
                .try_into()
                .expect("60 s is a valid idle timeout"),
        ));
    Arc::new(t)
}

/// The coordinator's QUIC server configuration.
pub fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ProtocolError::malformed("QUIC TLS configuration", e))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    cfg.migration(false);
    // Connection attempts not yet taken by the accept loop (which answers each at once, see
    // the coordinator's `admission`): at most 4096, with 64 KiB of early packets each and
    // 16 MiB in all (quinn's defaults: 65 536, 10 MiB, 100 MiB).
    cfg.max_incoming(4096)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(16 << 20);
    Ok(cfg)
}

/// The coordinator's endpoint on `addr`, with a stateless-reset key that survives restarts:
/// after a crash and restart on the same address, the new endpoint answers the clients'
/// packets for their old connections with stateless resets (RFC 9000 §10.3) their tokens
/// verify, so they reconnect at their next keep-alive instead of waiting for the idle timeout.
/// Connection ids are keyed from the same secret, so the new endpoint knows them for its own.
pub fn server_endpoint(
    server: quinn::ServerConfig,
    addr: std::net::SocketAddr,
    reset_key: [u8; 32],
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    // Connection ids the restarted endpoint recognises as its own (it drops packets for ids it
    // would not have issued, without answering).
    let cid_key = u64::from_le_bytes(
        blake3::keyed_hash(&reset_key, b"connection ids").as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    );
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
}

/// A client's QUIC configuration.
pub fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ProtocolError::malformed("QUIC TLS configuration", e))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

fn io(what: &'static str) -> impl Fn(String) -> ProtocolError {
    move |e| ProtocolError::malformed(what, e)
}

/// Writes one length-prefixed frame.
pub async fn write_frame(s: &mut SendStream, body: &[u8]) -> Result<()> {
    s.write_all(&(body.len() as u32).to_le_bytes())
        .await
        .map_err(|e| io("stream")(e.to_string()))?;
    s.write_all(body)
        .await
        .map_err(|e| io("stream")(e.to_string()))
}

/// Reads one length-prefixed frame of at most `limit` bytes; `None` at a clean end of stream.
/// The length is checked before anything is allocated.
pub async fn read_frame(s: &mut RecvStream, limit: usize) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(io("stream")(e.to_string())),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > limit {
        return Err(ProtocolError::TooLarge {
            what: "frame",
            size: n as u64,
            limit: limit as u64,
        });
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)
        .await
        .map_err(|e| io("stream")(e.to_string()))?;
    Ok(Some(body))
}
