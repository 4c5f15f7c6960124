//! Layered configuration for the daemons: defaults < TOML file < `TAPGRAPH_*` environment < flags.
//!
//! Values are read key by key through [`Layered`], which records every problem (naming the key) and
//! reports them all together, so an operator fixes a bad file in one pass. Unknown keys in the file
//! are errors: a typo must not silently fall back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::units;

/// `EX_CONFIG` from sysexits.h: the exit status of a daemon refusing its configuration.
pub const EX_CONFIG: i32 = 78;

/// Prefix of the environment variables read; `__` separates key levels:
/// `TAPGRAPH_TLS__CERT` is `tls.cert`, `TAPGRAPH_LOG__FORMAT` is `log.format`.
pub const ENV_PREFIX: &str = "TAPGRAPH";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub reason: String,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.0 {
            write!(f, "\n  {}: {}", issue.key, issue.reason)?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    /// Whether some problem names `key`.
    pub fn mentions(&self, key: &str) -> bool {
        self.0.iter().any(|i| i.key == key)
    }
}

/// Where configuration comes from. Tests build this from values; daemons from the process.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// Environment variables (only those starting with `TAPGRAPH_` are read).
    pub env: config::Map<String, String>,
    /// Flag values, as `(dotted.key, value)`.
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// The process environment, a config file if given, and flag overrides.
    pub fn from_process(file: Option<PathBuf>, overrides: Vec<(String, String)>) -> Self {
        let env = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Self {
            file,
            env,
            overrides,
        }
    }
}

/// The flags an operator gave, as overrides: `(key, value)` for each `Some`.
pub fn flag_overrides(flags: &[(&str, &Option<String>)]) -> Vec<(String, String)> {
    flags
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect()
}

/// A loaded configuration, read key by key; problems accumulate until [`Layered::finish`].
pub struct Layered {
    cfg: config::Config,
    issues: Vec<ConfigIssue>,
}

