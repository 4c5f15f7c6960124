//! The web console: its static files, embedded at build time from `console/dist` (a build without
//! Node embeds none and serves a page that says how to build them); the access tokens that guard
//! it and the read-only API when the HTTP listener is reachable beyond loopback, and the bearer
//! token `/metrics` may require; the rate limit on bad tokens, per source; and the security
//! headers every console and API response carries.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::listener::{HttpSettings, HttpStats, LOG_EVERY, Throttle, source_of};
use crate::enrollment::tokens::{hash, hex, split};
use crate::store::{Batch, Store, StoreError, Table};

const TOKENS: Table = redb::TableDefinition::new("console_tokens");
const PREFIX: &str = "tgc";
const COOKIE: &str = "tapgraph_console";

/// What the console may load: its own scripts, styles and API, nothing inline, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
     connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The built console (`npm run build` in console/); empty when it was not built.
#[derive(rust_embed::Embed)]
#[folder = "../console/dist/"]
#[allow_missing = true]
struct Assets;

/// A console access token as stored: only a hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleToken {
    pub id: String,
    pub secret_sha256: String,
    pub created_by: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub description: String,
}

/// The console's tokens, persisted; cheap to clone. The store is shared by the replicas:
/// [`ConsoleTokens::follow`] reads a token again when another replica creates or revokes it, so a
/// token works on every replica, and a revoked one on none.
#[derive(Clone)]
pub struct ConsoleTokens {
    store: Store,
    tokens: Arc<Mutex<BTreeMap<String, ConsoleToken>>>,
    /// Held from a write or a read of the store until its result is in `tokens`: a token revoked
    /// here is never put back by a read of it that started before the revocation.
    writing: Arc<Mutex<()>>,
}

fn now_ms() -> u64 {
    tapgraph::time::unix_nanos() / 1_000_000
}

