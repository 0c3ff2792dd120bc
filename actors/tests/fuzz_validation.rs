//! Property-based fuzzing of request parsing and validation (run briefly in `make test`;
//! longer with `PROPTEST_CASES=100000 cargo test -p actors --test fuzz_validation`).
//! Whatever the body, parsing and validation never panic, and what they accept keeps the
//! channel's rules.

use actors::domain::{is_e164, is_email_address, validate, Channel, RawRequest};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        "\\+[0-9]{0,17}".prop_map(serde_json::Value::from),
        "[a-z.]{0,10}@[a-z]{0,8}\\.[a-z]{0,4}".prop_map(serde_json::Value::from),
        prop_oneof![Just("sms"), Just("email"), Just("whatsapp"), Just("fax")]
            .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("data".to_string()),
                    Just("from".to_string()),
                    Just("to".to_string()),
                    Just("msg".to_string()),
                    Just("subject".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(raw) = serde_json::from_slice::<RawRequest>(&bytes) {
            let _ = validate(&raw);
        }
    }

    #[test]
    fn accepted_requests_keep_the_channel_rules(v in json_value()) {
        let Ok(raw) = serde_json::from_value::<RawRequest>(v) else { return Ok(()) };
        if let Ok(ok) = validate(&raw) {
            prop_assert!(!ok.msg.trim().is_empty());
            prop_assert!(ok.msg.chars().count() <= ok.channel.max_msg_chars());
            match ok.channel {
                Channel::Email => {
                    prop_assert!(is_email_address(&ok.to) && is_email_address(&ok.from));
                }
                Channel::Sms | Channel::Whatsapp => {
                    prop_assert!(is_e164(&ok.to));
                    prop_assert!(ok.subject.is_none());
                }
            }
        }
    }

    #[test]
    fn valid_sms_requests_are_accepted(to in "\\+[1-9][0-9]{6,14}", msg in "[ -~]{1,200}") {
        prop_assume!(!msg.trim().is_empty());
        let raw: RawRequest = serde_json::from_value(serde_json::json!(
            {"type": "sms", "data": {"from": "+15550001111", "to": to, "msg": msg}})).unwrap();
        prop_assert!(validate(&raw).is_ok());
    }
}