fn flatten(prefix: &str, value: &config::Value, out: &mut Vec<String>) {
    match &value.kind {
        config::ValueKind::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn file_source(path: &Path) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::from(path)
        .format(config::FileFormat::Toml)
        .required(true)
}

impl Layered {
    /// Loads `sources`; `known` lists every valid dotted key, used to refuse unknown keys in the file.
    pub fn load(sources: &Sources, known: &[&str]) -> Result<Self, ConfigErrors> {
        let mut issues = Vec::new();
        let mut builder = config::Config::builder();
        if let Some(path) = &sources.file {
            let key = format!("config file {}", path.display());
            if !path.exists() {
                return Err(ConfigErrors(vec![ConfigIssue {
                    key,
                    reason: "no such file".into(),
                }]));
            }
            match config::Config::builder()
                .add_source(file_source(path))
                .build()
            {
                Ok(file_only) => {
                    let mut keys = Vec::new();
                    let table = file_only
                        .try_deserialize::<config::Map<String, config::Value>>()
                        .unwrap_or_default();
                    let root = config::Value::new(None, config::ValueKind::Table(table));
                    flatten("", &root, &mut keys);
                    keys.sort();
                    for k in keys.into_iter().filter(|k| !known.contains(&k.as_str())) {
                        issues.push(ConfigIssue {
                            key: k,
                            reason: format!("unknown key in {}", path.display()),
                        });
                    }
                }
                Err(e) => {
                    return Err(ConfigErrors(vec![ConfigIssue {
                        key,
                        reason: e.to_string(),
                    }]));
                }
            }
            builder = builder.add_source(file_source(path));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(sources.env.clone())),
        );
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| {
                    ConfigErrors(vec![ConfigIssue {
                        key: key.clone(),
                        reason: e.to_string(),
                    }])
                })?;
        }
        let cfg = builder.build().map_err(|e| {
            ConfigErrors(vec![ConfigIssue {
                key: "configuration".into(),
                reason: e.to_string(),
            }])
        })?;
        Ok(Self { cfg, issues })
    }

    /// Records a problem with `key`.
    pub fn fail(&mut self, key: &str, reason: impl fmt::Display) {
        self.issues.push(ConfigIssue {
            key: key.to_string(),
            reason: reason.to_string(),
        });
    }

    /// The raw text of `key`, if set in any layer.
    pub fn raw(&mut self, key: &str) -> Option<String> {
        match self.cfg.get_string(key) {
            Ok(s) => Some(s),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(e) => {
                self.fail(key, e);
                None
            }
        }
    }

    /// `key` parsed by `parse`, or `default` when unset. A parse failure is recorded and the
    /// default returned, so reading goes on and every problem is reported.
    pub fn parse<T, E: fmt::Display>(
        &mut self,
        key: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> T {
        match self.raw(key) {
            None => default,
            Some(text) => match parse(text.trim()) {
                Ok(v) => v,
                Err(e) => {
                    self.fail(key, e);
                    default
                }
            },
        }
    }

    pub fn string(&mut self, key: &str, default: &str) -> String {
        self.raw(key).unwrap_or_else(|| default.to_string())
    }

    pub fn opt_string(&mut self, key: &str) -> Option<String> {
        self.raw(key).filter(|s| !s.is_empty())
    }

    pub fn path(&mut self, key: &str) -> Option<PathBuf> {
        self.opt_string(key).map(PathBuf::from)
    }

    /// A number (or any `FromStr` value) with the parser's reason on failure.
    pub fn value<T: FromStr>(&mut self, key: &str, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        self.parse(key, default, |s| {
            s.parse::<T>().map_err(|e| {
                let reason = e.to_string();
                // Our own parsers quote the input already; std's do not.
                if reason.contains(s) {
                    reason
                } else {
                    format!("`{s}`: {reason}")
                }
            })
        })
    }

    /// A number (or any ordered `FromStr` value) within `range`.
    pub fn ranged<T>(&mut self, key: &str, default: T, range: std::ops::RangeInclusive<T>) -> T
    where
        T: FromStr + PartialOrd + fmt::Display,
        T::Err: fmt::Display,
    {
        let v = self.value(key, default);
        if !range.contains(&v) {
            self.fail(
                key,
                format!("{v} is out of range {}..={}", range.start(), range.end()),
            );
        }
        v
    }

    pub fn bool(&mut self, key: &str, default: bool) -> bool {
        self.parse(key, default, |s| match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err(format!("`{s}` is not a boolean (true or false)")),
        })
    }

    /// A duration such as `10s`, bounded by `min..=max`.
    pub fn duration(
        &mut self,
        key: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let d = self.parse(key, default, units::parse_duration);
        if d < min || d > max {
            self.fail(
                key,
                format!(
                    "{} is out of range {}..={}",
                    units::format_duration(d),
                    units::format_duration(min),
                    units::format_duration(max)
                ),
            );
            return default;
        }
        d
    }

    /// A file that must exist.
    pub fn existing_file(&mut self, key: &str) -> Option<PathBuf> {
        let path = self.path(key)?;
        if !path.is_file() {
            self.fail(key, format!("{}: no such file", path.display()));
            return None;
        }
        Some(path)
    }

    /// A file that must exist, with `hint` explaining how to get one when unset.
    pub fn required_file(&mut self, key: &str, hint: &str) -> PathBuf {
        match self.existing_file(key) {
            Some(p) => p,
            None => {
                if self.raw(key).is_none() {
                    self.fail(key, format!("required; {hint}"));
                }
                PathBuf::new()
            }
        }
    }

    /// The value, or every problem recorded while reading it.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.issues.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.issues))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["listen", "log.format", "interval", "flag"];

    fn sources(file: Option<&str>, env: &[(&str, &str)], flags: &[(&str, &str)]) -> Sources {
        let file = file.map(|text| {
            let dir = tempfile::tempdir().unwrap().keep();
            let path = dir.join("c.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        Sources {
            file,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            overrides: flags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn listen(s: &Sources) -> String {
        let mut l = Layered::load(s, KNOWN).unwrap();
        let v = l.string("listen", "default");
        l.finish(v).unwrap()
    }

    #[test]
    fn precedence_is_default_file_env_flag() {
        assert_eq!(listen(&sources(None, &[], &[])), "default");
        assert_eq!(listen(&sources(Some("listen = 'file'"), &[], &[])), "file");
        assert_eq!(
            listen(&sources(
                Some("listen = 'file'"),
                &[("TAPGRAPH_LISTEN", "env")],
                &[]
            )),
            "env"
        );
        assert_eq!(
            listen(&sources(
                Some("listen = 'file'"),
                &[("TAPGRAPH_LISTEN", "env")],
                &[("listen", "flag")]
            )),
            "flag"
        );
    }

    #[test]
    fn nested_keys_come_from_double_underscore() {
        let s = sources(
            Some("[log]\nformat = 'text'"),
            &[("TAPGRAPH_LOG__FORMAT", "json")],
            &[],
        );
        let mut l = Layered::load(&s, KNOWN).unwrap();
        assert_eq!(l.string("log.format", "x"), "json");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let s = sources(
            Some(
                "interval = '10 parsecs'\nflag = 'maybe'\nlisten_typo = 1\n[log]\nformat = 'text'",
            ),
            &[],
            &[],
        );
        let mut l = Layered::load(&s, KNOWN).unwrap();
        let _ = l.duration(
            "interval",
            Duration::from_secs(1),
            Duration::ZERO,
            Duration::MAX,
        );
        let _ = l.bool("flag", false);
        let errors = l.finish(()).unwrap_err();
        assert_eq!(errors.0.len(), 3, "{errors}");
        assert!(errors.mentions("interval"));
        assert!(errors.mentions("flag"));
        assert!(errors.mentions("listen_typo"));
        let text = errors.to_string();
        assert!(text.contains("unknown unit `parsecs`"), "{text}");
        assert!(text.contains("3 problems"), "{text}");
    }

    #[test]
    fn out_of_range_durations_are_refused() {
        let s = sources(None, &[("TAPGRAPH_INTERVAL", "2h")], &[]);
        let mut l = Layered::load(&s, KNOWN).unwrap();
        let d = l.duration(
            "interval",
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        assert_eq!(d, Duration::from_secs(1));
        let e = l.finish(()).unwrap_err();
        assert!(e.to_string().contains("2h is out of range 1s..=1m"), "{e}");
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        let s = sources(None, &[("TAPGRAPH_INTERVAL", "70000")], &[]);
        let mut l = Layered::load(&s, KNOWN).unwrap();
        assert_eq!(l.ranged("interval", 10u32, 1..=65_536), 70_000);
        let e = l.finish(()).unwrap_err();
        assert!(
            e.to_string().contains("70000 is out of range 1..=65536"),
            "{e}"
        );
    }

    #[test]
    fn a_broken_file_is_one_clear_error() {
        let s = sources(Some("listen = "), &[], &[]);
        let e = Layered::load(&s, KNOWN).err().unwrap();
        assert!(e.0[0].key.starts_with("config file"), "{e}");
        let missing = Sources {
            file: Some("/nonexistent/tapgraph.toml".into()),
            ..Sources::default()
        };
        let e = Layered::load(&missing, KNOWN).err().unwrap();
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
