//! Enrollment: one task owns the join tokens, the enrolled agents, the revocation list and the CA
//! key. It signs certificates, and writes every change through to the state store before it answers.
//!
//! An agent id is an identity: a host keeps one only by proving it holds the key of a certificate
//! issued for it (its CSR is signed by that key), or with a join token an operator made for that id
//! (`token create --replaces`). Knowing a hostname and a machine id proves nothing: anyone else gets
//! the next free id (`vm-2`). Ids are decided in this one task, so racing enrollments are ordered.
//!
//! Replicas sharing one database (`store.backend = "postgres"`) each run this task. Each decision
//! (a token's use, an id, a renewal, a revocation) is committed with the stored values it was made
//! from as preconditions: when another replica changed one meanwhile, nothing is written, the row
//! is read again and the decision made again, so replicas racing for a token's last use or for the
//! same free id have exactly one winner. The task also follows what the other replicas write
//! (`Store::changes`): their tokens and agents, and with them the revocations and keys every agent
//! RPC checks; a revocation made elsewhere closes the agent's streams here too.
//!
//! Here: the task, its handle and its commands. Beside it: `agents.rs` (the agents' records, and the
//! revocations and keys they publish to `auth::Revocations`), `claim.rs` (which id a host gets),
//! `tokens.rs` (join tokens), `limits.rs` (per-source and fleet-wide rates), `ca.rs` (the CA key and
//! the serving certificate) and `service.rs` (the gRPC handler).

mod agents;
pub mod ca;
mod claim;
pub mod limits;
#[cfg(test)]
mod replicas;
pub mod seal;
pub mod service;
pub mod tokens;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use redb::{TableDefinition, TableHandle};
use tapgraph::identity::Identity;
use tapgraph::pki::{CertAuthority, PkiError};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::Status;

use crate::auth::Revocations;
use crate::events::Events;
use crate::registry::Registry;
use crate::store::{Batch, Change, Store, StoreError, Table};
pub use agents::EnrolledAgent;
use claim::{Claim, id_base};
use limits::EnrollLimits;
use tokens::{Token, TokenError};

const TOKENS: Table = TableDefinition::new("tokens");
const AGENTS: Table = TableDefinition::new("agents");

