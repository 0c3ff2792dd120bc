//! `/api/v1/templates`: a tenant's message templates (create, list, read a version, change,
//! delete, preview), and [`render_request`], which turns a request's `data.template` into
//! its `msg` (and email `subject`) before the request is validated.

use crate::auth::{AuthError, Identity};
use crate::clients::templates::{Template, Write};
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{
    at, at_with_param, CHANGE_TEMPLATE, CREATE_TEMPLATE, DELETE_TEMPLATE, GET_TEMPLATE,
    LIST_TEMPLATES, PREVIEW_TEMPLATE,
};
use crate::http::state::{authenticated, authenticated_read, with_state, AppState};
use crate::templates::{self, check_name, parse_input, TemplateError, Version};
use actors::domain::{Channel, RawRequest, ValidationLimits};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

/// Attempts at a change that races another change of the same template.
const CHANGE_TRIES: usize = 3;

/// What a record keeps of the template it was rendered from.
#[derive(Debug, Clone, PartialEq)]
pub struct Used {
    pub name: String,
    pub version: u32,
    pub locale: Option<String>,
    /// The rendered HTML body of an email template that has one.
    pub html: Option<String>,
}

impl Used {
    /// What the record keeps: the template reference, and the HTML body if any.
    pub fn into_record(
        used: Option<Used>,
    ) -> (Option<actors::domain::TemplateRef>, Option<String>) {
        match used {
            Some(u) => {
                let t = actors::domain::TemplateRef {
                    name: u.name,
                    version: u.version,
                    locale: u.locale,
                };
                (Some(t), u.html)
            }
            None => (None, None),
        }
    }
}

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    let create = at(CREATE_TEMPLATE)
        .and(authenticated(state))
        .and(json_body())
        .and(with_state(state))
        .then(create)
        .map(respond);
    let list = at(LIST_TEMPLATES)
        .and(authenticated_read(state))
        .and(with_state(state))
        .then(list)
        .map(respond);
    let get_one = at_with_param(GET_TEMPLATE)
        .and(authenticated_read(state))
        .and(warp::query::<HashMap<String, String>>())
        .and(with_state(state))
        .then(get)
        .map(respond);
    let change = at_with_param(CHANGE_TEMPLATE)
        .and(authenticated(state))
        .and(json_body())
        .and(with_state(state))
        .then(change)
        .map(respond);
    let delete = at_with_param(DELETE_TEMPLATE)
        .and(authenticated(state))
        .and(with_state(state))
        .then(delete)
        .map(respond);
    let preview = at_with_param(PREVIEW_TEMPLATE)
        .and(authenticated(state))
        .and(json_body())
        .and(with_state(state))
        .then(preview)
        .map(respond);
    create
        .or(list)
        .unify()
        .or(get_one)
        .unify()
        .or(change)
        .unify()
        .or(delete)
        .unify()
        .or(preview)
        .unify()
        .boxed()
}

/// The body as JSON (any JSON: the handlers say what shape they want).
pub fn json_body() -> BoxedFilter<(Result<Value, ApiError>,)> {
    limited_body()
        .map(|b: bytes::Bytes| {
            serde_json::from_slice::<Value>(&b)
                .map_err(|e| ApiError::InvalidJson(format!("malformed JSON: {e}")))
        })
        .boxed()
}

fn unavailable(e: actors::ports::DependencyError) -> ApiError {
    tracing::warn!(error = %e, "templates unavailable");
    ApiError::StoreUnavailable
}

/// A template as the API shows it: version `v` of `t`.
fn shown(t: &Template, v: &Version) -> Value {
    let locales: Map<String, Value> = v
        .locales
        .iter()
        .map(|(tag, c)| {
            let shown = json!({"body": c.body, "subject": c.subject, "html": c.html});
            (tag.clone(), shown)
        })
        .collect();
    json!({
        "name": t.name, "type": t.channel.as_str(), "version": v.version,
        "currentVersion": t.version, "deleted": t.deleted,
        "body": v.content.body, "subject": v.content.subject, "html": v.content.html,
        "locales": locales,
        "createdAt": v.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "versions": t.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
    })
}

fn current(t: &Template) -> Value {
    shown(t, t.at(None).expect("the current version is stored"))
}

