//! A stored value travels to and from PostgreSQL as the JSON text it already is.
//!
//! Every value the store holds is JSON bytes made by `serde_json`. Going through
//! `serde_json::Value` (parse the bytes into a tree, then print the tree for the wire) cost a
//! quarter of a PostgreSQL replica's CPU at 2,000 agents (`bench/replicas.sh`, perf): the map
//! rewrites each agent's table after every snapshot. The columns are `json` (schema version 2),
//! whose wire format is the text itself; `jsonb`'s (version 1 databases, before migrating) is a
//! version byte, 1, then the text. Either way the bytes go out as they are and come back the
//! same way, and the server still checks them.

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// The only jsonb wire format version there is.
const VERSION: u8 = 1;

/// JSON text to be written into a `jsonb` column (or an element of a `jsonb[]` parameter).
#[derive(Debug)]
pub struct Jsonb<'a>(pub &'a [u8]);

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[VERSION]);
        }
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

/// JSON text read from a `jsonb` (or `json`) column, as the server prints it.
#[derive(Debug)]
pub struct JsonText(pub Vec<u8>);

impl<'a> FromSql<'a> for JsonText {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty != Type::JSONB {
            return Ok(JsonText(raw.to_vec()));
        }
        match raw.split_first() {
            Some((&VERSION, text)) => Ok(JsonText(text.to_vec())),
            Some((version, _)) => {
                Err(format!("jsonb wire format version {version} is not 1").into())
            }
            None => Err("an empty jsonb value (no version byte)".into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonb_is_the_version_byte_then_the_text_both_ways() {
        let mut out = BytesMut::new();
        Jsonb(br#"{"a":1}"#).to_sql(&Type::JSONB, &mut out).unwrap();
        assert_eq!(&out[..], b"\x01{\"a\":1}");
        let back = JsonText::from_sql(&Type::JSONB, &out).unwrap();
        assert_eq!(back.0, br#"{"a":1}"#);

        let mut out = BytesMut::new();
        Jsonb(b"[1]").to_sql(&Type::JSON, &mut out).unwrap();
        assert_eq!(&out[..], b"[1]");
        assert!(!<Jsonb as ToSql>::accepts(&Type::TEXT));
    }

    #[test]
    fn an_unknown_jsonb_version_or_an_empty_value_is_refused_by_name() {
        let e = JsonText::from_sql(&Type::JSONB, b"\x02{}").unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        let e = JsonText::from_sql(&Type::JSONB, b"").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