/// Tries of a read-decide-write that other replicas keep changing under it, before giving up
/// (ABORTED): each lost race means another replica's write went through.
const ATTEMPTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("agent {0} is revoked")]
    Revoked(String),
    #[error("agent {0} was not enrolled by this controller")]
    NotEnrolled(String),
    #[error("no agent or token named {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    /// A limit of `limits.rs`; the message names it and says when to retry.
    #[error("{0}")]
    Limited(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EnrollError {
    /// A refusal the caller caused (a bad token, CSR or request), which counts against its source;
    /// a limit or the controller's own trouble does not.
    fn is_callers_fault(&self) -> bool {
        !matches!(self, Self::Limited(_) | Self::Store(_))
    }
}

impl From<EnrollError> for Status {
    fn from(e: EnrollError) -> Status {
        let msg = e.to_string();
        match e {
            EnrollError::Token(TokenError::Malformed) | EnrollError::Invalid(_) => {
                Status::invalid_argument(msg)
            }
            EnrollError::Token(_) | EnrollError::Revoked(_) => Status::permission_denied(msg),
            EnrollError::Pki(_) => Status::invalid_argument(msg),
            EnrollError::NotEnrolled(_) | EnrollError::Precondition(_) => {
                Status::failed_precondition(msg)
            }
            EnrollError::NotFound(_) => Status::not_found(msg),
            EnrollError::Limited(_) => Status::resource_exhausted(msg),
            // Lost every race for a row other replicas kept changing: the caller may try again.
            EnrollError::Store(StoreError::Conflict { .. }) => Status::aborted(msg),
            // The database is down (the text names it), or the store failed: nothing changed.
            EnrollError::Store(_) => Status::unavailable(msg),
        }
    }
}

/// What an agent sends to enroll, and where from.
pub struct EnrollRequest {
    pub peer: SocketAddr,
    pub token: String,
    pub csr_pem: String,
    pub hostname: String,
    pub machine_id: String,
    /// The id the agent asks for, if any; otherwise its hostname is the base.
    pub requested_id: String,
}

/// What an agent receives when it enrolls.
pub struct Enrolled {
    pub agent_id: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub labels: BTreeMap<String, String>,
    pub not_after_ms: u64,
}

pub struct NewToken {
    pub text: String,
    pub token: Token,
}

type Reply<T> = oneshot::Sender<Result<T, EnrollError>>;

enum Command {
    CreateToken {
        ttl: Duration,
        uses: u32,
        labels: BTreeMap<String, String>,
        description: String,
        replaces: Option<String>,
        reply: Reply<NewToken>,
    },
    ListTokens {
        reply: oneshot::Sender<Vec<Token>>,
    },
    RevokeToken {
        id: String,
        reply: Reply<()>,
    },
    Enroll {
        request: EnrollRequest,
        reply: Reply<Enrolled>,
    },
    Renew {
        agent_id: String,
        csr_pem: String,
        reply: Reply<Enrolled>,
    },
    ListAgents {
        reply: oneshot::Sender<Vec<EnrolledAgent>>,
    },
    RevokeAgent {
        id: String,
        reply: Reply<()>,
    },
    Labels {
        id: String,
        reply: oneshot::Sender<BTreeMap<String, String>>,
    },
    SetLabels {
        id: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
        reply: Reply<BTreeMap<String, String>>,
    },
}

/// A handle to the enrollment task.
#[derive(Clone)]
pub struct Enrollment {
    tx: mpsc::Sender<Command>,
    revocations: Revocations,
    fingerprint: String,
    refused: limits::Refused,
}

/// The stored tokens and agents, by id.
type Loaded = (BTreeMap<String, Token>, BTreeMap<String, EnrolledAgent>);

fn load(store: &Store) -> Result<Loaded, StoreError> {
    let tokens = store
        .load::<Token>(TOKENS)?
        .into_iter()
        .map(|t| (t.id.clone(), t))
        .collect();
    let agents = store
        .load::<EnrolledAgent>(AGENTS)?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    Ok((tokens, agents))
}

/// What a revoked agent's streams are closed with, on every replica.
fn revoked_status(id: &str) -> Status {
    Status::permission_denied(format!("the certificate of agent {id} was revoked"))
}

fn now_ms() -> u64 {
    tapgraph::time::unix_nanos() / 1_000_000
}

impl Enrollment {
    /// Loads tokens and agents from `store` and starts the task.
    pub fn spawn(
        store: Store,
        ca: CertAuthority,
        agent_lifetime: Duration,
        registry: Registry,
        events: Events,
        limits: EnrollLimits,
    ) -> Result<(Self, impl std::future::Future<Output = ()>), StoreError> {
        let changes = store.changes();
        let (tokens, agents) = load(&store)?;
        let revocations = agents::revocations(agents.values());
        let (tx, rx) = mpsc::channel(256);
        let fingerprint = ca.fingerprint();
        let refused = limits.refused();
        let task = Task {
            store,
            ca,
            tokens,
            agents,
            revocations: revocations.clone(),
            registry,
            events,
            limits,
            agent_lifetime,
        };
        Ok((
            Self {
                tx,
                revocations,
                fingerprint,
                refused,
            },
            task.run(rx, changes),
        ))
    }

    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Enrollments refused by a limit: (per source, `enrollment.rate`).
    pub fn refused(&self) -> (u64, u64) {
        self.refused.read()
    }

    pub fn ca_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EnrollError> {
        let (reply, rx) = oneshot::channel();
        let gone = || EnrollError::Store(StoreError::closed());
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// A join token; with `replaces`, one use that gives the enrolling host that agent id.
    pub async fn create_token(
        &self,
        ttl: Duration,
        uses: u32,
        labels: BTreeMap<String, String>,
        description: String,
        replaces: Option<String>,
    ) -> Result<NewToken, EnrollError> {
        self.call(|reply| Command::CreateToken {
            ttl,
            uses,
            labels,
            description,
            replaces,
            reply,
        })
        .await
    }

    pub async fn list_tokens(&self) -> Vec<Token> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::ListTokens { reply }).await;
        rx.await.unwrap_or_default()
    }

    pub async fn revoke_token(&self, id: String) -> Result<(), EnrollError> {
        self.call(|reply| Command::RevokeToken { id, reply }).await
    }

    pub async fn enroll(&self, request: EnrollRequest) -> Result<Enrolled, EnrollError> {
        self.call(|reply| Command::Enroll { request, reply }).await
    }

    pub async fn renew(&self, agent_id: String, csr_pem: String) -> Result<Enrolled, EnrollError> {
        self.call(|reply| Command::Renew {
            agent_id,
            csr_pem,
            reply,
        })
        .await
    }

    pub async fn list_agents(&self) -> Vec<EnrolledAgent> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::ListAgents { reply }).await;
        rx.await.unwrap_or_default()
    }

    pub async fn revoke_agent(&self, id: String) -> Result<(), EnrollError> {
        self.call(|reply| Command::RevokeAgent { id, reply }).await
    }

    /// The labels of agent `id` (from its token and operators); empty for an unknown agent.
    pub async fn labels(&self, id: &str) -> BTreeMap<String, String> {
        let (reply, rx) = oneshot::channel();
        let _ = self
            .tx
            .send(Command::Labels {
                id: id.to_string(),
                reply,
            })
            .await;
        rx.await.unwrap_or_default()
    }

    /// Sets and removes labels of agent `id`; returns the labels it has now.
    pub async fn set_labels(
        &self,
        id: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<BTreeMap<String, String>, EnrollError> {
        self.call(|reply| Command::SetLabels {
            id,
            set,
            remove,
            reply,
        })
        .await
    }
}

