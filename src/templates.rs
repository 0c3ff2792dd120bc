//! Message templates (pure): a tenant's named message bodies for one channel, with an email
//! `subject`, locale variants (`en`, `de-CH`, …) and a version that every change increases
//! (old versions stay readable). Rendered by minijinja, strictly: a variable the template
//! uses and the request leaves out is refused naming it, never sent as an empty hole.
//! Templates run with a fuel limit, so one cannot loop a sender's CPU away. An email template
//! may have an `html` body beside its text body: rendered with HTML escaping of every value
//! (`{{ name }}` of `<b>` is `&lt;b&gt;`; `|safe` opts out), sent as the HTML part of a
//! multipart/alternative mail whose text part is the `body`.

use actors::domain::Channel;
use chrono::{DateTime, Utc};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Instructions a render may take (minijinja's fuel): far beyond any message, far below a
/// runaway loop.
const FUEL: u64 = 50_000;
/// The longest template body and name.
pub const MAX_BODY: usize = 60_000;
pub const MAX_NAME: usize = 64;
/// Locale variants a template may have.
pub const MAX_LOCALES: usize = 50;

/// A body, subject and HTML body: the template's own, or one locale's.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub body: String,
    pub subject: Option<String>,
    /// Email only: the HTML part (the `body` is the text part).
    pub html: Option<String>,
}

/// One version of a template.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub version: u32,
    pub content: Content,
    pub locales: BTreeMap<String, Content>,
    pub created_at: DateTime<Utc>,
}

/// What a create or an update asks for: the channel (create only), the default content
/// and the locale variants.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub channel: Option<Channel>,
    pub content: Content,
    pub locales: BTreeMap<String, Content>,
}

/// A message rendered from a template.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub body: String,
    pub subject: Option<String>,
    /// The HTML body, every value escaped.
    pub html: Option<String>,
    /// The variant used: the asked locale, its language, or `None` for the default.
    pub locale: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    /// A field of a template request breaks a rule.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The template does not parse.
    #[error("{field}: the template does not parse: {message}")]
    Syntax { field: String, message: String },
    /// The template uses a variable the request does not give.
    #[error("variables.{0} is required by the template")]
    VariableMissing(String),
    /// Rendering failed for another reason (a filter on the wrong type, fuel spent).
    #[error("the template could not be rendered: {0}")]
    Render(String),
}

fn invalid(field: &str, message: impl Into<String>) -> TemplateError {
    TemplateError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// A template name: 1 to 64 of letters, digits, `_`, `-` and `.`.
pub fn check_name(name: &str) -> Result<(), TemplateError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    ok.then_some(())
        .ok_or_else(|| invalid("name", "name must be 1 to 64 letters, digits, _, - or ."))
}

/// A locale tag: a language of 2 or 3 letters, then optional `-` subtags of letters and
/// digits (BCP 47's shape, e.g. `en`, `de-CH`, `zh-Hant-TW`).
pub fn check_locale(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let lang_ok = parts
        .next()
        .is_some_and(|l| (2..=3).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphabetic()));
    lang_ok
        && tag.len() <= 35
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<String>, TemplateError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(field, format!("{field} must be a string"))),
    }
}

/// `{"body", "subject"?}` at `at` (`""` for the top level, `locales.de` for a variant).
fn content_of(
    obj: &Map<String, Value>,
    at: &str,
    channel: Option<Channel>,
) -> Result<Content, TemplateError> {
    let name = |f: &str| {
        if at.is_empty() {
            f.to_string()
        } else {
            format!("{at}.{f}")
        }
    };
    let body = string_field(obj, "body", &name("body"))?
        .filter(|b| !b.trim().is_empty())
        .ok_or_else(|| invalid(&name("body"), format!("{} is required", name("body"))))?;
    if body.chars().count() > MAX_BODY {
        return Err(invalid(
            &name("body"),
            format!("{} is longer than {MAX_BODY} characters", name("body")),
        ));
    }
    let subject = string_field(obj, "subject", &name("subject"))?;
    if subject.is_some() && channel.is_some_and(|c| c != Channel::Email) {
        return Err(invalid(
            &name("subject"),
            "only email templates have a subject",
        ));
    }
    let html = string_field(obj, "html", &name("html"))?;
    if html.is_some() && channel.is_some_and(|c| c != Channel::Email) {
        return Err(invalid(
            &name("html"),
            "only email templates have an html body",
        ));
    }
    if html.as_ref().is_some_and(|h| h.chars().count() > MAX_BODY) {
        return Err(invalid(
            &name("html"),
            format!("{} is longer than {MAX_BODY} characters", name("html")),
        ));
    }
    let content = Content {
        body,
        subject,
        html,
    };
    check_syntax(&content, at)?;
    Ok(content)
}

