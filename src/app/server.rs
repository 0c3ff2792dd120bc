//! The HTTP server loop: warp's filters served by hyper with the limits warp's own `serve`
//! does not set. A client that sends its headers a byte at a time (slowloris) is closed
//! after `header_read_timeout`; a request, body included, has `request_timeout` to be
//! answered (then 408); at most `max_connections` connections are open at once (beyond it
//! new ones are closed at once and counted, so file descriptors and tasks stay bounded);
//! headers larger than `max_header_bytes` are refused by hyper with 431.

use futures::FutureExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;
use warp::reply::Response;

/// The server's own limits (`[server]` in `config.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
}

/// Serve `routes` on `listener` until `shutdown`, then stop accepting and wait for the
/// connections inside to finish their requests.
pub async fn serve<F, R>(
    listener: TcpListener,
    routes: F,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) where
    F: warp::Filter<Extract = (R,), Error = Infallible> + Clone + Send + Sync + 'static,
    R: warp::Reply,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %err, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let service = RequestDeadline {
            inner: warp::service(routes.clone()),
            limit: limits.request_timeout,
            peer,
        };
        let conn = builder(&limits)
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "connection closed with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn builder(limits: &ServerLimits) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    b.http2().timer(TokioTimer::new());
    b
}

/// A request that is not answered within `limit` (a body trickling in, say) is answered
/// 408 and its handler dropped. Each request also carries the client's address.
#[derive(Clone)]
struct RequestDeadline<S> {
    inner: S,
    limit: Duration,
    /// The client's address, handed to the routes as [`crate::http::Peer`].
    peer: std::net::SocketAddr,
}

impl<S, B> Service<warp::http::Request<B>> for RequestDeadline<S>
where
    S: Service<warp::http::Request<B>, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: warp::http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(crate::http::Peer(self.peer));
        let limit = self.limit;
        tokio::time::timeout(limit, self.inner.call(req))
            .map(move |answer| match answer {
                Ok(answer) => answer,
                Err(_) => {
                    metrics::counter!("http_requests_timed_out_total").increment(1);
                    Ok(warp::Reply::into_response(
                        crate::http::ApiError::RequestTimeout(limit),
                    ))
                }
            })
            .boxed()
    }
}