impl ConsoleTokens {
    pub fn load(store: Store) -> Result<Self, StoreError> {
        let tokens = read_all(&store)?;
        Ok(Self {
            store,
            tokens: Arc::new(Mutex::new(tokens)),
            writing: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ConsoleToken>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new token valid for `ttl`, and its text (shown once). Expired ones are forgotten here.
    pub fn create(
        &self,
        ttl: Duration,
        description: String,
        created_by: String,
    ) -> Result<(String, ConsoleToken), StoreError> {
        let now = now_ms();
        let id = hex(&rand::random::<[u8; 8]>());
        let secret = hex(&rand::random::<[u8; 16]>());
        let token = ConsoleToken {
            id: id.clone(),
            secret_sha256: hash(&secret),
            created_by,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(ttl.as_millis() as u64),
            description,
        };
        let mut batch = Batch::default();
        batch.put(TOKENS, &id, &token)?;
        let _writing = self.writing();
        let expired: Vec<String> = self
            .lock()
            .values()
            .filter(|t| t.expires_at_ms <= now)
            .map(|t| t.id.clone())
            .collect();
        for old in &expired {
            batch.delete(TOKENS, old);
        }
        self.store.commit(batch)?;
        let mut tokens = self.lock();
        for old in &expired {
            tokens.remove(old);
        }
        tokens.insert(id.clone(), token.clone());
        Ok((format!("{PREFIX}.{id}.{secret}"), token))
    }

    /// Unexpired tokens, by id.
    pub fn list(&self) -> Vec<ConsoleToken> {
        let now = now_ms();
        self.lock()
            .values()
            .filter(|t| t.expires_at_ms > now)
            .cloned()
            .collect()
    }

    /// Forgets token `id`; false when there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let _writing = self.writing();
        // Another replica may have created it a moment ago: the store decides.
        if !self.lock().contains_key(id) && self.store.get::<ConsoleToken>(TOKENS, id)?.is_none() {
            return Ok(false);
        }
        let mut batch = Batch::default();
        batch.delete(TOKENS, id);
        self.store.commit(batch)?;
        self.lock().remove(id);
        Ok(true)
    }

    /// The token `text` is, if it is known and unexpired.
    fn check(&self, text: &str) -> Option<ConsoleToken> {
        let (id, secret) = split(PREFIX, text)?;
        let tokens = self.lock();
        let token = tokens.get(id)?;
        // Hashes of a 128-bit secret are compared: timing reveals nothing usable.
        (token.secret_sha256 == hash(secret) && token.expires_at_ms > now_ms())
            .then(|| token.clone())
    }

    /// Reads a token again whenever another replica creates or revokes it, and every token after
    /// the store may have missed changes, until `stop`. Reads them all once at its start: a
    /// change made between [`ConsoleTokens::load`] and the start is not missed.
    pub async fn follow(self, stop: tokio_util::sync::CancellationToken) {
        use crate::store::Reread;
        let mut changes = self.store.follow(&[TOKENS]);
        self.reread_all();
        loop {
            let reread = tokio::select! {
                _ = stop.cancelled() => return,
                reread = changes.next() => reread,
            };
            match reread {
                Some(Reread::Row { key, .. }) => self.reread(&key),
                Some(Reread::All) => self.reread_all(),
                None => return,
            }
        }
    }

    fn reread(&self, id: &str) {
        let _writing = self.writing();
        match self.store.get::<ConsoleToken>(TOKENS, id) {
            Ok(Some(token)) => {
                self.lock().insert(id.to_string(), token);
            }
            Ok(None) => {
                if self.lock().remove(id).is_some() {
                    tracing::info!(token = id, "console token revoked through another replica");
                }
            }
            // The database is down: the read once it is back (a resync) catches up.
            Err(error) => tracing::warn!(token = id, %error, "cannot read a console token again"),
        }
    }

    fn reread_all(&self) {
        let _writing = self.writing();
        match read_all(&self.store) {
            Ok(tokens) => *self.lock() = tokens,
            Err(error) => tracing::warn!(%error, "cannot read the console tokens again"),
        }
    }
}

/// Every stored token, by id.
fn read_all(store: &Store) -> Result<BTreeMap<String, ConsoleToken>, StoreError> {
    Ok(store
        .load::<ConsoleToken>(TOKENS)?
        .into_iter()
        .map(|t| (t.id.clone(), t))
        .collect())
}

/// Who may see the console, the read-only API and `/metrics`.
#[derive(Clone)]
pub struct Access {
    pub tokens: ConsoleTokens,
    /// A token is required: the listener is reachable beyond loopback, or configuration says so.
    pub required: bool,
    /// The SHA-256 of the bearer token `/metrics` requires (`http.metrics_token_file`), if any.
    pub metrics_token: Option<String>,
    /// Served over HTTPS: the token cookie is marked `Secure`.
    pub secure: bool,
    pub guesses: Guesses,
    pub stats: Arc<HttpStats>,
}

impl Access {
    pub fn new(
        tokens: ConsoleTokens,
        required: bool,
        settings: &HttpSettings,
        stats: Arc<HttpStats>,
    ) -> Self {
        Self {
            tokens,
            required,
            metrics_token: settings.metrics_token.as_ref().map(|t| hash(&t.0)),
            secure: settings.tls.is_some(),
            guesses: Guesses::new(settings.auth_failures_per_minute),
            stats,
        }
    }
}

/// Paths any client may read: probes, and Prometheus unless `/metrics` has its own token.
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// Sources tracked at most. Past it (many sources guessing at once) a new source's bad tokens are
/// not limited, only counted and logged once per interval: refusing every new source would lock
/// out operators with good tokens too.
const MAX_SOURCES: usize = 4096;

/// Bad tokens per source (an IPv4 address, an IPv6 /64): a bucket of `per_minute` failures that
/// refills at that rate. An empty bucket is answered 429 before any token is looked at.
#[derive(Clone)]
pub struct Guesses {
    per_minute: u32,
    buckets: Arc<Mutex<HashMap<IpAddr, (f64, Instant)>>>,
    untracked: Arc<Throttle>,
}

impl Guesses {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Arc::default(),
            untracked: Arc::new(Throttle::new(LOG_EVERY)),
        }
    }

    fn level(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        let refill = now.duration_since(at).as_secs_f64() * f64::from(self.per_minute) / 60.0;
        (tokens + refill).min(f64::from(self.per_minute))
    }

