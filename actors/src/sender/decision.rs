//! The sender's decision, pure: from what one provider call returned, the claimed record,
//! the retry policy, the time and a random source, the outcome to record and the log event
//! to emit. No I/O, no clock, no global randomness: every case is a row of a table test.
//!
//! An outcome can be unknown (a timeout, a reset after the request left, a 502/503/504
//! from a proxy): it is retried like a failure, but the retry carries the unknown attempt,
//! so the next claim asks the provider before sending again, and a resend after it is
//! flagged as a possible duplicate whatever it comes to.

use crate::domain::{
    Ambiguity, AttemptError, Claimed, ErrorClass, EventStatus, LogEvent, Outcome, ProviderError,
    UnknownAttempt,
};
use crate::retry::RetryPolicy;
use chrono::{DateTime, Utc};
use rand::Rng;
use std::time::Duration;

/// What one provider call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum CallResult {
    Accepted {
        provider_message_id: Option<String>,
    },
    /// No call made: asked about an earlier attempt of unknown outcome, the provider said
    /// it has the message.
    Found {
        provider_message_id: Option<String>,
    },
    Refused(ProviderError),
    /// No call made: the attempts are spent, an earlier attempt's outcome is unknown, and
    /// the provider could not say it has the message.
    NotResent,
    /// No answer within the provider timeout: the message may or may not have gone out.
    TimedOut(Duration),
    /// The provider client panicked; the sender restarts once the batch is recorded.
    Panicked,
}

impl CallResult {
    /// The provider's id for the message it took (sent now, or found).
    pub fn provider_message_id(&self) -> Option<String> {
        match self {
            CallResult::Accepted {
                provider_message_id,
            }
            | CallResult::Found {
                provider_message_id,
            } => provider_message_id.clone(),
            _ => None,
        }
    }

    /// The failure as the record keeps it; `None` when the provider took the message.
    /// Timeouts and panics are retryable: nothing says the message cannot be sent. A
    /// timeout leaves the outcome unknown.
    pub fn error(&self, provider: &str) -> Option<ProviderError> {
        let retryable = ErrorClass::Retryable { retry_after: None };
        match self {
            CallResult::Accepted { .. } | CallResult::Found { .. } => None,
            CallResult::Refused(e) => Some(e.clone()),
            CallResult::TimedOut(after) => Some(ProviderError {
                class: retryable,
                ambiguous: Some(Ambiguity::Timeout),
                rate_limited: false,
                code: Some("timeout".into()),
                message: format!("no answer from {provider} within {after:?}"),
            }),
            // The panic is in our client code, not a word from the provider; where it fell
            // is not known, and the retry is not flagged (as before).
            CallResult::NotResent => Some(ProviderError {
                class: ErrorClass::Permanent,
                ambiguous: None,
                rate_limited: false,
                code: Some("outcome_unknown".into()),
                message: format!(
                    "no attempt left, and {provider} cannot tell whether the last one took the message"
                ),
            }),
            CallResult::Panicked => Some(ProviderError {
                class: retryable,
                ambiguous: None,
                rate_limited: false,
                code: Some("internal".into()),
                message: "internal error: the provider call panicked".into(),
            }),
        }
    }
}

/// What a decision is made against, the same for every call of a batch.
#[derive(Debug, Clone, Copy)]
pub struct DecisionContext<'a> {
    /// The `service` of the log events: the channel.
    pub service: &'a str,
    /// The provider's name, for the record, the events and the error text.
    pub provider: &'static str,
    pub retry: &'a RetryPolicy,
    /// The provider timeout: a call whose outcome is unknown started at most this long
    /// before its decision.
    pub timeout: Duration,
}

/// What to record and what to tell.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub event: LogEvent,
    /// The `outcome` label of `deliveries_total`.
    pub label: &'static str,
}

