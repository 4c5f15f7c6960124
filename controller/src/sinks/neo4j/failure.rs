//! What can go wrong talking to the database, classed by what the sink does next.

use std::time::Duration;

/// What went wrong, as far as what to do next is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// Wrong user or password: retried slowly, reported once.
    Auth(String),
    /// Connection refused, reset, timed out: retried with backoff.
    Unreachable(String),
    /// The server refused a statement or transaction.
    Other(String),
}

impl Failure {
    pub(super) fn of(e: neo4rs::Error) -> Failure {
        let text = e.to_string();
        match e {
            neo4rs::Error::AuthenticationError(_) => Failure::Auth(text),
            neo4rs::Error::Neo4j(ref n) => Failure::of_code(n.code(), text),
            neo4rs::Error::IOError { .. }
            | neo4rs::Error::ConnectionError
            | neo4rs::Error::IncompleteBoltExchange => Failure::Unreachable(text),
            _ => Failure::Other(text),
        }
    }

    /// The server's own error, by its code: Unauthorized, CredentialsExpired,
    /// AuthenticationRateLimit are the credentials; not Forbidden (a user without the rights to
    /// write or to create constraints), which is a refusal like any other code.
    fn of_code(code: &str, text: String) -> Failure {
        if code.starts_with("Neo.ClientError.Security.") && !code.ends_with(".Forbidden") {
            Failure::Auth(text)
        } else {
            Failure::Other(text)
        }
    }

    pub(super) fn text(&self) -> &str {
        match self {
            Failure::Auth(t) | Failure::Unreachable(t) | Failure::Other(t) => t,
        }
    }

    /// The sink's state while this failure lasts, as [`crate::sinks::SinkStats`] names it.
    pub(super) fn state(&self) -> &'static str {
        match self {
            Failure::Auth(_) => "auth_failed",
            Failure::Unreachable(_) => "unreachable",
            Failure::Other(_) => "failing",
        }
    }
}

/// A failure is logged when it is the first, or of another kind than the last one logged; the
/// same failure again on every retry would be a storm.
pub(super) fn worth_reporting(last: Option<&Failure>, new: &Failure) -> bool {
    last.is_none_or(|l| std::mem::discriminant(l) != std::mem::discriminant(new))
}

/// Time limit of one database round trip; a server that hangs counts as unreachable.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// `f`, a call to the database named `what`, within [`STATEMENT_TIMEOUT`], its error classed.
pub(super) async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, neo4rs::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(result) => result.map_err(Failure::of),
        Err(_) => Err(Failure::Unreachable(format!(
            "{what}: no answer in {}s",
            STATEMENT_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_reported_once_until_another_kind_comes() {
        let auth = Failure::Auth("Authentication failed".into());
        let down = Failure::Unreachable("connection refused".into());
        assert!(worth_reporting(None, &auth));
        assert!(!worth_reporting(Some(&auth), &auth));
        assert!(!worth_reporting(
            Some(&down),
            &Failure::Unreachable("connection reset".into())
        ));
        assert!(worth_reporting(Some(&auth), &down));
    }

    #[test]
    fn failures_are_classed_by_what_to_do_next() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases = [
            (
                neo4rs::Error::AuthenticationError("bad password".into()),
                "auth_failed",
            ),
            (neo4rs::Error::IOError { detail: refused }, "unreachable"),
            (neo4rs::Error::ConnectionError, "unreachable"),
            (neo4rs::Error::IncompleteBoltExchange, "unreachable"),
            (neo4rs::Error::InvalidConfig, "failing"),
        ];
        for (error, state) in cases {
            let text = error.to_string();
            let failure = Failure::of(error);
            assert_eq!(failure.state(), state, "{text}");
            assert_eq!(failure.text(), text, "the driver's own words are kept");
        }
    }

    #[test]
    fn security_codes_are_the_credentials_except_forbidden() {
        for code in [
            "Neo.ClientError.Security.Unauthorized",
            "Neo.ClientError.Security.CredentialsExpired",
            "Neo.ClientError.Security.AuthenticationRateLimit",
        ] {
            assert_eq!(
                Failure::of_code(code, code.into()),
                Failure::Auth(code.into())
            );
        }
        for code in [
            "Neo.ClientError.Security.Forbidden",
            "Neo.ClientError.Statement.SyntaxError",
            "Neo.TransientError.Transaction.DeadlockDetected",
        ] {
            assert_eq!(
                Failure::of_code(code, code.into()),
                Failure::Other(code.into())
            );
        }
    }
}
