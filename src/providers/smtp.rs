//! Email over SMTP with lettre: `smtp://` (plain), `smtp://…?tls=required` (STARTTLS) or
//! `smtps://` (implicit TLS), credentials in the URL. A pooled async transport.
//!
//! SMTP has no lookup (`lookup` keeps the port's default, "cannot tell"): a message whose
//! earlier attempt timed out is sent again, flagged as a possible duplicate. Its
//! `Message-ID` is `<{communication id}@comm-aggregator>`, the same on every attempt, so
//! mail systems downstream that dedupe on it see the resend as the same message.

use super::classify_smtp;
use super::scrub::Scrub;
use actors::domain::{Ambiguity, ErrorClass, OutboundMessage, ProviderError, ProviderReceipt};
use actors::ports::Provider;
use async_trait::async_trait;
use lettre::message::{header::ContentType, Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

/// `SMTP_URL` is not one lettre can use.
#[derive(Debug, thiserror::Error)]
#[error("SMTP_URL: {0}")]
pub struct SmtpUrlError(#[from] lettre::transport::smtp::Error);

pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    default_subject: String,
    scrub: Scrub,
}

impl Smtp {
    pub fn new(url: &str, default_subject: &str, timeout: Duration) -> Result<Smtp, SmtpUrlError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)?
            .timeout(Some(timeout))
            .build();
        let parsed = url::Url::parse(url).ok();
        let host = parsed
            .as_ref()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let user = parsed
            .as_ref()
            .map(|u| u.username().to_string())
            .unwrap_or_default();
        let password = parsed
            .as_ref()
            .and_then(|u| u.password().map(str::to_string))
            .unwrap_or_default();
        Ok(Smtp {
            transport,
            default_subject: default_subject.into(),
            scrub: Scrub::new([
                (host.as_str(), "<relay>"),
                (user.as_str(), "<user>"),
                (password.as_str(), "<secret>"),
            ]),
        })
    }
}

fn permanent(message: String) -> ProviderError {
    ProviderError {
        class: ErrorClass::Permanent,
        ambiguous: None,
        rate_limited: false,
        code: Some("invalid-message".into()),
        message,
    }
}

/// The `Message-ID`: from the communication id alone, the same on every attempt.
fn message_id(communication_id: &str) -> String {
    format!("<{communication_id}@comm-aggregator>")
}

#[async_trait]
impl Provider for Smtp {
    fn name(&self) -> &'static str {
        "smtp"
    }

    /// Errors scrubbed of our identifiers (see [`Scrub`]): they are stored on records.
    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        self.send_raw(msg).await.map_err(|e| self.scrub.error(e))
    }
}

impl Smtp {
    async fn send_raw(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let from: Mailbox = msg
            .from
            .parse()
            .map_err(|e| permanent(format!("from: {e}")))?;
        let to: Mailbox = msg.to.parse().map_err(|e| permanent(format!("to: {e}")))?;
        let message_id = message_id(&msg.communication_id);
        let builder = Message::builder()
            .from(from)
            .to(to)
            .subject(
                msg.subject
                    .clone()
                    .unwrap_or_else(|| self.default_subject.clone()),
            )
            .message_id(Some(message_id.clone()));
        // With an HTML part: multipart/alternative, the text part first (RFC 2046: the
        // last part is the preferred one).
        let email = match &msg.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(
                msg.body.clone(),
                html.clone(),
            )),
            None => builder
                .header(ContentType::TEXT_PLAIN)
                .body(msg.body.clone()),
        }
        .map_err(|e| permanent(e.to_string()))?;
        match self.transport.send(email).await {
            Ok(_) => Ok(ProviderReceipt {
                provider_message_id: Some(message_id),
            }),
            Err(e) => {
                let code = e.status().map(u16::from);
                Err(ProviderError {
                    class: classify_smtp(code),
                    // No reply before the timeout: the server may have taken the data.
                    ambiguous: (code.is_none() && e.is_timeout()).then_some(Ambiguity::Timeout),
                    // 421 / 450-452: the server is busy or limits us.
                    rate_limited: matches!(code, Some(421) | Some(450) | Some(451) | Some(452)),
                    code: Some(
                        code.map(|c| c.to_string())
                            .unwrap_or_else(|| "network".into()),
                    ),
                    message: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_message_id_depends_on_the_communication_alone() {
        let id = "65f000000000000000000001";
        assert_eq!(
            super::message_id(id),
            "<65f000000000000000000001@comm-aggregator>"
        );
        assert_eq!(super::message_id(id), super::message_id(id));
    }
}
