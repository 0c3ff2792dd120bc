//! MongoDB's `templates`: one document per tenant and name, `_id: {tenant, name}`, holding
//! `type`, the current `version`, `deleted`, and every version in `versions` (`version`,
//! `body`, `subject?`, `html?`, `locales: {tag: {body, subject?, html?}}`, `createdAt`), so old versions
//! stay readable. A change adds a version only if the document still has the version it
//! read (a compare-and-set), so two concurrent changes cannot both become version n+1.

use crate::templates::{Content, Input, Version};
use actors::domain::Channel;
use actors::ports::{Dependency, DependencyError};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime as BsonDate, Document};
use mongodb::{Collection, Database};
use std::collections::BTreeMap;

pub const COLLECTION: &str = "templates";

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

/// A template as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: String,
    pub channel: Channel,
    pub version: u32,
    pub deleted: bool,
    pub versions: Vec<Version>,
}

impl Template {
    /// Version `n`, or the current one.
    pub fn at(&self, n: Option<u32>) -> Option<&Version> {
        let n = n.unwrap_or(self.version);
        self.versions.iter().find(|v| v.version == n)
    }
}

/// What became of a create or a change.
#[derive(Debug)]
pub enum Write {
    Done(Template),
    /// Create: the name is taken. Change: no such template.
    Refused,
    /// Change: another change came first.
    Raced,
}

fn content_doc(c: &Content) -> Document {
    let mut d = doc! {"body": &c.body};
    if let Some(s) = &c.subject {
        d.insert("subject", s);
    }
    if let Some(h) = &c.html {
        d.insert("html", h);
    }
    d
}

fn version_doc(n: u32, input: &Input, at: DateTime<Utc>) -> Document {
    let mut d = content_doc(&input.content);
    d.insert("version", n as i64);
    let locales: Document = input
        .locales
        .iter()
        .map(|(tag, c)| (tag.clone(), Bson::Document(content_doc(c))))
        .collect();
    d.insert("locales", locales);
    d.insert("createdAt", BsonDate::from_millis(at.timestamp_millis()));
    d
}

fn content_from(d: &Document) -> Option<Content> {
    Some(Content {
        body: d.get_str("body").ok()?.to_string(),
        subject: d.get_str("subject").ok().map(str::to_string),
        html: d.get_str("html").ok().map(str::to_string),
    })
}

fn version_from(d: &Document) -> Option<Version> {
    let locales: BTreeMap<String, Content> = d
        .get_document("locales")
        .map(|l| {
            l.iter()
                .filter_map(|(k, v)| Some((k.clone(), content_from(v.as_document()?)?)))
                .collect()
        })
        .unwrap_or_default();
    Some(Version {
        version: d.get_i64("version").ok()? as u32,
        content: content_from(d)?,
        locales,
        created_at: d.get_datetime("createdAt").ok()?.to_chrono(),
    })
}

fn template_from(d: &Document) -> Option<Template> {
    Some(Template {
        name: d.get_str("name").ok()?.to_string(),
        channel: Channel::parse(d.get_str("type").ok()?)?,
        version: d.get_i64("version").ok()? as u32,
        deleted: d.get_bool("deleted").unwrap_or(false),
        versions: d
            .get_array("versions")
            .ok()?
            .iter()
            .filter_map(|v| version_from(v.as_document()?))
            .collect(),
    })
}

pub struct MongoTemplates {
    coll: Collection<Document>,
}

impl MongoTemplates {
    /// Over `db`, with its client's write concern (`w: majority, j: true`).
    pub fn new(db: &Database) -> MongoTemplates {
        MongoTemplates {
            coll: db.collection(COLLECTION),
        }
    }

    fn key(tenant: &str, name: &str) -> Document {
        doc! {"tenant": tenant, "name": name}
    }

    pub async fn get(&self, tenant: &str, name: &str) -> Result<Option<Template>, DependencyError> {
        let d = self
            .coll
            .find_one(doc! {"_id": Self::key(tenant, name)})
            .await
            .map_err(err)?;
        Ok(d.as_ref().and_then(template_from))
    }

    /// The tenant's templates (not deleted), by name.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Template>, DependencyError> {
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"_id.tenant": tenant, "deleted": false})
            .sort(doc! {"name": 1})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok(docs.iter().filter_map(template_from).collect())
    }

    /// Version 1 of a new template; a deleted one of the same name comes back as its next
    /// version (its old versions stay).
    pub async fn create(
        &self,
        tenant: &str,
        name: &str,
        channel: Channel,
        input: &Input,
    ) -> Result<Write, DependencyError> {
        match self.get(tenant, name).await? {
            Some(t) if !t.deleted => Ok(Write::Refused),
            Some(t) if t.channel != channel => Ok(Write::Refused),
            Some(t) => self.add_version(tenant, &t, input, true).await,
            None => {
                let now = Utc::now();
                let d = doc! {
                    "_id": Self::key(tenant, name), "tenant": tenant, "name": name,
                    "type": channel.as_str(), "version": 1_i64, "deleted": false,
                    "versions": [version_doc(1, input, now)],
                };
                match self.coll.insert_one(d).await {
                    Ok(_) => Ok(self
                        .get(tenant, name)
                        .await?
                        .map_or(Write::Raced, Write::Done)),
                    Err(e) if is_duplicate(&e) => Ok(Write::Refused),
                    Err(e) => Err(err(e)),
                }
            }
        }
    }

    /// The next version of a template that is not deleted.
    pub async fn change(
        &self,
        tenant: &str,
        name: &str,
        input: &Input,
    ) -> Result<Write, DependencyError> {
        match self.get(tenant, name).await? {
            Some(t) if !t.deleted => self.add_version(tenant, &t, input, false).await,
            _ => Ok(Write::Refused),
        }
    }

    async fn add_version(
        &self,
        tenant: &str,
        t: &Template,
        input: &Input,
        revive: bool,
    ) -> Result<Write, DependencyError> {
        let next = t.version + 1;
        let r = self
            .coll
            .update_one(
                doc! {"_id": Self::key(tenant, &t.name), "version": t.version as i64, "deleted": revive},
                doc! {"$set": {"version": next as i64, "deleted": false},
                      "$push": {"versions": version_doc(next, input, Utc::now())}},
            )
            .await
            .map_err(err)?;
        if r.matched_count == 0 {
            return Ok(Write::Raced);
        }
        Ok(self
            .get(tenant, &t.name)
            .await?
            .map_or(Write::Raced, Write::Done))
    }

    /// Whether there was a template to delete. Its versions are kept: creating the name
    /// again continues them.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<bool, DependencyError> {
        let r = self
            .coll
            .update_one(
                doc! {"_id": Self::key(tenant, name), "deleted": false},
                doc! {"$set": {"deleted": true}},
            )
            .await
            .map_err(err)?;
        Ok(r.matched_count == 1)
    }
}

pub(crate) fn is_duplicate(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}
