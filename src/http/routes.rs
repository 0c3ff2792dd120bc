//! The route table: every route the service answers, written once. The filters match
//! what it says ([`at`], [`at_with_param`]), a request's metric label is the template it
//! matched ([`route_label`]), a 405 names the methods of its path from it
//! ([`allowed_methods`]), and `tests/api.rs` holds `openapi.json` and the running service
//! to it (every documented operation is here and answers, and no other).

use warp::filters::BoxedFilter;
use warp::Filter;

/// A route: method and path template, as in the OpenAPI document. A `{name}` segment is
/// any one non-empty segment.
pub type Route = (&'static str, &'static str);

pub const CREATE_COMMUNICATION: Route = ("POST", "/api/v1/communication");
pub const GET_COMMUNICATION: Route = ("GET", "/api/v1/communication/{id}");
pub const CANCEL_COMMUNICATION: Route = ("DELETE", "/api/v1/communication/{id}");
pub const SEARCH_COMMUNICATIONS: Route = ("GET", "/api/v1/communications");
pub const CREATE_BULK: Route = ("POST", "/api/v1/communications/bulk");
pub const GET_BATCH: Route = ("GET", "/api/v1/batches/{batchId}");
pub const EVENTS: Route = ("GET", "/api/v1/events");
pub const EVENTS_WS: Route = ("GET", "/api/v1/events/ws");
pub const PROVIDERS: Route = ("GET", "/api/v1/providers");
pub const OPENAPI_DOCUMENT: Route = ("GET", "/api/v1/openapi.json");
pub const TWILIO_CALLBACK: Route = ("POST", "/api/v1/callbacks/twilio");
pub const WHATSAPP_VERIFY: Route = ("GET", "/api/v1/callbacks/whatsapp");
pub const WHATSAPP_CALLBACK: Route = ("POST", "/api/v1/callbacks/whatsapp");
pub const VONAGE_CALLBACK: Route = ("POST", "/api/v1/callbacks/vonage");
pub const SENDGRID_CALLBACK: Route = ("POST", "/api/v1/callbacks/sendgrid");
pub const CREATE_TEMPLATE: Route = ("POST", "/api/v1/templates");
pub const LIST_TEMPLATES: Route = ("GET", "/api/v1/templates");
pub const GET_TEMPLATE: Route = ("GET", "/api/v1/templates/{name}");
pub const CHANGE_TEMPLATE: Route = ("PUT", "/api/v1/templates/{name}");
pub const DELETE_TEMPLATE: Route = ("DELETE", "/api/v1/templates/{name}");
pub const PREVIEW_TEMPLATE: Route = ("POST", "/api/v1/templates/{name}/preview");
pub const COMMUNICATION_EVENTS: Route = ("GET", "/api/v1/communication/{id}/events");
pub const LIST_DEAD_LETTERS: Route = ("GET", "/api/v1/dead-letters");
pub const REPLAY_DEAD_LETTER: Route = ("POST", "/api/v1/dead-letters/{id}/replay");
pub const CONSOLE: Route = ("GET", "/console");
pub const CONSOLE_ASSET: Route = ("GET", "/console/{asset}");
pub const LIST_SUPPRESSIONS: Route = ("GET", "/api/v1/suppressions");
pub const ADD_SUPPRESSION: Route = ("POST", "/api/v1/suppressions");
pub const REMOVE_SUPPRESSION: Route = ("DELETE", "/api/v1/suppressions");
pub const TWILIO_INBOUND: Route = ("POST", "/api/v1/callbacks/twilio/inbound");
pub const METRICS: Route = ("GET", "/metrics");
pub const HEALTHZ: Route = ("GET", "/healthz");
pub const READYZ: Route = ("GET", "/readyz");

/// Every route.
pub const ROUTES: &[Route] = &[
    CREATE_COMMUNICATION,
    GET_COMMUNICATION,
    CANCEL_COMMUNICATION,
    SEARCH_COMMUNICATIONS,
    CREATE_BULK,
    GET_BATCH,
    EVENTS,
    EVENTS_WS,
    PROVIDERS,
    OPENAPI_DOCUMENT,
    TWILIO_CALLBACK,
    WHATSAPP_VERIFY,
    WHATSAPP_CALLBACK,
    VONAGE_CALLBACK,
    SENDGRID_CALLBACK,
    CREATE_TEMPLATE,
    LIST_TEMPLATES,
    GET_TEMPLATE,
    CHANGE_TEMPLATE,
    DELETE_TEMPLATE,
    PREVIEW_TEMPLATE,
    COMMUNICATION_EVENTS,
    LIST_DEAD_LETTERS,
    REPLAY_DEAD_LETTER,
    CONSOLE,
    CONSOLE_ASSET,
    LIST_SUPPRESSIONS,
    ADD_SUPPRESSION,
    REMOVE_SUPPRESSION,
    TWILIO_INBOUND,
    METRICS,
    HEALTHZ,
    READYZ,
];

