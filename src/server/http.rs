//! The metrics listener: `GET /metrics` answers the OpenMetrics text, `GET /status` a JSON
//! summary (table counts and digest, the cluster as seen from this node), anything else 404.
//! One request per connection, five seconds at most.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::conn::{Acceptor, ConnGuard};
use super::metrics::Port;
use super::Shared;

/// A request head larger than this is not a scrape.
const MAX_HEAD: usize = 8192;

/// Serves scrapes until `token` is cancelled. Connections count against the metrics port's
/// own cap (`max-connections`), so idle ones cannot exhaust descriptors, and each is closed
/// after five seconds, idle or not.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    let mut acceptor = Acceptor::new(listener, Port::Metrics);
    loop {
        let (mut stream, _) = tokio::select! {
            _ = token.cancelled() => break,
            a = acceptor.accept(&shared) => a,
        };
        // Over the cap the stream is dropped here: closed at once.
        let Some(guard) = ConnGuard::try_new(&shared, Port::Metrics) else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let mut buf = Vec::with_capacity(1024);
            let fut = async {
                while buf.len() < MAX_HEAD && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let (status, ctype, body) = match route(&buf) {
                    Route::Metrics => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        shared.metrics.render(&shared.engine),
                    ),
                    Route::Status => {
                        // The digest walks the whole table: off the runtime's workers.
                        let s = shared.clone();
                        let json = tokio::task::spawn_blocking(move || {
                            serde_json::to_string_pretty(&s.status()).unwrap_or_default() + "\n"
                        })
                        .await
                        .unwrap_or_default();
                        ("200 OK", "application/json", json)
                    }
                    Route::NotFound => (
                        "404 Not Found",
                        "text/plain; charset=utf-8",
                        "not found: try GET /metrics or GET /status\n".to_string(),
                    ),
                };
                let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), fut).await;
        });
    }
}

/// Whether a request head asks for `GET /metrics` (with or without a query string).
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Status,
    NotFound,
}

fn route(head: &[u8]) -> Route {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]));
    let path = path.split(|&b| b == b'?').next().unwrap_or(&[]);
    match (method, path) {
        (b"GET", b"/metrics") => Route::Metrics,
        (b"GET", b"/status") => Route::Status,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::{route, Route};

    fn is_scrape(head: &[u8]) -> bool {
        route(head) == Route::Metrics
    }

    #[test]
    fn only_get_status_is_a_status_request() {
        assert_eq!(route(b"GET /status HTTP/1.1\r\n\r\n"), Route::Status);
        assert_eq!(route(b"GET /status?x HTTP/1.1\r\n\r\n"), Route::Status);
        assert_eq!(route(b"GET /statusx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"PUT /status HTTP/1.1\r\n\r\n"), Route::NotFound);
    }

    #[test]
    fn only_get_metrics_is_a_scrape() {
        assert!(is_scrape(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_scrape(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"));
        assert!(!is_scrape(b"GET /metricsx HTTP/1.1\r\n\r\n"));
        assert!(!is_scrape(b"POST /metrics HTTP/1.1\r\n\r\n"));
        assert!(!is_scrape(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!is_scrape(b""));
    }
}
