//! The web console at `/console`: one HTML page, one script and one style sheet, built
//! into the binary (`include_str!`), no build step and no asset from elsewhere. The page
//! calls the API as any client does, with the API key its user signs in with (kept in the
//! browser's `sessionStorage`), so it sees what that key's tenant sees and nothing else.
//! Served with a Content-Security-Policy that allows this origin's script, style and API
//! only: no inline script, no other origin, no framing.

use crate::http::routes::{at, at_with_param, CONSOLE, CONSOLE_ASSET};
use warp::filters::BoxedFilter;
use warp::http::{header, StatusCode};
use warp::reply::{Reply, Response};
use warp::Filter;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

/// The page's policy: everything from this origin, nothing inline, no frames.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

pub fn routes() -> BoxedFilter<(Response,)> {
    let index = at(CONSOLE).map(|| file(INDEX, "text/html; charset=utf-8"));
    let asset = at_with_param(CONSOLE_ASSET).map(|name: String| match name.as_str() {
        "app.js" => file(SCRIPT, "text/javascript; charset=utf-8"),
        "app.css" => file(STYLE, "text/css; charset=utf-8"),
        "index.html" => file(INDEX, "text/html; charset=utf-8"),
        _ => crate::http::ApiError::NoRoute.into_response(),
    });
    index.or(asset).unify().boxed()
}

fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut r = warp::reply::with_status(body, StatusCode::OK).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}
