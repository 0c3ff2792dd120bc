//! A provider that answers each call from a script.

use super::lock;
use crate::domain::{OutboundMessage, ProviderError, ProviderReceipt};
use crate::ports::Provider;
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// How the provider answers one call.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Took the message, under this provider message id.
    Accept(Option<String>),
    Refuse(ProviderError),
    /// Never answers (the sender's timeout ends the call).
    Hang,
    Panic,
    /// Answer as the inner answer, after a wait.
    After(Duration, Box<Answer>),
}

/// Answers from its script in order; once the script is empty, accepts every message
/// (provider message ids `{name}-1`, `{name}-2`...). Keeps every message it was given.
#[derive(Debug)]
pub struct ScriptedProvider {
    name: &'static str,
    script: Mutex<VecDeque<Answer>>,
    sent: Mutex<Vec<OutboundMessage>>,
}

impl ScriptedProvider {
    pub fn new(name: &'static str) -> Self {
        ScriptedProvider {
            name,
            script: Mutex::new(VecDeque::new()),
            sent: Mutex::new(Vec::new()),
        }
    }

    /// Answer the next calls with `answers`, in order.
    pub fn answer(&self, answers: impl IntoIterator<Item = Answer>) {
        lock(&self.script).extend(answers);
    }

    /// Every message the provider was called with, in order.
    pub fn sent(&self) -> Vec<OutboundMessage> {
        lock(&self.sent).clone()
    }
}

#[async_trait]
impl Provider for ScriptedProvider {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let n = {
            let mut sent = lock(&self.sent);
            sent.push(msg.clone());
            sent.len()
        };
        let mut answer = lock(&self.script)
            .pop_front()
            .unwrap_or_else(|| Answer::Accept(Some(format!("{}-{n}", self.name))));
        loop {
            match answer {
                Answer::Accept(provider_message_id) => {
                    return Ok(ProviderReceipt {
                        provider_message_id,
                    })
                }
                Answer::Refuse(e) => return Err(e),
                Answer::Hang => std::future::pending::<()>().await,
                Answer::Panic => panic!("scripted provider panic"),
                Answer::After(d, inner) => {
                    tokio::time::sleep(d).await;
                    answer = *inner;
                }
            }
        }
    }
}
