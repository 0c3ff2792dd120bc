//! Provider callbacks (delivery receipts), verified before anything changes. One file per
//! provider holds its routes, its signature scheme and the mapping of its statuses to
//! ours:
//! - [`twilio`]: `POST /api/v1/callbacks/twilio`, Twilio's status callback.
//! - [`twilio_inbound`]: `POST /api/v1/callbacks/twilio/inbound`, Twilio's incoming
//!   message webhook: `STOP` and `START` keep the sender's opt-out list.
//! - [`whatsapp`]: `GET /api/v1/callbacks/whatsapp` (Meta's webhook verification) and
//!   `POST /api/v1/callbacks/whatsapp` (status notifications).
//! - [`vonage`]: `POST /api/v1/callbacks/vonage`, Vonage's SMS delivery receipts.
//! - [`sendgrid`]: `POST /api/v1/callbacks/sendgrid`, SendGrid's signed event webhook.
//!
//! A missing signature is 401, a wrong one 403; neither changes anything. A verified
//! receipt goes to the ReceiptActor; if it is not recorded the answer is 503 and the
//! provider sends it again.

pub mod sendgrid;
pub mod twilio;
pub mod twilio_inbound;
pub mod vonage;
pub mod whatsapp;

pub use twilio::signature as twilio_signature;
pub use whatsapp::signature as meta_signature;

use crate::http::errors::ApiError;
use actors::domain::Status;
use actors::ports::ReceiptUpdate;
use actors::receipts::{self, Receipt};
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

#[derive(Clone)]
pub struct CallbackConfig {
    /// The URL Twilio calls (the public base URL + the route); signatures are over it.
    pub twilio_url: Option<String>,
    pub twilio_auth_token: SecretString,
    pub whatsapp_app_secret: SecretString,
    pub whatsapp_verify_token: SecretString,
    /// Vonage's signature secret; empty: receipts refused.
    pub vonage_signature_secret: SecretString,
    /// SendGrid's verification key (the point, see [`sendgrid::public_key`]); `None`:
    /// events refused.
    pub sendgrid_public_key: Option<Vec<u8>>,
    /// How long a callback waits for the ReceiptActor (`receipts.apply_timeout_ms`).
    pub apply_timeout: Duration,
    /// The opt-out lists that SendGrid's and Meta's reports add to.
    pub suppressions: Arc<crate::clients::suppressions::MongoSuppressions>,
}

pub fn routes(cfg: Arc<CallbackConfig>) -> BoxedFilter<(Response,)> {
    twilio::routes(cfg.clone())
        .or(whatsapp::routes(cfg.clone()))
        .unify()
        .or(vonage::routes(cfg.clone()))
        .unify()
        .or(sendgrid::routes(cfg))
        .unify()
        .boxed()
}

/// Hand one receipt to the ReceiptActor and wait for its answer.
async fn record(
    apply_timeout: Duration,
    provider: &'static str,
    service: &'static str,
    provider_message_id: &str,
    status: Status,
    error: Option<(String, String)>,
) -> Result<(), ApiError> {
    let receipt = Receipt {
        update: ReceiptUpdate {
            provider: provider.to_string(),
            provider_message_id: provider_message_id.to_string(),
            status,
            error,
        },
        service,
    };
    match receipts::apply(receipt, apply_timeout).await {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "receipt not recorded");
            Err(ApiError::ReceiptNotRecorded)
        }
    }
}
