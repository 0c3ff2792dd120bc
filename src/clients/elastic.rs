//! Elasticsearch: index creation with the seed's mappings, and `_bulk` for the LogIndexer.
//! Implements `actors::ports::SearchSink`.

use actors::ports::{BulkAction, BulkOp, Dependency, DependencyError, ItemResult, SearchSink};
use async_trait::async_trait;
use elasticsearch::auth::Credentials;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::{IndicesCreateParts, IndicesExistsParts};
use elasticsearch::{BulkParts, Elasticsearch};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Clone)]
pub struct ElasticSink {
    client: Elasticsearch,
    communications_index: String,
    logs_index: String,
    /// The security audit index, made with the others when set.
    audit_index: Option<String>,
}

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::Elasticsearch, e)
}

/// The seed's `communications` model, plus the status fields the records carry.
pub fn communications_mapping() -> Value {
    json!({"mappings": {"properties": {
        "tenant": {"type": "keyword"},
        "communicationId": {"type": "keyword"},
        "from": {"type": "keyword"},
        "to": {"type": "keyword"},
        "msg": {"type": "text"},
        "status": {"type": "keyword"},
        "type": {"type": "keyword"},
        "stream": {"type": "keyword"},
        "timestamp": {"type": "date"},
        "createdAt": {"type": "date"},
        "updatedAt": {"type": "date"},
        "attempts": {"type": "integer"},
        "provider": {"type": "keyword"},
        "providerMessageId": {"type": "keyword"},
        "batchId": {"type": "keyword"},
        "priority": {"type": "keyword"},
        "lastError": {"type": "text"}
    }}})
}

/// The security audit trail (`actors::audit::AuditEvent::to_doc`): searchable by tenant,
/// kind, key digest and source.
pub fn audit_mapping() -> Value {
    json!({"mappings": {"properties": {
        "timestamp": {"type": "date"},
        "kind": {"type": "keyword"},
        "tenant": {"type": "keyword"},
        "source": {"type": "keyword"},
        "keyDigest": {"type": "keyword"},
        "route": {"type": "keyword"}
    }}})
}

/// The seed's `communication-logs` model, plus attempt and provider details.
pub fn logs_mapping() -> Value {
    json!({"mappings": {"properties": {
        "tenant": {"type": "keyword"},
        "service": {"type": "keyword"},
        "status": {"type": "keyword"},
        "from": {"type": "keyword"},
        "to": {"type": "keyword"},
        "msg": {"type": "text"},
        "error": {"type": "text"},
        "timestamp": {"type": "date"},
        "communicationId": {"type": "keyword"},
        "type": {"type": "keyword"},
        "attempt": {"type": "integer"},
        "createdAt": {"type": "date"},
        "provider": {"type": "keyword"},
        "providerMessageId": {"type": "keyword"},
        "batchId": {"type": "keyword"},
        "cursor": {"type": "keyword"},
        // Zero-padded text (`actors::event_fanout::cursor_seq_text`), ranged and sorted
        // as the number: a keyword costs osmem a quarter of what a long does. Indexes
        // created before map it `long`, which takes the same text.
        "cursorSeq": {"type": "keyword"},
        "priority": {"type": "keyword"}
    }}})
}

/// Read every item of a bulk answer. HTTP 200 with `"errors": true` is common: an item
/// that already exists (409 on create) is done, 429 and 5xx are retried, anything else is
/// refused for good.
pub fn parse_bulk_items(ops: &[BulkOp], body: &Value) -> Vec<ItemResult> {
    let items = body.get("items").and_then(Value::as_array);
    (0..ops.len())
        .map(|i| {
            let Some(item) = items.and_then(|a| a.get(i)).and_then(Value::as_object) else {
                return ItemResult::Retry("missing from the bulk answer".into());
            };
            let Some(inner) = item.values().next() else {
                return ItemResult::Retry("empty bulk item".into());
            };
            let status = inner.get("status").and_then(Value::as_u64).unwrap_or(0);
            item_result(&ops[i].action, status, inner.get("error"))
        })
        .collect()
}