    /// Verifies a token `source` presents with `verify` (synchronous: a hash and a lookup). One
    /// of the source's bad-token allowance is taken before, under the same lock as the look at
    /// its bucket, and given back when the token verifies: however many requests a source sends
    /// at once, no more of its guesses are verified than its bucket holds. An empty bucket is
    /// [`Verdict::Held`] and nothing is verified.
    pub fn attempt<T>(
        &self,
        source: IpAddr,
        now: Instant,
        verify: impl FnOnce() -> Option<T>,
    ) -> Verdict<T> {
        let source = source_of(source);
        let full = f64::from(self.per_minute);
        // `Some(limited)`: taken from a tracked bucket, which a failure leaves empty or not.
        let taken = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            let level = buckets
                .get(&source)
                .map_or(full, |bucket| self.level(*bucket, now));
            if level < 1.0 {
                return Verdict::Held(Duration::from_secs_f64(
                    (1.0 - level) * 60.0 / f64::from(self.per_minute),
                ));
            }
            if !buckets.contains_key(&source) && buckets.len() >= MAX_SOURCES {
                buckets.retain(|_, b| self.level(*b, now) < full);
            }
            (buckets.contains_key(&source) || buckets.len() < MAX_SOURCES).then(|| {
                buckets.insert(source, (level - 1.0, now));
                level - 1.0 < 1.0
            })
        };
        match verify() {
            Some(good) => {
                if taken.is_some() {
                    self.give_back(source, now);
                }
                Verdict::Good(good)
            }
            None => Verdict::Bad { limited: taken },
        }
    }

    /// Returns the allowance a good token took; a full bucket is forgotten.
    fn give_back(&self, source: IpAddr, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = buckets.get_mut(&source) {
            let level = self.level(*bucket, now) + 1.0;
            if level >= f64::from(self.per_minute) {
                buckets.remove(&source);
            } else {
                *bucket = (level, now);
            }
        }
    }
}

/// What [`Guesses::attempt`] came to.
#[derive(Debug, PartialEq)]
pub enum Verdict<T> {
    /// The token verified; what it took from the source's allowance was given back.
    Good(T),
    /// It did not, and was charged: `limited` says whether the source's bucket is now empty, or
    /// is `None` when too many sources are limited to track one more.
    Bad { limited: Option<bool> },
    /// The source's bucket is empty for this long: nothing was verified.
    Held(Duration),
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn presented_token(headers: &HeaderMap) -> Option<String> {
    let bearer = bearer(headers).map(str::to_string);
    bearer.or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value.to_string())
    })
}

