//! Email over SMTP with lettre: `smtp://` (plain), `smtp://…?tls=required` (STARTTLS) or
//! `smtps://` (implicit TLS), credentials in the URL. A pooled async transport.

use super::classify_smtp;
use actors::domain::{ErrorClass, OutboundMessage, ProviderError, ProviderReceipt};
use actors::ports::Provider;
use async_trait::async_trait;
use lettre::message::{header::ContentType, Mailbox};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

/// `SMTP_URL` is not one lettre can use.
#[derive(Debug, thiserror::Error)]
#[error("SMTP_URL: {0}")]
pub struct SmtpUrlError(#[from] lettre::transport::smtp::Error);

pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    default_subject: String,
}

impl Smtp {
    pub fn new(url: &str, default_subject: &str, timeout: Duration) -> Result<Smtp, SmtpUrlError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)?
            .timeout(Some(timeout))
            .build();
        Ok(Smtp {
            transport,
            default_subject: default_subject.into(),
        })
    }
}

fn permanent(message: String) -> ProviderError {
    ProviderError {
        class: ErrorClass::Permanent,
        rate_limited: false,
        code: Some("invalid-message".into()),
        message,
    }
}

#[async_trait]
impl Provider for Smtp {
    fn name(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let from: Mailbox = msg
            .from
            .parse()
            .map_err(|e| permanent(format!("from: {e}")))?;
        let to: Mailbox = msg.to.parse().map_err(|e| permanent(format!("to: {e}")))?;
        let message_id = format!("<{}@comm-aggregator>", msg.communication_id);
        let email = Message::builder()
            .from(from)
            .to(to)
            .subject(
                msg.subject
                    .clone()
                    .unwrap_or_else(|| self.default_subject.clone()),
            )
            .message_id(Some(message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(msg.body.clone())
            .map_err(|e| permanent(e.to_string()))?;
        match self.transport.send(email).await {
            Ok(_) => Ok(ProviderReceipt {
                provider_message_id: Some(message_id),
            }),
            Err(e) => {
                let code = e.status().map(u16::from);
                Err(ProviderError {
                    class: classify_smtp(code),
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