/// Decide what the call `call` for `claimed` means.
pub fn decide(
    call: &CallResult,
    claimed: &Claimed,
    ctx: DecisionContext<'_>,
    now: DateTime<Utc>,
    rng: &mut impl Rng,
) -> Decision {
    let rec = &claimed.record;
    let attempt = rec.attempts;
    let provider = ctx.provider.to_string();
    let event = |status| {
        let mut ev = LogEvent::for_record(rec, ctx.service, status, attempt, now);
        ev.provider = Some(provider.clone());
        ev
    };
    // A call made after an attempt of unknown outcome may be a second send; a message
    // found at the provider was not sent again.
    let possible_duplicate = match call {
        CallResult::Found { .. } | CallResult::NotResent => None,
        _ => claimed.unknown,
    };
    let Some(err) = call.error(ctx.provider) else {
        let provider_message_id = call.provider_message_id();
        let mut ev = event(EventStatus::Sent);
        ev.provider_message_id = provider_message_id.clone();
        return Decision {
            outcome: Outcome::Sent {
                provider,
                provider_message_id,
                possible_duplicate,
                failovers: Vec::new(),
            },
            event: ev,
            label: "sent",
        };
    };
    let (error, text) = attempt_error(&err, attempt, now, ctx.provider);
    // The last attempt's outcome is unknown: one more claim, to ask the provider before
    // the record is called failed (the sender makes no further send; see `NotResent`).
    // The budget counts from the record's last replay (none: from its first attempt).
    let spent = attempt.saturating_sub(rec.attempt_base);
    let verify = err.ambiguous.is_some() && spent == ctx.retry.max_attempts;
    match err.class {
        ErrorClass::Retryable { retry_after } if ctx.retry.allows_another(spent) || verify => {
            let delay = ctx.retry.delay(attempt, retry_after, rng);
            let not_before =
                now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(60));
            let mut ev = event(EventStatus::Retrying);
            ev.error = Some(text);
            Decision {
                outcome: Outcome::Retry {
                    provider,
                    error,
                    not_before,
                    possible_duplicate,
                    unknown: unknown_attempt(&err, claimed, ctx, now),
                    failovers: Vec::new(),
                },
                event: ev,
                label: "retry",
            }
        }
        _ => {
            let mut ev = event(EventStatus::Failed);
            ev.error = Some(text);
            Decision {
                outcome: Outcome::Failed {
                    provider,
                    error,
                    possible_duplicate,
                    failovers: Vec::new(),
                },
                event: ev,
                label: "failed",
            }
        }
    }
}

/// The failure as the record keeps it, and as the log event tells it.
fn attempt_error(
    err: &ProviderError,
    attempt: u32,
    now: DateTime<Utc>,
    provider: &str,
) -> (AttemptError, String) {
    let text = match &err.code {
        Some(c) => format!("{provider} (code {c}): {}", err.message),
        None => format!("{provider}: {}", err.message),
    };
    let error = AttemptError {
        attempt,
        at: now,
        provider: Some(provider.to_string()),
        code: err.code.clone(),
        message: err.message.clone(),
    };
    (error, text)
}

/// The unknown attempt a retry carries: this attempt's, when its outcome is unknown (the
/// lookup window from the start of the first unknown attempt: this call started at most
/// `timeout` ago), else the one the claim carried (an earlier attempt, or a provider failed
/// over from in this one), so the next claim still asks before sending. Asked at this
/// provider, unless the earlier unknown attempt was at another (or at one not known).
fn unknown_attempt(
    err: &ProviderError,
    claimed: &Claimed,
    ctx: DecisionContext<'_>,
    now: DateTime<Utc>,
) -> Option<UnknownAttempt> {
    let Some(cause) = err.ambiguous else {
        return claimed.unknown;
    };
    let started = now - chrono::Duration::from_std(ctx.timeout).unwrap_or(chrono::Duration::zero());
    let since = claimed
        .unknown
        .map_or(started, |earlier| earlier.since.min(started));
    let provider = match claimed.unknown {
        Some(earlier) if earlier.provider != Some(ctx.provider) => None,
        _ => Some(ctx.provider),
    };
    Some(UnknownAttempt {
        attempt: claimed.record.attempts,
        cause,
        since,
        provider,
    })
}