/// Read a create (`creating`: `type` required) or update request body.
pub fn parse_input(
    v: &Value,
    creating: bool,
    channel: Option<Channel>,
) -> Result<Input, TemplateError> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("body", "the body must be a JSON object"))?;
    let asked = match obj.get("type") {
        None | Some(Value::Null) if !creating => None,
        Some(Value::String(s)) => Some(
            Channel::parse(s)
                .ok_or_else(|| invalid("type", "type must be one of email, sms, whatsapp"))?,
        ),
        _ => {
            return Err(invalid(
                "type",
                "type is required: one of email, sms, whatsapp",
            ))
        }
    };
    if let (Some(a), Some(c)) = (asked, channel) {
        if a != c {
            return Err(invalid(
                "type",
                format!("this template is for {c}; its type cannot change"),
            ));
        }
    }
    let channel = asked.or(channel);
    let content = content_of(obj, "", channel)?;
    let mut locales = BTreeMap::new();
    match obj.get("locales") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            if m.len() > MAX_LOCALES {
                return Err(invalid("locales", format!("at most {MAX_LOCALES} locales")));
            }
            for (tag, variant) in m {
                let at = format!("locales.{tag}");
                if !check_locale(tag) {
                    return Err(invalid(
                        &at,
                        format!("{tag:?} is not a locale tag such as en or de-CH"),
                    ));
                }
                let variant = variant
                    .as_object()
                    .ok_or_else(|| invalid(&at, format!("{at} must be an object with body")))?;
                locales.insert(tag.clone(), content_of(variant, &at, channel)?);
            }
        }
        Some(_) => {
            return Err(invalid(
                "locales",
                "locales must be an object of locale → {body, subject}",
            ))
        }
    }
    Ok(Input {
        channel: asked,
        content,
        locales,
    })
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    // Text bodies and subjects are sent as they render; only the HTML body escapes.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env
}

/// [`environment`] for HTML bodies: every value HTML-escaped unless marked `|safe`.
fn html_environment() -> Environment<'static> {
    let mut env = environment();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env
}

fn check_syntax(c: &Content, at: &str) -> Result<(), TemplateError> {
    let env = environment();
    let sources = [
        ("body", Some(&c.body)),
        ("subject", c.subject.as_ref()),
        ("html", c.html.as_ref()),
    ];
    for (part, src) in sources {
        let Some(src) = src else { continue };
        if let Err(e) = env.template_from_str(src) {
            let field = if at.is_empty() {
                part.to_string()
            } else {
                format!("{at}.{part}")
            };
            return Err(TemplateError::Syntax {
                field,
                message: e.detail().unwrap_or("invalid syntax").to_string(),
            });
        }
    }
    Ok(())
}

/// The variant for `locale`: the exact tag, else its language alone, else the default.
pub fn choose<'a>(v: &'a Version, locale: Option<&str>) -> (&'a Content, Option<String>) {
    let Some(tag) = locale else {
        return (&v.content, None);
    };
    if let Some(c) = v.locales.get(tag) {
        return (c, Some(tag.to_string()));
    }
    let lang = tag.split('-').next().unwrap_or(tag);
    match v.locales.get(lang) {
        Some(c) => (c, Some(lang.to_string())),
        None => (&v.content, None),
    }
}

fn render_one(
    env: &Environment<'_>,
    src: &str,
    vars: &Map<String, Value>,
) -> Result<String, TemplateError> {
    let t = env
        .template_from_str(src)
        .map_err(|e| TemplateError::Render(e.to_string()))?;
    let mut missing: Vec<String> = t
        .undeclared_variables(false)
        .into_iter()
        .filter(|name| !vars.contains_key(name) && !env.globals().any(|(g, _)| g == name))
        .collect();
    missing.sort();
    if let Some(first) = missing.into_iter().next() {
        return Err(TemplateError::VariableMissing(first));
    }
    t.render(vars).map_err(|e| match e.kind() {
        minijinja::ErrorKind::UndefinedError => {
            TemplateError::Render(format!("a value the template uses is missing: {e}"))
        }
        _ => TemplateError::Render(e.to_string()),
    })
}

