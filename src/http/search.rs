//! `GET /api/v1/communications`: the query string read into [`SearchParams`], then
//! [`crate::search`] (which speaks Elasticsearch and knows nothing of HTTP) builds and
//! runs the search.

use crate::auth::{AuthError, Identity};
use crate::http::errors::{respond, ApiError};
use crate::http::extract::{authenticated, with_state};
use crate::http::routes::{at, SEARCH_COMMUNICATIONS};
use crate::http::AppState;
use crate::search::{self, SearchParams};
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};
use warp::Filter;

/// A query string that does not read as search parameters; the text is what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0} must be a positive integer")]
    NotANumber(String),
    #[error("unknown parameter {0:?}")]
    Unknown(String),
    #[error(transparent)]
    Malformed(#[from] serde_json::Error),
}

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    at(SEARCH_COMMUNICATIONS)
        .and(authenticated(state))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_state(state))
        .then(search_communications)
        .map(respond)
        .boxed()
}

async fn search_communications(
    who: Result<Identity, AuthError>,
    raw: String,
    state: AppState,
) -> Result<Response, ApiError> {
    let who = who?;
    let params = parse_search_params(&raw)?;
    let (body, page, size) = search::build_query(&params, &who.tenant)?;
    let es = state.search.client();
    match search::search(es, &state.communications_index, body, page, size).await {
        Ok(v) => Ok(warp::reply::json(&v).into_response()),
        Err(e) => {
            tracing::warn!(error = %e, "search failed");
            Err(ApiError::SearchUnavailable)
        }
    }
}

/// Query string → parameters; the error names what could not be read.
fn parse_search_params(raw: &str) -> Result<SearchParams, QueryError> {
    let mut map = serde_json::Map::new();
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        let val = match k.as_ref() {
            "page" | "size" => json!(v
                .parse::<u32>()
                .map_err(|_| QueryError::NotANumber(k.to_string()))?),
            "q" | "type" | "status" | "to" | "from" | "since" | "until" => json!(v),
            other => return Err(QueryError::Unknown(other.to_string())),
        };
        map.insert(k.into_owned(), val);
    }
    Ok(serde_json::from_value(serde_json::Value::Object(map))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_read_as_parameters_or_say_why_not() {
        let p = parse_search_params("q=code+4242&type=sms&page=2").unwrap();
        assert_eq!(
            (p.q.as_deref(), p.kind.as_deref(), p.page),
            (Some("code 4242"), Some("sms"), Some(2))
        );
        let e = |raw: &str| parse_search_params(raw).unwrap_err().to_string();
        assert_eq!(e("size=-1"), "size must be a positive integer");
        assert_eq!(e("colour=red"), "unknown parameter \"colour\"");
    }
}
