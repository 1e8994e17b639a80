//! The daemons' Prometheus endpoint: `GET /metrics` over plain HTTP/1.1 on an opt-in listen
//! address (`metrics_listen` in `coord.toml` and `client.toml`), answering with the text
//! exposition a closure renders. One request per connection, at most 8 KiB of it read within
//! 5 s, at most 32 connections served at once; anything but `GET /metrics` gets a 404. It never
//! panics on what it reads.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests answered at once; more connections are closed unanswered.
const MAX_REQUESTS: usize = 32;

/// Renders the metrics' text exposition.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Listens on `addr` and serves `render` there on a task of its own (see [`serve`]).
pub async fn listen(addr: std::net::SocketAddr, render: Render) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(serve(listener, render));
    Ok(())
}

/// Serves `GET /metrics` on `listener` with what `render` returns, until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, render: Render) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS));
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of descriptors, or the like: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let read = async {
                while n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let (status, body) = answer(&buf[..n], &render);
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// The status line and body for the request `head`.
fn answer(head: &[u8], render: &Render) -> (&'static str, String) {
    if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?") {
        ("200 OK", render())
    } else {
        ("404 Not Found", "only GET /metrics\n".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_get_metrics_and_nothing_else() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, Arc::new(|| "up 1\n".to_string())));
        let ask = |req: &'static [u8]| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(req).await.unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).await.unwrap();
            reply
        };
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nup 1\n"), "{ok}");
        let other = ask(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let garbage = ask(b"\xff\xfe\x00\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 404"), "{garbage}");
        task.abort();
    }
}
