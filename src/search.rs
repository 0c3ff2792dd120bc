//! Search over the `communications` index, behind `GET /api/v1/communications`
//! (`http/search.rs`): the parameters read from a query string, the Elasticsearch query
//! they make, and the answer. Elasticsearch serves it (MongoDB stays the source of truth
//! for one record: `GET /communication/{id}`).
//!
//! Parameters: `q` (full text over the message), `type`, `status`, `to`, `from`,
//! `since` / `until` (RFC 3339, on `createdAt`), `batchId` (a bulk send's), `priority` (the lane), `page` (from 1), `size` (1-100). Newest
//! first. The answer carries the page and the counts per status and per channel of
//! everything that matched.

use actors::domain::{Channel, Status};
use elasticsearch::{Elasticsearch, SearchParts};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Default, Clone, Deserialize)]
pub struct SearchParams {
    pub q: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub status: Option<String>,
    pub to: Option<String>,
    pub from: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    #[serde(rename = "batchId")]
    pub batch_id: Option<String>,
    pub priority: Option<String>,
    pub page: Option<u32>,
    pub size: Option<u32>,
}

/// A query string that does not read as search parameters; the text is what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0} must be a positive integer")]
    NotANumber(String),
    #[error("unknown parameter {0:?}")]
    Unknown(String),
    #[error(transparent)]
    Malformed(#[from] serde_json::Error),
}

impl SearchParams {
    /// A query string (`a=1&b=2`) → parameters; the error names what could not be read.
    pub fn from_query(raw: &str) -> Result<SearchParams, QueryError> {
        let mut map = serde_json::Map::new();
        for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
            let val = match k.as_ref() {
                "page" | "size" => json!(v
                    .parse::<u32>()
                    .map_err(|_| QueryError::NotANumber(k.to_string()))?),
                "q" | "type" | "status" | "to" | "from" | "since" | "until" | "batchId"
                | "priority" => {
                    json!(v)
                }
                other => return Err(QueryError::Unknown(other.to_string())),
            };
            map.insert(k.into_owned(), val);
        }
        Ok(serde_json::from_value(serde_json::Value::Object(map))?)
    }
}

/// A refused parameter: its name and why.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{1}")]
pub struct BadParam(pub &'static str, pub String);

/// Why a search has no answer (the caller answers 503; the text is only logged).
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(transparent)]
    Elasticsearch(#[from] elasticsearch::Error),
    #[error("search answered {0}")]
    Status(elasticsearch::http::StatusCode),
}

fn time(name: &'static str, v: &str) -> Result<String, BadParam> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&chrono::Utc).to_rfc3339())
        .map_err(|_| {
            BadParam(
                name,
                format!("{name} must be an RFC 3339 time, e.g. 2026-11-27T12:00:00Z"),
            )
        })
}

/// The Elasticsearch request body for these parameters.
/// Only `tenant`'s own records ever match.
pub fn build_query(p: &SearchParams, tenant: &str) -> Result<(Value, u32, u32), BadParam> {
    let size = p.size.unwrap_or(20);
    if !(1..=100).contains(&size) {
        return Err(BadParam("size", "size must be between 1 and 100".into()));
    }
    let page = p.page.unwrap_or(1);
    if !(1..=100).contains(&page) {
        return Err(BadParam(
            "page",
            "page must be between 1 and 100 (narrow the search with since/until to go further back)".into(),
        ));
    }
    let mut filter = vec![json!({"term": {"tenant": tenant}})];
    if let Some(t) = &p.kind {
        if Channel::parse(t).is_none() {
            return Err(BadParam(
                "type",
                "type must be one of email, sms, whatsapp".into(),
            ));
        }
        filter.push(json!({"term": {"type": t}}));
    }
    if let Some(s) = &p.status {
        if Status::parse(s).is_none() {
            return Err(BadParam(
                "status",
                "status must be one of scheduled, pending, sending, sent, failed, delivered, undelivered, read, canceled, suppressed".into(),
            ));
        }
        filter.push(json!({"term": {"status": s}}));
    }
    if let Some(v) = &p.to {
        filter.push(json!({"term": {"to": v}}));
    }
    if let Some(v) = &p.from {
        filter.push(json!({"term": {"from": v}}));
    }
    if let Some(v) = &p.batch_id {
        filter.push(json!({"term": {"batchId": v}}));
    }
    if let Some(v) = &p.priority {
        if actors::domain::Priority::parse(v).is_none() {
            return Err(BadParam(
                "priority",
                "priority must be one of high, normal, bulk".into(),
            ));
        }
        filter.push(json!({"term": {"priority": v}}));
    }
    let mut range = serde_json::Map::new();
    if let Some(v) = &p.since {
        range.insert("gte".into(), json!(time("since", v)?));
    }
    if let Some(v) = &p.until {
        range.insert("lte".into(), json!(time("until", v)?));
    }
    if !range.is_empty() {
        filter.push(json!({"range": {"createdAt": range}}));
    }
    let must = match p.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        Some(q) => vec![json!({"match": {"msg": {"query": q, "operator": "and"}}})],
        None => vec![json!({"match_all": {}})],
    };
    let body = json!({
        "query": {"bool": {"must": must, "filter": filter}},
        "sort": [{"createdAt": {"order": "desc"}}],
        "from": (page - 1) * size,
        "size": size,
        "track_total_hits": true,
        "aggs": {
            "byStatus": {"terms": {"field": "status", "size": 20}},
            "byType": {"terms": {"field": "type", "size": 10}},
        },
    });
    Ok((body, page, size))
}

fn buckets(v: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for b in v["buckets"].as_array().into_iter().flatten() {
        if let (Some(k), Some(n)) = (b["key"].as_str(), b["doc_count"].as_u64()) {
            out.insert(k.to_string(), json!(n));
        }
    }
    Value::Object(out)
}

