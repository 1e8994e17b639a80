//! A QUIC handshake flood: Initial packets that start handshakes and never finish them (no
//! certificate needed), as a black-box probe sent them at a coordinator. Each datagram is a
//! genuine client Initial (TLS ClientHello, padded to 1200 bytes, its own connection id),
//! made by quinn-proto and never followed up: Retry packets and the server's handshake are
//! ignored.
//!
//! `cargo run --release --example handshake_flood -- ADDR COUNT [CA_PEM]`: sends COUNT
//! Initials to ADDR from one UDP socket (the server name is the coordinator's; without the
//! CA certificate a throwaway one is used: the server never gets to verify anything).
//! `bench/handshake_flood.sh` runs it against `fedtune coord` and measures the coordinator's
//! peak memory while an honest federation runs.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `n` client Initial datagrams for a server at `server` named `name`, each starting its own
/// connection.
pub fn initials(
    n: usize,
    server: SocketAddr,
    config: &quinn::ClientConfig,
    name: &str,
) -> Vec<Vec<u8>> {
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut buf = Vec::new();
    for _ in 0..n {
        let (_, mut conn) = ep
            .connect(now, config.clone(), server, name)
            .expect("a client connection to a fixed address");
        buf.clear();
        if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            out.push(buf[..t.size].to_vec());
        }
    }
    out
}

/// Sends `datagrams` to `server` from one socket, pausing briefly every `burst` datagrams
/// so that the receiver's socket buffer is not simply overrun. Returns the datagrams sent.
pub fn send(datagrams: &[Vec<u8>], server: SocketAddr, burst: usize) -> std::io::Result<usize> {
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    let mut sent = 0;
    for chunk in datagrams.chunks(burst.max(1)) {
        for d in chunk {
            sock.send_to(d, server)?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(sent)
}

/// A client configuration whose ClientHello a server accepts (the handshake never gets as
/// far as verifying anything).
pub fn throwaway_config(ca_pem: Option<&str>) -> quinn::ClientConfig {
    let ca = fedtune_protocol::tls::new_ca("flood").expect("a CA");
    let own = fedtune_protocol::tls::issue(&ca, "flood", false, &[]).expect("a certificate");
    let pem = ca_pem.map_or(ca.cert_pem.clone(), str::to_string);
    fedtune_protocol::quic::client_config(
        fedtune_protocol::tls::client_config(&pem, &own).expect("a TLS client config"),
    )
    .expect("a QUIC client config")
}

#[allow(dead_code)] // the tests include this file for `initials` and `send`
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: handshake_flood ADDR COUNT [CA_PEM]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("ADDR: host:port");
    let n: usize = args[2].parse().expect("COUNT: a number");
    let ca = args
        .get(3)
        .map(|p| std::fs::read_to_string(p).expect("reading CA_PEM"));
    let config = throwaway_config(ca.as_deref());
    let t = Instant::now();
    let datagrams = initials(n, addr, &config, fedtune_protocol::tls::COORDINATOR_NAME);
    let made = t.elapsed();
    let sent = send(&datagrams, addr, 64).expect("sending");
    println!(
        "{{\"initials\":{sent},\"bytes\":{},\"made_s\":{:.2},\"sent_s\":{:.2}}}",
        datagrams.iter().map(Vec::len).sum::<usize>(),
        made.as_secs_f64(),
        t.elapsed().as_secs_f64() - made.as_secs_f64()
    );
}
