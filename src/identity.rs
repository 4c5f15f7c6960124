//! Who is on the other end of a connection. Identity lives in the certificate's URI SAN
//! (`tapgraph://agent/<id>`, `tapgraph://operator/<name>`, `tapgraph://controller`) and is read only
//! from a certificate the TLS layer has already verified.

use std::fmt;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub const URI_PREFIX: &str = "tapgraph://";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Agent(String),
    Operator(String),
    Controller,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("certificate has no tapgraph identity (a URI SAN starting with {URI_PREFIX})")]
    Missing,
    #[error("certificate has {0} tapgraph identities; exactly one is allowed")]
    Ambiguous(usize),
    #[error("`{0}` is not a tapgraph identity URI")]
    BadUri(String),
    #[error(
        "invalid {kind} name `{name}`: use 1 to 64 characters from a-z, A-Z, 0-9, '.', '_' and '-', starting with a letter or digit"
    )]
    BadName { kind: &'static str, name: String },
}

/// Checks an agent id or operator name: it appears in URIs, file names and graph keys.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), IdentityError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName {
            kind,
            name: name.to_string(),
        })
    }
}

impl Identity {
    pub fn agent(id: &str) -> Result<Self, IdentityError> {
        validate_name("agent", id)?;
        Ok(Self::Agent(id.to_string()))
    }

    pub fn operator(name: &str) -> Result<Self, IdentityError> {
        validate_name("operator", name)?;
        Ok(Self::Operator(name.to_string()))
    }

    pub fn uri(&self) -> String {
        match self {
            Self::Agent(id) => format!("{URI_PREFIX}agent/{id}"),
            Self::Operator(name) => format!("{URI_PREFIX}operator/{name}"),
            Self::Controller => format!("{URI_PREFIX}controller"),
        }
    }

    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| IdentityError::BadUri(uri.to_string()))?;
        match rest.split_once('/') {
            Some(("agent", id)) => Self::agent(id),
            Some(("operator", name)) => Self::operator(name),
            None if rest == "controller" => Ok(Self::Controller),
            _ => Err(IdentityError::BadUri(uri.to_string())),
        }
    }

    /// Reads the identity from a DER certificate. Exactly one tapgraph URI SAN must be present.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::Missing),
            [one] => Self::from_uri(one),
            many => Err(IdentityError::Ambiguous(many.len())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(id) => write!(f, "agent {id}"),
            Self::Operator(name) => write!(f, "operator {name}"),
            Self::Controller => f.write_str("controller"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        for id in [
            Identity::agent("web-01.prod").unwrap(),
            Identity::operator("alice").unwrap(),
            Identity::Controller,
        ] {
            assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn refuses_bad_names_and_uris() {
        for bad in ["", "-x", "a/b", "x y", "é", &"a".repeat(65)] {
            assert!(Identity::agent(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Identity::from_uri("spiffe://agent/x").is_err());
        assert!(Identity::from_uri("tapgraph://admin/x").is_err());
        assert!(Identity::from_uri("tapgraph://agent/../etc").is_err());
    }
}