fn is_param(segment: &str) -> bool {
    segment.starts_with('{')
}

/// The path's segments after the leading `/`.
fn segments(path: &'static str) -> Vec<&'static str> {
    path.trim_start_matches('/').split('/').collect()
}

/// The method's filter; a path that matched with another method is a 405.
fn method(name: &str) -> BoxedFilter<()> {
    match name {
        "GET" => warp::get().boxed(),
        "POST" => warp::post().boxed(),
        "PUT" => warp::put().boxed(),
        "DELETE" => warp::delete().boxed(),
        other => unreachable!("no route uses {other}"),
    }
}

fn literal_path(segments: &[&'static str]) -> BoxedFilter<()> {
    segments.iter().fold(warp::any().boxed(), |f, s| {
        debug_assert!(!is_param(s), "{s} is a parameter");
        f.and(warp::path(*s)).boxed()
    })
}

/// The filter of a route without parameters: its path, then its method (as `warp::path!`
/// followed by `warp::get()` would be).
pub fn at((m, path): Route) -> BoxedFilter<()> {
    literal_path(&segments(path))
        .and(warp::path::end())
        .and(method(m))
        .boxed()
}

/// The filter of a route with one parameter segment (anywhere in the path); yields that
/// segment.
pub fn at_with_param((m, path): Route) -> BoxedFilter<(String,)> {
    let segs = segments(path);
    let at = segs
        .iter()
        .position(|s| is_param(s))
        .expect("a route with a parameter");
    literal_path(&segs[..at])
        .and(warp::path::param::<String>())
        .and(literal_path(&segs[at + 1..]))
        .and(warp::path::end())
        .and(method(m))
        .boxed()
}

/// Whether `path` is one of `template`'s paths. Run for every request (its metric label),
/// so a template without a parameter is one string comparison and one with parameters a
/// single walk over both.
fn template_matches(template: &str, path: &str) -> bool {
    if !template.contains('{') {
        return template == path;
    }
    let mut p = path.split('/');
    for a in template.split('/') {
        match p.next() {
            Some(b) if a == b || (is_param(a) && !b.is_empty()) => {}
            _ => return false,
        }
    }
    p.next().is_none()
}

/// The methods a path answers (for `Allow` on a 405).
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let path = path.trim_end_matches('/');
    ROUTES
        .iter()
        .filter(|(_, template)| template_matches(template, path))
        .map(|(m, _)| *m)
        .collect()
}

/// The metric label of a request: the template of the route its path names, or `other`
/// (labels stay few whatever clients send).
pub fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|(_, template)| template_matches(template, path))
        .map_or("other", |(_, template)| *template)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_allowed_methods_come_from_the_table() {
        assert_eq!(
            route_label("/api/v1/communication"),
            "/api/v1/communication"
        );
        assert_eq!(
            route_label("/api/v1/communication/65f0c0ffee0123456789abcd"),
            "/api/v1/communication/{id}"
        );
        assert_eq!(route_label("/healthz"), "/healthz");
        assert_eq!(route_label("/api/v1/nope"), "other");
        assert_eq!(route_label("/"), "other");
        assert_eq!(
            allowed_methods("/api/v1/callbacks/whatsapp/"),
            ["GET", "POST"]
        );
        assert_eq!(
            allowed_methods("/api/v1/communication/x"),
            ["GET", "DELETE"]
        );
    }

    #[tokio::test]
    async fn each_route_is_matched_by_its_own_filter_only() {
        let concrete = |t: &str| {
            t.replace("{id}", "65f0c0ffee0123456789abcd")
                .replace("{name}", "otp")
        };
        for route in ROUTES {
            for other in ROUTES {
                let matched = if other.1.contains('{') {
                    warp::test::request()
                        .method(route.0)
                        .path(&concrete(route.1))
                        .matches(&at_with_param(*other))
                        .await
                } else {
                    warp::test::request()
                        .method(route.0)
                        .path(&concrete(route.1))
                        .matches(&at(*other))
                        .await
                };
                assert_eq!(
                    matched,
                    route == other,
                    "{route:?} by the filter of {other:?}"
                );
            }
        }
    }
}
