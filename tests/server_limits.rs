//! The HTTP server's own limits, from outside: slow clients are cut off, the number of
//! open connections is bounded, and the API keeps answering meanwhile.

mod common;

use common::start_isolated;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A slowloris client: the start of a request, then one header byte every 300 ms, never
/// finishing. Returns how long the server let it live (it stops trying after `give_up`).
async fn slowloris(port: u16, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .is_err()
    {
        return Some(started.elapsed());
    }
    let mut buf = [0u8; 256];
    while started.elapsed() < give_up {
        if s.write_all(b"a").await.is_err() {
            return Some(started.elapsed());
        }
        // The server closed its side: a read sees the end (or a reset).
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => return Some(started.elapsed()), // an error answer, then closed
            Err(_) => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_senders_are_cut_off_while_the_api_keeps_answering() {
    let svc = start_isolated(6, &[("HEADER_READ_TIMEOUT_MS", "1000")]);
    let port = svc.port;
    let slow: Vec<_> = (0..200)
        .map(|_| tokio::spawn(slowloris(port, Duration::from_secs(12))))
        .collect();
    // Meanwhile an ordinary client is served, again and again.
    let http = reqwest::Client::new();
    for _ in 0..10 {
        let r = http.get(svc.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut lived = Vec::new();
    for h in slow {
        lived.push(h.await.unwrap());
    }
    let kept = lived.iter().filter(|l| l.is_none()).count();
    assert_eq!(
        kept, 0,
        "slow connections still open after 12 s: {kept} of 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let svc = start_isolated(
        7,
        &[
            ("MAX_CONNECTIONS", "20"),
            ("HEADER_READ_TIMEOUT_MS", "3000"),
        ],
    );
    let port = svc.port;
    // Twenty idle connections take every slot.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next one is accepted and closed without an answer, well before the header timeout.
    let mut extra = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_millis(1500), extra.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "over the cap: closed without an answer, got {read:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
    // Once the idle ones are gone, the service answers again.
    drop(idle);
    let http = reqwest::Client::new();
    let ok = common::eventually(Duration::from_secs(10), "a slot free again", || async {
        let r = http.get(svc.url("/healthz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let () = ok;
}