/// Whether a call's result sends the message on to the channel's next provider, within
/// the same attempt: a retryable refusal (an outage, a rate limit), a refusal about the
/// account or sender at this provider (bad credentials, suspended, no balance: another
/// provider's account may send it), or a call whose outcome is unknown (a timeout, a reset,
/// an ambiguous 5xx: the next send is flagged as a possible duplicate). Not a permanent
/// refusal about the message (e.g. an invalid number: the next provider would refuse it
/// too), not a panic (our own client's bug: the sender restarts), not an answer about an
/// earlier attempt. When the last provider refuses for account reasons too, the message
/// fails (`decide`: only a retryable error is retried), every provider's error in `errors[]`.
pub fn fails_over(result: &CallResult) -> bool {
    match result {
        CallResult::Refused(e) => {
            matches!(e.class, ErrorClass::Retryable { .. } | ErrorClass::Account)
        }
        CallResult::TimedOut(_) => true,
        CallResult::Accepted { .. }
        | CallResult::Found { .. }
        | CallResult::NotResent
        | CallResult::Panicked => false,
    }
}

/// The refusals of the providers failed over from, as the record keeps them (each with
/// its provider), all of attempt `attempt`.
pub fn failover_errors(
    failovers: &[(&str, CallResult)],
    attempt: u32,
    now: DateTime<Utc>,
) -> Vec<AttemptError> {
    failovers
        .iter()
        .filter_map(|(provider, result)| {
            let err = result.error(provider)?;
            Some(attempt_error(&err, attempt, now, provider).0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, Communication, NewCommunication};
    use rand::SeedableRng;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_secs(1),
        cap: Duration::from_secs(60),
    };

    fn claimed(attempt: u32, unknown: Option<UnknownAttempt>) -> Claimed {
        let mut record = Communication::new(
            "65f000000000000000000001".into(),
            NewCommunication {
                channel: Channel::Sms,
                from: "+15550001111".into(),
                to: "+15557654321".into(),
                msg: "hi".into(),
                subject: None,
            },
            Utc::now(),
        );
        record.attempts = attempt;
        Claimed { record, unknown }
    }

    fn refused(class: ErrorClass, code: Option<&str>) -> CallResult {
        CallResult::Refused(ProviderError {
            class,
            ambiguous: None,
            rate_limited: false,
            code: code.map(str::to_string),
            message: "no".into(),
        })
    }

    fn retryable(retry_after: Option<Duration>) -> ErrorClass {
        ErrorClass::Retryable { retry_after }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn run(
        call: &CallResult,
        attempt: u32,
        unknown: Option<UnknownAttempt>,
        seed: u64,
    ) -> Decision {
        let ctx = DecisionContext {
            service: "sms",
            provider: "twilio",
            retry: &POLICY,
            timeout: TIMEOUT,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        decide(call, &claimed(attempt, unknown), ctx, now(), &mut rng)
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-28T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    struct Row {
        name: &'static str,
        call: CallResult,
        attempt: u32,
        label: &'static str,
        status: EventStatus,
        error: Option<&'static str>,
    }

    #[test]
    fn every_call_result_has_one_outcome() {
        let accepted = CallResult::Accepted {
            provider_message_id: Some("SM1".into()),
        };
        let rows = [
            Row {
                name: "sent",
                call: accepted,
                attempt: 1,
                label: "sent",
                status: EventStatus::Sent,
                error: None,
            },
            Row {
                name: "retryable, attempts left",
                call: refused(retryable(None), Some("503")),
                attempt: 1,
                label: "retry",
                status: EventStatus::Retrying,
                error: Some("twilio (code 503): no"),
            },
            Row {
                name: "retryable, last attempt",
                call: refused(retryable(None), None),
                attempt: 3,
                label: "failed",
                status: EventStatus::Failed,
                error: Some("twilio: no"),
            },
            Row {
                name: "permanent",
                call: refused(ErrorClass::Permanent, Some("21211")),
                attempt: 1,
                label: "failed",
                status: EventStatus::Failed,
                error: Some("twilio (code 21211): no"),
            },
            Row {
                name: "account refusal at the last provider: final, not retried",
                call: refused(ErrorClass::Account, Some("20003")),
                attempt: 1,
                label: "failed",
                status: EventStatus::Failed,
                error: Some("twilio (code 20003): no"),
            },
            Row {
                name: "timeout",
                call: CallResult::TimedOut(Duration::from_secs(10)),
                attempt: 1,
                label: "retry",
                status: EventStatus::Retrying,
                error: Some("twilio (code timeout): no answer from twilio within 10s"),
            },
            Row {
                name: "timeout, last attempt: one more claim, to ask the provider",
                call: CallResult::TimedOut(Duration::from_secs(10)),
                attempt: 3,
                label: "retry",
                status: EventStatus::Retrying,
                error: Some("twilio (code timeout): no answer from twilio within 10s"),
            },
            Row {
                name: "panic",
                call: CallResult::Panicked,
                attempt: 2,
                label: "retry",
                status: EventStatus::Retrying,
                error: Some("twilio (code internal): internal error: the provider call panicked"),
            },
            Row {
                name: "panic, last attempt",
                call: CallResult::Panicked,
                attempt: 3,
                label: "failed",
                status: EventStatus::Failed,
                error: Some("twilio (code internal): internal error: the provider call panicked"),
            },
        ];
        for Row {
            name,
            call,
            attempt,
            label,
            status,
            error,
        } in rows
        {
            let d = run(&call, attempt, None, 7);
            assert_eq!(d.label, label, "{name}");
            assert_eq!(d.event.status, status, "{name}");
            assert_eq!(d.event.error.as_deref(), error, "{name}");
            assert_eq!(d.event.attempt, attempt, "{name}");
            assert_eq!(d.event.provider.as_deref(), Some("twilio"), "{name}");
            assert_eq!(d.event.service, "sms", "{name}");
            assert_eq!(d.event.timestamp, now(), "{name}");
            match (&d.outcome, label) {
                (Outcome::Sent { .. }, "sent")
                | (Outcome::Retry { .. }, "retry")
                | (Outcome::Failed { .. }, "failed") => {}
                (o, _) => panic!("{name}: {o:?} under label {label}"),
            }
            if let Outcome::Retry { error, .. } | Outcome::Failed { error, .. } = &d.outcome {
                assert_eq!(error.attempt, attempt, "{name}");
                assert_eq!(error.at, now(), "{name}");
            }
        }
    }

    /// What sends a message on to the next provider within the attempt.
    #[test]
    fn retryable_unknown_and_account_results_fail_over_permanent_ones_do_not() {
        let gateway = CallResult::Refused(ProviderError {
            class: retryable(None),
            ambiguous: Some(Ambiguity::Gateway5xx),
            rate_limited: false,
            code: Some("http-503".into()),
            message: "HTTP 503".into(),
        });
        let rows = [
            ("an outage", refused(retryable(None), Some("20500")), true),
            (
                "a rate limit",
                refused(retryable(Some(TIMEOUT)), Some("20429")),
                true,
            ),
            ("a timeout", CallResult::TimedOut(TIMEOUT), true),
            ("an ambiguous 5xx", gateway, true),
            (
                "an invalid number",
                refused(ErrorClass::Permanent, Some("21211")),
                false,
            ),
            (
                "bad credentials at this provider",
                refused(ErrorClass::Account, Some("20003")),
                true,
            ),
            (
                "no credit at this provider",
                refused(ErrorClass::Account, Some("9")),
                true,
            ),
            (
                "accepted",
                CallResult::Accepted {
                    provider_message_id: None,
                },
                false,
            ),
            (
                "found",
                CallResult::Found {
                    provider_message_id: None,
                },
                false,
            ),
            ("not resent", CallResult::NotResent, false),
            ("a panic", CallResult::Panicked, false),
        ];
        for (name, result, want) in rows {
            assert_eq!(fails_over(&result), want, "{name}");
        }
        let errors = failover_errors(
            &[
                ("twilio", refused(retryable(None), Some("20500"))),
                ("vonage", CallResult::TimedOut(TIMEOUT)),
            ],
            2,
            now(),
        );
        let providers: Vec<_> = errors
            .iter()
            .map(|e| (e.attempt, e.provider.as_deref(), e.code.as_deref()))
            .collect();
        assert_eq!(
            providers,
            [
                (2, Some("twilio"), Some("20500")),
                (2, Some("vonage"), Some("timeout"))
            ]
        );
    }

    #[test]
    fn a_send_carries_its_message_id_and_duplicate_mark() {
        let call = CallResult::Accepted {
            provider_message_id: Some("SM1".into()),
        };
        let stale = UnknownAttempt {
            attempt: 1,
            cause: Ambiguity::StaleLease,
            since: now(),
            provider: None,
        };
        for dup in [None, Some(stale)] {
            let d = run(&call, 2, dup, 1);
            assert_eq!(
                d.outcome,
                Outcome::Sent {
                    provider: "twilio".into(),
                    provider_message_id: Some("SM1".into()),
                    possible_duplicate: dup,
                    failovers: Vec::new(),
                }
            );
            assert_eq!(d.event.provider_message_id.as_deref(), Some("SM1"));
        }
    }

    #[test]
    fn a_retry_is_due_within_the_jitter_bounds_and_never_before_retry_after() {
        for attempt in 1..POLICY.max_attempts {
            let ceiling = chrono::Duration::from_std(POLICY.ceiling(attempt)).unwrap();
            for seed in 0..50 {
                let d = run(&refused(retryable(None), None), attempt, None, seed);
                let Outcome::Retry { not_before, .. } = d.outcome else {
                    panic!("attempt {attempt}: {:?}", d.outcome);
                };
                assert!(not_before >= now() && not_before <= now() + ceiling);
            }
        }
        let asked = Duration::from_secs(30);
        for seed in 0..50 {
            let d = run(&refused(retryable(Some(asked)), None), 1, None, seed);
            let Outcome::Retry { not_before, .. } = d.outcome else {
                panic!("{:?}", d.outcome);
            };
            assert!(not_before >= now() + chrono::Duration::seconds(30));
        }
    }

    /// A replayed record's budget counts from its replay: attempt 4 after a replay at 3
    /// attempts is the first of a fresh budget of 3, and attempt 6 its last.
    #[test]
    fn a_replayed_record_has_a_fresh_attempt_budget() {
        let ctx = DecisionContext {
            service: "sms",
            provider: "twilio",
            retry: &POLICY,
            timeout: TIMEOUT,
        };
        let call = refused(retryable(None), None);
        for (attempt, label) in [(4, "retry"), (5, "retry"), (6, "failed")] {
            let mut c = claimed(attempt, None);
            c.record.attempt_base = 3;
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let d = decide(&call, &c, ctx, now(), &mut rng);
            assert_eq!(d.label, label, "attempt {attempt}");
        }
        assert_eq!(run(&call, 4, None, 1).label, "failed", "without a replay");
    }

    /// An outcome that is unknown, and what follows one: (call, attempt, the unknown
    /// attempt the claim carries) → (label, the unknown attempt the retry carries, the
    /// possible-duplicate mark).
    #[test]
    fn unknown_outcomes_are_remembered_and_a_resend_after_one_is_flagged() {
        let ago = |s: i64| now() - chrono::Duration::seconds(s);
        let unknown = |attempt, cause, since| UnknownAttempt {
            attempt,
            cause,
            since,
            provider: Some("twilio"),
        };
        let earlier = unknown(1, Ambiguity::Timeout, ago(60));
        let stale = unknown(1, Ambiguity::StaleLease, ago(120));
        let gateway = CallResult::Refused(ProviderError {
            class: retryable(None),
            ambiguous: Some(Ambiguity::Gateway5xx),
            rate_limited: false,
            code: Some("http-502".into()),
            message: "HTTP 502".into(),
        });
        let accepted = CallResult::Accepted {
            provider_message_id: Some("SM2".into()),
        };
        let found = CallResult::Found {
            provider_message_id: Some("SM1".into()),
        };
        let timeout = CallResult::TimedOut(TIMEOUT);
        type Row = (
            &'static str,
            CallResult,
            u32,
            Option<UnknownAttempt>,
            &'static str,
            Option<UnknownAttempt>,
            Option<UnknownAttempt>,
        );
        let rows: Vec<Row> = vec![
            (
                "a first timeout is unknown, from the call's start",
                timeout.clone(),
                1,
                None,
                "retry",
                Some(unknown(1, Ambiguity::Timeout, ago(10))),
                None,
            ),
            (
                "a 502 without the provider's body is unknown",
                gateway,
                1,
                None,
                "retry",
                Some(unknown(1, Ambiguity::Gateway5xx, ago(10))),
                None,
            ),
            (
                "a definite retryable failure is not unknown",
                refused(retryable(None), Some("20500")),
                1,
                None,
                "retry",
                None,
                None,
            ),
            (
                "found at the provider: sent, nothing resent, nothing flagged",
                found,
                2,
                Some(earlier),
                "sent",
                None,
                None,
            ),
            (
                "resent and accepted: flagged with the unknown attempt",
                accepted.clone(),
                2,
                Some(earlier),
                "sent",
                None,
                Some(earlier),
            ),
            (
                "resent after a stale claim: flagged as such",
                accepted,
                2,
                Some(stale),
                "sent",
                None,
                Some(stale),
            ),
            (
                "resent and timed out again: the lookup window keeps the first start",
                timeout.clone(),
                2,
                Some(earlier),
                "retry",
                Some(unknown(2, Ambiguity::Timeout, ago(60))),
                Some(earlier),
            ),
            (
                "resent and refused for good: still flagged (the first may have gone)",
                refused(ErrorClass::Permanent, Some("21211")),
                2,
                Some(earlier),
                "failed",
                None,
                Some(earlier),
            ),
            (
                "resent and timed out on the last attempt: one more claim, to ask",
                timeout.clone(),
                3,
                Some(earlier),
                "retry",
                Some(unknown(3, Ambiguity::Timeout, ago(60))),
                Some(earlier),
            ),
            (
                "a definite retryable failure after an unknown attempt carries it on",
                refused(retryable(None), Some("20500")),
                2,
                Some(earlier),
                "retry",
                Some(earlier),
                Some(earlier),
            ),
            (
                "unknown at another provider too: asked at every provider next time",
                timeout.clone(),
                2,
                Some(UnknownAttempt {
                    provider: Some("vonage"),
                    ..earlier
                }),
                "retry",
                Some(UnknownAttempt {
                    provider: None,
                    ..unknown(2, Ambiguity::Timeout, ago(60))
                }),
                Some(UnknownAttempt {
                    provider: Some("vonage"),
                    ..earlier
                }),
            ),
            (
                "a definite failure of the last attempt fails it",
                refused(retryable(None), Some("20500")),
                3,
                Some(earlier),
                "failed",
                None,
                Some(earlier),
            ),
            (
                "no attempt left and the provider cannot tell: failed, nothing resent",
                CallResult::NotResent,
                4,
                Some(earlier),
                "failed",
                None,
                None,
            ),
            (
                "a timeout past the last attempt (a stale claim made it) fails it",
                timeout,
                4,
                Some(stale),
                "failed",
                None,
                Some(stale),
            ),
        ];
        for (name, call, attempt, claimed_unknown, label, retry_unknown, dup) in rows {
            let d = run(&call, attempt, claimed_unknown, 3);
            assert_eq!(d.label, label, "{name}");
            assert_eq!(d.outcome.possible_duplicate(), dup, "{name}");
            let carried = match &d.outcome {
                Outcome::Retry { unknown, .. } => *unknown,
                _ => None,
            };
            assert_eq!(carried, retry_unknown, "{name}");
            if let Outcome::Sent {
                provider_message_id,
                ..
            } = &d.outcome
            {
                assert_eq!(provider_message_id, &d.event.provider_message_id, "{name}");
            }
        }
    }
}