/// One item's outcome, from its status and error.
fn item_result(action: &BulkAction, status: u64, error: Option<&Value>) -> ItemResult {
    let reason = || {
        error
            .map(|e| match e.get("reason").and_then(Value::as_str) {
                Some(r) => format!("{status} {r}"),
                None => format!("{status} {e}"),
            })
            .unwrap_or_else(|| status.to_string())
    };
    match status {
        200..=299 => ItemResult::Done,
        // Exists already (create), or a newer version is stored (versioned index).
        409 if matches!(
            action,
            BulkAction::Create | BulkAction::IndexVersioned { .. }
        ) =>
        {
            ItemResult::Done
        }
        409 | 429 | 500..=599 => ItemResult::Retry(reason()),
        _ => ItemResult::Rejected(reason()),
    }
}

/// A bulk answer read only as far as its items' outcomes, without a `serde_json::Value`
/// tree for the rest (`_index`, `_id`, `_version`, `_shards` ... of every item are skipped).
#[derive(Deserialize)]
struct BulkAnswer {
    #[serde(default)]
    items: Vec<BulkItem>,
}

/// `{"create": {...}}`, `{"index": {...}}` or `{"update": {...}}`.
#[derive(Deserialize)]
struct BulkItem {
    #[serde(alias = "index", alias = "update", alias = "delete")]
    create: Option<ItemOutcome>,
}

#[derive(Deserialize)]
struct ItemOutcome {
    #[serde(default)]
    status: u64,
    #[serde(default)]
    error: Option<Value>,
}

/// Read a bulk answer's text: the items' outcomes in the typed form; an answer of any
/// other shape item by item as a `serde_json::Value` ([`parse_bulk_items`]), as before.
pub fn read_bulk_answer(ops: &[BulkOp], text: &[u8]) -> Result<Vec<ItemResult>, serde_json::Error> {
    let Ok(answer) = serde_json::from_slice::<BulkAnswer>(text) else {
        return Ok(parse_bulk_items(ops, &serde_json::from_slice(text)?));
    };
    Ok(ops
        .iter()
        .enumerate()
        .map(|(i, op)| match answer.items.get(i) {
            None => ItemResult::Retry("missing from the bulk answer".into()),
            Some(BulkItem { create: None }) => ItemResult::Retry("empty bulk item".into()),
            Some(BulkItem {
                create: Some(outcome),
            }) => item_result(&op.action, outcome.status, outcome.error.as_ref()),
        })
        .collect())
}

/// The action line of one bulk operation: `{"<verb>": {"_index": .., "_id": .., ...}}`.
#[derive(Serialize)]
struct ActionMeta<'a> {
    #[serde(rename = "_index")]
    index: &'a str,
    #[serde(rename = "_id")]
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_on_conflict: Option<u32>,
}

/// The NDJSON body of one bulk request, written into one buffer: each operation's action
/// line, then its document's text as it was serialised when the operation was made.
pub fn bulk_body(ops: &[BulkOp]) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|op| op.doc.as_str().len() + op.index.len() + op.id.len() + 96)
        .sum();
    let mut body = Vec::with_capacity(size);
    for op in ops {
        let mut meta = ActionMeta {
            index: &op.index,
            id: &op.id,
            version: None,
            version_type: None,
            retry_on_conflict: None,
        };
        let verb = match &op.action {
            BulkAction::Create => "create",
            BulkAction::IndexVersioned { version } => {
                (meta.version, meta.version_type) = (Some(*version), Some("external"));
                "index"
            }
            BulkAction::IndexAtLeast { version } => {
                (meta.version, meta.version_type) = (Some(*version), Some("external_gte"));
                "index"
            }
            BulkAction::Update { .. } => {
                meta.retry_on_conflict = Some(3);
                "update"
            }
        };
        body.extend_from_slice(b"{\"");
        body.extend_from_slice(verb.as_bytes());
        body.extend_from_slice(b"\":");
        // Into a Vec: writing cannot fail, and these structs always serialise.
        let _ = serde_json::to_writer(&mut body, &meta);
        body.extend_from_slice(b"}\n");
        if let BulkAction::Update { upsert } = &op.action {
            body.extend_from_slice(b"{\"doc\":");
            body.extend_from_slice(op.doc.as_str().as_bytes());
            body.extend_from_slice(b",\"upsert\":");
            let _ = serde_json::to_writer(&mut body, upsert);
            body.push(b'}');
        } else {
            body.extend_from_slice(op.doc.as_str().as_bytes());
        }
        body.push(b'\n');
    }
    body
}

