//! The request body, read up to a limit whether or not a `content-length` declares it.

use warp::Filter;

/// Largest request body accepted.
pub const BODY_LIMIT: u64 = 64 * 1024;

/// A body larger than its route's limit (the limit).
#[derive(Debug)]
pub struct TooLarge(pub u64);
impl warp::reject::Reject for TooLarge {}

/// The body could not be read (the client went away mid-request).
#[derive(Debug)]
pub struct Unreadable;
impl warp::reject::Reject for Unreadable {}

/// The request body, up to [`BODY_LIMIT`] bytes, with or without a `content-length`
/// (a declared length over the limit is refused before anything is read).
pub fn limited_body() -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone {
    limited_body_up_to(BODY_LIMIT)
}

/// The request body, up to `limit` bytes (a bulk send's is larger than one request's).
pub fn limited_body_up_to(
    limit: u64,
) -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(move |len: Option<u64>| async move {
            match len {
                Some(n) if n > limit => Err(warp::reject::custom(TooLarge(limit))),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(move |body| collect_body(body, limit))
}

async fn collect_body<S, B>(body: S, limit: u64) -> Result<bytes::Bytes, warp::Rejection>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use bytes::BufMut;
    use futures::StreamExt;
    let mut body = std::pin::pin!(body);
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| warp::reject::custom(Unreadable))?;
        if out.len() + chunk.remaining() > limit as usize {
            return Err(warp::reject::custom(TooLarge(limit)));
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            let n = c.len();
            out.put_slice(c);
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}
