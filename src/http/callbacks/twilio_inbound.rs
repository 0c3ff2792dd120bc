//! Twilio's incoming message webhook, `POST /api/v1/callbacks/twilio/inbound` (form fields
//! `From`, `To`, `Body`; signed as the status callback is, over this route's own URL): an
//! opt-out keyword (`STOP`, `STOPALL`, `UNSUBSCRIBE`, `CANCEL`, `END`, `QUIT`) suppresses
//! `From` for SMS, an opt-in keyword (`START`, `UNSTOP`, `YES`) removes it, for the tenant
//! whose table lists the `To` number, or the default tenant if none does. Twilio's own
//! keyword handling is as documented at
//! <https://help.twilio.com/articles/223134027>: the keyword is the whole body, any case,
//! surrounding spaces and punctuation aside. The answer is an empty TwiML `<Response/>`, so
//! nothing is sent back by us.

use super::twilio::{valid, SIGNATURE_HEADER};
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, TWILIO_INBOUND};
use crate::http::state::{with_state, AppState};
use actors::domain::{suppression_address, Channel, DEFAULT_TENANT};
use secrecy::ExposeSecret;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};
use warp::Filter;

/// What an incoming message asks of the opt-out list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    OptOut,
    OptIn,
}

/// The keyword a message body is, if it is one.
pub fn keyword(body: &str) -> Option<Keyword> {
    let word = body
        .trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
        .to_ascii_uppercase();
    match word.as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" => Some(Keyword::OptOut),
        "START" | "UNSTOP" | "YES" => Some(Keyword::OptIn),
        _ => None,
    }
}

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    at(TWILIO_INBOUND)
        .and(warp::header::optional::<String>("x-twilio-signature"))
        .and(limited_body())
        .and(with_state(state))
        .then(|sig, body, state: Arc<AppState>| async move { respond(inbound(&state, sig, body).await) })
        .boxed()
}

fn twiml() -> Response {
    warp::reply::with_header(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
        "content-type",
        "text/xml",
    )
    .into_response()
}

async fn inbound(
    state: &AppState,
    signature: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let cfg = &state.callbacks;
    let url = cfg
        .twilio_url
        .as_deref()
        .map(|u| format!("{u}/inbound"))
        .ok_or(ApiError::CallbacksNotConfigured)?;
    let sig = signature.ok_or(ApiError::Unsigned(SIGNATURE_HEADER))?;
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    if !valid(cfg.twilio_auth_token.expose_secret(), &url, &params, &sig) {
        return Err(ApiError::BadSignature(SIGNATURE_HEADER));
    }
    let field = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (Some(from), Some(to)) = (field("From"), field("To")) else {
        return Err(ApiError::InvalidCallback);
    };
    let (Some(kw), Some(from)) = (
        keyword(field("Body").unwrap_or("")),
        suppression_address(Channel::Sms, from),
    ) else {
        return Ok(twiml());
    };
    let tenant = state.tenants.owner_of_number(to).unwrap_or(DEFAULT_TENANT);
    let store = &state.suppressions;
    let done = match kw {
        Keyword::OptOut => store
            .add(tenant, Channel::Sms, &from, Some("STOP"), "twilio-inbound")
            .await
            .map(|_| ()),
        Keyword::OptIn => store.remove(tenant, Channel::Sms, &from).await.map(|_| ()),
    };
    if let Err(e) = done {
        // Twilio retries an answer that is not a 2xx: nothing is lost.
        tracing::warn!(error = %e, "opt-out not recorded");
        return Err(ApiError::StoreUnavailable);
    }
    tracing::info!(tenant, keyword = ?kw, "Opt-out list changed by an incoming SMS.");
    Ok(twiml())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_whole_bodies_in_any_case() {
        for stop in [
            "STOP",
            "stop",
            " Stop. ",
            "STOPALL",
            "unsubscribe",
            "Cancel",
            "END",
            "quit!",
        ] {
            assert_eq!(keyword(stop), Some(Keyword::OptOut), "{stop}");
        }
        for start in ["START", "start", "Unstop", "yes"] {
            assert_eq!(keyword(start), Some(Keyword::OptIn), "{start}");
        }
        for other in ["", "please stop", "STOP IT", "stopp", "hello", "no"] {
            assert_eq!(keyword(other), None, "{other}");
        }
    }
}