/// How to reach the cluster: credentials and certificate (from the environment only), and
/// how long a request may take.
#[derive(Debug, Clone, Default)]
pub struct ElasticAccess {
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// `id:api_key`, or the base64 `encoded` form Elasticsearch hands out.
    pub api_key: Option<SecretString>,
    /// PEM certificate (a CA, or the node's own) to trust for `https://`.
    pub ca_file: Option<String>,
    /// One request, a `_bulk` included (`None`: [`DEFAULT_TIMEOUT`]).
    pub timeout: Option<Duration>,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl ElasticSink {
    pub fn new(
        node: &str,
        access: &ElasticAccess,
        communications_index: &str,
        logs_index: &str,
    ) -> Result<ElasticSink, DependencyError> {
        let url = url::Url::parse(node).map_err(err)?;
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .timeout(access.timeout.unwrap_or(DEFAULT_TIMEOUT));
        if let Some(k) = &access.api_key {
            let k = k.expose_secret();
            builder = builder.auth(match k.split_once(':') {
                Some((id, key)) => Credentials::ApiKey(id.into(), key.into()),
                None => Credentials::EncodedApiKey(k.to_string()),
            });
        } else if let (Some(u), Some(p)) = (&access.user, &access.password) {
            builder = builder.auth(Credentials::Basic(u.clone(), p.expose_secret().to_string()));
        }
        if let Some(path) = &access.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| err(format!("ELASTICSEARCH_CA_FILE {path:?}: {e}")))?;
            let cert = elasticsearch::cert::Certificate::from_pem(&pem).map_err(err)?;
            builder =
                builder.cert_validation(elasticsearch::cert::CertificateValidation::Full(cert));
        }
        let transport = builder.build().map_err(err)?;
        Ok(ElasticSink {
            client: Elasticsearch::new(transport),
            communications_index: communications_index.into(),
            logs_index: logs_index.into(),
            audit_index: None,
        })
    }

    /// Also make (and keep making after a failure) the security audit index.
    pub fn with_audit_index(mut self, name: &str) -> ElasticSink {
        self.audit_index = Some(name.to_string());
        self
    }

    pub fn client(&self) -> &Elasticsearch {
        &self.client
    }

    /// Create an index with its mapping unless it exists.
    pub async fn ensure_index(&self, name: &str, mapping: Value) -> Result<(), DependencyError> {
        let exists = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[name]))
            .send()
            .await
            .map_err(err)?;
        if exists.status_code().is_success() {
            return Ok(());
        }
        let res = self
            .client
            .indices()
            .create(IndicesCreateParts::Index(name))
            .body(mapping)
            .send()
            .await
            .map_err(err)?;
        let code = res.status_code();
        if code.is_success() {
            return Ok(());
        }
        let body = res.text().await.unwrap_or_default();
        if body.contains("resource_already_exists") {
            return Ok(());
        }
        Err(err(format!("creating index {name}: {code} {body}")))
    }
}

