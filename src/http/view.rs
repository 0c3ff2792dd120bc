//! What a tenant sees of a record: an allow-list, not a deny-list. A field added to the
//! MongoDB document or the search document for our own use (claims, hashes, consumer names,
//! routing) reaches no tenant until it is added here and to the README's field list.

use serde_json::Value;

/// The fields of `GET /api/v1/communication/{id}` (README, "GET /api/v1/communication/{id}").
pub const RECORD_FIELDS: &[&str] = &[
    "id",
    "tenant",
    "type",
    "from",
    "to",
    "msg",
    "subject",
    "status",
    "attempts",
    "createdAt",
    "updatedAt",
    "notBefore",
    "sendingAt",
    "sentAt",
    "failedAt",
    "deliveredAt",
    "undeliveredAt",
    "readAt",
    "provider",
    "providerMessageId",
    "lastError",
    "errors",
    "idempotencyKey",
    "possibleDuplicate",
    "possibleDuplicateCause",
    "possibleDuplicateAttempt",
    "unknownAttempt",
    "unknownCause",
    "unknownSince",
    "unknownProvider",
    "fallback",
    "fallbackAt",
    "fallbackId",
    "fallbackOf",
    "fallbackSettledAt",
    "template",
    "batchId",
    "html",
    "sendAt",
    "canceledAt",
    "deadLetterAt",
    "deadLetterReason",
    "replays",
    "replayedAt",
    "priority",
];

/// A search hit has the record's fields plus where and when it was last indexed.
const SEARCH_EXTRA: &[&str] = &["stream", "timestamp"];

/// The fields of each entry of `errors[]`.
const ERROR_FIELDS: &[&str] = &["attempt", "at", "provider", "code", "message"];

fn keep(v: &mut Value, allowed: &[&str]) {
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| allowed.contains(&k.as_str()));
    }
}

/// One record as its tenant may see it.
pub fn record(mut v: Value) -> Value {
    keep(&mut v, RECORD_FIELDS);
    if let Some(errors) = v.get_mut("errors").and_then(Value::as_array_mut) {
        errors.iter_mut().for_each(|e| keep(e, ERROR_FIELDS));
    }
    v
}

/// One search hit as its tenant may see it.
pub fn search_hit(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| RECORD_FIELDS.contains(&k.as_str()) || SEARCH_EXTRA.contains(&k.as_str()));
    }
    v
}

/// A search answer with each of its `items` through [`search_hit`].
pub fn search_answer(mut v: Value) -> Value {
    if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
        for item in items.iter_mut() {
            *item = search_hit(item.take());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_allowed_fields_pass() {
        let v = record(json!({"id": "1", "status": "sent", "sentBy": "host-1",
            "claimedBy": "x", "requestHash": "h", "errors": [{"attempt": 1, "message": "m",
            "internal": true}]}));
        assert_eq!(
            v,
            json!({"id": "1", "status": "sent", "errors": [{"attempt": 1, "message": "m"}]})
        );
        let hit = search_answer(json!({"items": [{"id": "1", "stream": "sms_stream",
            "communicationId": "1", "shard": 3}], "total": 1}));
        assert_eq!(
            hit,
            json!({"items": [{"id": "1", "stream": "sms_stream"}], "total": 1})
        );
    }
}