async fn create(
    who: Result<Identity, AuthError>,
    body: Result<Value, ApiError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let body = body?;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| TemplateError::Invalid {
            field: "name".into(),
            message: "name is required".into(),
        })?
        .to_string();
    check_name(&name)?;
    let input = parse_input(&body, true, None)?;
    let channel = input.channel.expect("a create names its type");
    match state
        .templates
        .create(&who.tenant, &name, channel, &input)
        .await
        .map_err(unavailable)?
    {
        Write::Done(t) => Ok(warp::reply::with_status(
            warp::reply::json(&current(&t)),
            StatusCode::CREATED,
        )
        .into_response()),
        Write::Refused | Write::Raced => Err(ApiError::TemplateExists(name)),
    }
}

async fn list(
    who: Result<Identity, AuthError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let all = state
        .templates
        .list(&who.tenant)
        .await
        .map_err(unavailable)?;
    let items: Vec<Value> = all
        .iter()
        .map(|t| json!({"name": t.name, "type": t.channel.as_str(), "version": t.version}))
        .collect();
    Ok(warp::reply::json(&json!({"templates": items})).into_response())
}

async fn found(state: &AppState, tenant: &str, name: &str) -> Result<Template, ApiError> {
    state
        .templates
        .get(tenant, name)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| ApiError::TemplateNotFound(name.to_string()))
}

/// `?version=n`, or none: the current one.
fn version_asked(v: Option<&Value>) -> Result<Option<u32>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
            .map(|n| Some(n as u32))
            .ok_or_else(|| {
                TemplateError::Invalid {
                    field: "version".into(),
                    message: "version must be a whole number from 1".into(),
                }
                .into()
            }),
    }
}

/// Version `asked` of `t`, or its current one: a version it does not have is a bad
/// request (the template exists), not a missing template.
fn version_of(t: &Template, asked: Option<u32>) -> Result<&Version, ApiError> {
    t.at(asked).ok_or_else(|| {
        TemplateError::Invalid {
            field: "version".into(),
            message: format!("template {:?} has versions 1 to {}", t.name, t.version),
        }
        .into()
    })
}

async fn get(
    name: String,
    who: Result<Identity, AuthError>,
    query: HashMap<String, String>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let asked = version_asked(
        query
            .get("version")
            .map(|v| Value::String(v.clone()))
            .as_ref(),
    )?;
    let t = found(&state, &who.tenant, &name).await?;
    if t.deleted {
        return Err(ApiError::TemplateNotFound(name));
    }
    let v = version_of(&t, asked)?;
    Ok(warp::reply::json(&shown(&t, v)).into_response())
}

async fn change(
    name: String,
    who: Result<Identity, AuthError>,
    body: Result<Value, ApiError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let body = body?;
    for _ in 0..CHANGE_TRIES {
        let t = found(&state, &who.tenant, &name).await?;
        if t.deleted {
            return Err(ApiError::TemplateNotFound(name));
        }
        let input = parse_input(&body, false, Some(t.channel))?;
        match state
            .templates
            .change(&who.tenant, &name, &input)
            .await
            .map_err(unavailable)?
        {
            Write::Done(t) => return Ok(warp::reply::json(&current(&t)).into_response()),
            Write::Refused => return Err(ApiError::TemplateNotFound(name)),
            Write::Raced => continue,
        }
    }
    Err(ApiError::TemplateChanged(name))
}

async fn delete(
    name: String,
    who: Result<Identity, AuthError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    match state
        .templates
        .delete(&who.tenant, &name)
        .await
        .map_err(unavailable)?
    {
        true => Ok(StatusCode::NO_CONTENT.into_response()),
        false => Err(ApiError::TemplateNotFound(name)),
    }
}

/// `variables` of a request: an object, or none.
fn variables(v: Option<&Value>, field: &str) -> Result<Map<String, Value>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(TemplateError::Invalid {
            field: field.into(),
            message: format!("{field} must be an object"),
        }
        .into()),
    }
}

/// `locale` of a request: a tag, or none.
fn locale(v: Option<&Value>, field: &str) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if templates::check_locale(s) => Ok(Some(s.clone())),
        Some(_) => Err(TemplateError::Invalid {
            field: field.into(),
            message: format!("{field} must be a locale tag such as en or de-CH"),
        }
        .into()),
    }
}

