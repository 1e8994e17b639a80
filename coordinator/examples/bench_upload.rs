//! Upload throughput of one adapter-sized payload: fedtune's QUIC transport (mutual TLS,
//! tuned windows) against a plain TCP copy on loopback in the same run, then QUIC through a
//! UDP delay proxy (50 ms each way: 100 ms round trip) with fedtune's windows and with quinn's
//! defaults. A TCP copy through a user-space proxy would terminate TCP at the proxy and hide
//! the round trip from the sender, so the delayed TCP baseline needs kernel `netem`, which this
//! machine lacks; it is left out rather than faked.
//!
//! The proxy runs on blocking OS threads with 64 MiB socket buffers. The kernel caps those at
//! `net.core.rmem_max`, and the QUIC endpoints' sockets get `net.core.rmem_default`: raise both
//! (`sysctl -w net.core.rmem_max=67108864 net.core.rmem_default=33554432`), or the kernel drops
//! datagrams in bursts and the figure measures the emulator instead of the transport. The
//! number of datagrams the kernel dropped is printed with the result; a trustworthy run drops
//! none.
//!
//! `cargo run --release -p fedtune-coordinator --example bench_upload -- [MIB] [DELAYED_MIB]`
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedtune_protocol::{quic, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn tcp_copy(payload: Arc<Vec<u8>>) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0usize;
        loop {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&payload).await.unwrap();
    c.shutdown().await.unwrap();
    let n = server.await.unwrap();
    assert_eq!(n, payload.len());
    t.elapsed().as_secs_f64()
}

/// UDP datagrams the kernel dropped because a socket's receive buffer was full, so far
/// (`RcvbufErrors` of `/proc/net/snmp`).
fn udp_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap_or(""), udp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// A UDP socket on loopback with a large receive buffer (up to `net.core.rmem_max`).
fn proxy_socket() -> std::net::UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    let _ = s.set_recv_buffer_size(64 << 20);
    let _ = s.set_send_buffer_size(64 << 20);
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.into()
}

/// One direction of the proxy: a thread reads datagrams as they come and stamps them, another
/// sends each `delay` after it arrived. Blocking OS threads, so that the proxy is scheduled by
/// the kernel rather than competing with the QUIC endpoints for the async runtime.
fn forward(
    from: std::net::UdpSocket,
    to: std::net::UdpSocket,
    dest: impl Fn() -> Option<SocketAddr> + Send + 'static,
    seen: impl Fn(SocketAddr) + Send + 'static,
    delay: Duration,
) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, src)) = from.recv_from(&mut buf) {
            seen(src);
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((at, p)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if let Some(d) = dest() {
                let _ = to.send_to(&p, d);
            }
        }
    });
}

/// Forwards UDP datagrams between one client and `server`, delaying each by `delay`.
async fn delay_proxy(server: SocketAddr, delay: Duration) -> SocketAddr {
    let client_side = proxy_socket();
    let server_side = proxy_socket();
    let addr = client_side.local_addr().unwrap();
    let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    let c = client.clone();
    forward(
        client_side.try_clone().unwrap(),
        server_side.try_clone().unwrap(),
        move || Some(server),
        move |src| *c.lock().unwrap() = Some(src),
        delay,
    );
    forward(
        server_side,
        client_side,
        move || *client.lock().unwrap(),
        |_| {},
        delay,
    );
    addr
}

async fn quic_upload(payload: Arc<Vec<u8>>, delay: Option<Duration>, tuned: bool) -> f64 {
    let ca = tls::new_ca("bench").unwrap();
    let server_pair = tls::issue(&ca, "coordinator", true, &[]).unwrap();
    let client_pair = tls::issue(&ca, "client", false, &[]).unwrap();
    let mut server_cfg =
        quic::server_config(tls::server_config(&ca.cert_pem, &server_pair).unwrap()).unwrap();
    let mut client_cfg =
        quic::client_config(tls::client_config(&ca.cert_pem, &client_pair).unwrap()).unwrap();
    if !tuned {
        server_cfg.transport_config(Arc::new(quinn::TransportConfig::default()));
        client_cfg.transport_config(Arc::new(quinn::TransportConfig::default()));
    }
    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let server_addr = server.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut s = conn.accept_uni().await.unwrap();
        let mut n = 0usize;
        while let Some(chunk) = s.read_chunk(1 << 20, true).await.unwrap() {
            n += chunk.bytes.len();
        }
        n
    });
    let target = match delay {
        Some(d) => delay_proxy(server_addr, d).await,
        None => server_addr,
    };
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_cfg);
    let conn = client
        .connect(target, tls::COORDINATOR_NAME)
        .unwrap()
        .await
        .unwrap();
    let t = Instant::now();
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&payload).await.unwrap();
    s.finish().unwrap();
    let n = receiver.await.unwrap();
    assert_eq!(n, payload.len());
    t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let mut payload = vec![0u8; mib << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in payload.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let payload = Arc::new(payload);
    let mb = payload.len() as f64 / 1e6;
    let tcp = tcp_copy(payload.clone()).await;
    let q = quic_upload(payload.clone(), None, true).await;
    println!(
        "loopback: TCP copy {:.0} MB/s, fedtune QUIC {:.0} MB/s ({:.2}x of TCP)",
        mb / tcp,
        mb / q,
        tcp / q
    );
    // Over 100 ms of round trip, a smaller payload keeps the run short.
    let delayed_mib: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let small = Arc::new(payload[..payload.len().min(delayed_mib << 20)].to_vec());
    let smb = small.len() as f64 / 1e6;
    let d = Some(Duration::from_millis(50));
    let drops = udp_drops();
    let tuned = quic_upload(small.clone(), d, true).await;
    let tuned_drops = udp_drops() - drops;
    let default = quic_upload(small.clone(), d, false).await;
    let default_drops = udp_drops() - drops - tuned_drops;
    println!(
        "100 ms RTT ({smb:.0} MB): fedtune windows {:.1} MB/s, quinn defaults {:.1} MB/s ({:.1}x); \
         datagrams dropped by full receive buffers: {tuned_drops} and {default_drops} \
         (net.core.rmem_max = {}, rmem_default = {})",
        smb / tuned,
        smb / default,
        default / tuned,
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap_or_default()
            .trim(),
        std::fs::read_to_string("/proc/sys/net/core/rmem_default")
            .unwrap_or_default()
            .trim()
    );
}
