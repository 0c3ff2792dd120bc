//! `GET /api/v1/communications`: the endpoint. [`crate::search`] reads the parameters,
//! builds the Elasticsearch query and runs it; it knows nothing of HTTP, and this file
//! knows nothing of Elasticsearch.

use crate::auth::{AuthError, Identity};
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, SEARCH_COMMUNICATIONS};
use crate::http::state::{authenticated_read, with_state, AppState};
use crate::search::{self, SearchParams};
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};
use warp::Filter;

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    at(SEARCH_COMMUNICATIONS)
        .and(authenticated_read(state))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_state(state))
        .then(search_communications)
        .map(respond)
        .boxed()
}

async fn search_communications(
    who: Result<Identity, AuthError>,
    raw: String,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let params = SearchParams::from_query(&raw)?;
    let (body, page, size) = search::build_query(&params, &who.tenant)?;
    let es = state.search.client();
    match search::search(es, &state.communications_index, body, page, size).await {
        Ok(v) => Ok(warp::reply::json(&super::view::search_answer(v)).into_response()),
        Err(e) => {
            tracing::warn!(error = %e, "search failed");
            Err(ApiError::SearchUnavailable)
        }
    }
}