fn query_token(uri: &Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

/// Guards `/metrics` when it has a token, and everything but the probes and `/metrics` when a
/// console token is required; answers 429 to a source that presented too many bad tokens; puts
/// the security headers on every response. `/?token=T` with a valid T sets the console's cookie
/// and sends the browser on to `/`, so the token leaves the address bar and the history.
pub async fn guard(State(access): State<Access>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if let (true, Some(wanted)) = (path == "/metrics", &access.metrics_token) {
        if let Some(presented) = bearer(request.headers()) {
            let verify = || (hash(presented) == *wanted).then_some(());
            match access.guesses.attempt(peer, Instant::now(), verify) {
                Verdict::Good(()) => return next.run(request).await,
                Verdict::Held(wait) => return too_many(&access, wait),
                Verdict::Bad { limited } => bad_token(&access, peer, &path, limited),
            }
        }
        let mut r = (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tapgraph metrics\""),
        );
        return r;
    }
    if open_path(&path) {
        return next.run(request).await;
    }
    let mut response = if !access.required {
        next.run(request).await
    } else {
        let presented = presented_token(request.headers());
        let query = query_token(request.uri()).map(str::to_string);
        if presented.is_none() && query.is_none() {
            unauthorized(&path)
        } else {
            let verify = || {
                if presented
                    .as_deref()
                    .is_some_and(|t| access.tokens.check(t).is_some())
                {
                    return Some(Pass::Presented);
                }
                let text = query?;
                let token = access.tokens.check(&text)?;
                Some(Pass::Query(text, token))
            };
            match access.guesses.attempt(peer, Instant::now(), verify) {
                Verdict::Held(wait) => too_many(&access, wait),
                Verdict::Good(Pass::Presented) => next.run(request).await,
                Verdict::Good(Pass::Query(text, token)) => {
                    let max_age = token.expires_at_ms.saturating_sub(now_ms()) / 1000;
                    let secure = if access.secure { "; Secure" } else { "" };
                    let cookie = format!(
                        "{COOKIE}={text}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
                    );
                    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        r.headers_mut().insert(header::SET_COOKIE, v);
                    }
                    r
                }
                Verdict::Bad { limited } => {
                    bad_token(&access, peer, &path, limited);
                    let mut r = unauthorized(&path);
                    // A stale cookie is sent with every request: forget it, so one page load is one failure.
                    let secure = if access.secure { "; Secure" } else { "" };
                    let clear =
                        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
                    if let Ok(v) = HeaderValue::from_str(&clear) {
                        r.headers_mut().insert(header::SET_COOKIE, v);
                    }
                    r
                }
            }
        }
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if path.starts_with("/api/") {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A console token that verified: the one the request carries, or `?token=` (a cookie is set).
enum Pass {
    Presented,
    Query(String, ConsoleToken),
}

/// Counts and logs a bad token, naming the source and the path, never the token; `limited` as
/// [`Verdict::Bad`] has it.
fn bad_token(access: &Access, peer: IpAddr, path: &str, limited: Option<bool>) {
    access.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
    match limited {
        Some(limited) => tracing::warn!(
            source = %peer,
            path,
            limited,
            "bad access token refused"
        ),
        None => {
            if let Some(n) = access.guesses.untracked.due() {
                tracing::warn!(
                    source = %peer,
                    path,
                    failures = n,
                    "bad access tokens refused from more sources than are tracked"
                );
            }
        }
    }
}

/// 429 to a source that presented too many bad tokens; it may try again after `wait`.
fn too_many(access: &Access, wait: Duration) -> Response {
    access.stats.auth_limited.fetch_add(1, Ordering::Relaxed);
    let wait = wait.as_secs_f64().ceil() as u64;
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        "too many bad access tokens from this address; try again later\n",
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&wait.max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// 401 that says how to get in and nothing else.
fn unauthorized(path: &str) -> Response {
    const HOW: &str = "A console access token is required: run `tapgraphctl console token` and open the address it prints";
    if path.starts_with("/api/") {
        let body = serde_json::json!({ "error": HOW });
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tapgraph</title></head>\
         <body><h1>tapgraph</h1><p>{}.</p></body></html>\n",
        HOW.replace('`', "")
    );
    html(StatusCode::UNAUTHORIZED, page)
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Whether the console's files were built into this binary.
pub fn built() -> bool {
    Assets::get("index.html").is_some()
}

/// The console's files: `/` is index.html; hashed assets are cached for good.
pub async fn asset(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    if path.starts_with("api/") {
        let body = serde_json::json!({ "error": format!("no such endpoint: {}", uri.path()) });
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
    let path = if path.is_empty() { "index.html" } else { path };
    match Assets::get(path) {
        Some(file) => {
            let cache = if path.starts_with("assets/") {
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            };
            let mime = file.metadata.mimetype().to_string();
            Response::builder()
                .header(header::CONTENT_TYPE, mime)
                .header(header::CACHE_CONTROL, cache)
                .body(Body::from(file.data.into_owned()))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        None if !built() && path == "index.html" => html(StatusCode::OK, not_built_page()),
        None => html(
            StatusCode::NOT_FOUND,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tapgraph</title></head>\
             <body><p>Not found.</p></body></html>\n"
                .into(),
        ),
    }
}

/// What a controller built without the console shows at `/`.
fn not_built_page() -> String {
    "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tapgraph console</title></head><body>\
     <h1>tapgraph</h1>\
     <p>The web console was not built into this controller: it was compiled without <code>console/dist</code>.</p>\
     <p>Build it with Node.js and npm, then rebuild the controller:</p>\
     <pre>npm --prefix console ci\nnpm --prefix console run build\ncargo build --workspace --bins</pre>\
     <p><code>scripts/quickstart</code> and <code>scripts/test</code> do both. The read-only API works without it: \
     <a href=\"/api/v1/graph\">/api/v1/graph</a>, <a href=\"/api/v1/agents\">/api/v1/agents</a>, \
     <a href=\"/api/v1/policies\">/api/v1/policies</a>, <a href=\"/api/v1/mirror\">/api/v1/mirror</a>, \
     <a href=\"/metrics\">/metrics</a>.</p></body></html>\n"
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> (tempfile::TempDir, ConsoleTokens) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        (dir, ConsoleTokens::load(store).unwrap())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_token_checks_until_revoked_and_survives_a_restart() {
        let (dir, t) = tokens();
        let (text, token) = t
            .create(Duration::from_secs(60), "laptop".into(), "alice".into())
            .unwrap();
        assert!(text.starts_with("tgc."));
        assert_eq!(t.check(&text).map(|x| x.id), Some(token.id.clone()));
        assert!(
            !serde_json::to_string(&token)
                .unwrap()
                .contains(text.rsplit('.').next().unwrap())
        );
        drop(t);
        let again =
            ConsoleTokens::load(Store::open(&dir.path().join("store.redb")).unwrap()).unwrap();
        assert!(again.check(&text).is_some(), "tokens persist");
        assert!(again.revoke(&token.id).unwrap());
        assert!(again.check(&text).is_none());
        assert!(!again.revoke(&token.id).unwrap());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn wrong_expired_and_malformed_tokens_fail() {
        let (_dir, t) = tokens();
        let (text, _) = t
            .create(Duration::from_secs(60), String::new(), "alice".into())
            .unwrap();
        let (id, _) = split(PREFIX, &text).unwrap();
        assert!(t.check(&format!("tgc.{id}.{}", "0".repeat(32))).is_none());
        assert!(t.check(&text.replace("tgc.", "tgj.")).is_none());
        assert!(t.check("tgc.nothex.x").is_none());
        assert!(t.check("").is_none());
        let (gone, _) = t
            .create(Duration::ZERO, String::new(), "alice".into())
            .unwrap();
        assert!(t.check(&gone).is_none(), "expired");
        assert_eq!(t.list().len(), 1, "expired ones are not listed");
    }

    /// Waits up to 10 s for `check` to hold, polling.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within 10 s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_a_token_created_through_one_replica_works_on_another_until_revoked() {
        let Some(pg) = crate::store::testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::store::StoreSettings::Postgres(pg);
        let a = Store::connect(&settings, dir.path(), "a").await.unwrap();
        let b = Store::connect(&settings, dir.path(), "b").await.unwrap();
        let (a, b) = (
            ConsoleTokens::load(a).unwrap(),
            ConsoleTokens::load(b).unwrap(),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let following = [
            tokio::spawn(a.clone().follow(stop.clone())),
            tokio::spawn(b.clone().follow(stop.clone())),
        ];
        let (text, token) = a
            .create(Duration::from_secs(60), "laptop".into(), "alice".into())
            .unwrap();
        eventually("B accepts the token", || b.check(&text).is_some()).await;
        assert_eq!(b.list(), std::slice::from_ref(&token));
        // Created through B and revoked through A at once, before A may have heard of it: the
        // store decides, and B forgets it.
        let (other, other_token) = b
            .create(Duration::from_secs(60), String::new(), "bob".into())
            .unwrap();
        assert!(a.revoke(&other_token.id).unwrap(), "the store knows it");
        eventually("B refuses the revoked token", || b.check(&other).is_none()).await;
        assert!(b.revoke(&token.id).unwrap());
        eventually("A refuses the revoked token", || a.check(&text).is_none()).await;
        assert!(a.list().is_empty() && b.list().is_empty());
        stop.cancel();
        for f in following {
            f.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_token_changes_the_database_refuses_are_unavailable_and_change_nothing() {
        let Some(pg) = crate::store::testpg::database().await else {
            return;
        };
        let (proxy, through) = crate::policies::testproxy::Proxy::start(&pg).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(
            &crate::store::StoreSettings::Postgres(through),
            dir.path(),
            "a",
        )
        .await
        .unwrap();
        let t = ConsoleTokens::load(store).unwrap();
        let (text, token) = t
            .create(Duration::from_secs(60), String::new(), "alice".into())
            .unwrap();
        proxy.cut();
        let e = t
            .create(Duration::from_secs(60), String::new(), "alice".into())
            .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(e.to_string().contains(&proxy.addr().to_string()), "{e}");
        let e = t.revoke(&token.id).unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert_eq!(t.list(), [token], "nothing changed");
        assert!(t.check(&text).is_some(), "the token still works");
    }

    /// A bad token from `source` at `now`.
    fn guess(g: &Guesses, source: IpAddr, now: Instant) -> Verdict<()> {
        g.attempt(source, now, || None)
    }

    #[test]
    fn bad_tokens_are_limited_per_source_and_refill() {
        let g = Guesses::new(3);
        let t0 = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let bad = |limited| Verdict::Bad {
            limited: Some(limited),
        };
        assert_eq!(guess(&g, a, t0), bad(false));
        assert_eq!(guess(&g, a, t0), bad(false));
        assert_eq!(guess(&g, a, t0), bad(true), "the third empties the bucket");
        let Verdict::Held(wait) = guess(&g, a, t0) else {
            panic!("an empty bucket verifies nothing");
        };
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        assert_eq!(
            g.attempt(a, t0, || Some(())),
            Verdict::Held(wait),
            "not even a good token"
        );
        assert_eq!(
            guess(&g, b, t0),
            bad(false),
            "another source is not held up"
        );
        assert_eq!(
            guess(&g, a, t0 + Duration::from_secs(20)),
            bad(true),
            "one refills in 20 s"
        );
        // One IPv6 /64 is one source.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for _ in 0..3 {
            guess(&g, v6("2001:db8::1"), t0);
        }
        assert!(matches!(
            guess(&g, v6("2001:db8::ffff"), t0),
            Verdict::Held(_)
        ));
    }

    #[test]
    fn good_tokens_give_back_what_they_took() {
        let g = Guesses::new(3);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for n in 0..100 {
            assert_eq!(g.attempt(a, t0, || Some(n)), Verdict::Good(n));
        }
        assert_eq!(
            guess(&g, a, t0),
            Verdict::Bad {
                limited: Some(false)
            }
        );
        assert_eq!(g.attempt(a, t0, || Some(1)), Verdict::Good(1));
        assert_eq!(
            guess(&g, a, t0),
            Verdict::Bad {
                limited: Some(false)
            }
        );
        assert_eq!(
            guess(&g, a, t0),
            Verdict::Bad {
                limited: Some(true)
            }
        );
    }

    /// Many requests from one source at once, each with a bad token that takes a while to
    /// verify: no more are verified than the bucket holds. Checking the bucket and charging it
    /// in two steps let every request in flight through the check first.
    #[test]
    fn concurrent_guesses_verify_no_more_than_the_budget() {
        const PER_MINUTE: usize = 10;
        const AT_ONCE: usize = 64;
        let g = Guesses::new(PER_MINUTE as u32);
        let t0 = Instant::now();
        let source: IpAddr = "10.0.0.1".parse().unwrap();
        let verified = std::sync::atomic::AtomicUsize::new(0);
        let start = std::sync::Barrier::new(AT_ONCE);
        let verdicts: Vec<Verdict<()>> = std::thread::scope(|s| {
            let guessing: Vec<_> = (0..AT_ONCE)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        g.attempt(source, t0, || {
                            verified.fetch_add(1, Ordering::SeqCst);
                            // A slow check: the other requests arrive meanwhile.
                            std::thread::sleep(Duration::from_millis(20));
                            None
                        })
                    })
                })
                .collect();
            guessing.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(verified.load(Ordering::SeqCst), PER_MINUTE);
        let held = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Held(_)))
            .count();
        assert_eq!(held, AT_ONCE - PER_MINUTE);
    }

    #[test]
    fn past_the_tracked_sources_new_ones_are_not_locked_out() {
        let g = Guesses::new(1);
        let t0 = Instant::now();
        for n in 0..MAX_SOURCES as u32 {
            assert_eq!(
                guess(&g, IpAddr::from((0x0a00_0000 + n).to_be_bytes()), t0),
                Verdict::Bad {
                    limited: Some(true)
                }
            );
        }
        let newcomer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            g.attempt(newcomer, t0, || Some(())),
            Verdict::Good(()),
            "a good token may still be presented"
        );
        assert_eq!(
            guess(&g, newcomer, t0),
            Verdict::Bad { limited: None },
            "not tracked"
        );
        // Once the others refill they are forgotten, and the newcomer is tracked.
        assert_eq!(
            guess(&g, newcomer, t0 + Duration::from_secs(61)),
            Verdict::Bad {
                limited: Some(true)
            }
        );
    }

    #[test]
    fn tokens_are_read_from_bearer_or_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; tapgraph_console=tgc.x.y"),
        );
        assert_eq!(presented_token(&h).as_deref(), Some("tgc.x.y"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tgc.z.w"),
        );
        assert_eq!(presented_token(&h).as_deref(), Some("tgc.z.w"));
        let uri: Uri = "/?x=1&token=tgc.a.b".parse().unwrap();
        assert_eq!(query_token(&uri), Some("tgc.a.b"));
    }
}