#[async_trait]
impl SearchSink for ElasticSink {
    async fn prepare(&self) -> Result<(), DependencyError> {
        self.ensure_index(&self.communications_index, communications_mapping())
            .await?;
        self.ensure_index(&self.logs_index, logs_mapping()).await?;
        if let Some(audit) = &self.audit_index {
            self.ensure_index(audit, audit_mapping()).await?;
        }
        Ok(())
    }

    async fn bulk(&self, ops: &[BulkOp]) -> Result<Vec<ItemResult>, DependencyError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let res = self
            .client
            .bulk(BulkParts::None)
            .body(vec![bytes::Bytes::from(bulk_body(ops))])
            .send()
            .await
            .map_err(err)?;
        let code = res.status_code();
        if !code.is_success() {
            let text = res.text().await.unwrap_or_default();
            return Err(err(format!(
                "bulk answered {code}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let text = res.bytes().await.map_err(err)?;
        read_bulk_answer(ops, &text).map_err(err)
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        let res = self.client.ping().send().await.map_err(err)?;
        if res.status_code().is_success() {
            Ok(())
        } else {
            Err(err(format!("ping answered {}", res.status_code())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(action: BulkAction) -> BulkOp {
        BulkOp {
            index: "i".into(),
            id: "x".into(),
            action,
            doc: json!({}).into(),
        }
    }

    #[test]
    fn mixed_bulk_answers_are_read_item_by_item() {
        let ops = vec![
            op(BulkAction::Create),
            op(BulkAction::Create),
            op(BulkAction::Create),
            op(BulkAction::Create),
            op(BulkAction::Update { upsert: json!({}) }),
        ];
        let body = json!({"errors": true, "items": [
            {"create": {"status": 201}},
            {"create": {"status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "exists"}}},
            {"create": {"status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "busy"}}},
            {"create": {"status": 400, "error": {"type": "mapper_parsing_exception", "reason": "bad field"}}},
            {"update": {"status": 503, "error": {"reason": "unavailable"}}}
        ]});
        let r = parse_bulk_items(&ops, &body);
        assert_eq!(
            read_bulk_answer(&ops, body.to_string().as_bytes()).unwrap(),
            r
        );
        assert_eq!(r[0], ItemResult::Done);
        assert_eq!(r[1], ItemResult::Done);
        assert!(matches!(&r[2], ItemResult::Retry(why) if why.contains("429")));
        assert!(matches!(&r[3], ItemResult::Rejected(why) if why.contains("bad field")));
        assert!(matches!(&r[4], ItemResult::Retry(_)));
    }

    #[test]
    fn missing_items_are_retried_not_dropped() {
        let ops = vec![op(BulkAction::Create), op(BulkAction::Create)];
        let answer = json!({"items": [{"create": {"status": 201}}]});
        let r = parse_bulk_items(&ops, &answer);
        assert_eq!(
            read_bulk_answer(&ops, answer.to_string().as_bytes()).unwrap(),
            r
        );
        assert_eq!(r[0], ItemResult::Done);
        assert!(matches!(r[1], ItemResult::Retry(_)));
    }

    #[test]
    fn only_429_items_are_resent_the_400_is_dead_lettered_the_409_is_done() {
        // Four events, two ops each (log document, then the communications document).
        let ops: Vec<BulkOp> = (0..8)
            .map(|k| BulkOp {
                index: if k % 2 == 0 {
                    "communication-logs"
                } else {
                    "communications"
                }
                .into(),
                id: format!("op{k}"),
                action: BulkAction::Create,
                doc: json!({}).into(),
            })
            .collect();
        let owner: Vec<usize> = (0..8).map(|k| k / 2).collect();
        let status = [201, 201, 409, 201, 429, 201, 400, 201];
        let answer = json!({"errors": true, "items": status.iter().map(|s| {
            let mut item = json!({"status": s});
            if *s >= 400 { item["error"] = json!({"type": "x", "reason": format!("status {s}")}); }
            json!({"create": item})
        }).collect::<Vec<_>>()});
        let results = parse_bulk_items(&ops, &answer);
        assert_eq!(
            read_bulk_answer(&ops, answer.to_string().as_bytes()).unwrap(),
            results
        );
        let (retry, dead) = actors::log_indexer::settle(&ops, &owner, &results, 4);
        assert!(retry[0].is_empty() && retry[1].is_empty() && retry[3].is_empty());
        assert_eq!(
            retry[2].iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
            ["op4"]
        );
        assert_eq!(dead[0], None);
        assert_eq!(dead[1], None, "409 on create counts as done");
        assert_eq!(dead[2], None);
        assert!(dead[3].as_deref().unwrap().contains("400"));
    }

    /// The lines `bulk_body` wrote before it wrote one buffer: a `serde_json::Value` per
    /// action line and per document.
    fn value_tree_lines(ops: &[BulkOp]) -> Vec<Value> {
        let mut lines = Vec::new();
        for op in ops {
            let doc = op.doc.value();
            match &op.action {
                BulkAction::Create => {
                    lines.push(json!({"create": {"_index": op.index, "_id": op.id}}));
                    lines.push(doc);
                }
                BulkAction::IndexVersioned { version } => {
                    lines.push(json!({"index": {"_index": op.index, "_id": op.id,
                        "version": version, "version_type": "external"}}));
                    lines.push(doc);
                }
                BulkAction::IndexAtLeast { version } => {
                    lines.push(json!({"index": {"_index": op.index, "_id": op.id,
                        "version": version, "version_type": "external_gte"}}));
                    lines.push(doc);
                }
                BulkAction::Update { upsert } => {
                    lines.push(json!({"update": {"_index": op.index, "_id": op.id,
                        "retry_on_conflict": 3}}));
                    lines.push(json!({"doc": doc, "upsert": upsert}));
                }
            }
        }
        lines
    }

    #[test]
    fn the_bulk_body_is_the_ndjson_the_value_trees_made() {
        let ev = actors::domain::LogEvent {
            tenant: "t".into(),
            service: "sender".into(),
            status: actors::domain::EventStatus::Sent,
            from: "+15550001111".into(),
            to: "+15557654321".into(),
            msg: "a \"quoted\"\nbody – ü \\".into(),
            error: Some("e".into()),
            communication_id: "65f000000000000000000001".into(),
            timestamp: chrono::Utc::now(),
            channel: actors::domain::Channel::Sms,
            attempt: 1,
            created_at: chrono::Utc::now(),
            provider: Some("twilio".into()),
            provider_message_id: Some("SM1".into()),
            batch_id: Some("65f0000000000000000000aa".into()),
            cursor: None,
            priority: Some(actors::domain::Priority::Bulk),
            msg_omitted: false,
        };
        let mut ops = actors::log_indexer::ops_for(&ev, "communication-logs", "communications");
        ops.push(BulkOp {
            action: BulkAction::IndexAtLeast { version: 7 },
            ..ops[1].clone()
        });
        ops.push(BulkOp {
            action: BulkAction::Update {
                upsert: json!({"a": [1, "x\"y"]}),
            },
            ..ops[0].clone()
        });
        ops.push(op(BulkAction::Create));
        let body = bulk_body(&ops);
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, value_tree_lines(&ops));
    }

    #[test]
    fn an_answer_of_another_shape_is_read_item_by_item_as_before() {
        let ops = vec![
            op(BulkAction::Create),
            op(BulkAction::Create),
            op(BulkAction::Create),
        ];
        // A status that is not a number, and an item that is not an object.
        let answer =
            json!({"items": [{"create": {"status": "201"}}, 5, {"index": {"status": 201}}]});
        let r = read_bulk_answer(&ops, answer.to_string().as_bytes()).unwrap();
        assert_eq!(r, parse_bulk_items(&ops, &answer));
        assert!(matches!(&r[1], ItemResult::Retry(_)));
        assert_eq!(r[2], ItemResult::Done);
        assert!(read_bulk_answer(&ops, b"not json").is_err());
    }
}