/// Version `asked` of `t` rendered; an SMS or WhatsApp body over its channel's limit, or an
/// email body over the configured one, is refused as `msg` would be.
fn render(
    t: &Template,
    asked: Option<u32>,
    locale: Option<&str>,
    vars: &Map<String, Value>,
    limits: &ValidationLimits,
) -> Result<(templates::Rendered, u32), ApiError> {
    let v = version_of(t, asked)?;
    let r = templates::render(v, locale, vars)?;
    let max = limits.max_msg_chars(t.channel);
    if r.body.chars().count() > max {
        return Err(ApiError::Invalid {
            field: "msg",
            message: format!("the rendered message is longer than {max} characters"),
        });
    }
    Ok((r, v.version))
}

async fn preview(
    name: String,
    who: Result<Identity, AuthError>,
    body: Result<Value, ApiError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let body = body?;
    let vars = variables(body.get("variables"), "variables")?;
    let locale = locale(body.get("locale"), "locale")?;
    let asked = version_asked(body.get("version"))?;
    let t = found(&state, &who.tenant, &name).await?;
    if t.deleted {
        return Err(ApiError::TemplateNotFound(name));
    }
    let (r, version) = render(&t, asked, locale.as_deref(), &vars, &state.validation)?;
    Ok(warp::reply::json(&json!({
        "name": t.name, "type": t.channel.as_str(), "version": version,
        "locale": r.locale, "body": r.body, "subject": r.subject, "html": r.html,
    }))
    .into_response())
}

/// A request whose `data.template` names a template: its `msg` (and, for email, its
/// `subject` unless the request gives one) rendered from the template's current version
/// with `data.variables` and `data.locale`. `msg` and `template` together are refused; the
/// template must be of the request's channel.
pub async fn render_request(
    state: &AppState,
    tenant: &str,
    raw: &mut RawRequest,
) -> Result<Option<Used>, ApiError> {
    let Some(named) = request_template(state, tenant, raw).await? else {
        return Ok(None);
    };
    render_with(&named, raw, &state.validation).map(Some)
}

/// The template a request names, read once (a bulk send renders it for every recipient).
pub struct Named {
    name: String,
    template: Template,
}

/// The current template `data.template` names, if it names one, checked against the
/// request (`msg` and `template` together are refused; the channel must match).
pub async fn request_template(
    state: &AppState,
    tenant: &str,
    raw: &RawRequest,
) -> Result<Option<Named>, ApiError> {
    let Some(Value::Object(data)) = raw.data.as_ref() else {
        return Ok(None);
    };
    let name = match data.get("template") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(n)) => n.clone(),
        Some(_) => {
            return Err(TemplateError::Invalid {
                field: "template".into(),
                message: "data.template must be a template name".into(),
            }
            .into())
        }
    };
    if !data.get("msg").is_none_or(Value::is_null) {
        return Err(ApiError::Invalid {
            field: "msg",
            message: "give data.msg or data.template, not both".into(),
        });
    }
    let channel = raw
        .kind
        .as_ref()
        .and_then(Value::as_str)
        .and_then(Channel::parse);
    match found(state, tenant, &name).await {
        Ok(template) if !template.deleted && channel.is_none_or(|c| c == template.channel) => {
            Ok(Some(Named { name, template }))
        }
        Ok(_) | Err(ApiError::TemplateNotFound(_)) => Err(ApiError::Invalid {
            field: "template",
            message: format!("no template {name:?} for this channel"),
        }),
        Err(e) => Err(e),
    }
}

/// `raw`'s `msg` (and `subject`, unless given) rendered from `named` with the request's
/// `data.variables` and `data.locale`.
pub fn render_with(
    named: &Named,
    raw: &mut RawRequest,
    limits: &ValidationLimits,
) -> Result<Used, ApiError> {
    let Some(Value::Object(data)) = raw.data.as_mut() else {
        return Err(ApiError::Invalid {
            field: "data",
            message: "data must be an object".into(),
        });
    };
    let vars = variables(data.get("variables"), "variables")?;
    let locale = locale(data.get("locale"), "locale")?;
    let (r, version) = render(&named.template, None, locale.as_deref(), &vars, limits)?;
    data.insert("msg".into(), Value::String(r.body));
    if let Some(s) = r.subject {
        data.entry("subject").or_insert(Value::String(s));
    }
    Ok(Used {
        name: named.name.clone(),
        version,
        locale: r.locale,
        html: r.html,
    })
}