struct Task {
    store: Store,
    ca: CertAuthority,
    tokens: BTreeMap<String, Token>,
    agents: BTreeMap<String, EnrolledAgent>,
    revocations: Revocations,
    registry: Registry,
    events: Events,
    limits: EnrollLimits,
    agent_lifetime: Duration,
}

impl Task {
    /// Handles commands one at a time, and follows what other replicas write to the tables this
    /// task owns (`changes`, subscribed before the first load so nothing falls between).
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut changes: broadcast::Receiver<Change>,
    ) {
        let mut following = true;
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                change = changes.recv(), if following => {
                    following = self.follow(change).await;
                }
            }
        }
    }

    /// Commands are handled one at a time: two enrollments racing for a token's last use on this
    /// replica are ordered here, and between replicas the store's preconditions order them.
    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::CreateToken {
                ttl,
                uses,
                labels,
                description,
                replaces,
                reply,
            } => {
                let result = self
                    .create_token(ttl, uses, labels, description, replaces)
                    .await;
                let _ = reply.send(result);
            }
            Command::ListTokens { reply } => {
                let _ = reply.send(self.tokens.values().cloned().collect());
            }
            Command::RevokeToken { id, reply } => {
                let _ = reply.send(self.revoke_token(&id).await);
            }
            Command::Enroll { request, reply } => {
                let _ = reply.send(self.enroll_limited(&request).await);
            }
            Command::Renew {
                agent_id,
                csr_pem,
                reply,
            } => {
                let result = self.renew(&agent_id, &csr_pem).await;
                if let Err(error) = &result {
                    tracing::warn!(agent = %agent_id, %error, "renewal refused");
                }
                let _ = reply.send(result);
            }
            Command::ListAgents { reply } => {
                let _ = reply.send(self.agents.values().cloned().collect());
            }
            Command::RevokeAgent { id, reply } => {
                let result = self.revoke_agent(&id).await;
                let _ = reply.send(result);
            }
            Command::Labels { id, reply } => {
                // An agent enrolled through another replica a moment ago is read from the store.
                let labels = match self.agent(&id).await {
                    Ok(agent) => agent.map(|a| a.labels),
                    Err(error) => {
                        tracing::warn!(agent = %id, %error, "cannot read the agent's labels");
                        None
                    }
                };
                let _ = reply.send(labels.unwrap_or_default());
            }
            Command::SetLabels {
                id,
                set,
                remove,
                reply,
            } => {
                let result = self.set_labels(&id, set, remove).await;
                let _ = reply.send(result);
            }
        }
    }

    /// Applies a change another replica made; `false` once the store has no more to say.
    async fn follow(&mut self, change: Result<Change, RecvError>) -> bool {
        let result = match change {
            Ok(Change::Row { table, key }) => self.reread(&table, &key).await,
            Ok(Change::Resync) | Err(RecvError::Lagged(_)) => self.reload().await,
            Err(RecvError::Closed) => return false,
        };
        if let Err(error) = result {
            // The store announces a resync once it is reachable again.
            tracing::warn!(%error, "cannot read what another replica changed; reading again once the database is back");
        }
        true
    }

    /// Reads `key` of `table` again (if it is one of this task's) and applies it: a token as it
    /// is, an agent as [`Task::apply_agent`] does.
    async fn reread(&mut self, table: &str, key: &str) -> Result<(), StoreError> {
        if table == TOKENS.name() {
            match self.store.get::<Token>(TOKENS, key)? {
                Some(token) => self.tokens.insert(key.to_string(), token),
                None => self.tokens.remove(key),
            };
        } else if table == AGENTS.name() {
            let agent = self.store.get::<EnrolledAgent>(AGENTS, key)?;
            self.apply_agent(key, agent).await;
        }
        Ok(())
    }

    /// Reads both tables whole and applies the difference, after changes may have been missed.
    async fn reload(&mut self) -> Result<(), StoreError> {
        let (tokens, agents) = load(&self.store)?;
        self.tokens = tokens;
        let gone: Vec<String> = self
            .agents
            .keys()
            .filter(|id| !agents.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.apply_agent(&id, None).await;
        }
        for (id, agent) in agents {
            if self.agents.get(&id) != Some(&agent) {
                self.apply_agent(&id, Some(agent)).await;
            }
        }
        Ok(())
    }

    /// Makes `agent` (as stored now; `None`: deleted) the record of `id` here: its keys, its
    /// labels (the registry re-resolves its policy), and a revocation made through another
    /// replica, whose streams on this one are closed as a local revocation closes them.
    async fn apply_agent(&mut self, id: &str, agent: Option<EnrolledAgent>) {
        let Some(agent) = agent else {
            self.agents.remove(id);
            self.revocations.remember_keys(id, "", "");
            return;
        };
        let newly_revoked = agent.revoked_at_ms.is_some() && !self.revocations.is_revoked(id);
        let relabelled = self.agents.get(id).map(|a| &a.labels) != Some(&agent.labels);
        self.revocations
            .remember_keys(id, &agent.key_sha256, &agent.previous_key_sha256);
        if relabelled {
            // Its policy may change: the agent gets it here if it is connected here.
            self.registry.set_labels(id, agent.labels.clone()).await;
        }
        self.agents.insert(id.to_string(), agent);
        if newly_revoked {
            self.revocations.revoke(id);
            self.registry.close_agent(id, revoked_status(id)).await;
            tracing::info!(agent = %id, "agent revoked through another replica; its streams here are closed");
        }
    }

    /// Whether to try a read-decide-write again after `error`: yes when another replica changed
    /// what it was computed from (the changed row is read again first), up to [`ATTEMPTS`].
    async fn retry(&mut self, error: &EnrollError, attempt: u32) -> Result<bool, EnrollError> {
        let EnrollError::Store(StoreError::Conflict { table, key }) = error else {
            return Ok(false);
        };
        if attempt >= ATTEMPTS {
            return Ok(false);
        }
        tracing::debug!(%table, %key, attempt, "changed by another replica meanwhile; deciding again");
        self.reread(table, key).await?;
        Ok(true)
    }

    async fn create_token(
        &mut self,
        ttl: Duration,
        uses: u32,
        labels: BTreeMap<String, String>,
        description: String,
        replaces: Option<String>,
    ) -> Result<NewToken, EnrollError> {
        if let Some(id) = &replaces {
            if uses != 1 {
                return Err(EnrollError::Invalid(format!(
                    "a token that replaces agent {id} has exactly one use, not {uses}"
                )));
            }
            let agent = self.record(id).await?;
            if agent.revoked_at_ms.is_some() || self.revocations.is_revoked(id) {
                return Err(EnrollError::Revoked(id.clone()));
            }
        }
        let (text, token) = Token::generate(
            now_ms(),
            ttl.as_millis() as u64,
            uses,
            labels,
            description,
            replaces,
        );
        self.store.put(TOKENS, &token.id, &token)?;
        self.tokens.insert(token.id.clone(), token.clone());
        tracing::info!(token = %token.id, uses, ttl = ?ttl, replaces = ?token.replaces, "join token created");
        Ok(NewToken { text, token })
    }

    async fn revoke_token(&mut self, id: &str) -> Result<(), EnrollError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.try_revoke_token(id).await {
                Ok(()) => break,
                Err(error) => error,
            };
            if !self.retry(&error, attempt).await? {
                return Err(error);
            }
        }
        tracing::info!(token = %id, "join token revoked");
        Ok(())
    }

    async fn try_revoke_token(&mut self, id: &str) -> Result<(), EnrollError> {
        let stored = self.token(id).await?;
        let mut token = stored
            .clone()
            .ok_or_else(|| EnrollError::NotFound(id.to_string()))?;
        token.revoked = true;
        let mut batch = Batch::default();
        batch.expect(TOKENS, id, stored.as_ref())?;
        batch.put(TOKENS, id, &token)?;
        self.store.commit(batch)?;
        self.tokens.insert(id.to_string(), token);
        Ok(())
    }

    /// Token `id` as this replica knows it, or as the store has it when this replica has not
    /// heard of it yet (made through another replica a moment ago).
    async fn token(&mut self, id: &str) -> Result<Option<Token>, StoreError> {
        if !self.tokens.contains_key(id) {
            self.reread(TOKENS.name(), id).await?;
        }
        Ok(self.tokens.get(id).cloned())
    }

    /// An enrollment within the limits; a refusal the caller caused counts against its source.
    async fn enroll_limited(&mut self, request: &EnrollRequest) -> Result<Enrolled, EnrollError> {
        // A refused flood is not logged per attempt: its source is, once, below.
        self.limits
            .admit(request.peer, Instant::now())
            .map_err(EnrollError::Limited)?;
        tracing::info!(peer = %request.peer, hostname = %request.hostname, "enrollment request");
        let result = self.enroll(request).await;
        if let Err(error) = &result {
            tracing::warn!(peer = %request.peer, hostname = %request.hostname, %error, "enrollment refused");
            if error.is_callers_fault() && self.limits.failed(request.peer, Instant::now()) {
                tracing::warn!(source = %limits::source(request.peer), limit = limits::FAILURE_BURST, "enrollment source used up its failed attempts; its attempts are refused until it waits");
            }
        }
        result
    }

    async fn enroll(&mut self, request: &EnrollRequest) -> Result<Enrolled, EnrollError> {
        if request.hostname.is_empty() || request.hostname.len() > 255 {
            return Err(EnrollError::Invalid(
                "hostname must be 1 to 255 bytes".into(),
            ));
        }
        if request.machine_id.len() > 128 {
            return Err(EnrollError::Invalid(
                "machine_id is longer than 128 bytes".into(),
            ));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.try_enroll(request).await {
                Ok(enrolled) => return Ok(enrolled),
                Err(error) => error,
            };
            if !self.retry(&error, attempt).await? {
                return Err(error);
            }
        }
    }

    /// One read-decide-write of an enrollment: it commits only if the token and the agent id
    /// are still as they were read, so replicas racing for a token's last use, or for one free
    /// id, have exactly one winner ([`StoreError::Conflict`] for the others).
    async fn try_enroll(&mut self, request: &EnrollRequest) -> Result<Enrolled, EnrollError> {
        let (token_id, secret) = tokens::parse(&request.token)?;
        let stored_token = self
            .token(token_id)
            .await?
            .ok_or_else(|| TokenError::Unknown(token_id.to_string()))?;
        let mut token = stored_token.clone();
        let now = now_ms();
        token.check(secret, now)?;
        // The CSR's signature proves the sender holds this key.
        let key = tapgraph::pki::csr_key_sha256(&request.csr_pem)?;
        let asked = id_base(if request.requested_id.is_empty() {
            &request.hostname
        } else {
            &request.requested_id
        });
        let (id, claim) = match &token.replaces {
            Some(id) => (self.approved_id(id, &token.id).await?, Claim::Approved),
            None => self.allocate_id(&asked, &key),
        };
        let identity = Identity::agent(&id).map_err(|e| EnrollError::Invalid(e.to_string()))?;
        let cert = self
            .ca
            .sign_csr(&request.csr_pem, &identity, self.agent_lifetime)?;
        let info = tapgraph::pki::cert_info(&cert.cert_pem)
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        token.uses_left -= 1;
        // A kept id keeps its keys' history; an approved replacement starts a new one, so the
        // replaced host's key no longer claims the id.
        let (key_sha256, previous_key_sha256) = match (&claim, self.agents.get(&id)) {
            (Claim::ProvedKey, Some(old)) => {
                let mut old = old.clone();
                old.rotate_key(key);
                (old.key_sha256, old.previous_key_sha256)
            }
            _ => (key, String::new()),
        };
        let agent = EnrolledAgent {
            id: id.clone(),
            hostname: request.hostname.clone(),
            machine_id: request.machine_id.clone(),
            labels: token.labels.clone(),
            enrolled_at_ms: now,
            token_id: token.id.clone(),
            cert_serial: info.serial,
            cert_not_after_ms: tapgraph::time::to_unix_nanos(info.not_after) / 1_000_000,
            revoked_at_ms: None,
            key_sha256,
            previous_key_sha256,
        };
        // Both records, or neither: the token's use and the agent are committed together.
        let mut batch = Batch::default();
        batch.expect(TOKENS, &token.id, Some(&stored_token))?;
        batch.expect(AGENTS, &id, self.agents.get(&id))?;
        batch.put(TOKENS, &token.id, &token)?;
        batch.put(AGENTS, &id, &agent)?;
        self.store.commit(batch)?;
        let why = claim.explain(&id, &token.id);
        match claim {
            Claim::Taken { .. } => {
                tracing::warn!(agent = %id, hostname = %request.hostname, token = %token.id, uses_left = token.uses_left, decision = claim.name(), reason = %why, "agent enrolled under a new id")
            }
            _ => {
                tracing::info!(agent = %id, hostname = %request.hostname, token = %token.id, uses_left = token.uses_left, decision = claim.name(), reason = %why, "agent enrolled")
            }
        }
        let fields = BTreeMap::from([
            ("decision".to_string(), claim.name().to_string()),
            ("hostname".to_string(), request.hostname.clone()),
            ("token".to_string(), token.id.clone()),
            ("asked".to_string(), asked.clone()),
        ]);
        self.events.emit_with(
            "enrolled",
            &id,
            format!("agent {id} enrolled from host {}: {why}", request.hostname),
            fields,
        );
        let enrolled = Enrolled {
            agent_id: id.clone(),
            cert_pem: cert.cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            labels: agent.labels.clone(),
            not_after_ms: agent.cert_not_after_ms,
        };
        self.tokens.insert(token.id.clone(), token);
        self.revocations
            .remember_keys(&agent.id, &agent.key_sha256, &agent.previous_key_sha256);
        self.agents.insert(id, agent);
        Ok(enrolled)
    }

    async fn renew(&mut self, id: &str, csr_pem: &str) -> Result<Enrolled, EnrollError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.try_renew(id, csr_pem).await {
                Ok(renewed) => return Ok(renewed),
                Err(error) => error,
            };
            if !self.retry(&error, attempt).await? {
                return Err(error);
            }
        }
    }

    async fn try_renew(&mut self, id: &str, csr_pem: &str) -> Result<Enrolled, EnrollError> {
        if self.revocations.is_revoked(id) {
            return Err(EnrollError::Revoked(id.to_string()));
        }
        let stored = self
            .agent(id)
            .await?
            .ok_or_else(|| EnrollError::NotEnrolled(id.to_string()))?;
        let mut agent = stored.clone();
        let identity = Identity::agent(id).map_err(|e| EnrollError::Invalid(e.to_string()))?;
        let key = tapgraph::pki::csr_key_sha256(csr_pem)?;
        let cert = self.ca.sign_csr(csr_pem, &identity, self.agent_lifetime)?;
        let info = tapgraph::pki::cert_info(&cert.cert_pem)
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        agent.rotate_key(key);
        agent.cert_serial = info.serial;
        agent.cert_not_after_ms = tapgraph::time::to_unix_nanos(info.not_after) / 1_000_000;
        let mut batch = Batch::default();
        batch.expect(AGENTS, id, Some(&stored))?;
        batch.put(AGENTS, id, &agent)?;
        self.store.commit(batch)?;
        tracing::info!(agent = %id, serial = %agent.cert_serial, "certificate renewed");
        let renewed = Enrolled {
            agent_id: id.to_string(),
            cert_pem: cert.cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            labels: agent.labels.clone(),
            not_after_ms: agent.cert_not_after_ms,
        };
        self.revocations
            .remember_keys(&agent.id, &agent.key_sha256, &agent.previous_key_sha256);
        self.agents.insert(id.to_string(), agent);
        Ok(renewed)
    }
}