/// A record's document says when it last changed once, in `timestamp` (the seed's field);
/// the answer names that time `updatedAt` too, as `GET /communication/{id}` does. Documents
/// written before kept an `updatedAt` of their own (the same time), left as it is.
fn answer_updated_at(hit: &mut serde_json::Map<String, Value>) {
    if !hit.contains_key("updatedAt") {
        if let Some(t) = hit.get("timestamp").cloned() {
            hit.insert("updatedAt".into(), t);
        }
    }
}

/// Run a search; `Err` is a dependency failure (the caller answers 503).
pub async fn search(
    es: &Elasticsearch,
    index: &str,
    body: Value,
    page: u32,
    size: u32,
) -> Result<Value, SearchError> {
    let res = es
        .search(SearchParts::Index(&[index]))
        .body(body)
        .send()
        .await?;
    let code = res.status_code();
    let v: Value = res.json().await?;
    if code.as_u16() == 404 {
        // No index yet: nothing was indexed.
        return Ok(json!({"total": 0, "page": page, "size": size, "items": [],
                         "counts": {"byStatus": {}, "byType": {}}}));
    }
    if !code.is_success() {
        return Err(SearchError::Status(code));
    }
    let items: Vec<Value> = v["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            let mut s = h["_source"].clone();
            if let Some(o) = s.as_object_mut() {
                o.insert("id".into(), h["_id"].clone());
                o.remove("communicationId");
                answer_updated_at(o);
            }
            s
        })
        .collect();
    Ok(json!({
        "total": v["hits"]["total"]["value"],
        "page": page,
        "size": size,
        "items": items,
        "counts": {
            "byStatus": buckets(&v["aggregations"]["byStatus"]),
            "byType": buckets(&v["aggregations"]["byType"]),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_answers_updated_at_from_its_timestamp() {
        let mut now = json!({"timestamp": "2026-11-29T21:00:00.123Z", "status": "sent"});
        answer_updated_at(now.as_object_mut().unwrap());
        assert_eq!(now["updatedAt"], "2026-11-29T21:00:00.123Z");
        let mut before =
            json!({"timestamp": "2026-11-29T21:00:00Z", "updatedAt": "2026-11-29T21:00:00Z"});
        answer_updated_at(before.as_object_mut().unwrap());
        assert_eq!(before["updatedAt"], "2026-11-29T21:00:00Z");
        let mut neither = json!({"status": "sent"});
        answer_updated_at(neither.as_object_mut().unwrap());
        assert!(neither.get("updatedAt").is_none());
    }

    #[test]
    fn every_filter_lands_in_the_query() {
        let p = SearchParams {
            q: Some("code 4242".into()),
            kind: Some("sms".into()),
            status: Some("failed".into()),
            to: Some("+15557654321".into()),
            from: Some("+15550001111".into()),
            since: Some("2026-11-01T00:00:00Z".into()),
            until: Some("2026-11-30T00:00:00+01:00".into()),
            batch_id: Some("0123456789abcdef01234567".into()),
            priority: Some("bulk".into()),
            page: Some(3),
            size: Some(10),
        };
        let (q, page, size) = build_query(&p, "acme").unwrap();
        assert_eq!((page, size), (3, 10));
        assert_eq!(q["from"], 20);
        let f = q["query"]["bool"]["filter"].to_string();
        for needle in [
            "\"tenant\":\"acme\"",
            "\"type\":\"sms\"",
            "\"status\":\"failed\"",
            "+15557654321",
            "+15550001111",
            "2026-11-29T23:00:00+00:00",
            "\"batchId\":\"0123456789abcdef01234567\"",
            "\"priority\":\"bulk\"",
        ] {
            assert!(f.contains(needle), "{needle} in {f}");
        }
        assert_eq!(
            q["query"]["bool"]["must"][0]["match"]["msg"]["query"],
            "code 4242"
        );
        assert_eq!(q["sort"][0]["createdAt"]["order"], "desc");
    }

    #[test]
    fn bad_parameters_are_named() {
        let bad = |p: SearchParams| build_query(&p, "acme").unwrap_err().0;
        assert_eq!(
            bad(SearchParams {
                kind: Some("fax".into()),
                ..Default::default()
            }),
            "type"
        );
        assert_eq!(
            bad(SearchParams {
                status: Some("lost".into()),
                ..Default::default()
            }),
            "status"
        );
        assert_eq!(
            bad(SearchParams {
                since: Some("yesterday".into()),
                ..Default::default()
            }),
            "since"
        );
        assert_eq!(
            bad(SearchParams {
                size: Some(0),
                ..Default::default()
            }),
            "size"
        );
        assert_eq!(
            bad(SearchParams {
                size: Some(101),
                ..Default::default()
            }),
            "size"
        );
        assert_eq!(
            bad(SearchParams {
                page: Some(0),
                ..Default::default()
            }),
            "page"
        );
        assert_eq!(
            bad(SearchParams {
                page: Some(200),
                size: Some(100),
                ..Default::default()
            }),
            "page"
        );
    }

    #[test]
    fn query_strings_read_as_parameters_or_say_why_not() {
        let p = SearchParams::from_query("q=code+4242&type=sms&page=2").unwrap();
        assert_eq!(
            (p.q.as_deref(), p.kind.as_deref(), p.page),
            (Some("code 4242"), Some("sms"), Some(2))
        );
        let e = |raw: &str| SearchParams::from_query(raw).unwrap_err().to_string();
        assert_eq!(e("size=-1"), "size must be a positive integer");
        assert_eq!(e("colour=red"), "unknown parameter \"colour\"");
    }
}
