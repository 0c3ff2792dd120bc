//! The request body, read up to a limit whether or not a `content-length` declares it.

use warp::Filter;

/// Largest request body accepted.
pub const BODY_LIMIT: u64 = 64 * 1024;

/// A body larger than [`BODY_LIMIT`].
#[derive(Debug)]
pub struct TooLarge;
impl warp::reject::Reject for TooLarge {}

/// The body could not be read (the client went away mid-request).
#[derive(Debug)]
pub struct Unreadable;
impl warp::reject::Reject for Unreadable {}

/// The request body, up to [`BODY_LIMIT`] bytes, with or without a `content-length`
/// (a declared length over the limit is refused before anything is read).
pub fn limited_body() -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|len: Option<u64>| async move {
            match len {
                Some(n) if n > BODY_LIMIT => Err(warp::reject::custom(TooLarge)),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(collect_body)
}

async fn collect_body<S, B>(body: S) -> Result<bytes::Bytes, warp::Rejection>
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
        if out.len() + chunk.remaining() > BODY_LIMIT as usize {
            return Err(warp::reject::custom(TooLarge));
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
