//! A provider that answers each call from a script.

use super::lock;
use crate::domain::{Lookup, OutboundMessage, ProviderError, ProviderReceipt};
use crate::ports::Provider;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
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
/// Lookups answer from their own script, then "cannot tell" (the default of the port).
#[derive(Debug)]
pub struct ScriptedProvider {
    name: &'static str,
    script: Mutex<VecDeque<Answer>>,
    sent: Mutex<Vec<OutboundMessage>>,
    lookups: Mutex<VecDeque<Result<Lookup, ProviderError>>>,
    /// Every lookup asked: the message's communication id and the `since` given.
    looked_up: Mutex<Vec<(String, DateTime<Utc>)>>,
}

impl ScriptedProvider {
    pub fn new(name: &'static str) -> Self {
        ScriptedProvider {
            name,
            script: Mutex::new(VecDeque::new()),
            sent: Mutex::new(Vec::new()),
            lookups: Mutex::new(VecDeque::new()),
            looked_up: Mutex::new(Vec::new()),
        }
    }

    /// Answer the next lookups with `answers`, in order.
    pub fn answer_lookups(&self, answers: impl IntoIterator<Item = Result<Lookup, ProviderError>>) {
        lock(&self.lookups).extend(answers);
    }

    /// Every lookup asked: (communication id, since), in order.
    pub fn looked_up(&self) -> Vec<(String, DateTime<Utc>)> {
        lock(&self.looked_up).clone()
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

    async fn lookup(
        &self,
        msg: &OutboundMessage,
        since: DateTime<Utc>,
    ) -> Result<Lookup, ProviderError> {
        lock(&self.looked_up).push((msg.communication_id.clone(), since));
        lock(&self.lookups)
            .pop_front()
            .unwrap_or(Ok(Lookup::CannotTell))
    }
}
