//! What of a provider's error text may reach a tenant. Provider answers and transport errors
//! name things that are ours, not the tenant's: the account SID (in Twilio's texts and in
//! the request URL's path), the WhatsApp phone-number id (Meta's "Object with ID '…' does
//! not exist"), our endpoints and the hosts behind them, and, in a URL, credentials. Error
//! texts are stored on records (`lastError`, `errors[]`), indexed for search and shown to
//! tenants, so every provider client passes its errors through [`Scrub`] before they leave
//! it. The code and the provider's wording stay, so the tenant still learns what went wrong.

use actors::domain::ProviderError;

/// The placeholder that replaces every URL in an error text.
pub const ENDPOINT: &str = "<provider endpoint>";

/// One provider client's identifiers and how each is shown instead.
#[derive(Debug, Clone, Default)]
pub struct Scrub {
    known: Vec<(String, &'static str)>,
}

impl Scrub {
    /// `known`: (identifier, placeholder) pairs; empty identifiers are ignored.
    pub fn new<'a>(known: impl IntoIterator<Item = (&'a str, &'static str)>) -> Scrub {
        let mut known: Vec<(String, &'static str)> = known
            .into_iter()
            .filter(|(k, _)| !k.trim().is_empty())
            .map(|(k, p)| (k.to_string(), p))
            .collect();
        // Longest first, so an identifier that holds another is replaced whole.
        known.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        Scrub { known }
    }

    /// `text` with URLs, our identifiers and any Twilio account SID replaced.
    pub fn text(&self, text: &str) -> String {
        let mut out = without_urls(text);
        for (k, placeholder) in &self.known {
            out = out.replace(k.as_str(), placeholder);
        }
        without_account_sids(&out)
    }

    pub fn error(&self, mut e: ProviderError) -> ProviderError {
        e.message = self.text(&e.message);
        e
    }
}

/// Every `scheme://…` up to the next space, quote, bracket or comma becomes [`ENDPOINT`].
fn without_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
            .map_or(0, |i| i + 1);
        if scheme_start == at {
            // "://" with no scheme before it: not a URL.
            out.push_str(&rest[..at + 3]);
            rest = &rest[at + 3..];
            continue;
        }
        let after = &rest[at + 3..];
        let end = after
            .find(|c: char| c.is_whitespace() || "\"'<>(),[]{}".contains(c))
            .unwrap_or(after.len());
        out.push_str(&rest[..scheme_start]);
        out.push_str(ENDPOINT);
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Twilio account SIDs (`AC` and 32 hex digits), ours or any other, become `AC…`.
fn without_account_sids(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i + 34 <= b.len() {
        let boundary = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        if boundary
            && &b[i..i + 2] == b"AC"
            && b[i + 2..i + 34].iter().all(u8::is_ascii_hexdigit)
            && b.get(i + 34).is_none_or(|c| !c.is_ascii_alphanumeric())
        {
            out.push_str(&text[copied..i]);
            out.push_str("AC…");
            i += 34;
            copied = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_identifiers_and_account_sids_are_replaced() {
        let s = Scrub::new([
            ("100000000000001", "<phone-number-id>"),
            ("secret-token", "<secret>"),
            ("", "<ignored>"),
        ]);
        let cases = [
            (
                "twilio unreachable: error sending request for url (http://10.0.0.7:8080/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json)",
                "twilio unreachable: error sending request for url (<provider endpoint>)",
            ),
            (
                "(#100) Object with ID '100000000000001' does not exist",
                "(#100) Object with ID '<phone-number-id>' does not exist",
            ),
            (
                "not a valid number for your account AC0123456789abcdef0123456789abcdef.",
                "not a valid number for your account AC….",
            ),
            (
                "smtp://user:pw@mail.internal:587 refused: secret-token",
                "<provider endpoint> refused: <secret>",
            ),
            // Nothing of ours: unchanged.
            (
                "Invalid 'To' Phone Number: +1555 (ACK)",
                "Invalid 'To' Phone Number: +1555 (ACK)",
            ),
            ("a :// b", "a :// b"),
        ];
        for (input, want) in cases {
            assert_eq!(s.text(input), want, "{input}");
        }
    }

    #[test]
    fn the_longer_identifier_wins() {
        let s = Scrub::new([("12", "<short>"), ("1234", "<long>")]);
        assert_eq!(s.text("id 1234"), "id <long>");
    }
}