/// Render version `v` for `locale` with `vars`: body and subject.
pub fn render(
    v: &Version,
    locale: Option<&str>,
    vars: &Map<String, Value>,
) -> Result<Rendered, TemplateError> {
    let env = environment();
    let (content, used) = choose(v, locale);
    let body = render_one(&env, &content.body, vars)?;
    let subject = match &content.subject {
        Some(s) => Some(render_one(&env, s, vars)?),
        None => None,
    };
    let html = match &content.html {
        Some(h) => Some(render_one(&html_environment(), h, vars)?),
        None => None,
    };
    Ok(Rendered {
        body,
        subject,
        html,
        locale: used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn version(v: Value) -> Version {
        let input = parse_input(&v, true, None).unwrap();
        Version {
            version: 1,
            content: input.content,
            locales: input.locales,
            created_at: Utc::now(),
        }
    }

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn an_html_body_escapes_every_value_and_the_text_body_none() {
        let v = version(
            json!({"type": "email", "body": "Hi {{ name }}", "subject": "For {{ name }}",
            "html": "<p>Hi {{ name }}</p>{{ sig|safe }}",
            "locales": {"de": {"body": "Hallo {{ name }}", "html": "<p>Hallo {{ name }}</p>"}}}),
        );
        let vars = vars(json!({"name": "<b>Ann & Bo</b>", "sig": "<i>us</i>"}));
        let r = render(&v, None, &vars).unwrap();
        assert_eq!(r.body, "Hi <b>Ann & Bo</b>");
        assert_eq!(r.subject.as_deref(), Some("For <b>Ann & Bo</b>"));
        assert_eq!(
            r.html.as_deref(),
            Some("<p>Hi &lt;b&gt;Ann &amp; Bo&lt;&#x2f;b&gt;</p><i>us</i>")
        );
        let de = render(&v, Some("de"), &vars).unwrap();
        assert_eq!(
            de.html.as_deref(),
            Some("<p>Hallo &lt;b&gt;Ann &amp; Bo&lt;&#x2f;b&gt;</p>")
        );
        let sms = parse_input(
            &json!({"type": "sms", "body": "x", "html": "<p>x</p>"}),
            true,
            None,
        );
        assert!(matches!(sms, Err(TemplateError::Invalid { field, .. }) if field == "html"));
        let broken = parse_input(
            &json!({"type": "email", "body": "x", "html": "{{ x"}),
            true,
            None,
        );
        assert!(matches!(broken, Err(TemplateError::Syntax { field, .. }) if field == "html"));
    }

    #[test]
    fn renders_strictly_and_names_a_missing_variable() {
        let v = version(json!({"type": "sms", "body": "Code {{ code }} for {{ user.name }}"}));
        let r = render(
            &v,
            None,
            &vars(json!({"code": "1234", "user": {"name": "Ann"}})),
        )
        .unwrap();
        assert_eq!(r.body, "Code 1234 for Ann");
        assert_eq!(
            render(&v, None, &vars(json!({"user": {"name": "Ann"}}))),
            Err(TemplateError::VariableMissing("code".into()))
        );
        // A nested value missing is refused too, not rendered empty.
        assert!(matches!(
            render(&v, None, &vars(json!({"code": "1", "user": {}}))),
            Err(TemplateError::Render(_))
        ));
    }

    #[test]
    fn the_locale_falls_back_to_its_language_then_the_default() {
        let v = version(
            json!({"type": "email", "body": "Hello {{ n }}", "subject": "Hi",
            "locales": {"de": {"body": "Hallo {{ n }}", "subject": "Grüezi"}, "de-AT": {"body": "Servus {{ n }}"}}}),
        );
        let x = vars(json!({"n": "Jo"}));
        let pick = |l: Option<&str>| {
            let r = render(&v, l, &x).unwrap();
            (r.body, r.subject, r.locale)
        };
        assert_eq!(pick(None), ("Hello Jo".into(), Some("Hi".into()), None));
        assert_eq!(
            pick(Some("de-CH")),
            ("Hallo Jo".into(), Some("Grüezi".into()), Some("de".into()))
        );
        assert_eq!(
            pick(Some("de-AT")),
            ("Servus Jo".into(), None, Some("de-AT".into()))
        );
        assert_eq!(
            pick(Some("fr")),
            ("Hello Jo".into(), Some("Hi".into()), None)
        );
    }

    #[test]
    fn bad_templates_name_the_field() {
        for (body, field) in [
            (json!({"body": "x"}), "type"),
            (json!({"type": "sms"}), "body"),
            (json!({"type": "sms", "body": "{{ open"}), "body"),
            (
                json!({"type": "sms", "body": "x", "subject": "s"}),
                "subject",
            ),
            (
                json!({"type": "email", "body": "x", "locales": {"xx_YY": {"body": "y"}}}),
                "locales.xx_YY",
            ),
            (
                json!({"type": "email", "body": "x", "locales": {"de": {"body": "{% if %}"}}}),
                "locales.de.body",
            ),
        ] {
            let e = parse_input(&body, true, None).unwrap_err();
            let named = match &e {
                TemplateError::Invalid { field, .. } | TemplateError::Syntax { field, .. } => {
                    field.clone()
                }
                other => panic!("{other:?}"),
            };
            assert_eq!(named, field, "{body}");
        }
        assert!(check_name("otp.v2_login-code").is_ok());
        assert!(check_name("with space").is_err() && check_name("").is_err());
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let v = version(
            json!({"type": "sms", "body": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"}),
        );
        assert!(matches!(
            render(&v, None, &Map::new()),
            Err(TemplateError::Render(_))
        ));
    }
}
